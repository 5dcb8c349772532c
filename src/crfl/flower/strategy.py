"""CRFL's server step as a Flower strategy that wraps any strategy (Algorithm 1, Section 4.1).

:class:`CRFL` wraps an aggregation strategy (Flower's ``FedAvg`` by default, or
any ``flwr.serverapp.strategy.Strategy``: ``FedMedian``, ``Krum``, ..., or this
package's rules through :class:`PackageAggregation` / :class:`RFA`). In round t
it

1. checks every reply (one model of the global model's shape, finite entries, a
   finite norm, a valid ``partition-id``) and drops the bad ones with a
   ``crfl.flower`` log line naming the node and the problem;
2. sorts the good replies by ``partition-id`` (Flower delivers them in any
   order; summation order must not depend on it) and lets the inner strategy
   aggregate them into w_t (its weights are renormalized over the replies kept);
3. applies :func:`crfl.server.server_step`: Clip_{rho_t}(w_t) and, for t <= T-1,
   + N(0, sigma_t^2 I) drawn from ``torch_generator(noise_seed, "server-noise", t)``.

Unlike Flower's ``DifferentialPrivacyServerSideFixedClipping``, which clips each
client *update* and draws noise from numpy's global RNG, CRFL clips the
aggregated *model* and seeds its noise per round, so the Flower server and the
package's simulator (:func:`crfl.train.run_round`) draw the same noise: the
schedule and the server step exist once, in :mod:`crfl.schedule` and
:mod:`crfl.server`.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from crfl.aggregation import AggregateResult, aggregate, aggregator_names
from crfl.flower.records import PARTITION_ID, Layout, params_to_record, record_layout, record_to_params
from crfl.server import server_step
from crfl.validation import check_choice, check_int, check_real, fail

log = logging.getLogger("crfl.flower")

Schedule = Callable[[int], float]


class ReplyRejected(ValueError):
    """A client's reply cannot be aggregated; the message says why."""


@dataclass(frozen=True)
class ClientReply:
    """A reply that passed :func:`check_reply`."""

    node_id: int
    partition: int
    model: torch.Tensor
    metrics: dict[str, Any]
    message: Message


def check_reply(
    msg: Message,
    layout: Layout,
    *,
    num_clients: int | None = None,
    required_metrics: Sequence[str] = (),
) -> ClientReply:
    """Validate one train reply against the global model's layout; raise ReplyRejected naming the problem."""
    if msg.has_error():
        raise ReplyRejected(f"the client reported an error: {msg.error.reason}")
    content = msg.content
    if len(content.array_records) != 1:
        raise ReplyRejected(f"it must carry one ArrayRecord (the local model); it carries {len(content.array_records)}")
    if len(content.metric_records) != 1:
        raise ReplyRejected(f"it must carry one MetricRecord; it carries {len(content.metric_records)}")
    metrics = dict(next(iter(content.metric_records.values())))
    pid = metrics.get(PARTITION_ID)
    if isinstance(pid, bool) or not isinstance(pid, int):
        raise ReplyRejected(f"its MetricRecord must hold an integer '{PARTITION_ID}'; got {pid!r}")
    if num_clients is not None and not 0 <= pid < num_clients:
        raise ReplyRejected(f"its '{PARTITION_ID}' must be in [0, {num_clients - 1}]; got {pid}")
    for key in required_metrics:
        v = metrics.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ReplyRejected(f"its MetricRecord must hold a finite non-negative '{key}'; got {v!r}")
    record = next(iter(content.array_records.values()))
    got = record_layout(record)
    if got.keys != layout.keys:
        raise ReplyRejected(f"its model has the arrays {list(got.keys)}; the global model has {list(layout.keys)}")
    for key, shape, want in zip(got.keys, got.shapes, layout.shapes):
        if shape != want:
            raise ReplyRejected(f"wrong shape: the array {key!r} has shape {shape}; the global model's is {want}")
    for key, dtype in zip(got.keys, got.dtypes):
        if not (dtype.startswith("float") or dtype.startswith("bfloat")):
            raise ReplyRejected(f"the array {key!r} has dtype {dtype}; a floating-point model is needed")
    model = record_to_params(record)
    nan = int(torch.isnan(model).sum())
    if nan:
        raise ReplyRejected(f"its model holds {nan} NaN value(s)")
    inf = int(torch.isinf(model).sum())
    if inf:
        raise ReplyRejected(f"its model holds {inf} infinite value(s): infinite norm")
    norm = float(torch.linalg.vector_norm(model.double()))
    if not math.isfinite(norm):
        raise ReplyRejected("its model's norm overflows to inf")
    return ClientReply(int(msg.metadata.src_node_id), int(pid), model, metrics, msg)


