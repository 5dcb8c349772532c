"""CRFL training (Algorithm 1) with the model-replacement attack, as a resumable run.

A round is a pure state transition: from the global model w~_{t-1} every client
trains locally (all clients batched, :mod:`crfl.clients`), attackers poison and
scale in attack rounds (:mod:`crfl.attacks`), the updates are aggregated by a
registered rule (:mod:`crfl.aggregation`), and the server clips the model to
rho_t and perturbs it with sigma_t (:mod:`crfl.server`). All randomness of round
t derives from (seed, t), so a resumed run repeats an uninterrupted one exactly
and a clean *twin* run (same seed, attackers benign) sees the same batches and
the same noise (used by the certification's model-closeness check, Fig. 9a).

Run directory (owned by :mod:`crfl.rundir`: claimed, hash-checked, final files as one result set):
    config.yaml     fully resolved configuration (+ package, torch and dataset provenance)
    rounds.csv      one row per round: accuracy, attack success, norms, rho_t, sigma_t, attacker weights
    attack.json     per attack round: attackers' p_i, tau_i, q_B/n_B, gamma, eta, ||delta|| (configured, actual)
    model_final.pt  Clip_{rho_T}(w_T): the output of Algorithm 1 (and the twin's, with --twin), with the config hash
    checkpoint.pt   the state after the last finished round (for --resume), with the config hash
    summary.json    the ``training`` block (certification adds its own blocks)
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from crfl import aggregation, rundir
from crfl.clients import Poison, local_updates, nominal_poison_ratio, poison_ratio_per_step, poison_slots, round_batches
from crfl.config import Config
from crfl.data import Dataset
from crfl.lipschitz import centred_operator_norm
from crfl.server import server_step
from crfl.setup import Setup, evaluate, prepare, resolved_config
from crfl.validation import ConfigError

ROUND_COLUMNS = rundir.ROUND_COLUMNS


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

    ``trigger=False`` gives the counterfactual twin that the certificate compares with (the
    paper's D against D'): the same batches and noise, the attackers' poisoned slots keep the
    target label and the gamma scaling, only the trigger delta_x is left out.
    ``attacking=False`` drops the poisoning altogether (no label swap either); ``scaling=False``
    drops the model-replacement scaling.
    """
    cfg, plan = setup.cfg, setup.plan
    K = setup.data.num_clients
    idx = round_batches(setup.data, cfg.clients.batch_size, setup.tau, cfg.seed, t)
    active = plan.active(t)
    poison = None
    if active and attacking and plan.poison_per_batch > 0:
        deltas = torch.zeros(K, setup.dataset.num_features, dtype=setup.dtype)
        if trigger:
            for a_id, trig in plan.local_triggers.items():
                deltas[a_id] = trig.delta.to(setup.dtype)
        poison = Poison(mask=poison_slots(idx, plan.attackers, plan.poison_per_batch), deltas=deltas, target=plan.target)
    updates, stats = local_updates(setup.model, params, setup.data, idx, cfg.clients.lr, poison, setup.dtype)
    if active and scaling:
        for a_id in plan.attackers:
            updates[a_id] *= plan.gamma
    # aggregate in float64: the attackers' weights p_i enter the certificate exactly
    agg = aggregation.aggregate(cfg.aggregation.name, updates.double(), setup.weights, **cfg.aggregation.options)
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
        measured = {
            "poison_ratio_per_step": [
                poison_ratio_per_step(idx, poison.mask, a) if poison is not None else 0.0 for a in plan.attackers
            ],
            "poisoned_samples": [int(stats.count[a]) for a in plan.attackers],
            "actual_delta_norm_max": [float(stats.max_norm[a]) for a in plan.attackers],
            "actual_delta_norm_mean": [float(stats.sum_norm[a] / max(1, stats.count[a])) for a in plan.attackers],
        }
        p_total = float(w.sum()) if w is not None else None
        attack = attack_record(setup, t, params, p_eff, aggregation_info=agg.info, measured=measured, p_total=p_total)
    return RoundResult(new, info, attack, sinfo.pre_noise if active else None)


