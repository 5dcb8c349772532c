"""The CRFL server as a Flower ``ServerApp``: Algorithm 1's rounds, then the run directory and certification.

``main`` resolves the crfl configuration from the Flower run config (keys of
:data:`crfl.flower.run_config.RUN_CONFIG`, set in ``[tool.flwr.app.config]`` or by ``flwr run
--run-config``), prepares the run exactly like ``crfl train`` (the ServerApp
holds the test set for evaluation and, like the simulator, knows the attack plan
only to label the records), and runs :class:`crfl.flower.strategy.CRFL` with
Flower's own round loop (:class:`FlowerRound`, the Flower engine's round of the one driver,
:func:`crfl.driver.drive`, which also runs the simulator). After round T it writes the
same run directory as ``crfl run``::

    config.yaml     resolved configuration (+ provenance, with a ``flower`` block)
    rounds.csv      one row per round (accuracy, norms, rho_t, sigma_t, attack, attacker weights,
                    aggregation_fixed_weights)
    attack.json     per attack round: crfl.driver.attack_record, from server-owned quantities only
                    (clients' reports under ``measured``)
    model_final.pt  Clip_{rho_T}(w_T) (+ the first attack round's pre-noise aggregate)
    summary.json    the ``training`` block (+ certificate blocks with ``certify = true``)
    flower.json     per round: S_t, nodes messaged, replies kept / rejected (with the reason) / missing
    checkpoint.pt   the state after the last finished round (``resume = true`` continues from it)

and, with ``certify = true``, runs :func:`crfl.certify.certify_run` on it
(certificates, summary blocks, plots), unless a round had no valid reply: such
a run says so in ``summary.json`` and is not certified.

The certificate's input-norm bound: the server never sees client data. With
``model.input_norm_bound`` (the demo preset sets it) the model it ships projects
every input onto the ball of that radius, and the certificate uses it. Otherwise
it sets ``certify.input_norm_bound`` (unless the configuration does) from the input
domain every crfl dataset declares, model inputs in [0, 1]^d: B = sqrt(d), or
from the run config's ``input-norm-bound``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import flwr
import torch
from flwr.app import ConfigRecord, Context, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Strategy

from crfl.config import Config, resolve
from crfl.data import Dataset
from crfl.flower.run_config import RUN_CONFIG
from crfl.flower.records import CRFL_CONFIG, config_to_json, params_to_record, record_to_params
from crfl.flower.deploy.waits import shorten_object_backoff
from crfl.flower.strategy import CRFL, PackageAggregation, RoundLog, Sampling
from crfl import rundir
from crfl.driver import BaseRound, Finish, RoundOutput, RunState, TrainResult, attack_record, drive
from crfl.ensemble import build_groups, fix_sample_seed, is_ensemble
from crfl.setup import Setup, prepare
from crfl.validation import ConfigError, check_int, check_real, fail

log = logging.getLogger("crfl.flower")

#: Seconds between two pulls of a round's replies (Flower's deployment Grid waits 3 s between pulls).
REPLY_POLL_INTERVAL = 0.02


def send_and_receive(grid: Grid, messages: list, timeout: float, poll_interval: float = REPLY_POLL_INTERVAL) -> list:
    """The replies of :func:`push_and_pull`."""
    return push_and_pull(grid, messages, timeout, poll_interval)[1]


def push_and_pull(
    grid: Grid, messages: list, timeout: float, poll_interval: float = REPLY_POLL_INTERVAL
) -> tuple[list[str], list]:
    """Push a round's messages, then pull their replies every ``poll_interval`` s until all came or ``timeout`` s passed.

    Returns the pushed messages' ids (in the order of ``messages``) and the replies.

    Flower's ``Grid.send_and_receive`` does the same, but the deployment Grid of flwr 1.41
    sleeps 3 s between two pulls, and retries a reply's objects that are not there yet after
    1 s, which would add up to 4 s to every round (:mod:`crfl.flower.deploy.waits`).
    """
    if type(grid).__module__ == "flwr.superlink.grid.http_grid":  # a reply is listed before its objects arrive
        import flwr.superlink.grid.http_grid as http_grid

        shorten_object_backoff(http_grid)
    ids = list(grid.push_messages(messages))
    waiting = set(ids)
    deadline = time.monotonic() + timeout
    replies: list = []
    while waiting:
        got = list(grid.pull_messages(list(waiting)))
        replies += got
        waiting -= {m.metadata.reply_to_message_id for m in got}
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(poll_interval)
    return ids, replies


class FederationFailed(RuntimeError):
    """No client contributed to any round: the run directory is written, but there is nothing to certify."""


@dataclass
class FlowerRun(TrainResult):
    """The outcome of :func:`run_federation`: the simulator's :class:`~crfl.train.TrainResult` plus
    Flower's per-round log, the certification summary and whether all T rounds ran."""

    history: dict[int, RoundLog] = field(default_factory=dict)
    summary: dict[str, Any] | None = None
    finished: bool = True


