"""CRFL training (Algorithm 1) with the model-replacement attack, as a resumable run.

A round is a pure state transition: from the global model w~_{t-1} every client
trains locally (all clients batched, :mod:`crfl.clients`), attackers poison and
scale in attack rounds (:mod:`crfl.attacks`), the updates are aggregated by a
registered rule (:mod:`crfl.aggregation`), and the server clips the model to
rho_t and perturbs it with sigma_t (:mod:`crfl.server`). All randomness of round
t derives from (seed, t), so a resumed run repeats an uninterrupted one exactly
and a clean *twin* run (same seed, attackers benign) sees the same batches and
the same noise (used by the certification's model-closeness check, Fig. 9a).

Run directory (every file written atomically):
    config.yaml     fully resolved configuration (+ package, torch and dataset provenance)
    rounds.csv      one row per round: accuracy, attack success, norms, rho_t, sigma_t, attacker weights
    attack.json     per attack round: attackers' p_i, tau_i, q_B/n_B, gamma, eta, ||delta|| (configured, actual)
    model_final.pt  Clip_{rho_T}(w_T): the output of Algorithm 1 (and the twin's, with --twin)
    checkpoint.pt   the state after the last finished round (for --resume)
    summary.json    the ``training`` block (certification adds its own blocks)
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

import crfl
from crfl import aggregation
from crfl.attacks import AttackPlan, attack_rounds, backdoor_test_mask, build_plan
from crfl.clients import (
    ClientData, Poison, local_iterations, local_updates, poison_ratio_per_step, poison_slots, round_batches,
)
from crfl.config import Config, from_dict
from crfl.data import Dataset, dataset_names, load_dataset
from crfl.data.partition import partition
from crfl.io import torch_save, write_dict_csv, write_json, write_yaml
from crfl.model import Model, build_model, wrap_module
from crfl.rng import torch_generator
from crfl.schedule import RhoSchedule, SigmaSchedule
from crfl.server import server_step
from crfl.validation import ConfigError, check_choice

ROUND_COLUMNS = [
    "round", "clean_acc", "backdoor_acc", "norm_before_clip", "rho", "sigma", "clipped",
    "attack", "attacker_weights", "twin_distance",
]


@dataclass
class Setup:
    """Everything a run needs, resolved from the config and the data."""

    cfg: Config
    dataset: Dataset
    model: Model
    data: ClientData
    tau: np.ndarray  # tau_i per client
    weights: torch.Tensor  # configured p_i (or RFA's alpha_i)
    plan: AttackPlan
    rho: RhoSchedule
    sigma: SigmaSchedule
    dtype: torch.dtype
    _eval_cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def rounds(self) -> int:
        return self.cfg.server.rounds


def resolve_auto(cfg: Config, ds: Dataset) -> Config:
    """Fill the dataset-dependent ``auto`` values (trigger kind, target, trigger features)."""
    a = cfg.attack
    over: dict[str, Any] = {}
    if a.trigger == "auto":
        over["attack.trigger"] = "pixel" if ds.image_shape is not None else "loan"
    if a.target == "auto":
        over["attack.target"] = int(ds.source.get("default_target", 0))
    if a.features is None and ds.image_shape is None:
        feats = ds.source.get("trigger_features")
        if feats:
            over["attack.features"] = list(feats)
    if a.attackers is None:
        over["attack.attackers"] = list(range(a.num_attackers))
    if cfg.data.num_clients is None and cfg.data.partition != "natural":
        raise ConfigError("The 'data.num_clients' parameter must be set for iid and dirichlet partitions. Got None instead.")
    return cfg.replace(**over) if over else cfg


def load_data(cfg: Config) -> Dataset:
    """The config's dataset; ``data.options`` go to its loader (e.g. LOAN's ``categorical``)."""
    import inspect

    from crfl.data.base import loader

    opts = dict(cfg.data.options)
    if cfg.data.name == "mnist-5k":
        opts.setdefault("test_fraction", cfg.data.test_fraction)
    check_choice("data.name", cfg.data.name, dataset_names())
    params = inspect.signature(loader(cfg.data.name)).parameters
    allowed = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    for k in opts:
        if k not in allowed:
            raise ConfigError(
                f"The 'data.options' parameter must hold options of the {cfg.data.name!r} loader "
                f"({', '.join(allowed) or 'none'}). Got {k!r} instead."
            )
    return load_dataset(cfg.data.name, cfg.data.data_dir, seed=cfg.seed, **opts)


def prepare(cfg: Config, dataset: Dataset | None = None, module: torch.nn.Module | None = None) -> Setup:
    """Resolve a config against its data: partition, model, tau_i, p_i, attack plan."""
    if cfg.run.threads is not None:
        torch.set_num_threads(cfg.run.threads)
    ds = dataset if dataset is not None else load_data(cfg)
    cfg = resolve_auto(cfg, ds)
    indices = partition(ds, cfg.data.partition, cfg.data.num_clients, cfg.seed, alpha=cfg.data.dirichlet_alpha)
    K = len(indices)
    a = cfg.attack
    if module is not None:
        model = wrap_module(module, ds.num_features, ds.num_classes)
    else:
        opts = {"hidden": cfg.model.hidden} if cfg.model.name == "mlp" else {}
        model = build_model(cfg.model.name, ds.num_features, ds.num_classes, **opts)
    data = ClientData(
        x=torch.from_numpy(np.ascontiguousarray(ds.x_train)),
        y=torch.from_numpy(np.ascontiguousarray(ds.y_train)).long(),
        input_scale=float(ds.input_scale),
        indices=tuple(np.asarray(ix, dtype=np.int64) for ix in indices),
    )
    sizes = data.sizes
    tau = local_iterations(sizes, cfg.clients.batch_size, cfg.clients.local_iters, cfg.clients.local_epochs)
    if cfg.clients.weighting == "uniform":
        w = torch.full((K,), 1.0 / K, dtype=torch.float64)
    else:
        n_trained = torch.from_numpy(np.minimum(sizes, tau * cfg.clients.batch_size)).double()
        w = n_trained / n_trained.sum()
    rounds = attack_rounds(a.rounds, a.every, a.start, cfg.server.rounds) if a.num_attackers > 0 else ()
    plan = build_plan(
        num_clients=K,
        attackers=a.attackers or [],
        rounds=rounds,
        poison_per_batch=a.poison_per_batch,
        batch_size=cfg.clients.batch_size,
        target=int(a.target),
        num_classes=ds.num_classes,
        gamma=a.gamma,
        kind=a.trigger,
        magnitude=a.magnitude,
        image_shape=ds.image_shape,
        feature_names=ds.feature_names,
        pixels=a.pixels,
        features=a.features,
        dba_num_parts=a.dba_parts,
        num_features=ds.num_features,
    )
    check_choice("aggregation.name", cfg.aggregation.name, aggregation.aggregator_names())
    return Setup(
        cfg=cfg,
        dataset=ds,
        model=model,
        data=data,
        tau=tau,
        weights=w,
        plan=plan,
        rho=RhoSchedule.from_config(cfg.server.rho),
        sigma=SigmaSchedule.from_config(cfg.server.sigma, cfg.server.rounds),
        dtype=torch.float32 if cfg.run.dtype == "float32" else torch.float64,
    )


# ---------------------------------------------------------------------------------------------
# one round


@dataclass
class RoundResult:
    params: torch.Tensor
    info: dict[str, Any]
    attack: dict[str, Any] | None


def run_round(setup: Setup, params: torch.Tensor, t: int, *, attacking: bool = True, scaling: bool = True) -> RoundResult:
    """Round t of Algorithm 1 from w~_{t-1} = params; returns w~_t (or Clip(w_T) when t = T).

    ``attacking=False`` gives the clean twin: the same batches and noise, no poisoned samples;
    with ``scaling=True`` the attackers still scale their (benign) update by gamma, which is the
    virtual benign process M(D) of the proof of Theorem 2 (Appendix B.3).
    """
    cfg, plan = setup.cfg, setup.plan
    K = setup.data.num_clients
    idx = round_batches(setup.data, cfg.clients.batch_size, setup.tau, cfg.seed, t)
    active = plan.active(t)
    poison = None
    if active and attacking and plan.poison_per_batch > 0:
        deltas = torch.zeros(K, setup.dataset.num_features, dtype=setup.dtype)
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
        sigma_t=setup.sigma(t) if t < setup.rounds else 0.0, seed=cfg.seed,
    )
    info = {
        "norm_before_clip": sinfo.norm_before_clip,
        "rho": sinfo.rho,
        "sigma": sinfo.sigma,
        "clipped": int(sinfo.clipped),
        "attack": int(active and attacking),
    }
    attack = None
    if active:
        w = agg.weights
        p_eff = [float(w[a]) for a in plan.attackers] if w is not None else None
        info["attacker_weights"] = p_eff
        attack = {
            "round": t,
            "start_norm": float(torch.linalg.vector_norm(params.double())),
            "attackers": list(plan.attackers),
            "p": p_eff,
            "configured_p": [float(setup.weights[a]) for a in plan.attackers],
            "tau": [int(setup.tau[a]) for a in plan.attackers],
            "gamma": [plan.gamma] * len(plan.attackers),
            "eta": [cfg.clients.lr] * len(plan.attackers),
            # the mean over local steps of poisoned / batch size (> q_B/n_B when a last batch is short)
            "poison_ratio": [
                poison_ratio_per_step(idx, poison.mask, a) if poison is not None else 0.0 for a in plan.attackers
            ],
            "nominal_poison_ratio": [plan.poison_per_batch / cfg.clients.batch_size] * len(plan.attackers),
            "delta_norm": [plan.local_triggers[a].norm for a in plan.attackers],
            "poisoned_samples": [int(stats.count[a]) for a in plan.attackers],
            "actual_delta_norm_max": [float(stats.max_norm[a]) for a in plan.attackers],
            "actual_delta_norm_mean": [float(stats.sum_norm[a] / max(1, stats.count[a])) for a in plan.attackers],
            "aggregation": {k: v for k, v in agg.info.items() if isinstance(v, (int, float, str, list))},
        }
    return RoundResult(new, info, attack)


# ---------------------------------------------------------------------------------------------
# evaluation


def model_inputs(ds: Dataset, x: np.ndarray | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Stored rows (uint8 pixels, float features) as model inputs x / input_scale."""
    X = torch.as_tensor(x).to(dtype)
    return X / ds.input_scale if ds.input_scale != 1.0 else X


