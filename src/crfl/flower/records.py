"""What travels in Flower messages: the global model, the run's config, a client's report.

The global model w~_{t-1} is sent as an ``ArrayRecord``. crfl's own models are one
flat parameter vector (weights and bias, the vector whose norm the server clips,
Section 4.1) stored under the key ``params``; any other ``ArrayRecord`` (e.g. a
PyTorch ``state_dict`` of another Flower app) is treated as the concatenation of
its arrays in key order, so the CRFL wrapper clips the norm of *all* parameters.

The ServerApp sends the fully resolved crfl configuration (JSON) in every train
message's ``ConfigRecord`` under ``crfl-config``: clients never guess the
schedule, the seed or the attack. A client answers with one ``ArrayRecord``
(its local model) and one ``MetricRecord`` whose keys belong to :data:`REPLY_METRICS`.
The server tells each node which partition it trains (``partition-id`` in the train
message's ``ConfigRecord``): partitions are bound to node identities by the server.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

#: Key of the flat parameter vector in an ArrayRecord.
PARAMS_KEY = "params"
#: Keys of the records inside a message's RecordDict (Flower's defaults).
ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
CONFIG_KEY = "config"
#: ConfigRecord entries the ServerApp adds to every train message.
CRFL_CONFIG = "crfl-config"
SERVER_ROUND = "server-round"
#: The partition the server assigns to a node (train ConfigRecord) and, in a reply, the one it trained;
#: node_config keys of Flower's simulation (the client ignores them: the server assigns).
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"

#: The MetricRecord of a client's reply: name -> (kind, meaning). The server validates every reply
#: against this schema (unknown keys, wrong types and non-finite values are rejected), never against
#: what the other clients sent. None of these values enters an aggregation weight or a certificate:
#: the server owns p_i, tau_i, eta, gamma and q_B/n_B; the client's numbers are bookkeeping that the
#: simulation records under ``measured``.
REPLY_METRICS: dict[str, tuple[str, str]] = {
    "partition-id": ("int", "the partition the client trained on; must be the one the server assigned"),
    "num-examples": ("int", "samples the client trained on this round, min(n_i, tau_i n_B)"),
    "weight": ("float", "the client's configured p_i as it read it (ignored: the server's table is used)"),
    "tau": ("int", "tau_i the client ran (ignored: the server prescribes it)"),
    "lr": ("float", "eta_i the client used (ignored: the server prescribes it)"),
    "attacker": ("int", "1 if the client poisoned and scaled this round (simulation bookkeeping)"),
    "gamma": ("float", "the scale the client applied (simulation bookkeeping)"),
    "poison-ratio": ("float", "mean over local steps of poisoned / batch size (simulation bookkeeping)"),
    "nominal-poison-ratio": ("float", "the configured q_B / n_B (simulation bookkeeping)"),
    "delta-norm": ("float", "||delta|| of the client's local trigger (simulation bookkeeping)"),
    "poisoned-samples": ("int", "number of poisoned samples trained on"),
    "delta-norm-max": ("float", "largest actual ||x' - x|| after clamping"),
    "delta-norm-mean": ("float", "mean actual ||x' - x|| after clamping"),
    "seconds": ("float", "local training time"),
}


@dataclass(frozen=True)
class Layout:
    """How a flat vector maps back onto an ArrayRecord: keys, shapes and dtypes, in order."""

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @property
    def size(self) -> int:
        return int(sum(int(np.prod(s, dtype=np.int64)) for s in self.shapes))


def params_to_record(params: torch.Tensor, layout: Layout | None = None) -> ArrayRecord:
    """A flat parameter vector as an ArrayRecord (one ``params`` array, or split by ``layout``)."""
    vec = params.detach().cpu().numpy()
    if layout is None:
        return ArrayRecord({PARAMS_KEY: Array(np.ascontiguousarray(vec))})
    out, start = {}, 0
    for key, shape, dtype in zip(layout.keys, layout.shapes, layout.dtypes):
        n = int(np.prod(shape, dtype=np.int64))
        out[key] = Array(np.ascontiguousarray(vec[start : start + n].reshape(shape).astype(dtype)))
        start += n
    return ArrayRecord(out)


def record_layout(record: ArrayRecord) -> Layout:
    keys = tuple(record.keys())
    return Layout(keys, tuple(tuple(record[k].shape) for k in keys), tuple(record[k].dtype for k in keys))


def record_to_params(record: ArrayRecord) -> torch.Tensor:
    """The flat vector of an ArrayRecord: its arrays flattened and concatenated in key order.

    The dtype is the arrays' common floating dtype (float64 if they differ).
    """
    arrays = [np.asarray(record[k].numpy()) for k in record.keys()]
    if not arrays:
        raise ValueError("The ArrayRecord holds no array; there is no model to read.")
    dtype = arrays[0].dtype if all(a.dtype == arrays[0].dtype for a in arrays) else np.dtype(np.float64)
    if not np.issubdtype(dtype, np.floating):
        dtype = np.dtype(np.float64)
    flat = np.concatenate([a.reshape(-1).astype(dtype, copy=False) for a in arrays])
    return torch.from_numpy(np.ascontiguousarray(flat))


def config_to_json(cfg_dict: Mapping[str, Any]) -> str:
    """The resolved config as the JSON string carried in ``crfl-config`` (inf encoded as Infinity)."""
    return json.dumps(cfg_dict, sort_keys=True)


def config_from_json(text: str) -> dict[str, Any]:
    return json.loads(text)
