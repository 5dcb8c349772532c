"""The ensemble of G group models over Flower: the client-level certificate in a real federation.

:class:`FlowerEnsembleRound` is the Flower engine's round for ``ensemble.kind: partition |
sampled`` (:mod:`crfl.ensemble`). The server owns the groups (the configuration's rule,
never a client's statement): group g is one :class:`~crfl.flower.strategy.CRFL` strategy
restricted to its members' partitions, all G sharing one partition-to-node binding
(:class:`~crfl.flower.strategy.Roster`). In round t the server sends every member of every
group its group's model w~^g_{t-1} (a client of several sampled groups gets one message per
group), screens and weights the replies with the server's p_i renormalized per group, and
aggregates per group; with ``ensemble.server_step`` each group's model is clipped to rho_t and
perturbed with the noise of :func:`crfl.ensemble.noise_stream`, as the simulator's
:class:`crfl.ensemble.EnsembleRound` does, so both engines train the same G models.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import torch
from flwr.app import ConfigRecord
from flwr.serverapp import Grid

from crfl import rundir
from crfl.driver import Finish, RoundOutput, RunState
from crfl.ensemble import EnsembleRound, Groups, noise_stream, redacted
from crfl.flower.records import CRFL_CONFIG, config_to_json, params_to_record, record_to_params
from crfl.flower.strategy import CRFL, Roster
from crfl.setup import Setup

log = logging.getLogger("crfl.flower")

#: rho_t of a group without CRFL's server step: no clipping (a norm never reaches it).
NO_CLIP = 1e300


def group_strategies(setup: Setup, groups: Groups, inner_factory: Any, *, noise_seed: int | None = None,
                     node_partitions: dict[int, int] | None = None, node_timeout: float = 120.0) -> list[CRFL]:
    """One CRFL strategy per group: its members' partitions, one shared binding, its own noise stream.

    ``inner_factory()`` makes each group's aggregation strategy (one instance per group).
    """
    roster = Roster(groups.num_clients, node_partitions)
    step = setup.cfg.ensemble.server_step
    out = []
    for g, members in enumerate(groups.members):
        out.append(CRFL(
            inner_factory(), rho=setup.rho if step else NO_CLIP, sigma=setup.sigma if step else 0.0,
            rounds=setup.rounds, seed=setup.cfg.seed, num_clients=groups.num_clients, weights=setup.weights,
            noise_seed=noise_seed, partitions=members, roster=roster, noise_stream=noise_stream(groups, g),
            node_timeout=node_timeout,
        ))
    return out


class FlowerEnsembleRound(EnsembleRound):
    """The G group models trained over a Flower grid (the driver's Round for an ensemble run over Flower)."""

    def __init__(self, setup: Setup, groups: Groups, grid: Grid, strategies: list[CRFL], round_timeout: float,
                 seed_drawn: bool | None = None) -> None:
        super().__init__(setup, groups, seed_drawn)
        self.engine = rundir.FLOWER
        self.grid, self.strategies, self.round_timeout = grid, strategies, round_timeout
        self._config_json = config_to_json(redacted(setup.cfg))  # without the subsets' seed
        if len(strategies) != groups.G:
            raise ValueError(f"{len(strategies)} strategies for G = {groups.G} groups")

    def __call__(self, params: torch.Tensor, t: int, *, trigger: bool = True) -> RoundOutput:
        from crfl.flower.server_app import push_and_pull

        setup, plan = self.setup, self.setup.plan
        messages, group_of = [], []
        for g, s in enumerate(self.strategies):
            msgs = list(s.configure_train(t, params_to_record(params[g]), ConfigRecord({CRFL_CONFIG: self._config_json}),
                                          self.grid))
            messages += msgs
            group_of += [g] * len(msgs)
        ids, replies = push_and_pull(self.grid, messages, self.round_timeout) if messages else ([], [])
        by_id = dict(zip(ids, group_of))
        per_group: list[list[Any]] = [[] for _ in self.strategies]
        for r in replies:
            g = by_id.get(r.metadata.reply_to_message_id)
            if g is not None:
                per_group[g].append(r)
        new = torch.empty_like(params)
        logs, norms, clipped, fixed = [], [], [], True
        for g, s in enumerate(self.strategies):
            arrays, _ = s.aggregate_train(t, per_group[g])
            new[g] = record_to_params(arrays).to(params.dtype)
            rec = s.history[t]
            logs.append({"group": g, **rec.to_dict()})
            norms.append(rec.norm_before_clip)
            clipped.append(rec.clipped)
            fixed &= bool(rec.fixed_weights)
        if not setup.cfg.ensemble.server_step:  # no clip: the norms of the new models
            norms = [float(torch.linalg.vector_norm(new[g].double())) for g in range(len(norms))]
            clipped = []
        weights = [w for g, s in enumerate(self.strategies) for a in plan.attackers
                   if a in self.groups.members[g] and (w := s.history[t].weight_of(a)) is not None]
        row, entry = self.record(params, t, norms, clipped, fixed, weights)
        return RoundOutput(new, row, entry, None, {"round": t, "groups": logs})

    def identity(self) -> dict[str, Any]:
        """The noise seed's digest and the groups: a resumed run must use the same."""
        s = self.strategies[0]
        members = hashlib.blake2b(json.dumps(self.groups.to_dict(), sort_keys=True).encode(), digest_size=8).hexdigest()
        noise = hashlib.blake2b(str(int(s.noise_seed)).encode(), digest_size=8).hexdigest()
        return {"noise": noise, "groups": members}

    def provenance(self) -> dict[str, Any]:
        import flwr

        prov = super().provenance()
        prov["flower"] = {"flwr_version": flwr.__version__, "inner_strategy": type(self.strategies[0].strategy).__name__,
                          "binding": "operator's node table" if self.strategies[0].roster.fixed
                          else "server: first N nodes seen, by node id"}
        return prov

    def finish(self, state: RunState) -> Finish:
        fin = super().finish(state)
        skipped = sorted({r["round"] for r in state.logs for gl in r["groups"] if gl["skipped"] is not None})
        nothing = [r["round"] for r in state.logs if all(gl["skipped"] is not None for gl in r["groups"])]
        fin.extra.update({
            "replies_rejected": sum(len(gl["rejected"]) for r in state.logs for gl in r["groups"]),
            "replies_missing": sum(len(gl["missing"]) for r in state.logs for gl in r["groups"]),
            # a group without a valid reply keeps its model: it still depends on its own members only
            "rounds_with_a_skipped_group": skipped,
            "rounds_with_contributions": self.setup.rounds - len(nothing),
            "certifiable": True,
            "not_certifiable_because": None,
        })
        fin.files["flower.json"] = {"rounds": state.logs}
        return fin
