"""The CRFL server as a Flower ``ServerApp``: Algorithm 1's rounds, then the run directory and certification.

``main`` resolves the crfl configuration from the Flower run config (keys of
:data:`RUN_CONFIG`, set in ``[tool.flwr.app.config]`` or by ``flwr run
--run-config``), prepares the run exactly like ``crfl train`` (the ServerApp
holds the test set for evaluation and, like the simulator, knows the attack plan
only to label the records), and runs :class:`crfl.flower.strategy.CRFL` with
Flower's own round loop (``Strategy.start``). After round T it writes the same
run directory as ``crfl run``::

    config.yaml     resolved configuration (+ provenance, with a ``flower`` block)
    rounds.csv      one row per round (accuracy, norms, rho_t, sigma_t, attack, attacker weights)
    attack.json     per attack round: the attackers' effective p_i and their reported tau, gamma, eta, ...
    model_final.pt  Clip_{rho_T}(w_T)
    summary.json    the ``training`` block (+ certificate blocks with ``certify = true``)
    flower.json     per round: nodes messaged, replies kept / rejected (with the reason) / missing

and, with ``certify = true``, runs :func:`crfl.certify.certify_run` on it
(certificates, summary blocks, plots).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flwr
import torch
from flwr.app import ConfigRecord, Context, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Strategy

from crfl.config import Config, resolve
from crfl.data import Dataset
from crfl.flower.records import CRFL_CONFIG, config_to_json, params_to_record, record_to_params
from crfl.flower.strategy import CRFL, PackageAggregation, RoundLog
from crfl.io import write_json, write_yaml
from crfl.setup import Setup, evaluate, prepare, resolved_config
from crfl.train import write_final
from crfl.validation import ConfigError, check_int, check_real

log = logging.getLogger("crfl.flower")

#: The Flower run config of the app: key -> (default, meaning). ``[tool.flwr.app.config]`` lists them.
RUN_CONFIG: dict[str, tuple[Any, str]] = {
    "preset": ("demo", "crfl preset (demo, mnist, emnist, loan); empty for none"),
    "config-file": ("", "a crfl YAML config file, layered over the preset"),
    "overrides": ("", "'key=value' overrides separated by ';', e.g. 'server.rounds=5; data.num_clients=4'"),
    "out-dir": ("runs/flower-{run_id}", "run directory; {run_id} is replaced by Flower's run id; prefer an absolute path"),
    "certify": (True, "certify the final model after training (crfl.certify.certify_run)"),
    "round-timeout": (600.0, "seconds to wait for the replies of one round"),
    "noise-seed": (-1, "seed of the server noise; -1 uses the run seed (as the simulator does)"),
}


@dataclass
class FlowerRun:
    """The outcome of :func:`run_federation`."""

    out_dir: Path
    setup: Setup
    final_params: torch.Tensor
    records: list[dict[str, Any]]
    attack_log: list[dict[str, Any]]
    history: dict[int, RoundLog]
    seconds: float
    summary: dict[str, Any] | None = None


def parse_overrides(text: str) -> list[str]:
    """'a.b=1; c=[1, 2]' -> ['a.b=1', 'c=[1, 2]'] (parsed later by crfl.config.parse_override)."""
    return [part.strip() for part in str(text).split(";") if part.strip()]


def config_from_run_config(run_config: dict[str, Any]) -> Config:
    """The crfl Config named by a Flower run config (preset < config file < overrides)."""
    preset = str(run_config.get("preset", RUN_CONFIG["preset"][0])).strip() or None
    cfile = str(run_config.get("config-file", "")).strip() or None
    return resolve(preset, cfile, parse_overrides(str(run_config.get("overrides", ""))))


def _train_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Round summary of the replies' metrics (instead of a weighted mean of every key)."""
    ms = [next(iter(r.metric_records.values())) for r in records]
    return MetricRecord(
        {
            "clients": len(ms),
            "attackers": int(sum(int(m.get("attacker", 0)) for m in ms)),
            "poisoned-samples": int(sum(int(m.get("poisoned-samples", 0)) for m in ms)),
            "client-seconds-max": float(max((float(m.get("seconds", 0.0)) for m in ms), default=0.0)),
        }
    )


