"""CRFL training (Algorithm 1) with the model-replacement attack: the batched simulator's round.

:class:`SimulatorRound` is the simulator's :class:`crfl.driver.Round`; :func:`train` runs it
through the one driver (:func:`crfl.driver.drive`), which owns the loop, resume, evaluation,
checkpoints and the run directory's result set. A round is a pure state transition: from the global model w~_{t-1} every client
trains locally (all clients batched, :mod:`crfl.clients`), attackers poison and
scale in attack rounds (:mod:`crfl.attacks`), the updates are aggregated by a
registered rule (:mod:`crfl.aggregation`) in float64, and the server clips the model to
rho_t and perturbs it with sigma_t (:mod:`crfl.server`). All randomness of round
t derives from (seed, t), so a resumed run repeats an uninterrupted one exactly
and a clean *twin* run (same seed, attackers benign) sees the same batches and
the same noise (used by the certification's model-closeness check, Fig. 9a).

Run directory (owned by :mod:`crfl.rundir`: claimed, hash-checked, final files as one result set):
    config.yaml     fully resolved configuration (+ package, torch and dataset provenance)
    rounds.csv      one row per round: accuracy, attack success, norms, rho_t, sigma_t, attacker weights
                    (accuracies every ``run.eval_every`` rounds, on ``run.eval_points`` test points; round T: all)
    attack.json     per attack round: attackers' p_i, tau_i, q_B/n_B, gamma, eta, ||delta|| (configured, actual)
    model_final.pt  Clip_{rho_T}(w_T): the output of Algorithm 1 (and the twin's, with --twin), with the config hash
    checkpoint.pt   the state after the last finished round (for --resume), with the config hash
    summary.json    the ``training`` block (certification adds its own blocks)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from crfl import aggregation, ensemble, rundir
from crfl.config import Config
from crfl.data import Dataset
from crfl.driver import BaseRound, RoundOutput, TrainResult, attack_record, diverged, drive
from crfl.local import local_round
from crfl.server import server_step
from crfl.setup import Setup, prepare
from crfl.validation import ConfigError

ROUND_COLUMNS = rundir.ROUND_COLUMNS

__all__ = ["RoundResult", "SimulatorRound", "TrainResult", "run_round", "train"]


# ---------------------------------------------------------------------------------------------
# one round


@dataclass
class RoundResult:
    params: torch.Tensor
    info: dict[str, Any]
    attack: dict[str, Any] | None
    pre_noise: torch.Tensor | None = None  # Clip_{rho_t}(w_t) before eps_t (kept for attack rounds)


def run_round(
    setup: Setup, params: torch.Tensor, t: int, *, attacking: bool = True, trigger: bool = True, scaling: bool = True
) -> RoundResult:
    """Round t of Algorithm 1 from w~_{t-1} = params; returns w~_t (or Clip(w_T) when t = T).

    All N clients train at once (:func:`crfl.local.local_round`); ``trigger``, ``attacking`` and
    ``scaling`` are passed to it (``trigger=False``: the coupled certificate's clean twin).
    """
    cfg, plan = setup.cfg, setup.plan
    loc = local_round(setup, params, t, attacking=attacking, trigger=trigger, scaling=scaling)
    active = plan.active(t)
    # aggregate in float64: the attackers' weights p_i enter the certificate exactly
    agg = aggregation.aggregate(cfg.aggregation.name, loc.updates.double(), setup.weights, **cfg.aggregation.options)
    new, sinfo = server_step(
        params, agg.update.to(params.dtype), t=t, rounds=setup.rounds, rho_t=setup.rho(t),
        sigma_t=setup.sigma(t), seed=cfg.seed,
    )
    info = {
        "norm_before_clip": sinfo.norm_before_clip,
        "rho": sinfo.rho,
        "sigma": sinfo.sigma,
        "clipped": int(sinfo.clipped),
        "attack": int(active and attacking),
        "aggregation_fixed_weights": int(agg.fixed_weights),
    }
    attack = None
    if active:
        w = agg.weights
        p_eff = [float(w[a]) for a in plan.attackers] if w is not None else None
        info["attacker_weights"] = p_eff
        stats = loc.stats
        measured = {
            "poison_ratio_per_step": [loc.poison_ratio(a) for a in plan.attackers],
            "poisoned_samples": [int(stats.count[a]) for a in plan.attackers],
            "actual_delta_norm_max": [float(stats.max_norm[a]) for a in plan.attackers],
            "actual_delta_norm_mean": [float(stats.sum_norm[a] / max(1, stats.count[a])) for a in plan.attackers],
        }
        p_total = float(w.sum()) if w is not None else None
        attack = attack_record(setup, t, params, p_eff, aggregation_info=agg.info, measured=measured, p_total=p_total)
    return RoundResult(new, info, attack, sinfo.pre_noise if active else None)


@dataclass
class SimulatorRound(BaseRound):
    """The batched simulator as the driver's :class:`~crfl.driver.Round` (every client, every round)."""

    setup: Setup
    engine: str = field(default=rundir.SIMULATOR, init=False)
    trains_twin: bool = field(default=True, init=False)
    def __call__(self, params: torch.Tensor, t: int, *, trigger: bool = True) -> RoundOutput:
        try:
            res = run_round(self.setup, params, t, trigger=trigger)
        except ConfigError as e:
            if "finite" in str(e):
                raise diverged(self.setup, t, "a client update") from None
            raise
        return RoundOutput(res.params, res.info, res.attack, res.pre_noise)


# ---------------------------------------------------------------------------------------------
# the run


def train(
    cfg: Config,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = False,
    dataset: Dataset | None = None,
    module: torch.nn.Module | None = None,
    twin: bool | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Run (or resume) Algorithm 1 into ``out_dir`` with the simulator. ``stop_after`` ends early after that round (tests).

    The run directory is claimed for the whole run (:mod:`crfl.rundir`): a fresh run needs a new
    or empty directory, a resume finds its config.yaml there (written by the simulator: a Flower
    run resumes over Flower), and a second writer is refused. The setup is resolved before
    anything is written, so a bad config or dataset leaves nothing.
    """
    drawn = None
    if resume:
        run = rundir.resume_run(out_dir)
    else:
        drawn = cfg.ensemble.kind == "sampled" and cfg.ensemble.sample_seed is None
        setup = prepare(ensemble.fix_sample_seed(cfg), dataset, module)
        run = rundir.create_run(out_dir)
    with run:
        if resume:
            run.refuse_engine(rundir.SIMULATOR)  # before preparing: a Flower run is never retrained here
            setup = prepare(run.load_config(), dataset, module)
        twin = setup.cfg.certify.twin if twin is None else twin
        step = simulator_round(setup, seed_drawn=drawn)
        return drive(setup, step, run, resume=resume, twin=twin, progress=progress, stop_after=stop_after)


def simulator_round(setup: Setup, seed_drawn: bool | None = None) -> BaseRound:
    """The simulator's round for this configuration: one global model, or an ensemble of G (crfl.ensemble)."""
    if ensemble.is_ensemble(setup.cfg):
        return ensemble.EnsembleRound(setup, ensemble.build_groups(setup.cfg, setup.data.num_clients), seed_drawn)
    return SimulatorRound(setup)