def attack_record(
    setup: Setup,
    t: int,
    start_params: torch.Tensor,
    p: list[float] | None,
    *,
    aggregation_info: dict[str, Any] | None = None,
    measured: dict[str, Any] | None = None,
    p_total: float | None = None,
) -> dict[str, Any]:
    """attack.json's entry for attack round t, from server-owned quantities only.

    The certificate's ingredients come from the server's configuration and what it sent: the
    attackers and gamma of the threat model it certifies against, tau_i and eta of the local
    training it prescribes, q_B/n_B per local step from the batch sizes of the shard it assigned
    (:func:`crfl.clients.nominal_poison_ratio`), the aggregation weight p_i it applied, and the
    broadcast model w~_{t-1} it sent (its norm and the class-centred operator norm of its weight
    matrix, which L_Z needs). ``measured`` holds what the simulator observed (bookkeeping only).
    """
    cfg, plan = setup.cfg, setup.plan
    attackers = list(plan.attackers)
    sizes = setup.data.sizes
    tau = [int(setup.tau[a]) for a in attackers]
    rec: dict[str, Any] = {
        "round": int(t),
        "attackers": attackers,
        "p": None if p is None else [float(v) for v in p],
        "configured_p": [float(setup.weights[a]) for a in attackers],
        "tau": tau,
        "gamma": [float(plan.gamma)] * len(attackers),
        "eta": [float(cfg.clients.lr)] * len(attackers),
        # the mean over local steps of q_s / n_s (> q_B/n_B when a last batch is short)
        "poison_ratio": [
            nominal_poison_ratio(int(sizes[a]), cfg.clients.batch_size, plan.poison_per_batch, tau[i])
            for i, a in enumerate(attackers)
        ],
        "nominal_poison_ratio": [plan.poison_per_batch / cfg.clients.batch_size] * len(attackers),
        "delta_norm": [float(plan.local_triggers[a].norm) for a in attackers],
        "start_norm": float(torch.linalg.vector_norm(start_params.double())),
        "start_centred_opnorm": centred_opnorm(setup, start_params),
        # the sum of every client's weight in this round (P of docs/theory.md (g)): the round's Lipschitz constant needs it
        "p_total": float(setup.weights.sum()) if p_total is None else float(p_total),
    }
    if aggregation_info:
        rec["aggregation"] = {k: v for k, v in aggregation_info.items() if isinstance(v, (int, float, str, list))}
    if measured:
        rec["measured"] = measured
    return rec


def centred_opnorm(setup: Setup, params: torch.Tensor) -> float | None:
    """||(I - 11^T/C) W||_2 of a linear model's weight matrix (None for other models); see lipschitz.lz_centred."""
    if not setup.model.is_linear:
        return None
    W, _ = setup.model.split(params.double())
    return centred_operator_norm(W)


# ---------------------------------------------------------------------------------------------
# the run


@dataclass
class TrainResult:
    out_dir: Path
    setup: Setup
    final_params: torch.Tensor
    records: list[dict[str, Any]]
    attack_log: list[dict[str, Any]]
    twin_final: torch.Tensor | None = None
    seconds: float = 0.0