def parse_overrides(text: str) -> list[str]:
    """'a.b=1; c=[1, 2]' -> ['a.b=1', 'c=[1, 2]'] (parsed later by crfl.config.parse_override)."""
    return [part.strip() for part in str(text).split(";") if part.strip()]


def config_from_run_config(run_config: dict[str, Any]) -> Config:
    """The crfl Config named by a Flower run config (preset < config file < overrides)."""
    preset = str(run_config.get("preset", RUN_CONFIG["preset"][0])).strip() or None
    cfile = str(run_config.get("config-file", RUN_CONFIG["config-file"][0])).strip() or None
    return resolve(preset, cfile, parse_overrides(str(run_config.get("overrides", RUN_CONFIG["overrides"][0]))))


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
    """Flower's FedAvg for ``fedavg``, else the package's rule.

    Clients are weighted by the metric ``weight``, which :class:`CRFL` sets to the server's p_i
    (``clients.weighting`` over the partition sizes the server assigned) on every reply.
    """
    common: dict[str, Any] = dict(
        fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1, min_evaluate_nodes=0,
        min_available_nodes=1, weighted_by_key="weight", train_metrics_aggr_fn=_train_metrics,
    )
    agg = setup.cfg.aggregation
    if agg.name == "fedavg" and not agg.options:
        return FedAvg(**common)
    return PackageAggregation(agg.name, agg.options, **common)


def parse_node_partitions(text: str) -> dict[int, int] | None:
    """'12345=0 67890=1' (or comma-separated) -> {12345: 0, 67890: 1}; empty -> None."""
    pairs = [p for p in str(text).replace(",", " ").split() if p]
    if not pairs:
        return None
    out: dict[int, int] = {}
    for pair in pairs:
        node, sep, pid = pair.partition("=")
        try:
            if not sep:
                raise ValueError
            out[int(node)] = int(pid)
        except ValueError:
            raise fail("node-partitions", "'NODE_ID=PARTITION' pairs separated by spaces or commas", pair) from None
    return out


def sampling_from_run_config(rc: dict[str, Any]) -> Sampling:
    count = check_int("sample-count", rc.get("sample-count", RUN_CONFIG["sample-count"][0]), low=0)
    fraction = check_real("sample-fraction", rc.get("sample-fraction", RUN_CONFIG["sample-fraction"][0]),
                          low=0.0, high=1.0, low_open=True)
    if count:
        return Sampling(count=count)
    return Sampling(fraction=fraction) if fraction < 1.0 else Sampling()


def build_strategy(
    setup: Setup,
    inner: Strategy | None = None,
    *,
    noise_seed: int | None = None,
    sampling: Sampling | None = None,
    node_partitions: dict[int, int] | None = None,
    node_timeout: float = 120.0,
) -> CRFL:
    """The CRFL wrapper with the run's rho_t and sigma_t schedules and p_i table (the simulator's objects)."""
    return CRFL(
        inner if inner is not None else default_inner_strategy(setup),
        rho=setup.rho, sigma=setup.sigma, rounds=setup.rounds, seed=setup.cfg.seed,
        num_clients=setup.data.num_clients, weights=setup.weights, noise_seed=noise_seed,
        sampling=sampling, node_partitions=node_partitions, node_timeout=node_timeout,
    )


