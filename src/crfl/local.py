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

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from crfl.attacks import BACKDOOR, GroupInfo, attack_update, lookup_attack, relabel_shards
from crfl.clients import Poison, PoisonStats, client_round_batches, local_updates, poison_ratio_per_step, poison_slots, round_batches
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
