"""The clients' side of a round of Algorithm 1, with Section 3.2's attacker: one implementation for every engine.

:func:`local_round` runs the local SGD of any set of clients from the global model w~_{t-1}:
the batches of client i in round t are a pure function of (seed, t, i)
(:func:`crfl.clients.client_round_batches`), so a batched simulator round over all N clients
and a Flower ClientApp training one partition compute the same update for that client. In an
attack round an attacker poisons the first q_B samples of every batch (trigger delta_x added,
label swapped to the target) and scales its update by gamma (model replacement:
w~_{t-1} + gamma (w_i - w~_{t-1})). Under another attack kind (``attack.kind``,
:mod:`crfl.attacks`) an attacker relabels its shard before local SGD (data level) or replaces
its row of the updates after it (update level).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from crfl import kernels
from crfl.attacks import BACKDOOR, GroupInfo, attack_update, lookup_attack, relabel_shards
from crfl.clients import (
    ClientData, Poison, PoisonStats, client_round_batches, local_updates, poison_ratio_per_step, poison_slots, round_batches,
)
from crfl.model import LinearModel, Model
from crfl.setup import Setup
from crfl.validation import ConfigError


@dataclass
class LocalRound:
    """Local updates u_i = w_i - w~_{t-1} of ``clients`` (rows in that order; gamma applied to attackers)."""

    clients: list[int]
    updates: torch.Tensor  # (len(clients), D)
    stats: PoisonStats  # actual ||x' - x|| of the poisoned samples, per row
    idx: np.ndarray  # (len(clients), max tau, n_B) sample indices, -1 padded
    poison: Poison | None
    attacking: list[bool]  # per row: an attacker in an attack round (follows the threat model)

    def poison_ratio(self, row: int) -> float:
        """The mean over the row's local steps of q_s / n_s (0 for a clean client)."""
        return poison_ratio_per_step(self.idx, self.poison.mask, row) if self.poison is not None else 0.0


def local_round(
    setup: Setup,
    params: torch.Tensor,
    t: int,
    clients: Sequence[int] | None = None,
    *,
    attacking: bool = True,
    trigger: bool = True,
    scaling: bool = True,
    groups: Sequence[GroupInfo | None] | None = None,
) -> LocalRound:
    """Round t's local training of ``clients`` (default: all N, batched) from w~_{t-1} = ``params``.

    ``params`` is the global model (D,), or one start model per client row (len(clients), D): the
    clients of an ensemble start from their group's model.

    ``trigger=False`` gives the counterfactual twin the coupled certificate compares with (the
    paper's D against D'): the same batches, the attackers' poisoned slots keep the target label
    and the gamma scaling, only the trigger delta_x is left out. ``attacking=False`` drops the
    poisoning altogether (no label swap either); ``scaling=False`` drops the model replacement.

    Other attack kinds: ``attacking=False`` drops the attack (the attackers train honestly); the
    twin (``trigger=False``) attacks as the run does, as these kinds have no trigger. ``groups``
    (one :class:`~crfl.attacks.GroupInfo` or None per row) is what an update-level attacker knows
    of its group in an ensemble; None: the federation is one group.
    """
    cfg, plan = setup.cfg, setup.plan
    n_B = cfg.clients.batch_size
    if clients is None:
        rows = list(range(setup.data.num_clients))
        idx = round_batches(setup.data, n_B, setup.tau, cfg.seed, t)
    else:
        rows = [int(c) for c in clients]
        taus = [int(setup.tau[c]) for c in rows]
        idx = np.full((len(rows), max(taus, default=0), n_B), -1, dtype=np.int64)
        for r, (c, tau) in enumerate(zip(rows, taus)):
            idx[r, :tau] = client_round_batches(setup.data.indices[c], c, n_B, tau, cfg.seed, t)
    active = plan.active(t)
    bad = [active and plan.is_attacker(c) for c in rows]
    poison = None
    if attacking and plan.poison_per_batch > 0 and any(bad):
        deltas = torch.zeros(len(rows), setup.dataset.num_features, dtype=setup.dtype)
        if trigger:
            for r, c in enumerate(rows):
                if bad[r]:
                    deltas[r] = plan.local_triggers[c].delta.to(setup.dtype)
        mask = poison_slots(idx, [r for r in range(len(rows)) if bad[r]], plan.poison_per_batch)
        poison = Poison(mask=mask, deltas=deltas, target=plan.target)
    level = lookup_attack(plan.attack).level
    if groups is not None and len(groups) != len(rows):
        raise ConfigError(f"The 'groups' parameter must hold one entry per row ({len(rows)}). Got {len(groups)} instead.")
    data = setup.data
    if attacking and level == "data" and any(bad):
        data = relabel_shards(setup, t, rows, bad, idx)  # the attackers train on relabelled shards
    updates, stats = local_updates(setup.model, params, data, idx, cfg.clients.lr, poison, setup.dtype)
    if scaling and level == BACKDOOR:
        for r in range(len(rows)):
            if bad[r]:
                updates[r] *= plan.gamma  # model replacement
    if attacking and level == "update":
        for r, c in enumerate(rows):
            if bad[r]:  # the attacker sends what it chooses instead of its honest update
                start = (params if params.dim() == 1 else params[r]).to(setup.dtype)
                group = groups[r] if groups is not None else None
                updates[r] = attack_update(setup, t, c, start, updates[r], group)
    return LocalRound(rows, updates, stats, idx, poison, [bool(b) for b in bad])


