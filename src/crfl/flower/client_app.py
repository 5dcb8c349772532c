"""The CRFL client as a Flower ``ClientApp`` (Algorithm 1, the client's loop; Section 3.2's attacker).

A SuperNode is client i = the ``partition-id`` the server assigned to it (sent in
every train message; the server binds partitions to node identities). On a train
message for round t it

1. rebuilds the run from the ``crfl-config`` the server sent (cached per config):
   the registered dataset, client i's shard, tau_i, p_i and the attack plan;
2. starts from the received global model w~_{t-1} and runs tau_i steps of SGD on
   the batches ``client_round_batches(shard_i, i, n_B, tau_i, seed, t)``, the very
   batches the batched simulator draws for client i (:func:`crfl.local.local_round`);
3. if it is an attacker and t is an attack round, poisons the first q_B samples
   of every batch (trigger + label swap) and scales its update by gamma (model
   replacement): it sends w~_{t-1} + gamma (w_i - w~_{t-1});
4. replies with its local model and the metrics of :data:`crfl.flower.records.REPLY_METRICS`.

The local training is :func:`crfl.local.local_round` for one client, the function
the simulator runs for all clients at once: one implementation of the client's (and the
attacker's) local step for both engines.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from crfl.config import from_dict
from crfl.data import Dataset
from crfl.flower.records import (
    ARRAYS_KEY,
    CRFL_CONFIG,
    METRICS_KEY,
    PARAMS_KEY,
    PARTITION_ID,
    SERVER_ROUND,
    config_from_json,
    record_to_params,
)
from crfl.local import local_round
from crfl.setup import Setup, prepare
from crfl.validation import ConfigError, check_int


@dataclass(frozen=True)
class ClientResult:
    """A client's round: the model it sends and what it reports."""

    model: torch.Tensor
    metrics: dict[str, int | float]


def client_round(setup: Setup, params: torch.Tensor, client: int, t: int) -> ClientResult:
    """Client ``client``'s part of round t of Algorithm 1, from the global model ``params``.

    Returns w~_{t-1} + u_i, with u_i = w_{t tau_i} - w~_{t-1} (multiplied by gamma for an
    attacker in an attack round), in ``setup.dtype``.
    """
    cfg, plan = setup.cfg, setup.plan
    K = setup.data.num_clients
    client = check_int("partition-id", client, low=0, high=K - 1)
    t0 = time.perf_counter()
    tau = int(setup.tau[client])
    n_B = cfg.clients.batch_size
    w = params.to(setup.dtype)
    loc = local_round(setup, w, t, [client])  # the simulator's local step, for one client
    attacking = loc.attacking[0]
    model = w + loc.updates[0]
    stats = loc.stats
    n = int(min(setup.data.sizes[client], tau * n_B))
    count = int(stats.count[0])
    metrics: dict[str, int | float] = {
        "partition-id": client,
        "num-examples": n,
        "weight": float(setup.weights[client]),
        "tau": tau,
        "lr": float(cfg.clients.lr),
        "attacker": int(attacking),
        "gamma": float(plan.gamma) if attacking else 1.0,
        # mean over local steps of poisoned / batch size, as the simulator records it for the certificate
        "poison-ratio": loc.poison_ratio(0),
        "nominal-poison-ratio": plan.poison_per_batch / n_B if attacking else 0.0,
        "delta-norm": plan.local_triggers[client].norm if attacking else 0.0,
        "poisoned-samples": count,
        "delta-norm-max": float(stats.max_norm[0]),
        "delta-norm-mean": float(stats.sum_norm[0] / max(1, count)),
        "seconds": time.perf_counter() - t0,
    }
    return ClientResult(model, metrics)


def _assigned_partition(config: Any, context: Context, num_clients: int) -> int:
    """The partition the server assigned to this node (train ConfigRecord); errors say which key is wrong.

    The server binds partitions to nodes (crfl.flower.strategy.Roster); a node's own
    ``node_config`` ``partition-id`` (set by Flower's simulation) is not consulted.
    """
    if PARTITION_ID not in config:
        raise ConfigError(
            f"The train message carries no '{PARTITION_ID}': the crfl ServerApp assigns every node its partition. "
            f"Got the keys {sorted(config)} instead."
        )
    return check_int(f"train config '{PARTITION_ID}'", config[PARTITION_ID], low=0, high=num_clients - 1)


def make_client_app(dataset: Dataset | None = None, *, data_dir_key: str = "data-dir") -> ClientApp:
    """A ``ClientApp`` running :func:`client_round`.

    Args:
        dataset: use this dataset instead of loading ``data.name`` (tests, notebooks; it is
            pickled into Ray's workers in simulation).
        data_dir_key: a node_config key that, when set, overrides ``data.data_dir`` on this
            node (a SuperNode reading its own copy of the files).
    """
    app = ClientApp()
    cache: dict[str, Setup] = {}

    def setup_for(text: str, context: Context) -> Setup:
        data_dir = context.node_config.get(data_dir_key)
        key = f"{data_dir}\n{text}"
        if key not in cache:
            d = config_from_json(text)
            if data_dir:
                d.setdefault("data", {})["data_dir"] = str(data_dir)
            cache.clear()  # one run at a time per worker
            from crfl.plugins import load_entry_points

            load_entry_points()  # installed plugins (crfl.plugins): the run's own parts, on every node
            cache[key] = prepare(from_dict(d), dataset)
        return cache[key]

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        config = next(iter(msg.content.config_records.values()))
        if CRFL_CONFIG not in config:
            raise ConfigError(f"The train message carries no '{CRFL_CONFIG}'; was it sent by the crfl ServerApp?")
        setup = setup_for(str(config[CRFL_CONFIG]), context)
        k = _assigned_partition(config, context, setup.data.num_clients)
        t = int(config[SERVER_ROUND])
        params = record_to_params(next(iter(msg.content.array_records.values())))
        res = client_round(setup, params, k, t)
        arrays = ArrayRecord({PARAMS_KEY: Array(np.ascontiguousarray(res.model.numpy()))})
        content = RecordDict({ARRAYS_KEY: arrays, METRICS_KEY: MetricRecord(res.metrics)})
        return Message(content=content, reply_to=msg)

    return app

#: The app ``flwr run`` loads (``crfl.flower.client_app:app``).
app = make_client_app()

__all__ = ["ClientResult", "app", "client_round", "make_client_app"]