def default_inner_strategy(setup: Setup) -> Strategy:
    """Flower's FedAvg for ``fedavg``, else the package's rule; every client in every round (Algorithm 1).

    Clients are weighted by the metric ``weight`` = p_i as configured (``clients.weighting``).
    """
    K = setup.data.num_clients
    common: dict[str, Any] = dict(
        fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=K, min_evaluate_nodes=0,
        min_available_nodes=K, weighted_by_key="weight", train_metrics_aggr_fn=_train_metrics,
    )
    agg = setup.cfg.aggregation
    if agg.name == "fedavg" and not agg.options:
        return FedAvg(**common)
    return PackageAggregation(agg.name, agg.options, **common)


def build_strategy(setup: Setup, inner: Strategy | None = None, *, noise_seed: int | None = None) -> CRFL:
    """The CRFL wrapper with the run's rho_t and sigma_t schedules (the simulator's objects)."""
    return CRFL(
        inner if inner is not None else default_inner_strategy(setup),
        rho=setup.rho, sigma=setup.sigma, rounds=setup.rounds, seed=setup.cfg.seed,
        noise_seed=noise_seed, num_clients=setup.data.num_clients,
    )


def _attack_entry(rec: RoundLog, attackers: list[int]) -> dict[str, Any]:
    """attack.json's entry for one round, from what the attackers reported and how they were aggregated."""
    m = rec.metrics
    weights = [rec.weight_of(a) for a in attackers] if rec.weights is not None else None
    return {
        "round": rec.round,
        "start_norm": rec.start_norm,
        "attackers": attackers,
        "p": weights,
        "configured_p": [float(m[a]["weight"]) for a in attackers],
        "tau": [int(m[a]["tau"]) for a in attackers],
        "gamma": [float(m[a]["gamma"]) for a in attackers],
        "eta": [float(m[a]["lr"]) for a in attackers],
        "poison_ratio": [float(m[a]["poison-ratio"]) for a in attackers],
        "nominal_poison_ratio": [float(m[a]["nominal-poison-ratio"]) for a in attackers],
        "delta_norm": [float(m[a]["delta-norm"]) for a in attackers],
        "poisoned_samples": [int(m[a]["poisoned-samples"]) for a in attackers],
        "actual_delta_norm_max": [float(m[a]["delta-norm-max"]) for a in attackers],
        "actual_delta_norm_mean": [float(m[a]["delta-norm-mean"]) for a in attackers],
        "aggregation": rec.aggregation,
        "clients_aggregated": len(rec.accepted),
        "replies_rejected": len(rec.rejected),
        "replies_missing": len(rec.missing),
    }


