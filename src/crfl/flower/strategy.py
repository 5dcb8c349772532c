"""CRFL's server step as a Flower strategy that wraps any strategy (Algorithm 1, Section 4.1).

:class:`CRFL` wraps an aggregation strategy (Flower's ``FedAvg`` by default, or
any ``flwr.serverapp.strategy.Strategy``: ``FedMedian``, ``Krum``, ..., or this
package's rules through :class:`PackageAggregation` / :class:`RFA`). The server
owns every quantity the certificate reads; in round t it

1. waits (at most ``node_timeout`` seconds) for the nodes it needs, binds the
   partitions 0..N-1 to node identities (:class:`Roster`: the operator's table of
   node ids, e.g. of authenticated SuperNodes, or the first N nodes seen, in node-id
   order) and draws the round's sample S_t of partitions from
   ``numpy_generator(seed, "client-sampling", t)`` (:class:`Sampling`; all N by default);
2. sends each sampled partition's node the global model and its ``partition-id``;
3. checks every reply against the server's schema (one model with the global model's
   arrays, shapes and dtype, finite, a finite norm; metric keys of
   :data:`~crfl.flower.records.REPLY_METRICS` with finite values of the right type;
   from the node the partition is bound to) and drops the bad ones with a
   ``crfl.flower`` log line naming the node and the problem;
4. gives each kept reply the server's weight p_i (its own table, never the client's
   number), sorts the replies by partition and lets the inner strategy aggregate them
   into w_t; a round whose kept weights sum to 0 is skipped (w_t = w~_{t-1});
5. applies :func:`crfl.server.server_step`: Clip_{rho_t}(w_t) and, for t <= T-1,
   + N(0, sigma_t^2 I) drawn from ``torch_generator(noise_seed, "server-noise", t)``.

Unlike Flower's ``DifferentialPrivacyServerSideFixedClipping``, which clips each
client *update* and draws noise from numpy's global RNG, CRFL clips the
aggregated *model* and seeds its noise per round, so the Flower server and the
package's simulator (:func:`crfl.train.run_round`) draw the same noise: the
schedule and the server step exist once, in :mod:`crfl.schedule` and
:mod:`crfl.server`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from crfl.aggregation import AggregateResult, ZeroWeightSum, aggregate, aggregator_names
from crfl.flower.records import (
    ARRAYS_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    PARTITION_ID,
    REPLY_METRICS,
    SERVER_ROUND,
    Layout,
    params_to_record,
    record_layout,
    record_to_params,
)
from crfl.rng import numpy_generator
from crfl.server import server_step
from crfl.validation import check_choice, check_int, check_real, fail

log = logging.getLogger("crfl.flower")


class _DropInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO


@contextlib.contextmanager
def _flwr_info_off(off: bool):
    """Flower's own per-round INFO lines (``aggregate_train: Received ...``) dropped inside the block when ``off``."""
    if not off:
        yield
        return
    lg, f = logging.getLogger("flwr"), _DropInfo()
    lg.addFilter(f)
    try:
        yield
    finally:
        lg.removeFilter(f)

Schedule = Callable[[int], float]

#: Error codes of replies that the SuperLink makes up for a node that is gone: a drop, not a bad reply.
DROPPED_CODES = (ErrorCode.NODE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE)


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