# ---------------------------------------------------------------------------------------------
# the fused local SGD of the logistic model (crfl.clients.local_updates calls it)


def fused_linear_applies(model: Model) -> bool:
    """Whether :func:`linear_local_updates` computes this model's local SGD (the logistic model)."""
    return isinstance(model, LinearModel)


_KERNEL_TYPES = {torch.float64: "float64", torch.float32: "float32", torch.uint8: "uint8"}


def _linear_kernel(model: LinearModel, data: ClientData, dtype: torch.dtype):  # noqa: ANN202 (a ctypes function)
    """The compiled local SGD (``crfl/kernels/linear_sgd.cpp``) for this compute dtype and storage
    type, or None: kernels off or not built, a model with an input bound (the map P stays on the torch
    path), a compute dtype other than float32/float64 or a storage type other than uint8/float32/float64."""
    if model.input_bound is not None or dtype not in (torch.float32, torch.float64) or data.x.dtype not in _KERNEL_TYPES:
        return None
    lib = kernels.load("linear_sgd")
    if lib is None:
        return None
    fn = getattr(lib, f"linear_sgd_{_KERNEL_TYPES[dtype]}_{_KERNEL_TYPES[data.x.dtype]}")
    if fn.argtypes is None:
        fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_void_p] + [ctypes.c_int64] * 6 + [ctypes.c_double] * 2
        fn.restype = ctypes.c_int
    return fn


def linear_engine(model: Model, data: ClientData, dtype: torch.dtype) -> str:
    """Which engine runs :func:`linear_local_updates` here (provenance): 'compiled' (the C++ kernel,
    for rounds without poisoned slots and the clean clients of an attack round) or 'torch'."""
    ok = fused_linear_applies(model) and _linear_kernel(model, data, dtype) is not None  # type: ignore[arg-type]
    return "compiled" if ok else "torch"