def run_federation(
    grid: Grid,
    setup: Setup,
    out_dir: str | Path,
    *,
    strategy: CRFL | None = None,
    certify: bool = False,
    round_timeout: float = 600.0,
    dataset: Dataset | None = None,
) -> FlowerRun:
    """Run Algorithm 1 over a Flower grid into ``out_dir`` and (optionally) certify the result."""
    out = Path(out_dir)
    if (out / "config.yaml").exists():
        raise ConfigError(f"The 'out-dir' directory {str(out)!r} already holds a run; choose another directory.")
    round_timeout = check_real("round-timeout", round_timeout, low=0.0, low_open=True)
    cfg, T = setup.cfg, setup.rounds
    strategy = strategy if strategy is not None else build_strategy(setup)
    if strategy.rounds != T:
        raise ConfigError(f"The strategy was built for T = {strategy.rounds} rounds but the run has T = {T}.")
    if cfg.certify.twin:
        log.warning("certify.twin: the clean twin run is a simulator feature; the Flower run trains no twin.")
    resolved = resolved_config(setup)
    resolved["provenance"]["flower"] = {
        "flwr_version": flwr.__version__,
        "inner_strategy": type(strategy.strategy).__name__,
        "noise_seed": "run seed" if strategy.noise_seed == cfg.seed else "separate (not recorded)",
    }
    out.mkdir(parents=True, exist_ok=True)
    write_yaml(out / "config.yaml", resolved)
    log.info("crfl over Flower: %d clients, T = %d rounds, aggregation %s; run directory %s",
             setup.data.num_clients, T, type(strategy.strategy).__name__, out.resolve())

    params0 = setup.w0.clone()
    records: list[dict[str, Any]] = []
    attack_log: list[dict[str, Any]] = []

    def evaluate_fn(t: int, arrays: Any) -> MetricRecord | None:
        if t == 0:
            return None
        params = record_to_params(arrays).to(setup.dtype)
        rec = strategy.history[t]
        attackers = sorted(p for p in rec.accepted if int(rec.metrics[p].get("attacker", 0)) == 1)
        row: dict[str, Any] = {
            "round": t, "norm_before_clip": rec.norm_before_clip, "rho": rec.rho, "sigma": rec.sigma,
            "clipped": int(rec.clipped), "attack": int(bool(attackers)),
        }
        if setup.plan.active(t) and not attackers:
            log.warning("Round %d is an attack round but no attacker's reply was aggregated.", t)
        if attackers:
            entry = _attack_entry(rec, attackers)
            row["attacker_weights"] = entry["p"]
            attack_log.append(entry)
        if t % cfg.run.eval_every == 0 or t == T:
            row["clean_acc"], row["backdoor_acc"] = evaluate(setup, params)
        records.append(row)
        shown = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))}
        return MetricRecord({k.replace("_", "-"): float(v) for k, v in shown.items()})

    train_config = ConfigRecord({CRFL_CONFIG: config_to_json(setup.cfg.to_dict())})
    t0 = time.perf_counter()
    result = strategy.start(
        grid, params_to_record(params0), num_rounds=T, timeout=round_timeout,
        train_config=train_config, evaluate_fn=evaluate_fn,
    )
    seconds = time.perf_counter() - t0
    final = record_to_params(result.arrays).to(setup.dtype)
    hist = strategy.history
    write_final(
        out, setup, final, records, attack_log, None, seconds,
        extra={
            "engine": "flower",
            "replies_rejected": sum(len(h.rejected) for h in hist.values()),
            "replies_missing": sum(len(h.missing) for h in hist.values()),
            "rounds_with_every_client": sum(len(h.accepted) == setup.data.num_clients for h in hist.values()),
        },
    )
    write_json(out / "flower.json", {"rounds": [hist[t].to_dict() for t in sorted(hist)]})
    run = FlowerRun(out, setup, final, records, attack_log, dict(hist), seconds)
    if certify:
        from crfl.certify import certify_run

        run.summary = certify_run(out, dataset=dataset)
    return run


def _ensure_log_handler() -> None:
    """Show crfl.flower's lines in Flower's process logs (which mirror stderr) when nothing else does."""
    lg = logging.getLogger("crfl.flower")
    if not lg.handlers and not logging.getLogger().handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(levelname)-8s: crfl.flower: %(message)s"))
        lg.addHandler(h)
    if lg.level == logging.NOTSET:
        lg.setLevel(logging.INFO)


def make_server_app(
    cfg: Config | None = None,
    out_dir: str | Path | None = None,
    *,
    dataset: Dataset | None = None,
    inner: Strategy | None = None,
    certify: bool | None = None,
    round_timeout: float | None = None,
) -> ServerApp:
    """A ``ServerApp`` running :func:`run_federation`; arguments left None come from the run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        _ensure_log_handler()
        rc = {k: v[0] for k, v in RUN_CONFIG.items()}
        unknown = set(context.run_config) - set(rc)
        if unknown:
            log.warning("Ignoring unknown run-config keys %s; known: %s", sorted(unknown), ", ".join(rc))
        rc.update(dict(context.run_config))
        c = cfg if cfg is not None else config_from_run_config(rc)
        out = Path(out_dir) if out_dir is not None else Path(str(rc["out-dir"]).format(run_id=context.run_id))
        noise_seed = check_int("noise-seed", rc["noise-seed"], low=-1)
        setup = prepare(c, dataset)
        strategy = build_strategy(setup, inner, noise_seed=None if noise_seed < 0 else noise_seed)
        run = run_federation(
            grid, setup, out, strategy=strategy,
            certify=bool(rc["certify"]) if certify is None else certify,
            round_timeout=float(rc["round-timeout"]) if round_timeout is None else round_timeout,
            dataset=dataset,
        )
        last = run.records[-1] if run.records else {}
        log.info("Finished: %d rounds in %.1f s; clean accuracy %s, backdoor accuracy %s; run directory %s",
                 setup.rounds, run.seconds, last.get("clean_acc"), last.get("backdoor_acc"), run.out_dir.resolve())

    return app


#: The app ``flwr run`` loads (``crfl.flower.server_app:app``).
app = make_server_app()