@torch.no_grad()
def predict(setup: Setup, params: torch.Tensor, x: np.ndarray | torch.Tensor, trigger=None, chunk: int = 8192) -> torch.Tensor:
    """Base-model predictions on stored inputs (optionally with the trigger added), in chunks."""
    xs = torch.as_tensor(x)
    out = []
    for i in range(0, len(xs), chunk):
        X = model_inputs(setup.dataset, xs[i : i + chunk], setup.dtype)
        if trigger is not None:
            X = trigger.apply(X)
        out.append(setup.model.predict(params.to(setup.dtype), X))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


EVAL_CACHE_BYTES = 512 * 1024**2


def _eval_inputs(setup: Setup) -> dict[str, Any]:
    """Test inputs for the per-round evaluation, as model-ready floats when they fit in 512 MiB."""
    c = setup._eval_cache
    if not c:
        ds = setup.dataset
        y = torch.from_numpy(ds.y_test).long()
        mask = backdoor_test_mask(y, setup.plan.target).numpy()
        c.update(y=y, mask=mask)
        nbytes = ds.x_test.shape[0] * ds.x_test.shape[1] * torch.finfo(setup.dtype).bits // 8
        if 2 * nbytes <= EVAL_CACHE_BYTES:
            X = model_inputs(ds, ds.x_test, setup.dtype)
            c.update(X=X, Xb=setup.plan.trigger.apply(X[torch.from_numpy(mask)]))
    return c