def with_input_norm_bound(setup: Setup, bound: float | None = None) -> Setup:
    """The setup with ``certify.input_norm_bound`` set by the server: the configured value, else ``bound``,
    else sqrt(d), the norm bound of crfl's model inputs in [0, 1]^d (the server does not see client data).

    A model with ``model.input_norm_bound`` enforces its own bound on every input: the setup is
    returned as it is, and a run-config ``bound`` next to it is an error."""
    enforced = setup.cfg.model.input_norm_bound
    if enforced is not None:
        if bound is not None:
            raise ConfigError(
                f"The 'input-norm-bound' run-config parameter must be -1 when 'model.input_norm_bound' is set (the model "
                f"enforces B_0 = {enforced:g}, which the certificate uses). Got {bound!r} instead."
            )
        return setup
    if setup.cfg.certify.input_norm_bound is not None:
        return setup
    if bound is None:
        bound = math.sqrt(setup.dataset.num_features)
    bound = check_real("input-norm-bound", bound, low=0.0, low_open=True)
    return dataclasses.replace(setup, cfg=setup.cfg.replace(**{"certify.input_norm_bound": float(bound)}))


def _bound_provenance(cfg: Config, run_config_bound: float | None) -> str:
    if cfg.model.input_norm_bound is not None:
        return f"model.input_norm_bound = {cfg.model.input_norm_bound:.6g}: enforced by the model the server ships"
    if run_config_bound is not None:
        return "run config"
    return f"sqrt(d) = {cfg.certify.input_norm_bound:.6g}: model inputs in [0, 1]^d"


def log_certification(summary: dict[str, Any]) -> None:
    """Log the certificate's headline as ``crfl run`` prints it: the fraction certified at the attack's ||delta||."""
    cert, res = summary.get("certificate") or {}, summary.get("results") or {}
    if cert.get("reading") == "client-level":
        log.info("Certificate: client-level (%s, G = %s), certified: %s", cert.get("kind"), cert.get("groups"),
                 cert.get("client_level_certified"))
        for k in ("clean", "backdoor"):
            curve = {c["m"]: c["certified_accuracy"] for c in ((summary.get("client_level") or {}).get(k) or {}).get("curve", [])}
            shown = ", ".join(f"m = {m}: {curve[m]:.4f}" for m in (0, 1, 2, 5, 10, 20) if m in curve)
            log.info("  %-8s certified accuracy against m malicious clients: %s", k, shown)
        return
    delta = cert.get("delta_norm")
    log.info("Certificate: reading %s, radius certified: %s, B_0 = %s (%s)", cert.get("reading"),
             cert.get("radius_certified"), cert.get("input_norm_bound"), cert.get("input_norm_source"))
    for k in ("clean", "backdoor"):
        r = res.get(k) or {}
        if r.get("certified_at_attack") is not None and delta is not None:
            log.info("  %-8s certified at the attack's ||delta|| = %.4g: %.4f of the points (%.4f certified and correct)",
                     k, delta, r["certified_at_attack"], r["certified_correct_at_attack"])
    failed = [name for name, c in ((summary.get("assumptions") or {}).get("checks") or {}).items() if not c.get("holds")]
    if failed:
        log.warning("  not certified: %s (see summary.json 'assumptions')", ", ".join(failed))


def _attack_entry(setup: Setup, rec: RoundLog, start: torch.Tensor) -> dict[str, Any]:
    """attack.json's entry for attack round t: crfl.driver.attack_record from server-owned quantities.

    p_i is the weight the server applied to the configured attacker (0 when its partition was not
    sampled or its reply not aggregated). What the attackers' replies reported is kept under
    ``measured`` and never enters a certificate.
    """
    attackers = list(setup.plan.attackers)
    ps = [rec.weight_of(a) for a in attackers]
    p = None if any(v is None for v in ps) else [float(v) for v in ps]
    measured = {
        "reported_by_clients": {str(a): rec.metrics[a] for a in attackers if a in rec.metrics},
        "sampled": [a in rec.sampled for a in attackers],
        "clients_aggregated": len(rec.accepted),
        "replies_rejected": len(rec.rejected),
        "replies_missing": len(rec.missing),
    }
    return attack_record(setup, rec.round, start, p, aggregation_info=rec.aggregation, measured=measured)