# ---------------------------------------------------------------------------------------------
# the package's aggregation rules as Flower strategies


class PackageAggregation(FedAvg):
    """A rule of :mod:`crfl.aggregation` (fedavg, rfa, median, trimmed-mean, krum) as a Flower strategy.

    Sampling, messages and metrics are ``FedAvg``'s; ``aggregate_train`` forms the updates
    u_i = w_i - w~_{t-1} of the replies (in the order given: :class:`CRFL` sorts them by
    partition), weights them by the metric ``weighted_by_key`` and calls
    ``crfl.aggregation.aggregate(name, updates, weights, **options)`` -- the simulator's
    code. ``last_result`` keeps the rule's :class:`~crfl.aggregation.AggregateResult`
    (effective weights p_i, RFA iterations, Krum selection).
    """

    def __init__(self, name: str = "fedavg", options: dict[str, Any] | None = None, **fedavg_kwargs: Any) -> None:
        check_choice("aggregation.name", name, aggregator_names())
        if options is not None and not isinstance(options, dict):
            raise fail("aggregation.options", "a mapping of option names to values", options)
        super().__init__(**fedavg_kwargs)
        self.name = name
        self.options = dict(options or {})
        self.last_result: AggregateResult | None = None
        self._global: torch.Tensor | None = None
        self._layout: Layout | None = None

    def summary(self) -> None:
        log.info("PackageAggregation: crfl.aggregation rule %r, options %s", self.name, self.options)
        super().summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._global = record_to_params(arrays)
        self._layout = record_layout(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self.last_result = None
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        if self._global is None or self._layout is None:
            raise RuntimeError("PackageAggregation.aggregate_train was called before configure_train.")
        contents = [m.content for m in valid]
        models = torch.stack([record_to_params(next(iter(c.array_records.values()))) for c in contents])
        g = self._global.to(models.dtype)
        weights = torch.tensor(
            [float(next(iter(c.metric_records.values()))[self.weighted_by_key]) for c in contents], dtype=torch.float64
        )
        res = aggregate(self.name, models - g, weights.to(models.dtype), **self.options)
        self.last_result = res
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        return params_to_record(g + res.update, self._layout), metrics


class RFA(PackageAggregation):
    """Robust Federated Aggregation (geometric median, smoothed Weiszfeld; Pillutla et al.) as a Flower strategy.

    Flower has FedAvg, FedMedian, FedTrimmedAvg, Krum, MultiKrum and Bulyan but no geometric
    median; this is :func:`crfl.aggregation.rfa`, the robust aggregator the CRFL paper compares with.
    """

    def __init__(self, *, max_iter: int = 10, ftol: float = 1e-6, eps: float = 1e-5, **fedavg_kwargs: Any) -> None:
        super().__init__("rfa", {"max_iter": max_iter, "ftol": ftol, "eps": eps}, **fedavg_kwargs)


# ---------------------------------------------------------------------------------------------
# the CRFL wrapper


@dataclass
class RoundLog:
    """What happened in one round, for the run directory (``flower.json``, ``rounds.csv``, ``attack.json``)."""

    round: int
    sent: list[int] = field(default_factory=list)  # node ids the round's train messages went to
    accepted: list[int] = field(default_factory=list)  # partition ids aggregated, sorted
    nodes: dict[int, int] = field(default_factory=dict)  # partition id -> node id
    rejected: list[dict[str, Any]] = field(default_factory=list)  # {"node", "partition", "reason"}
    missing: list[int] = field(default_factory=list)  # node ids that sent no reply in time
    weights: list[float] | None = None  # effective weight of each accepted partition (None: not a weighted mean)
    metrics: dict[int, dict[str, Any]] = field(default_factory=dict)  # partition -> reported metrics
    aggregation: dict[str, Any] = field(default_factory=dict)
    start_norm: float = math.nan  # ||w~_{t-1}||
    norm_before_clip: float = math.nan
    rho: float = math.nan
    sigma: float = math.nan
    clipped: bool = False
    seconds: float = math.nan  # configure_train to the end of aggregate_train: sending, local training, replies, server step

    def weight_of(self, partition: int) -> float | None:
        if self.weights is None or partition not in self.accepted:
            return None
        return self.weights[self.accepted.index(partition)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "sent": self.sent,
            "accepted": self.accepted,
            "nodes": {str(k): v for k, v in self.nodes.items()},
            "rejected": self.rejected,
            "missing": self.missing,
            "weights": self.weights,
            "norm_before_clip": self.norm_before_clip,
            "rho": self.rho,
            "sigma": self.sigma,
            "clipped": self.clipped,
            "seconds": self.seconds,
        }


def _schedule(name: str, value: Schedule | float, *, positive: bool) -> Schedule:
    """A schedule object (RhoSchedule, SigmaSchedule, any t -> float) or a constant."""
    if callable(value):
        return value
    v = check_real(name, value, low=0.0, low_open=positive)
    return lambda t: v


class CRFL(Strategy):
    """Clip the aggregated global model to rho_t and perturb it with N(0, sigma_t^2 I) (Algorithm 1).

    Args:
        strategy: the inner aggregation strategy (default: Flower's ``FedAvg()``).
        rho: rho_t, a :class:`crfl.schedule.RhoSchedule` (any callable t -> float) or a constant.
        sigma: sigma_t for t <= T-1, a :class:`crfl.schedule.SigmaSchedule`, callable or constant.
            No noise is added in round T: the output is Clip_{rho_T}(w_T).
        rounds: T, the number of rounds the strategy will be started for.
        seed: the run seed; the noise of round t is drawn from ``torch_generator(noise_seed, "server-noise", t)``.
        noise_seed: a separate seed for the server noise (default: ``seed``, which reproduces the
            simulator). In a deployment with untrusted clients keep it secret on the server.
        num_clients: N; replies naming a ``partition-id`` outside [0, N) are rejected.
        required_metrics: metric keys every reply must carry as finite non-negative numbers
            (default: the inner strategy's ``weighted_by_key`` when it has one).
    """

    def __init__(
        self,
        strategy: Strategy | None = None,
        *,
        rho: Schedule | float,
        sigma: Schedule | float,
        rounds: int,
        seed: int,
        noise_seed: int | None = None,
        num_clients: int | None = None,
        required_metrics: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if strategy is not None and not isinstance(strategy, Strategy):
            raise fail("strategy", "a flwr.serverapp.strategy.Strategy", type(strategy).__name__)
        if isinstance(strategy, CRFL):
            raise fail("strategy", "an aggregation strategy, not another CRFL wrapper", "CRFL")
        self.strategy = strategy if strategy is not None else FedAvg()
        self.rho = _schedule("rho", rho, positive=True)
        self.sigma = _schedule("sigma", sigma, positive=False)
        self.rounds = check_int("rounds", rounds, low=1)
        self.seed = check_int("seed", seed, low=0)
        self.noise_seed = self.seed if noise_seed is None else check_int("noise_seed", noise_seed, low=0)
        self.num_clients = None if num_clients is None else check_int("num_clients", num_clients, low=1)
        if required_metrics is None:
            key = getattr(self.strategy, "weighted_by_key", None)
            required_metrics = (key,) if isinstance(key, str) else ()
        self.required_metrics = tuple(required_metrics)
        self.history: dict[int, RoundLog] = {}
        self._global: dict[int, tuple[torch.Tensor, Layout]] = {}
        self._started = time.perf_counter()

    # -- Strategy interface --------------------------------------------------------------------

    def summary(self) -> None:
        log.info(
            "CRFL: clip the global model to rho_t, add N(0, sigma_t^2 I) for t <= T-1 (T = %d, rho_1 = %.4g, "
            "sigma_1 = %.4g); inner strategy %s",
            self.rounds, self.rho(1), self.sigma(1) if self.rounds > 1 else 0.0, type(self.strategy).__name__,
        )
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        started = time.perf_counter()
        self._global = {server_round: (record_to_params(arrays), record_layout(arrays))}
        config["server-round"] = server_round  # clients key their batches on t (FedAvg sets it too)
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self.history[server_round] = RoundLog(round=server_round, sent=[int(m.metadata.dst_node_id) for m in messages])
        self._started = started
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        t = server_round
        if t not in self._global:
            raise RuntimeError(f"CRFL.aggregate_train was called for round {t} before configure_train.")
        w_prev, layout = self._global[t]
        rec = self.history.setdefault(t, RoundLog(round=t))
        rec.start_norm = float(torch.linalg.vector_norm(w_prev.double()))
        kept = self._screen(t, list(replies), layout, rec)

        update = torch.zeros_like(w_prev)
        inner_metrics: MetricRecord | None = None
        if kept:
            agg_arrays, inner_metrics = self.strategy.aggregate_train(t, [r.message for r in kept])
            res = getattr(self.strategy, "last_result", None)
            if isinstance(self.strategy, PackageAggregation) and res is not None:
                update = res.update.to(w_prev.dtype)  # the rule's own update: no round trip through w_t
                rec.aggregation = {k: v for k, v in res.info.items() if isinstance(v, (int, float, str, list))}
            elif agg_arrays is not None:
                update = record_to_params(agg_arrays).to(w_prev.dtype) - w_prev
            if agg_arrays is None:
                log.warning("Round %d: the inner strategy %s returned no model; w_t = w~_{t-1}.", t, type(self.strategy).__name__)
            rec.weights = self._effective_weights(kept)
        else:
            log.warning("Round %d: no valid reply; w_t = w~_{t-1}, which is still clipped and perturbed.", t)

        new, info = server_step(
            w_prev, update, t=t, rounds=self.rounds, rho_t=self.rho(t),
            sigma_t=self.sigma(t) if t < self.rounds else 0.0, seed=self.noise_seed,
        )
        rec.norm_before_clip, rec.rho, rec.sigma, rec.clipped = info.norm_before_clip, info.rho, info.sigma, info.clipped
        rec.seconds = time.perf_counter() - self._started
        log.info(
            "Round %d: aggregated %d of %d replies; ||w_t|| = %.4f, rho_t = %.4g%s, sigma_t = %.4g",
            t, len(kept), len(rec.sent) or len(kept), info.norm_before_clip, info.rho,
            " (clipped)" if info.clipped else "", info.sigma,
        )
        metrics = MetricRecord(dict(inner_metrics) if inner_metrics is not None else {})
        metrics["crfl-clients"] = len(kept)
        metrics["crfl-rejected"] = len(rec.rejected)
        metrics["crfl-missing"] = len(rec.missing)
        metrics["crfl-norm-before-clip"] = info.norm_before_clip
        metrics["crfl-rho"] = info.rho
        metrics["crfl-sigma"] = info.sigma
        return params_to_record(new, layout), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    # -- helpers -------------------------------------------------------------------------------

    def _screen(self, t: int, replies: list[Message], layout: Layout, rec: RoundLog) -> list[ClientReply]:
        """Keep the well-formed replies, one per partition, sorted by partition id; log every drop."""
        good: list[ClientReply] = []
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            try:
                good.append(check_reply(msg, layout, num_clients=self.num_clients, required_metrics=self.required_metrics))
            except ReplyRejected as err:
                pid = None
                if not msg.has_error() and len(msg.content.metric_records) == 1:
                    pid = next(iter(msg.content.metric_records.values())).get(PARTITION_ID)
                self._reject(t, rec, node, pid, str(err))
        # one reply per partition: a partition claimed twice is dropped twice (it cannot be told apart)
        counts = Counter(r.partition for r in good)
        kept = []
        for r in good:
            if counts[r.partition] > 1:
                self._reject(t, rec, r.node_id, r.partition, f"{counts[r.partition]} nodes claim partition {r.partition}")
            else:
                kept.append(r)
        # Flower's strategies need the same metric keys in every reply: drop the odd ones out
        if kept:
            keysets = Counter(frozenset(r.metrics) for r in kept)
            common = max(keysets.items(), key=lambda kv: (kv[1], sorted(kv[0])))[0]
            odd = [r for r in kept if frozenset(r.metrics) != common]
            for r in odd:
                self._reject(t, rec, r.node_id, r.partition, f"its metric keys {sorted(r.metrics)} differ from the others' {sorted(common)}")
            kept = [r for r in kept if frozenset(r.metrics) == common]
        kept.sort(key=lambda r: r.partition)
        replied = {int(m.metadata.src_node_id) for m in replies}
        rec.missing = [n for n in rec.sent if n not in replied]
        for n in rec.missing:
            log.warning("Round %d: no reply from node %d in time; the round goes on without it.", t, n)
        rec.accepted = [r.partition for r in kept]
        rec.nodes = {r.partition: r.node_id for r in kept}
        rec.metrics = {r.partition: r.metrics for r in kept}
        return kept

    @staticmethod
    def _reject(t: int, rec: RoundLog, node: int, partition: Any, reason: str) -> None:
        log.warning("Round %d: rejected the reply of node %d (partition %s): %s. The round goes on without it.", t, node, partition, reason)
        rec.rejected.append({"node": node, "partition": partition, "reason": reason})

    def _effective_weights(self, kept: list[ClientReply]) -> list[float] | None:
        """p_i as aggregated: the rule's weights, or FedAvg's normalized weighting metric; None otherwise."""
        inner = self.strategy
        if isinstance(inner, PackageAggregation):
            res = inner.last_result
            return None if res is None or res.weights is None else [float(w) for w in res.weights]
        if isinstance(inner, FedAvg) and type(inner).aggregate_train is FedAvg.aggregate_train:
            raw = [float(r.metrics[inner.weighted_by_key]) for r in kept]
            total = sum(raw)
            return [w / total for w in raw] if total > 0 else None
        return None