def linear_local_updates(
    model: LinearModel, params: torch.Tensor, data: ClientData, idx: np.ndarray, lr: float, dtype: torch.dtype,
    poison: Poison | None = None,
) -> tuple[torch.Tensor, PoisonStats]:
    """Every client's local SGD of the logistic model at once, as :func:`crfl.clients.local_updates_generic`
    computes it, in fewer and larger operations; returns the updates (K, D) and the poison statistics.

    Engines: the compiled kernel (``crfl/kernels/linear_sgd.cpp``, the same operations per step, one
    client's tau steps per call, the clients split over threads) trains every client without a
    poisoned slot in this round; a client with poisoned slots (an attacker in an attack round), a model
    with an input bound, or kernels off or unavailable (``CRFL_KERNELS=0``, no compiler) take the torch
    path :func:`linear_local_updates_torch`, the reference. Both agree up to float rounding.
    """
    fn = _linear_kernel(model, data, dtype)
    K = idx.shape[0]
    if fn is None or K == 0:
        return linear_local_updates_torch(model, params, data, idx, lr, dtype, poison)
    bad = poison.mask.reshape(K, -1).any(dim=1) if poison is not None else torch.zeros(K, dtype=torch.bool)
    clean = torch.nonzero(~bad).flatten()
    dirty = torch.nonzero(bad).flatten()
    start = params.to(dtype)
    if start.ndim == 2 and start.shape[0] != K:
        raise ValueError(f"linear_local_updates: {start.shape[0]} start models for {K} clients")
    out = torch.empty(K, model.num_params, dtype=dtype)
    stats = PoisonStats.empty(K)
    if len(clean):
        sub = clean.numpy()
        idx_c = np.ascontiguousarray(idx[sub], dtype=np.int64) if len(dirty) else np.ascontiguousarray(idx, dtype=np.int64)
        starts = (start.index_select(0, clean) if len(dirty) else start).contiguous() if start.ndim == 2 else start.contiguous()
        upd = out if not len(dirty) else torch.empty(len(clean), model.num_params, dtype=dtype)
        x, y = data.x.contiguous(), data.y.to(torch.int64).contiguous()
        idx_t = torch.from_numpy(idx_c)
        stride = model.num_params if starts.ndim == 2 else 0
        kk, tau_max, n_B = idx_c.shape
        failed = []

        def work(lo: int, hi: int) -> None:
            rc = fn(kernels.ptr(x), kernels.ptr(y), kernels.ptr(idx_t), kernels.ptr(starts), stride, kernels.ptr(upd),
                    lo, hi, tau_max, n_B, model.num_features, model.num_classes, float(lr), 1.0 / data.input_scale)
            if rc != 0:
                failed.append(rc)

        kernels.parallel_for(kk, work)
        if failed:
            raise MemoryError("linear_sgd: the kernel could not allocate its buffers")
        if len(dirty):
            out[clean] = upd
    if len(dirty):
        sub = dirty.numpy()
        p = Poison(mask=poison.mask[dirty], deltas=poison.deltas[dirty], target=poison.target, low=poison.low, high=poison.high)
        upd_d, st = linear_local_updates_torch(model, start[dirty] if start.ndim == 2 else start, data, idx[sub], lr, dtype, p)
        out[dirty] = upd_d
        stats.count[sub], stats.max_norm[sub], stats.sum_norm[sub] = st.count, st.max_norm, st.sum_norm
    return out, stats