def _noise_tag(seed: int) -> str:
    """A digest of the noise seed: a resumed run must use the same one; the seed itself is not stored."""
    return hashlib.blake2b(str(int(seed)).encode(), digest_size=8).hexdigest()


@dataclass
class FlowerRound(BaseRound):
    """The Flower server's round of Algorithm 1, as the driver's :class:`~crfl.driver.Round`.

    Sends w~_{t-1} and ``crfl-config`` to the sampled partitions' nodes, waits for their replies
    (:func:`send_and_receive`), and lets the :class:`CRFL` strategy screen, weight, aggregate,
    clip and perturb; the round's :class:`RoundLog` becomes its ``flower.json`` row.
    """

    setup: Setup
    grid: Grid
    strategy: CRFL
    round_timeout: float
    input_norm_source: str
    engine: str = field(default=rundir.FLOWER, init=False)
    trains_twin: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self._config_json = config_to_json(self.setup.cfg.to_dict())  # the crfl-config every train message carries

    def __call__(self, params: torch.Tensor, t: int, *, trigger: bool = True) -> RoundOutput:
        setup, strategy, plan = self.setup, self.strategy, self.setup.plan
        if plan.active(t):
            strategy.keep_pre_noise.add(t)
        train_config = ConfigRecord({CRFL_CONFIG: self._config_json})
        messages = list(strategy.configure_train(t, params_to_record(params), train_config, self.grid))
        replies = send_and_receive(self.grid, messages, self.round_timeout) if messages else []
        new_arrays, _ = strategy.aggregate_train(t, replies)
        rec = strategy.history[t]
        row: dict[str, Any] = {
            "norm_before_clip": rec.norm_before_clip, "rho": rec.rho, "sigma": rec.sigma, "clipped": int(rec.clipped),
            "attack": int(plan.active(t)), "aggregation_fixed_weights": int(rec.fixed_weights),
        }
        entry, pre_noise = None, None
        if plan.active(t):
            entry = _attack_entry(setup, rec, params)
            row["attacker_weights"] = entry["p"]
            pre = strategy.pre_noise.pop(t, None)
            pre_noise = pre.to(setup.dtype) if pre is not None else None
            if entry["p"] is not None and not any(entry["p"]):
                log.warning("Round %d is an attack round of the threat model but no attacker's reply was aggregated (p = 0).", t)
        return RoundOutput(record_to_params(new_arrays).to(setup.dtype), row, entry, pre_noise, rec.to_dict())

    def identity(self) -> dict[str, Any]:
        """The noise seed's digest and the sampling: a resumed run must use the same."""
        return {"noise": _noise_tag(self.strategy.noise_seed), "sampling": self.strategy.sampling.describe()}

    def provenance(self) -> dict[str, Any]:
        s, cfg = self.strategy, self.setup.cfg
        return {"flower": {
            "flwr_version": flwr.__version__,
            "inner_strategy": type(s.strategy).__name__,
            "noise_seed": "run seed" if s.noise_seed == cfg.seed else "separate (not recorded)",
            "sampling": s.sampling.describe(),
            "binding": "operator's node table" if s.roster.fixed else "server: first N nodes seen, by node id",
            "input_norm_bound": self.input_norm_source,
        }}

    def finish(self, state: RunState) -> Finish:
        rounds = state.logs
        T = self.setup.rounds
        without = [r["round"] for r in rounds if r["skipped"] is not None]
        certifiable = not without
        reason = None if certifiable else (
            f"round(s) {without} aggregated no update (no valid reply, or weights summing to 0): "
            "the run is not the process the certificate describes"
        )
        extra = {
            "replies_rejected": sum(len(r["rejected"]) for r in rounds),
            "replies_missing": sum(len(r["missing"]) for r in rounds),
            "rounds_with_every_client": sum(len(r["accepted"]) == self.setup.data.num_clients for r in rounds),
            "rounds_without_valid_replies": without,
            "rounds_with_contributions": T - len(without),
            "sampling": self.strategy.sampling.describe(),
            "certifiable": certifiable,
            "not_certifiable_because": reason,
        }
        return Finish(extra=extra, files={FLOWER_LOG: {"rounds": rounds}})