def _check_metric(key: str, value: Any) -> None:
    kind = REPLY_METRICS[key][0]
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ReplyRejected(f"its metric {key!r} must be an integer; got {value!r}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ReplyRejected(f"its metric {key!r} must be a finite number; got {value!r}")


def check_reply(msg: Message, layout: Layout, *, partition: int | None = None) -> ClientReply:
    """Validate one train reply against the server's schema; raise ReplyRejected naming the problem.

    ``layout`` is the global model's (array keys, shapes and dtypes: a reply in another dtype
    would change the aggregate's precision); ``partition`` the one the server assigned to the
    sending node (a reply that names another is rejected).
    """
    if msg.has_error():
        raise ReplyRejected(f"the client reported an error: {msg.error.reason}")
    content = msg.content
    if len(content.array_records) != 1:
        raise ReplyRejected(f"it must carry one ArrayRecord (the local model); it carries {len(content.array_records)}")
    if len(content.metric_records) > 1 or len(content.config_records) > 0:
        raise ReplyRejected(
            f"it must carry at most one MetricRecord and no ConfigRecord; it carries {len(content.metric_records)} "
            f"and {len(content.config_records)}"
        )
    metrics = dict(next(iter(content.metric_records.values()))) if content.metric_records else {}
    unknown = sorted(set(metrics) - set(REPLY_METRICS))
    if unknown:
        raise ReplyRejected(f"its metrics hold unknown keys {unknown}; the server's schema allows {sorted(REPLY_METRICS)}")
    for key, value in metrics.items():
        _check_metric(key, value)
    pid = metrics.get(PARTITION_ID, partition)
    if partition is not None and pid != partition:
        raise ReplyRejected(f"it names partition {pid}; the server assigned partition {partition} to this node")
    record = next(iter(content.array_records.values()))
    got = record_layout(record)
    if got.keys != layout.keys:
        raise ReplyRejected(f"its model has the arrays {list(got.keys)}; the global model has {list(layout.keys)}")
    for key, shape, want in zip(got.keys, got.shapes, layout.shapes):
        if shape != want:
            raise ReplyRejected(f"wrong shape: the array {key!r} has shape {shape}; the global model's is {want}")
    for key, dtype, want in zip(got.keys, got.dtypes, layout.dtypes):
        if dtype != want:
            raise ReplyRejected(f"the array {key!r} has dtype {dtype}; the global model's is {want}")
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
    return ClientReply(int(msg.metadata.src_node_id), int(pid) if pid is not None else -1, model, metrics, msg)


# ---------------------------------------------------------------------------------------------
# who trains: partitions bound to nodes, and the per-round sample


@dataclass(frozen=True)
class Sampling:
    """Client sampling per round: S_t, a uniform sample without replacement of the N partitions.

    Give ``fraction`` in (0, 1] (m = ceil(fraction N)) or ``count`` in [1, N]; neither: all N
    (Algorithm 1). S_t is drawn from ``numpy_generator(seed, "client-sampling", t)``, so it
    depends only on the seed and t: a resumed run draws the same samples, and the sample does
    not depend on any client's data or update (the certificate then holds conditionally on it).
    """

    fraction: float | None = None
    count: int | None = None

    def __post_init__(self) -> None:
        if self.fraction is not None and self.count is not None:
            raise fail("sampling", "a fraction or a count of clients, not both", (self.fraction, self.count))
        if self.fraction is not None:
            check_real("sample-fraction", self.fraction, low=0.0, high=1.0, low_open=True)
        if self.count is not None:
            check_int("sample-count", self.count, low=1)

    def size(self, num_clients: int) -> int:
        if self.count is not None:
            if self.count > num_clients:
                raise fail("sample-count", f"an integer in [1, {num_clients}] (N = data.num_clients)", self.count)
            return self.count
        if self.fraction is not None:
            return max(1, math.ceil(self.fraction * num_clients - 1e-9))
        return num_clients

    def sample(self, seed: int, t: int, num_clients: int) -> list[int]:
        m = self.size(num_clients)
        if m == num_clients:
            return list(range(num_clients))
        rng = numpy_generator(seed, "client-sampling", t)
        return sorted(int(k) for k in rng.choice(num_clients, size=m, replace=False))

    def describe(self) -> str:
        if self.count is not None:
            return f"{self.count} clients per round"
        if self.fraction is not None:
            return f"a fraction {self.fraction} of the clients per round"
        return "every client in every round"


class Roster:
    """The binding of partitions 0..N-1 to node identities, decided by the server.

    With ``table`` (node id -> partition, e.g. the node ids that ``flwr supernode register``
    gave the SuperNodes' public keys) only those nodes are ever messaged. Without it, the
    server binds each free partition, in order, to the connected unbound node with the
    smallest node id the first time it needs one; a binding lasts for the run, so a node that
    connects later cannot take over a partition, and nodes beyond N receive nothing.
    """

    def __init__(self, num_clients: int, table: Mapping[int, int] | None = None) -> None:
        self.num_clients = check_int("num_clients", num_clients, low=1)
        self.fixed = table is not None
        self.node_of: dict[int, int] = {}
        if table is not None:
            for node, pid in table.items():
                check_int("node-partitions partition", pid, low=0, high=num_clients - 1)
                if pid in self.node_of:
                    raise fail("node-partitions", "one node per partition", f"partition {pid} given to nodes {self.node_of[pid]} and {node}")
                self.node_of[int(pid)] = int(node)
        self.partition_of = {n: p for p, n in self.node_of.items()}

    def bind(self, connected: Iterable[int]) -> list[tuple[int, int]]:
        """Bind free partitions to connected unbound nodes (automatic mode); returns the new (partition, node) pairs."""
        if self.fixed:
            return []
        free = [p for p in range(self.num_clients) if p not in self.node_of]
        spare = sorted(n for n in connected if n not in self.partition_of)
        new = list(zip(free, spare))
        for p, n in new:
            self.node_of[p] = n
            self.partition_of[n] = p
        return new

    def complete(self) -> bool:
        return len(self.node_of) == self.num_clients


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

    def begin_round(self, arrays: ArrayRecord) -> None:
        """Remember w~_{t-1} (CRFL calls this; it sends the messages itself)."""
        self._global = record_to_params(arrays)
        self._layout = record_layout(arrays)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.begin_round(arrays)
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
        # in float64, as the simulator: the effective weights p_i enter the certificate
        res = aggregate(self.name, (models - g).double(), weights, **self.options)
        self.last_result = res
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        return params_to_record(g + res.update.to(g.dtype), self._layout), metrics


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
    sampled: list[int] = field(default_factory=list)  # S_t: the partitions the server asked to train
    sent: list[int] = field(default_factory=list)  # node ids the round's train messages went to
    accepted: list[int] = field(default_factory=list)  # partition ids aggregated, sorted
    nodes: dict[int, int] = field(default_factory=dict)  # partition id -> node id (the binding used)
    rejected: list[dict[str, Any]] = field(default_factory=list)  # {"node", "partition", "reason"}
    missing: list[int] = field(default_factory=list)  # sampled partitions with no reply (unreachable, dropped, late)
    unbound_nodes: list[int] = field(default_factory=list)  # connected nodes without a partition (not messaged)
    weights: list[float] | None = None  # effective weight of each accepted partition (None: not a weighted mean)
    fixed_weights: bool = False  # the weights did not depend on the updates' values (server table, FedAvg)
    skipped: str | None = None  # why w_t = w~_{t-1} (no valid reply, weights summing to 0)
    metrics: dict[int, dict[str, Any]] = field(default_factory=dict)  # partition -> reported metrics (bookkeeping)
    aggregation: dict[str, Any] = field(default_factory=dict)
    start_norm: float = math.nan  # ||w~_{t-1}||
    norm_before_clip: float = math.nan
    rho: float = math.nan
    sigma: float = math.nan
    clipped: bool = False
    seconds: float = math.nan  # configure_train to the end of aggregate_train: sending, local training, replies, server step

    def weight_of(self, partition: int) -> float | None:
        """p_i as applied: 0 for a partition that was not aggregated, None when the rule has no weights."""
        if self.skipped is not None or not self.accepted:
            return 0.0
        if self.weights is None:
            return None
        return self.weights[self.accepted.index(partition)] if partition in self.accepted else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "sampled": self.sampled,
            "sent": self.sent,
            "accepted": self.accepted,
            "nodes": {str(k): v for k, v in self.nodes.items()},
            "rejected": self.rejected,
            "missing": self.missing,
            "unbound_nodes": self.unbound_nodes,
            "weights": self.weights,
            "fixed_weights": self.fixed_weights,
            "skipped": self.skipped,
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
        strategy: the inner aggregation strategy (default: Flower's ``FedAvg()``). Only its
            ``aggregate_train`` is used: CRFL decides who trains and with which weight.
        rho: rho_t, a :class:`crfl.schedule.RhoSchedule` (any callable t -> float) or a constant.
        sigma: sigma_t for t <= T-1, a :class:`crfl.schedule.SigmaSchedule`, callable or constant.
            No noise is added in round T: the output is Clip_{rho_T}(w_T).
        rounds: T, the number of rounds.
        seed: the run seed; it fixes the sampling, and by default the server noise
            (``torch_generator(noise_seed, "server-noise", t)``).
        num_clients: N, the number of partitions.
        weights: the server's p_i of every partition (N numbers >= 0; default uniform). A reply's
            aggregation weight is always taken from here; the inner strategy's ``weighted_by_key``
            metric is overwritten with it.
        noise_seed: a separate seed for the server noise (default: ``seed``, which reproduces the
            simulator). In a deployment with untrusted clients keep it secret on the server.
        sampling: :class:`Sampling` (default: every client in every round).
        node_partitions: node id -> partition, the operator's binding (default: the server binds
            the first N nodes it sees, see :class:`Roster`).
        node_timeout: seconds a round waits for the nodes of its sampled partitions to be
            connected; after that it goes on with those that are (the others count as missing).
        poll_interval: seconds between two looks at the connected nodes while waiting.
        partitions: the partitions this strategy trains, all of them every round (an ensemble's
            group; default: all N, sampled by ``sampling``).
        roster: a binding shared with other strategies (the G groups of an ensemble share one).
        noise_stream: extra indices of the noise generator, ``("server-noise", t, *noise_stream)``
            (an ensemble's group g draws its own).
    """

    def __init__(
        self,
        strategy: Strategy | None = None,
        *,
        rho: Schedule | float,
        sigma: Schedule | float,
        rounds: int,
        seed: int,
        num_clients: int,
        weights: Sequence[float] | torch.Tensor | None = None,
        noise_seed: int | None = None,
        sampling: Sampling | None = None,
        node_partitions: Mapping[int, int] | None = None,
        node_timeout: float = 120.0,
        poll_interval: float = 0.2,
        partitions: Sequence[int] | None = None,
        roster: Roster | None = None,
        noise_stream: Sequence[int] = (),
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
        self.num_clients = check_int("num_clients", num_clients, low=1)
        w = np.full(self.num_clients, 1.0 / self.num_clients) if weights is None else np.asarray(
            torch.as_tensor(weights, dtype=torch.float64).numpy(), dtype=np.float64
        )
        if w.shape != (self.num_clients,) or not np.isfinite(w).all() or (w < 0).any():
            raise fail("weights", f"{self.num_clients} finite non-negative numbers (one p_i per partition)", w.tolist())
        self.weights = w
        self.noise_seed = self.seed if noise_seed is None else check_int("noise_seed", noise_seed, low=0)
        self.sampling = sampling if sampling is not None else Sampling()
        self.sampling.size(self.num_clients)  # validates a count against N
        if roster is not None and node_partitions is not None:
            raise fail("roster", "a Roster or a node-partitions table, not both", "both")
        self.roster = roster if roster is not None else Roster(self.num_clients, node_partitions)
        self.partitions = None if partitions is None else sorted({int(p) for p in partitions})
        if self.partitions is not None:
            if not self.partitions or self.partitions[0] < 0 or self.partitions[-1] >= self.num_clients:
                raise fail("partitions", f"a non-empty set of partition ids in [0, {self.num_clients - 1}]", partitions)
            if self.sampling != Sampling():
                raise fail("sampling", "every partition of the group (an ensemble's group trains all its clients)",
                           self.sampling.describe())
        self.noise_stream = tuple(int(i) for i in noise_stream)
        self.node_timeout = check_real("node-timeout", node_timeout, low=0.0)
        self.poll_interval = check_real("poll_interval", poll_interval, low=0.0, low_open=True)
        self.history: dict[int, RoundLog] = {}
        self.pre_noise: dict[int, torch.Tensor] = {}  # Clip_{rho_t}(w_t) of rounds the caller asks to keep
        self.keep_pre_noise: set[int] = set()
        self._global: dict[int, tuple[torch.Tensor, Layout]] = {}
        self._asked: dict[int, dict[int, int]] = {}  # round -> node id -> partition
        self._started = time.perf_counter()

    # -- Strategy interface --------------------------------------------------------------------

    #: A round's INFO lines (this strategy's and the inner strategy's) are logged every ``log_every``
    #: rounds and in the first and the last (0: about ten over the run); the others go to DEBUG.
    #: The run config's ``log-every`` sets it (1: every round).
    log_every: int = 0

    def loud(self, t: int) -> bool:
        """Whether round t's per-round lines are logged at INFO."""
        every = self.log_every or max(1, self.rounds // 10)
        return t in (1, self.rounds) or t % every == 0

    def summary(self) -> None:
        log.info(
            "CRFL: clip the global model to rho_t, add N(0, sigma_t^2 I) for t <= T-1 (T = %d, rho_1 = %.4g, "
            "sigma_1 = %.4g); %s; inner strategy %s",
            self.rounds, self.rho(1), self.sigma(1) if self.rounds > 1 else 0.0, self.sampling.describe(),
            type(self.strategy).__name__,
        )
        self.strategy.summary()

    def sample(self, t: int) -> list[int]:
        """S_t, the partitions asked to train in round t (a group's: all its partitions)."""
        if self.partitions is not None:
            return list(self.partitions)
        return self.sampling.sample(self.seed, t, self.num_clients)

    def _wait_for_nodes(self, t: int, sampled: list[int], grid: Grid) -> set[int]:
        """Connected node ids once every sampled partition's node is there, or when node_timeout runs out."""
        deadline = time.monotonic() + self.node_timeout
        warned = False
        while True:
            connected = {int(n) for n in grid.get_node_ids()}
            self.roster.bind(connected)
            ready = [p for p in sampled if self.roster.node_of.get(p) in connected]
            if len(ready) == len(sampled) or time.monotonic() >= deadline:
                if len(ready) < len(sampled):
                    log.warning(
                        "Round %d: after %.0f s, %d of the %d nodes it needs are connected (%d connected in all); "
                        "partitions %s count as missing. With `flwr run`, num-supernodes must be at least "
                        "data.num_clients = %d.", t, self.node_timeout, len(ready), len(sampled), len(connected),
                        sorted(set(sampled) - set(ready)), self.num_clients,
                    )
                return connected
            if not warned:
                log.info("Round %d: waiting up to %.0f s for nodes (%d of %d needed connected).",
                         t, self.node_timeout, len(ready), len(sampled))
                warned = True
            time.sleep(self.poll_interval)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        t = server_round
        started = time.perf_counter()
        self._global = {t: (record_to_params(arrays), record_layout(arrays))}
        begin = getattr(self.strategy, "begin_round", None)
        if callable(begin):
            begin(arrays)
        sampled = self.sample(t)
        connected = self._wait_for_nodes(t, sampled, grid)
        rec = RoundLog(round=t, sampled=sampled)
        rec.unbound_nodes = sorted(n for n in connected if n not in self.roster.partition_of)
        asked: dict[int, int] = {}
        messages = []
        for p in sampled:
            node = self.roster.node_of.get(p)
            if node is None or node not in connected:
                continue
            cfg = ConfigRecord(dict(config))
            cfg[SERVER_ROUND] = t
            cfg[PARTITION_ID] = p
            messages.append(Message(RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: cfg}), dst_node_id=node, message_type="train"))
            asked[node] = p
        rec.sent = sorted(asked)
        self._asked[t] = asked
        self.history[t] = rec
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
        server_w = [float(self.weights[r.partition]) for r in kept]
        if not kept:
            rec.skipped = "no valid reply"
            log.warning("Round %d: no valid reply; w_t = w~_{t-1}, which is still clipped and perturbed.", t)
        elif not sum(server_w) > 0:
            rec.skipped = "the accepted replies' weights sum to 0"
            log.warning("Round %d: the server's weights of the accepted partitions %s sum to 0; the round is skipped "
                        "(w_t = w~_{t-1}, still clipped and perturbed).", t, rec.accepted)
        else:
            key = getattr(self.strategy, "weighted_by_key", None)
            for r, w in zip(kept, server_w):
                # what the inner strategy sees: every schema key (0 where the client sent none), the
                # partition the server assigned, and the server's p_i under the weighting key
                m: dict[str, int | float] = {k: (0 if kind == "int" else 0.0) for k, (kind, _) in REPLY_METRICS.items()}
                m.update(r.metrics)
                m[PARTITION_ID] = r.partition
                m["weight"] = w
                if isinstance(key, str):
                    m[key] = w
                content = r.message.content
                name = next(iter(content.metric_records), METRICS_KEY)
                content[name] = MetricRecord(m)
            try:
                with _flwr_info_off(not self.loud(t)):
                    agg_arrays, inner_metrics = self.strategy.aggregate_train(t, [r.message for r in kept])
            except ZeroWeightSum as err:
                agg_arrays = None
                rec.skipped = str(err)
                log.warning("Round %d: %s The round is skipped (w_t = w~_{t-1}).", t, err)
            if rec.skipped is None:
                res = getattr(self.strategy, "last_result", None)
                if isinstance(self.strategy, PackageAggregation) and res is not None:
                    update = res.update.to(w_prev.dtype)  # the rule's own update: no round trip through w_t
                    rec.aggregation = {k: v for k, v in res.info.items() if isinstance(v, (int, float, str, list))}
                elif agg_arrays is not None:
                    update = record_to_params(agg_arrays).to(w_prev.dtype) - w_prev
                if agg_arrays is None:
                    log.warning("Round %d: the inner strategy %s returned no model; w_t = w~_{t-1}.", t, type(self.strategy).__name__)
                rec.weights, rec.fixed_weights = self._effective_weights(server_w)

        new, info = server_step(
            w_prev, update, t=t, rounds=self.rounds, rho_t=self.rho(t),
            sigma_t=self.sigma(t) if t < self.rounds else 0.0, seed=self.noise_seed, stream=self.noise_stream,
        )
        if t in self.keep_pre_noise and info.pre_noise is not None:
            self.pre_noise[t] = info.pre_noise
        rec.norm_before_clip, rec.rho, rec.sigma, rec.clipped = info.norm_before_clip, info.rho, info.sigma, info.clipped
        rec.seconds = time.perf_counter() - self._started
        log.log(
            logging.INFO if self.loud(t) else logging.DEBUG,
            "Round %d: aggregated %d of %d sampled partitions; ||w_t|| = %.4f, rho_t = %.4g%s, sigma_t = %.4g",
            t, len(kept), len(rec.sampled) or len(kept), info.norm_before_clip, info.rho,
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
        return []  # Algorithm 1 evaluates on the server

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    # -- helpers -------------------------------------------------------------------------------

    def _screen(self, t: int, replies: list[Message], layout: Layout, rec: RoundLog) -> list[ClientReply]:
        """Keep the well-formed replies of the nodes asked, one per node, sorted by partition; log every drop."""
        asked = self._asked.get(t, {})
        good: dict[int, ClientReply] = {}
        dropped: set[int] = set()
        seen: set[int] = set()
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            pid = asked.get(node)
            if pid is None and msg.has_error() and msg.error.code in DROPPED_CODES:
                # a deployment's SuperLink answers for a node that is gone with its own node id (SUPERLINK_NODE_ID),
                # not the node's: the node's partition is counted once, as missing (not also as a rejected reply)
                log.warning("Round %d: the SuperLink reports a node unavailable: %s", t, msg.error.reason)
                continue
            if pid is None:
                self._reject(t, rec, node, None, "the server did not ask this node to train in this round")
                continue
            if node in seen:
                self._reject(t, rec, node, pid, "a second reply from the same node")
                continue
            seen.add(node)
            if msg.has_error() and msg.error.code in DROPPED_CODES:
                dropped.add(pid)  # the node is gone: counted once, as missing
                log.warning("Round %d: node %d (partition %d) is unavailable: %s", t, node, pid, msg.error.reason)
                continue
            try:
                good[pid] = check_reply(msg, layout, partition=pid)
            except ReplyRejected as err:
                self._reject(t, rec, node, pid, str(err))
        kept = [good[p] for p in sorted(good)]
        answered = {r["partition"] for r in rec.rejected} | set(good)
        rec.missing = [p for p in rec.sampled if p not in answered]
        for p in rec.missing:
            if p not in dropped:
                node = self.roster.node_of.get(p)
                log.warning("Round %d: no reply for partition %d (node %s) in time; the round goes on without it.", t, p, node)
        rec.accepted = [r.partition for r in kept]
        rec.nodes = {r.partition: r.node_id for r in kept}
        rec.metrics = {r.partition: r.metrics for r in kept}
        return kept

    @staticmethod
    def _reject(t: int, rec: RoundLog, node: int, partition: Any, reason: str) -> None:
        log.warning("Round %d: rejected the reply of node %d (partition %s): %s. The round goes on without it.", t, node, partition, reason)
        rec.rejected.append({"node": node, "partition": partition, "reason": reason})

    def _effective_weights(self, server_w: list[float]) -> tuple[list[float] | None, bool]:
        """(p_i as aggregated, whether they are fixed by the server): the rule's weights, or FedAvg's normalized table."""
        inner = self.strategy
        if isinstance(inner, PackageAggregation):
            res = inner.last_result
            if res is None or res.weights is None:
                return None, False
            return [float(w) for w in res.weights], bool(res.fixed_weights)
        if isinstance(inner, FedAvg) and type(inner).aggregate_train is FedAvg.aggregate_train:
            total = math.fsum(server_w)
            return [w / total for w in server_w], True
        return None, False