def linear_local_updates_torch(
    model: LinearModel, params: torch.Tensor, data: ClientData, idx: np.ndarray, lr: float, dtype: torch.dtype,
    poison: Poison | None = None,
) -> tuple[torch.Tensor, PoisonStats]:
    """:func:`linear_local_updates` in torch (the reference the compiled kernel is tested against).

    Poisoned slots (``poison``) are treated as the generic path treats them: the trigger is added in
    model units and clamped to the data's box, the label becomes the target (in the round's targets).

    Step s of client k is w <- w - eta sum_j a_j (softmax(W x_j + b) - e_{y_j}) [x_j; 1]^T (Eq. 24),
    a_j = 1/|B_s| for a sample of the batch and 0 for a padded slot. Against the generic path:

    - the round's labels and averaging weights are gathered once, as the weighted one-hot targets
      a_j e_{y_j} (K, tau, n_B, C); a step's rows are gathered in their storage type and converted
      into one reused float buffer (a gather of the whole round's rows at once is slower: it leaves the cache);
    - W (K, C, d) and b (K, C) are kept apart during the steps; the gradient product is fused into
      the update (``W.baddbmm_(G^T, X, alpha=-eta / scale)``), so the gradient is never a tensor;
    - the batch stays in storage units (0..255 pixels as floats): the 1/scale of the inputs goes into
      the (much smaller) weights for the logits and into the update's ``alpha``, instead of a pass over
      the batch (with an input bound, the map P is applied to the batch in those units, as the generic path does).

    Each batch is converted to floats once and streamed by two products, the logits X W^T and the
    update G^T X; about 12 operations per local step instead of 25. Equal to the generic path up to
    float rounding (tests/test_perf_equivalence.py). :func:`crfl.clients.local_updates` calls it for
    the logistic model.
    """
    K, tau_max, n_B = idx.shape
    C, d = model.num_classes, model.num_features
    start = params.to(dtype)
    if start.ndim == 2 and start.shape[0] != K:
        raise ValueError(f"linear_local_updates: {start.shape[0]} start models for {K} clients")
    starts = start if start.ndim == 2 else start.unsqueeze(0).expand(K, -1)
    W0, b0 = model.split(starts)
    W, b = W0.contiguous().clone(), b0.contiguous().clone()  # (K, C, d), (K, C)
    idx_t = torch.from_numpy(idx)
    valid = idx_t >= 0
    rows = idx_t.clamp(min=0)
    # a_j: 1 / (samples in the batch) for a sample, 0 for a padded slot (an empty step changes nothing)
    weight = valid.to(dtype) / valid.sum(dim=2, keepdim=True).clamp(min=1).to(dtype)
    labels = data.y.index_select(0, rows.reshape(-1)).view(K, tau_max, n_B)
    stats = PoisonStats.empty(K)
    pmask = poison.mask if poison is not None else None
    if pmask is not None:
        labels = labels.masked_fill(pmask, poison.target)  # a poisoned slot's label is the target
    target = torch.zeros(K, tau_max, n_B, C, dtype=dtype)
    target.scatter_(-1, labels.unsqueeze(-1), weight.unsqueeze(-1))
    poisoned_steps = set(torch.nonzero(pmask.any(dim=2).any(dim=0)).flatten().tolist()) if pmask is not None else set()
    step_rows = rows.transpose(0, 1).reshape(tau_max, K * n_B)  # step s: the K clients' rows
    inv = 1.0 / data.input_scale
    bound = model.input_bound
    X = torch.empty(K, n_B, d, dtype=dtype)
    for s in range(tau_max):
        # the step's rows in their storage type (uint8 pixels), converted to floats once, into one buffer
        X.view(K * n_B, d).copy_(data.x.index_select(0, step_rows[s]))
        if s in poisoned_steps:  # as crfl.clients._batch: x' = clamp(x + delta) in model units, stored back
            k, j = torch.nonzero(pmask[:, s], as_tuple=True)
            clean = X[k, j] / data.input_scale
            dirty = torch.clamp(clean + poison.deltas[k].to(dtype), poison.low, poison.high)
            X[k, j] = dirty * data.input_scale
            stats.add(k, torch.linalg.vector_norm((dirty - clean).double(), dim=1))
        Xm = X if bound is None else bound.apply(X, inv)  # the model's input map P, in storage units
        # logits (K, n_B, C): the weights scaled first, as the generic step does (the product of the
        # unscaled ones with 0..255 pixels would overflow float32 earlier when a run diverges)
        Z = torch.baddbmm(b.unsqueeze(1), Xm, (W * inv if inv != 1.0 else W).transpose(1, 2))
        Z.sub_(Z.amax(dim=-1, keepdim=True)).exp_()
        # G = a_j softmax(z_j) - a_j e_{y_j}: the weighted softmax minus the weighted one-hot target
        G = Z.mul_(weight[:, s].unsqueeze(-1) / Z.sum(dim=-1, keepdim=True)).sub_(target[:, s])
        W.baddbmm_(G.transpose(1, 2), Xm, alpha=-lr * inv)
        b.sub_(G.sum(dim=1), alpha=lr)
    return torch.cat([W.view(K, C * d), b], dim=1).sub_(starts), stats