def evaluate(setup: Setup, params: torch.Tensor) -> tuple[float, float]:
    """(clean test accuracy, backdoor accuracy = attack success on triggered non-target test points)."""
    ds = setup.dataset
    c = _eval_inputs(setup)
    y, mask = c["y"], c["mask"]
    p = params.to(setup.dtype)
    if "X" in c:
        clean_pred = setup.model.predict(p, c["X"])
    else:
        clean_pred = predict(setup, params, ds.x_test)
    clean = float((clean_pred == y).double().mean())
    if mask.sum() == 0:
        return clean, math.nan
    if "Xb" in c:
        pred = setup.model.predict(p, c["Xb"])
    else:
        pred = predict(setup, params, ds.x_test[mask], trigger=setup.plan.trigger)
    return clean, float((pred == setup.plan.target).double().mean())


# ---------------------------------------------------------------------------------------------
# the run


def resolved_config(setup: Setup) -> dict[str, Any]:
    d = setup.cfg.to_dict()
    ds = setup.dataset
    d["provenance"] = {
        "crfl_version": crfl.__version__,
        "torch_version": str(torch.__version__),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "dataset": {
            "name": ds.name,
            "train_samples": int(len(ds.y_train)),
            "test_samples": int(len(ds.y_test)),
            "num_features": ds.num_features,
            "num_classes": ds.num_classes,
            "source": {k: v for k, v in ds.source.items() if isinstance(v, (str, int, float, list, dict))},
        },
        "model": {"name": setup.model.name, "num_params": setup.model.num_params, "linear": setup.model.is_linear},
        "clients": {
            "num_clients": setup.data.num_clients,
            "samples": setup.data.sizes.tolist(),
            "tau": setup.tau.tolist(),
            "p": [float(v) for v in setup.weights],
        },
        "attack": {"rounds": list(setup.plan.rounds), "trigger_norm": setup.plan.trigger.norm},
    }
    return d