#: The Flower engine's own per-round log in the run directory.
FLOWER_LOG = "flower.json"


def run_federation(
    grid: Grid,
    setup: Setup,
    out_dir: str | Path,
    *,
    strategy: CRFL | None = None,
    certify: bool = False,
    round_timeout: float = 600.0,
    dataset: Dataset | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    input_norm_bound: float | None = None,
    ensemble_strategies: list[CRFL] | None = None,
    seed_drawn: bool | None = None,
) -> FlowerRun:
    """Run Algorithm 1 over a Flower grid into ``out_dir`` (through :func:`crfl.driver.drive`) and
    (optionally) certify the result.

    ``resume`` continues the run in ``out_dir`` from its checkpoint (the same configuration,
    sampling and noise seed are required); ``stop_after`` ends after that round (tests of resume).
    An ensemble configuration (``ensemble.kind``) trains its G group models
    (:class:`crfl.flower.ensemble.FlowerEnsembleRound`, one strategy per group).
    """
    round_timeout = check_real("round-timeout", round_timeout, low=0.0, low_open=True)
    setup = with_input_norm_bound(setup, input_norm_bound)
    cfg, T = setup.cfg, setup.rounds
    if cfg.certify.twin:
        log.warning("certify.twin: the clean twin run is a simulator feature; the Flower run trains no twin.")
    if is_ensemble(cfg):
        from crfl.flower.ensemble import FlowerEnsembleRound, group_strategies

        if strategy is not None:
            raise ConfigError("An ensemble run (ensemble.kind != none) builds one CRFL strategy per group: pass "
                              "'ensemble_strategies' (crfl.flower.ensemble.group_strategies), not 'strategy'.")
        groups = build_groups(cfg, setup.data.num_clients)
        strategies = ensemble_strategies if ensemble_strategies is not None else group_strategies(
            setup, groups, lambda: default_inner_strategy(setup))
        step: BaseRound = FlowerEnsembleRound(setup, groups, grid, strategies, round_timeout, seed_drawn)
        what = f"an ensemble of G = {groups.G} {groups.kind} group models"
        history: dict[int, RoundLog] = {}
    else:
        strategy = strategy if strategy is not None else build_strategy(setup)
        if strategy.rounds != T:
            raise ConfigError(f"The strategy was built for T = {strategy.rounds} rounds but the run has T = {T}.")
        if strategy.num_clients != setup.data.num_clients:
            raise ConfigError(f"The strategy was built for N = {strategy.num_clients} clients but the run has N = {setup.data.num_clients}.")
        step = FlowerRound(setup, grid, strategy, round_timeout, _bound_provenance(cfg, input_norm_bound))
        what = f"{strategy.sampling.describe()}, aggregation {type(strategy.strategy).__name__}"
        history = strategy.history
    run = rundir.resume_run(out_dir, param="out-dir") if resume else rundir.create_run(out_dir, param="out-dir")
    with run:
        if resume:
            log.info("Resuming the Flower run in %s.", run.path.resolve())
        log.info("crfl over Flower: %d clients (%s), T = %d rounds; run directory %s",
                 setup.data.num_clients, what, T, run.path.resolve())
        res = drive(setup, step, run, resume=resume, checkpoint_every=1, stop_after=stop_after)
    result = FlowerRun(**{f.name: getattr(res, f.name) for f in dataclasses.fields(TrainResult)},
                       history=dict(history))
    if not res.finished:
        return result
    out = res.out_dir
    fin = res.finish or Finish()  # what the driver wrote into the result set
    if fin.extra.get("rounds_with_contributions", T) == 0:
        raise FederationFailed(
            f"No client contributed to any of the {T} rounds (see {out / FLOWER_LOG}); the run is not certified."
        )
    if certify and not fin.extra.get("certifiable", True):
        log.warning("Not certifying %s: %s.", out, fin.extra.get("not_certifiable_because"))
    elif certify:
        from crfl.certify import certify_run

        result.summary = certify_run(out, dataset=dataset)
        log_certification(result.summary)
    return result


