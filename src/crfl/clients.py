"""Local training of all clients of a round as one batched computation (Section 3.1).

Client i starts from the global model w~_{t-1} and runs tau_i steps of plain
SGD, w_s = w_{s-1} - eta * g_i(w_{s-1}; xi_s), each g_i the mean cross-entropy
gradient over a mini-batch of n_B samples (a short last batch is averaged over
its actual size). It sends w_{t tau_i} - w~_{t-1}.

Instead of a Python loop over clients, every local step of every client is one
batched tensor operation: the K clients' parameters are a (K, D) tensor and the
s-th batches of all clients a (K, n_B, d) tensor. Clients with fewer local
iterations (tau_i < max tau) or a short batch are handled by per-sample
weights: a padded slot has weight 0, so the result is exactly that of the
per-client loop (:func:`local_updates_loop`, kept as the reference).

Batches are drawn per client per round from ``numpy_generator(seed, "batches",
t, i)``: each local epoch is a fresh permutation of the client's shard cut into
ceil(n_i / n_B) batches; tau_i batches are taken in order. Attackers poison the
first q_B positions of each batch (Section 3.2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from crfl.model import Model
from crfl.rng import numpy_generator
from crfl.validation import ConfigError


@dataclass(frozen=True)
class ClientData:
    """The federated training data: shared storage plus each client's sample indices."""

    x: torch.Tensor  # (n, d) storage dtype (uint8 pixels or float32 features)
    y: torch.Tensor  # (n,) int64
    input_scale: float
    indices: tuple[np.ndarray, ...]

    @property
    def num_clients(self) -> int:
        return len(self.indices)

    @property
    def sizes(self) -> np.ndarray:
        return np.array([len(ix) for ix in self.indices], dtype=np.int64)

    def raw_inputs(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Stored values as floats (pixels 0..255) for storage rows (any shape of row indices).

        ``index_select`` on the flat row list is several times faster than advanced indexing.
        """
        return self.x.index_select(0, rows.reshape(-1)).to(dtype).view(*rows.shape, self.x.shape[1])

    def inputs(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Model inputs x / input_scale for storage rows (any shape of row indices)."""
        x = self.raw_inputs(rows, dtype)
        return x.mul_(1.0 / self.input_scale) if self.input_scale != 1.0 else x


def local_iterations(sizes: Sequence[int], batch_size: int, local_iters: int | None, local_epochs: int) -> np.ndarray:
    """tau_i: a fixed number of iterations, or local_epochs * ceil(n_i / n_B)."""
    if local_iters is not None:
        return np.full(len(sizes), int(local_iters), dtype=np.int64)
    return np.array([local_epochs * math.ceil(n / batch_size) for n in sizes], dtype=np.int64)


def client_batches(num_samples: int, batch_size: int, tau: int, rng: np.random.Generator) -> np.ndarray:
    """(tau, n_B) positions into a client's shard, -1 where a short last batch has no sample.

    Epoch e is ``rng.permutation(num_samples)`` cut into ceil(n / n_B) batches; the tau batches are
    the first tau of the epochs in order (ceil(tau / batches per epoch) permutations drawn, one per
    epoch, as a loop over the steps draws them). An empty shard has only empty batches.
    """
    per_epoch = math.ceil(num_samples / batch_size)
    if tau <= 0 or per_epoch == 0:
        return np.full((max(tau, 0), batch_size), -1, dtype=np.int64)
    epochs = math.ceil(tau / per_epoch)
    pos = np.full((epochs, per_epoch * batch_size), -1, dtype=np.int64)
    for e in range(epochs):
        pos[e, :num_samples] = rng.permutation(num_samples)
    return pos.reshape(epochs * per_epoch, batch_size)[:tau]


def client_round_batches(shard: np.ndarray, client: int, batch_size: int, tau: int, seed: int, t: int) -> np.ndarray:
    """Global sample indices of client ``client``'s batches in round t: (tau, n_B), -1 padded.

    A pure function of (seed, t, client): a client computing alone (e.g. a Flower ClientApp)
    draws exactly the batches it draws in the batched simulator.
    """
    pos = client_batches(len(shard), batch_size, int(tau), numpy_generator(seed, "batches", t, client))
    if len(shard) % batch_size == 0 and len(shard) > 0:  # every batch full: no padded slot
        return shard.take(pos)
    return np.where(pos >= 0, shard[np.maximum(pos, 0)], -1)


def round_batches(data: ClientData, batch_size: int, tau: np.ndarray, seed: int, t: int) -> np.ndarray:
    """Global sample indices of every client's batches in round t: (K, max tau, n_B), -1 padded."""
    K = data.num_clients
    taus = [int(v) for v in tau]
    idx = np.empty((K, max(taus, default=0), batch_size), dtype=np.int64)
    for i, shard in enumerate(data.indices):
        idx[i, : taus[i]] = client_round_batches(shard, i, batch_size, taus[i], seed, t)
        idx[i, taus[i] :] = -1
    return idx


@dataclass(frozen=True)
class Poison:
    """Which batch slots are poisoned in this round, with what trigger, to which label."""

    mask: torch.Tensor  # (K, tau, n_B) bool
    deltas: torch.Tensor  # (K, d) trigger per client (zero rows for benign clients)
    target: int
    low: float = 0.0
    high: float = 1.0


def poison_slots(idx: np.ndarray, attackers: Sequence[int], q_B: int) -> torch.Tensor:
    """The first q_B positions of every (non-empty) batch of each attacker (Section 3.2)."""
    mask = np.zeros(idx.shape, dtype=bool)
    for a in attackers:
        mask[a, :, :q_B] = idx[a, :, :q_B] >= 0
    return torch.from_numpy(mask)


def poison_ratio_per_step(idx: np.ndarray, mask: np.ndarray | torch.Tensor, client: int) -> float:
    """Mean over the client's local steps of (poisoned samples / batch size) — Lemma 7's q_B/n_B.

    Equal to q_B/n_B when every batch is full; a short last batch with r < n_B samples has
    min(q_B, r)/r poisoned, more than q_B/n_B. Lemma 6 with a step-dependent ||B_s|| gives
    Delta_tau <= 2 eta sum_s ||B_s||, so the certificate needs tau * (this mean) = sum_s q_s/n_s.
    """
    m = np.asarray(mask)[client]
    valid = idx[client] >= 0
    sizes = valid.sum(axis=1)
    steps = sizes > 0
    if not steps.any():
        return 0.0
    return float((m[steps].sum(axis=1) / sizes[steps]).mean())


def nominal_poison_ratio(num_samples: int, batch_size: int, q_B: int, tau: int) -> float:
    """:func:`poison_ratio_per_step` for the batch sizes a client of ``num_samples`` will see."""
    per_epoch = math.ceil(num_samples / batch_size)
    sizes = [min(batch_size, num_samples - j * batch_size) for j in range(per_epoch)]
    seq = [sizes[s % per_epoch] for s in range(tau)]
    return float(np.mean([min(q_B, r) / r for r in seq]))


@dataclass
class PoisonStats:
    """Actual ||x' - x|| of the poisoned samples per attacker (clamping can shrink the trigger)."""

    count: np.ndarray
    max_norm: np.ndarray
    sum_norm: np.ndarray

    @staticmethod
    def empty(K: int) -> "PoisonStats":
        return PoisonStats(np.zeros(K, np.int64), np.zeros(K), np.zeros(K))

    def add(self, k: torch.Tensor, norms: torch.Tensor) -> None:
        kk = k.numpy()
        nn_ = norms.double().numpy()
        np.add.at(self.count, kk, 1)
        np.add.at(self.sum_norm, kk, nn_)
        np.maximum.at(self.max_norm, kk, nn_)


def _batch(
    data: ClientData, idx_s: torch.Tensor, pmask_s: torch.Tensor | None, poison: Poison | None, dtype: torch.dtype,
    stats: PoisonStats | None, scaled: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs (K, n_B, d), labels (K, n_B) and averaging weights (K, n_B) of one local step.

    With ``scaled=False`` the inputs stay in storage units (x * input_scale) for a model that
    folds the scale into its weights; the trigger is still applied in model units.
    """
    valid = idx_s >= 0
    rows = idx_s.clamp(min=0)
    X = data.inputs(rows, dtype) if scaled else data.raw_inputs(rows, dtype)
    Y = data.y.index_select(0, rows.reshape(-1)).view(rows.shape)
    if poison is not None and pmask_s is not None and bool(pmask_s.any()):
        k, j = torch.nonzero(pmask_s, as_tuple=True)
        unit = 1.0 if scaled else data.input_scale
        clean = X[k, j] / unit
        dirty = torch.clamp(clean + poison.deltas[k].to(dtype), poison.low, poison.high)
        X[k, j] = dirty * unit
        Y = Y.clone()
        Y[k, j] = poison.target
        if stats is not None:
            stats.add(k, torch.linalg.vector_norm((dirty - clean).double(), dim=1))
    count = valid.sum(dim=1, keepdim=True).clamp(min=1)
    weight = valid.to(dtype) / count.to(dtype)
    return X, Y, weight


def local_updates(
    model: Model,
    params: torch.Tensor,
    data: ClientData,
    idx: np.ndarray,
    lr: float,
    poison: Poison | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, PoisonStats]:
    """Run every client's local SGD at once; return the updates w_i - w (K, D) and poison stats.

    ``params``: the global model (D,) every client starts from, or one start per client (K, D)
    (an ensemble's clients start from their group's model). The logistic model takes the fused
    path (:func:`crfl.local.linear_local_updates`, the same step in fewer operations), any other
    model the generic step :func:`local_updates_generic`.
    """
    from crfl import local  # the fused step lives with the round (crfl.local imports this module)

    if local.fused_linear_applies(model):
        return local.linear_local_updates(model, params, data, idx, lr, dtype, poison)  # type: ignore[arg-type]
    return local_updates_generic(model, params, data, idx, lr, poison, dtype)


def local_updates_generic(
    model: Model,
    params: torch.Tensor,
    data: ClientData,
    idx: np.ndarray,
    lr: float,
    poison: Poison | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, PoisonStats]:
    """:func:`local_updates` for any model: one batched gradient (``model.loss_grad``) per local step."""
    K, tau_max, _ = idx.shape
    idx_t = torch.from_numpy(idx)
    start = params.to(dtype)
    if start.ndim == 2 and start.shape[0] != K:
        raise ValueError(f"local_updates: {start.shape[0]} start models for {K} clients")
    local = start.clone() if start.ndim == 2 else start.unsqueeze(0).repeat(K, 1)
    stats = PoisonStats.empty(K)
    fold = getattr(model, "folds_input_scale", False) and data.input_scale != 1.0
    for s in range(tau_max):
        pm = poison.mask[:, s] if poison is not None else None
        X, Y, weight = _batch(data, idx_t[:, s], pm, poison, dtype, stats, scaled=not fold)
        grad = model.loss_grad(local, X, Y, weight, 1.0 / data.input_scale) if fold else model.loss_grad(local, X, Y, weight)
        local.sub_(grad, alpha=lr)
    return local - (start if start.ndim == 2 else start.unsqueeze(0)), stats


def local_updates_shared(
    model: Model,
    params: torch.Tensor,
    data: ClientData,
    idx: np.ndarray,
    lr: float,
    client_weights: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Benign local SGD of every client from each of K global models (K, D) on the same batches.

    Returns the aggregated update sum_i p_i (w_i - w) (K, D) for the client weights p (N,),
    without materialising the N K D local updates. For the linear model only
    (``sgd_step_shared_``): the K models of a client meet the same inputs, so every step is one
    wide product per client.
    """
    if not hasattr(model, "sgd_step_shared_"):
        raise ConfigError(f"The model {getattr(model, 'name', model)!r} has no shared-batch step; the mixture certificate needs the linear model.")
    N, tau_max, _ = idx.shape
    K = params.shape[0]
    C, d = model.num_classes, model.num_features
    start = params.to(dtype)
    W0, b0 = model.split(start)  # (K, C, d), (K, C)
    W = W0.reshape(1, K * C, d).repeat(N, 1, 1)
    b = b0.reshape(1, K, C).repeat(N, 1, 1)
    idx_t = torch.from_numpy(idx)
    fold = data.input_scale != 1.0
    for s in range(tau_max):
        X, Y, weight = _batch(data, idx_t[:, s], None, None, dtype, None, scaled=not fold)
        model.sgd_step_shared_(W, b, X, Y, weight, lr, 1.0 / data.input_scale if fold else 1.0)
    p = client_weights.to(dtype)
    Wm = torch.einsum("n,nkd->kd", p, W.view(N, K, C * d))
    bm = torch.einsum("n,nk->k", p, b.view(N, K * C)).view(K, C)
    return torch.cat([Wm, bm], dim=1).sub_(start, alpha=float(p.sum()))