def config_for_compare(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in ("provenance", "certify", "run")}


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
    """Run (or resume) Algorithm 1 into ``out_dir``. ``stop_after`` ends early after that round (tests)."""
    out = Path(out_dir)
    ckpt_path = out / "checkpoint.pt"
    if resume:
        if not (out / "config.yaml").is_file():
            raise ConfigError(f"The '--resume' directory {str(out)!r} holds no config.yaml: nothing to resume.")
        saved = yaml.safe_load((out / "config.yaml").read_text())
        saved_cfg = {k: v for k, v in saved.items() if k != "provenance"}
        cfg = from_dict(saved_cfg)
    elif (out / "config.yaml").exists():
        raise ConfigError(
            f"The '--out' directory {str(out)!r} already holds a run; use --resume to continue it or choose another directory."
        )
    twin = cfg.certify.twin if twin is None else twin
    setup = prepare(cfg, dataset, module)
    resolved = resolved_config(setup)
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        write_yaml(out / "config.yaml", resolved)

    T = setup.rounds
    start, records, attack_log = 1, [], []
    params = setup.model.init(torch_generator(setup.cfg.seed, "init"), setup.dtype, setup.cfg.model.init)
    twin_params = params.clone() if twin else None
    seconds = 0.0
    if resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, weights_only=False)
        if config_for_compare(ck["config"]) != config_for_compare(resolved):
            raise ConfigError(f"The checkpoint in {str(out)!r} was written by a different configuration; refusing to resume.")
        start = ck["round"] + 1
        params, records, attack_log = ck["params"], ck["records"], ck["attack_log"]
        twin_params = ck.get("twin_params") if twin else None
        seconds = ck.get("seconds", 0.0)
    bar = _Progress(T, progress)
    t0 = time.perf_counter()
    for t in range(start, T + 1):
        res = run_round(setup, params, t)
        params = res.params
        rec: dict[str, Any] = {"round": t, **res.info}
        if res.attack is not None:
            attack_log.append(res.attack)
        if twin_params is not None:
            twin_params = run_round(setup, twin_params, t, attacking=False, scaling=setup.cfg.certify.twin_scaling).params
            rec["twin_distance"] = float(torch.linalg.vector_norm((params - twin_params).double()))
        if t % setup.cfg.run.eval_every == 0 or t == T:
            rec["clean_acc"], rec["backdoor_acc"] = evaluate(setup, params)
        records.append(rec)
        bar.update(t, rec)
        if t == T or t % setup.cfg.run.checkpoint_every == 0 or (stop_after is not None and t >= stop_after):
            write_dict_csv(out / "rounds.csv", ROUND_COLUMNS, records)
            torch_save(
                ckpt_path,
                {
                    "round": t,
                    "params": params,
                    "twin_params": twin_params,
                    "records": records,
                    "attack_log": attack_log,
                    "config": resolved,
                    "seconds": seconds + time.perf_counter() - t0,
                },
            )
        if stop_after is not None and t >= stop_after and t < T:
            return TrainResult(out, setup, params, records, attack_log, twin_params, seconds + time.perf_counter() - t0)
    seconds += time.perf_counter() - t0
    write_final(out, setup, params, records, attack_log, twin_params, seconds)
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
) -> None:
    """Write the end-of-run files (model_final.pt, rounds.csv, attack.json, summary.json's ``training``).

    Shared by the simulator and the Flower server, so both leave the same run directory.
    """
    T = setup.rounds
    final: dict[str, Any] = {
        "params": params,
        "model": setup.model.name,
        "num_features": setup.dataset.num_features,
        "num_classes": setup.dataset.num_classes,
        "linear": setup.model.is_linear,
    }
    if twin_params is not None:
        final["twin_params"] = twin_params
    write_dict_csv(out / "rounds.csv", ROUND_COLUMNS, records)
    torch_save(out / "model_final.pt", final)
    write_json(out / "attack.json", {"trigger_norm": setup.plan.trigger.norm, "rounds": attack_log})
    last = records[-1] if records else {}
    summary_path = out / "summary.json"
    summary: dict[str, Any] = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary["training"] = {
        "rounds": T,
        "final_clean_acc": last.get("clean_acc"),
        "final_backdoor_acc": last.get("backdoor_acc"),
        "final_norm": float(torch.linalg.vector_norm(params.double())),
        "attack_rounds": list(setup.plan.rounds),
        "seconds": seconds,
        "seconds_per_round": seconds / max(1, T),
        **(extra or {}),
    }
    write_json(summary_path, summary)