def _ensemble_seed(cfg: Config, out: Path, resume: bool) -> tuple[Config, bool | None]:
    """The sampled ensemble's subset seed: the resumed run's (from its config.yaml), else drawn now from the OS."""
    if cfg.ensemble.kind != "sampled" or cfg.ensemble.sample_seed is not None:
        return cfg, False if cfg.ensemble.kind == "sampled" else None
    if resume and (out / rundir.CONFIG).is_file():
        saved = (rundir.RunDir(out).read_config().get("ensemble") or {}).get("sample_seed")
        if saved is not None:
            return cfg.replace(**{"ensemble.sample_seed": int(saved)}), None
    return fix_sample_seed(cfg), True


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
        from crfl.plugins import load_entry_points

        load_entry_points()  # installed plugins (crfl.plugins) register their parts here as in the crfl command
        rc = {k: v[0] for k, v in RUN_CONFIG.items()}
        unknown = set(context.run_config) - set(rc)
        if unknown:
            log.warning("Ignoring unknown run-config keys %s; known: %s", sorted(unknown), ", ".join(rc))
        rc.update(dict(context.run_config))
        c = cfg if cfg is not None else config_from_run_config(rc)
        out = Path(out_dir) if out_dir is not None else Path(str(rc["out-dir"]).format(run_id=context.run_id))
        noise_seed = check_int("noise-seed", rc["noise-seed"], low=-1)
        bound = check_real("input-norm-bound", rc["input-norm-bound"], low=-1.0)
        c, drawn = _ensemble_seed(c, out, bool(rc["resume"]))
        setup = prepare(c, dataset)
        node_timeout = check_real("node-timeout", rc["node-timeout"], low=0.0)
        partitions = parse_node_partitions(str(rc["node-partitions"]))
        seed = None if noise_seed < 0 else noise_seed
        strategy, strategies = None, None
        if is_ensemble(setup.cfg):
            from crfl.flower.ensemble import group_strategies

            if sampling_from_run_config(rc) != Sampling():
                raise ConfigError("The 'sample-fraction' and 'sample-count' run-config keys must stay 1.0 and 0 for an "
                                  "ensemble: every group trains all its clients in every round.")
            groups = build_groups(setup.cfg, setup.data.num_clients)
            strategies = group_strategies(
                setup, groups, (lambda: inner) if inner is not None else (lambda: default_inner_strategy(setup)),
                noise_seed=seed, node_partitions=partitions, node_timeout=node_timeout)
        else:
            strategy = build_strategy(setup, inner, noise_seed=seed, sampling=sampling_from_run_config(rc),
                                      node_partitions=partitions, node_timeout=node_timeout)
        log_every = check_int("log-every", rc["log-every"], low=0)
        for s in [strategy] if strategy is not None else strategies or []:
            s.log_every = log_every
        run = run_federation(
            grid, setup, out, strategy=strategy, ensemble_strategies=strategies, seed_drawn=drawn,
            certify=bool(rc["certify"]) if certify is None else certify,
            round_timeout=float(rc["round-timeout"]) if round_timeout is None else round_timeout,
            dataset=dataset, resume=bool(rc["resume"]), input_norm_bound=bound if bound > 0 else None,
        )
        last = run.records[-1] if run.records else {}
        log.info("Finished: %d rounds in %.1f s; clean accuracy %s, backdoor accuracy %s; run directory %s",
                 setup.rounds, run.seconds, last.get("clean_acc"), last.get("backdoor_acc"), run.out_dir.resolve())

    return app


#: The app ``flwr run`` loads (``crfl.flower.server_app:app``).
app = make_server_app()