class _Progress:
    """A progress bar on a terminal (redrawn in place); a line every ~10% of rounds otherwise."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled, self.t0 = total, enabled, time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.every = max(1, total // 10)

    def update(self, t: int, rec: dict[str, Any]) -> None:
        if not self.enabled or (not self.tty and t % self.every and t != self.total):
            return
        width = 28
        done = int(width * t / self.total)
        msg = f"[{'#' * done}{'.' * (width - done)}] round {t}/{self.total}"
        acc, bd = rec.get("clean_acc"), rec.get("backdoor_acc")
        if isinstance(acc, float):
            msg += f"  acc {acc:.3f}"
        if isinstance(bd, float) and not math.isnan(bd):
            msg += f"  backdoor {bd:.3f}"
        msg += f"  {time.perf_counter() - self.t0:.1f}s"
        if self.tty:
            sys.stderr.write("\r" + msg + ("\n" if t == self.total else ""))
        else:
            sys.stderr.write(msg + "\n")
        sys.stderr.flush()


def diverged(setup: Setup, t: int, what: str) -> ConfigError:
    """The error for a round whose models or updates stopped being finite: the round and the settings."""
    cfg = setup.cfg
    return ConfigError(
        f"Training diverged in round {t} of {setup.rounds}: {what} holds NaN or inf. The step size "
        f"'clients.lr' = {cfg.clients.lr!r} (with 'attack.gamma' = {cfg.attack.gamma!r}) is too large "
        "for this data; lower 'clients.lr' or 'attack.gamma'."
    )


def _round(setup: Setup, params: torch.Tensor, t: int, **kw: Any) -> RoundResult:
    """run_round, with divergence reported as the round and the setting, not an internal name."""
    try:
        res = run_round(setup, params, t, **kw)
    except ConfigError as e:
        if "finite" in str(e):
            raise diverged(setup, t, "a client update") from None
        raise
    if not bool(torch.isfinite(res.params).all()):
        raise diverged(setup, t, "the global model")
    return res


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
    """Run (or resume) Algorithm 1 into ``out_dir``. ``stop_after`` ends early after that round (tests).

    The run directory is claimed for the whole run (:mod:`crfl.rundir`): a fresh run needs a new
    or empty directory, a resume finds its config.yaml there, and a second writer is refused.
    The setup is resolved before anything is written, so a bad config or dataset leaves nothing.
    """
    if resume:
        from crfl.flower.provenance import refuse_simulator_resume

        refuse_simulator_resume(out_dir)  # a Flower run resumes over Flower, never with the simulator
        run = rundir.resume_run(out_dir)
    else:
        setup = prepare(cfg, dataset, module)
        run = rundir.create_run(out_dir)
    with run:
        if resume:
            saved = run.read_config()
            cfg = run.load_config()
            setup = prepare(cfg, dataset, module)
        twin = setup.cfg.certify.twin if twin is None else twin
        resolved = resolved_config(setup)
        if resume:
            chash = rundir.config_hash(saved)
            if chash != rundir.config_hash(resolved):
                raise rundir.RunDirError(
                    f"{run.path / rundir.CONFIG} does not resolve to itself against its data (config hash "
                    f"{chash} != {rundir.config_hash(resolved)}): the dataset changed; restore it or retrain."
                )
        try:
            if not resume:
                run.write_config(resolved)
                chash = rundir.config_hash(resolved)
            return _loop(setup, run, chash, resume=resume, progress=progress, twin=twin, stop_after=stop_after)
        except (ConfigError, OSError):
            if not resume:
                run.discard_unstarted()  # a fresh run that failed before its first checkpoint leaves nothing
            raise


def _loop(
    setup: Setup, run: rundir.RunDir, chash: str, *, resume: bool, progress: bool, twin: bool, stop_after: int | None
) -> TrainResult:
    out = run.path
    T = setup.rounds
    start, records, attack_log = 1, [], []
    params = setup.w0.clone()
    twin_params = params.clone() if twin else None
    attack_state: dict[str, Any] = {}  # the first attack round: round, pre-noise aggregate (and the twin's)
    seconds = 0.0
    ck = run.read_checkpoint() if resume else None
    if ck is not None:
        start = ck["round"] + 1
        params, records, attack_log = ck["params"], ck["records"], ck["attack_log"]
        twin_params = ck.get("twin_params") if twin else None
        attack_state = ck.get("attack_state", {})
        seconds = ck.get("seconds", 0.0)
    bar = _Progress(T, progress)
    t0 = time.perf_counter()
    for t in range(start, T + 1):
        res = _round(setup, params, t)
        params = res.params
        rec: dict[str, Any] = {"round": t, **res.info}
        if res.attack is not None:
            attack_log.append(res.attack)
            if not attack_state:
                attack_state = {"round": t, "pre_noise": res.pre_noise}
        if twin_params is not None:
            tw = _round(setup, twin_params, t, trigger=False)
            twin_params = tw.params
            if attack_state.get("round") == t:
                attack_state["twin_pre_noise"] = tw.pre_noise
            rec["twin_distance"] = float(torch.linalg.vector_norm((params - twin_params).double()))
        if t % setup.cfg.run.eval_every == 0 or t == T:
            rec["clean_acc"], rec["backdoor_acc"] = evaluate(setup, params)
        records.append(rec)
        bar.update(t, rec)
        if t == T or t % setup.cfg.run.checkpoint_every == 0 or (stop_after is not None and t >= stop_after):
            run.write_checkpoint(
                {
                    "round": t,
                    "params": params,
                    "twin_params": twin_params,
                    "attack_state": attack_state,
                    "records": records,
                    "attack_log": attack_log,
                    "seconds": seconds + time.perf_counter() - t0,
                },
                chash,
            )
        if stop_after is not None and t >= stop_after and t < T:
            return TrainResult(out, setup, params, records, attack_log, twin_params, seconds + time.perf_counter() - t0)
    seconds += time.perf_counter() - t0
    write_final(out, setup, params, records, attack_log, twin_params, seconds, attack_state=attack_state, run=run)
    return TrainResult(out, setup, params, records, attack_log, twin_params, seconds)


def write_final(
    out: Path,
    setup: Setup,
    params: torch.Tensor,
    records: list[dict[str, Any]],
    attack_log: list[dict[str, Any]],
    twin_params: torch.Tensor | None,
    seconds: float,
    extra: dict[str, Any] | None = None,
    attack_state: dict[str, Any] | None = None,
    run: rundir.RunDir | None = None,
) -> None:
    """Write the end-of-run result set (model_final.pt, rounds.csv, attack.json, summary.json's ``training``).

    Shared by the simulator and the Flower server, so both leave the same run directory. The four
    files are one staged result set (all or none). ``run``: the claimed run directory; without it
    ``out`` is claimed for the write (the caller must not hold its claim).
    """
    T = setup.rounds
    final: dict[str, Any] = {
        "params": params,
        "model": setup.model.name,
        "num_features": setup.dataset.num_features,
        "num_classes": setup.dataset.num_classes,
        "linear": setup.model.is_linear,
        "config_hash": rundir.config_hash(resolved_config(setup)),
    }
    if twin_params is not None:
        final["twin_params"] = twin_params
    if attack_state:
        # the first attack round's Clip(w_{t_adv}) before eps_{t_adv}: the mixture certificate's start
        final["attack_state"] = attack_state
    last = records[-1] if records else {}
    block = rundir.TrainingBlock(
        rounds=T,
        final_clean_acc=last.get("clean_acc"),
        final_backdoor_acc=last.get("backdoor_acc"),
        final_norm=float(torch.linalg.vector_norm(params.double())),
        attack_rounds=list(setup.plan.rounds),
        seconds=seconds,
        seconds_per_round=seconds / max(1, T),
        extra=dict(extra or {}),
    )
    log = rundir.AttackLog(setup.plan.trigger.norm, [rundir.AttackRecord(**r) for r in attack_log])
    with run.results() if run is not None else rundir.results_for(out) as rs:
        rs.write_dict_csv(rundir.ROUNDS, ROUND_COLUMNS, records)
        rs.torch_save(rundir.MODEL, final)
        rs.write_json(rundir.ATTACKS, log.to_dict())
        rs.update_summary({"training": block.to_dict()})
