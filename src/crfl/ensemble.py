"""An ensemble of G group models and the client-level certificate: any attack by m malicious clients.

The paper's certificate (:mod:`crfl.certify`) bounds a trigger's magnitude for attackers who
otherwise follow the protocol. This module certifies against clients that send *anything*, for
any model, by training G global models on groups of clients and taking their majority vote
(Cao, Jia and Gong, AAAI 2021, "Provably secure federated learning against malicious clients";
FLCert, Cao, Zhang, Jia and Gong, IEEE TIFS 2022). Two kinds (``ensemble.kind``):

- ``partition`` (FLCert-D): the server splits the N clients into G disjoint groups by its own
  rule (a permutation of the client ids drawn from ``numpy_generator(seed, "ensemble-groups")``,
  dealt out in turn: group sizes differ by at most one; a client's statements never enter it),
  and trains one global model per group by federated averaging over that group only.
- ``sampled`` (Ensemble FL / FLCert-P): G models, model g trained on a uniform random subset S_g
  of k clients, drawn by the server from ``numpy_generator(sample_seed, "ensemble-sample", g)``;
  ``sample_seed`` is drawn from the operating system when training starts (recorded in the run's
  config.yaml, which only the server sees; the configuration sent to Flower clients leaves it out)
  unless the configuration fixes it.

All G models train as one batched computation (:class:`EnsembleRound`): every (group, client)
pair is a row of :func:`crfl.local.local_round` that starts from its group's model, and the
aggregation is a registered rule applied per group. ``ensemble.server_step`` applies CRFL's
clip to rho_t and noise sigma_t to every model (partition: drawn per group, ``("server-noise", t, g)``;
sampled: one sequence for all models, :func:`noise_stream`).

The certificates (proofs in docs/theory.md (i)); which clients are malicious is fixed before
training, and the group rule and the subsets are the server's:

- partition: with n_c(x) the votes of the G models and c_A the plurality class (ties to the
  smallest class), m malicious clients sit in at most m groups, whose models they control
  entirely; the vote cannot change iff for every c != c_A, n_A - m > n_c + m, or n_A - m = n_c + m
  with c_A < c. :func:`partition_certified` gives the largest such m, m*(x); it is tight (m* + 1
  malicious clients in groups that voted c_A can make them vote for the runner-up).
- sampled: p_c(x) = Pr_S[model on S predicts c]; a model whose S avoids the m malicious clients
  is unchanged, so each p_c moves by at most delta_m = 1 - C(N-m, k) / C(N, k). With simultaneous
  bounds p_A_lower, p_B_upper from the G models' votes (probability >= 1 - alpha over the draw of
  the subsets), the prediction c_A is certified for every m with
  p_A_lower - p_B_upper > 2 delta_m (:func:`sampled_certified`).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from crfl import aggregation, rundir
from crfl.attacks import GroupInfo
from crfl.bounds import select_and_bound
from crfl.config import Config
from crfl.driver import BaseRound, Finish, RoundOutput, attack_record
from crfl.local import local_round
from crfl.rng import numpy_generator
from crfl.server import server_step
from crfl.setup import Setup, evaluation_inputs
from crfl.validation import ConfigError, fail

#: m*(x) of a point whose prediction is not certified even without malicious clients (sampled kind).
ABSTAIN = -1


# ---------------------------------------------------------------------------------------------
# the groups


@dataclass(frozen=True)
class Groups:
    """Which clients train which of the G group models (``members[g]``, sorted client ids)."""

    kind: str
    num_clients: int
    members: tuple[tuple[int, ...], ...]
    clients_per_model: int | None = None

    @property
    def G(self) -> int:
        return len(self.members)

    def rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(group, client) of every training row: the pairs of the batched round, group by group."""
        g = np.concatenate([np.full(len(m), i, dtype=np.int64) for i, m in enumerate(self.members)])
        c = np.concatenate([np.asarray(m, dtype=np.int64) for m in self.members])
        return g, c

    def group_of(self, client: int) -> list[int]:
        return [g for g, m in enumerate(self.members) if client in m]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_clients": self.num_clients, "clients_per_model": self.clients_per_model,
                "members": [list(m) for m in self.members]}


def partition_groups(num_clients: int, G: int, seed: int) -> Groups:
    """FLCert-D's disjoint groups: a seeded permutation of the client ids dealt out to G groups in turn."""
    if G > num_clients:
        raise fail("ensemble.groups", f"an integer in [1, {num_clients}] (at most data.num_clients) for the partition kind", G)
    perm = numpy_generator(seed, "ensemble-groups").permutation(num_clients)
    return Groups("partition", num_clients, tuple(tuple(sorted(int(c) for c in perm[g::G])) for g in range(G)))


def sampled_groups(num_clients: int, G: int, k: int, sample_seed: int) -> Groups:
    """G uniform subsets of k clients without replacement, subset g from ("ensemble-sample", g)."""
    if k > num_clients:
        raise fail("ensemble.clients_per_model", f"an integer in [1, {num_clients}] (at most data.num_clients)", k)
    members = tuple(
        tuple(sorted(int(c) for c in numpy_generator(sample_seed, "ensemble-sample", g).choice(num_clients, k, replace=False)))
        for g in range(G)
    )
    return Groups("sampled", num_clients, members, clients_per_model=k)


def noise_stream(groups: Groups, g: int) -> tuple[int, ...]:
    """The server-noise indices of group g (``("server-noise", t, *stream)``) with ``ensemble.server_step``.

    partition: each group its own noise, ``(g,)``. sampled: one noise sequence for every model, ``()``, so
    that model g is f_{S_g}(x; omega) with the same omega for all g: the G models are then independent,
    identically distributed draws of f_S (docs/theory.md (i)), which the vote shares' bounds need.
    """
    return () if groups.kind == "sampled" else (int(g),)


def redacted(cfg: Config) -> dict[str, Any]:
    """The configuration a client is sent: without the sampled kind's subset seed, which only the server knows."""
    d = cfg.to_dict()
    d["ensemble"]["sample_seed"] = None
    return d


def build_groups(cfg: Config, num_clients: int) -> Groups:
    e = cfg.ensemble
    if e.kind == "partition":
        return partition_groups(num_clients, e.groups, cfg.seed)
    if e.kind == "sampled":
        if e.sample_seed is None:
            raise ConfigError("The 'ensemble.sample_seed' parameter must be fixed before training (fix_sample_seed).")
        return sampled_groups(num_clients, e.groups, int(e.clients_per_model), e.sample_seed)
    raise fail("ensemble.kind", "'partition' or 'sampled' for an ensemble", e.kind)


def fix_sample_seed(cfg: Config) -> Config:
    """The configuration with the sampled kind's subset seed drawn from the OS (secrets), if not given.

    Drawn when training starts, after the configuration (and so the malicious clients) is fixed,
    and written to config.yaml: a resumed run redraws the same subsets, and the draw is recorded.
    """
    if cfg.ensemble.kind == "sampled" and cfg.ensemble.sample_seed is None:
        return cfg.replace(**{"ensemble.sample_seed": secrets.randbits(62)})
    return cfg


def is_ensemble(cfg: Config) -> bool:
    return cfg.ensemble.kind != "none"


# ---------------------------------------------------------------------------------------------
# votes and the certificates (docs/theory.md (i))


def vote_counts(predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """(n, C) votes of G models from their (G, n) predicted classes."""
    P = np.asarray(predictions, dtype=np.int64)
    G, n = P.shape
    counts = np.zeros((n, num_classes), dtype=np.int64)
    np.add.at(counts, (np.tile(np.arange(n), G), P.reshape(-1)), 1)
    return counts


def plurality(counts: np.ndarray) -> np.ndarray:
    """The class with the most votes; ties go to the smallest class (``np.argmax`` takes the first)."""
    return np.argmax(np.asarray(counts), axis=1).astype(np.int64)


def partition_certified(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(prediction c_A, m*(x)) of the partition ensemble: the largest m that cannot change the vote.

    m malicious clients control at most m groups, each of which may move its vote from c_A to any
    c: the gap n_A - n_c shrinks by at most 2m. For c > c_A a tie still predicts c_A, so the
    condition is n_A - n_c >= 2m, m <= floor((n_A - n_c) / 2); for c < c_A the tie goes to c,
    so n_A - n_c > 2m, m <= ceil((n_A - n_c) / 2) - 1. m*(x) is the minimum over c != c_A.
    """
    counts = np.asarray(counts, dtype=np.int64)
    n, C = counts.shape
    pred = plurality(counts)
    n_a = counts[np.arange(n), pred]
    gap = n_a[:, None] - counts  # >= 0 for every class; > 0 for classes below c_A
    cls = np.arange(C)[None, :]
    m_c = np.where(cls > pred[:, None], gap // 2, -((-gap) // 2) - 1)
    m_c[np.arange(n), pred] = np.iinfo(np.int64).max
    m_star = m_c.min(axis=1) if C > 1 else np.full(n, np.iinfo(np.int64).max)
    return pred, m_star.astype(np.int64)


def log_untouched(N: int, k: int, m: np.ndarray | int) -> np.ndarray:
    """log(C(N - m, k) / C(N, k)) = sum_{j<k} log(1 - m / (N - j)): the probability that a uniform
    k-subset of N clients avoids m given clients (-inf where N - m < k)."""
    m = np.atleast_1d(np.asarray(m, dtype=np.float64))
    j = np.arange(k, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.log1p(-np.minimum(m[:, None] / (N - j[None, :]), 1.0))
    out = terms.sum(axis=1)
    return np.where(N - m >= k, out, -np.inf)


#: delta_m is rounded up by this relative amount (and 1e-15 absolute): the certificate's comparison
#: stays sound with the few ulps of error the log-space sum carries.
DELTA_ROUND_UP = 1e-12


def delta_m(N: int, k: int, m: np.ndarray | int) -> np.ndarray:
    """delta_m = 1 - C(N-m, k) / C(N, k), the most a vote share can move with m malicious clients."""
    out = -np.expm1(log_untouched(N, k, m))
    return out if np.ndim(m) else out[0]


def sampled_certified(p_a_lower: np.ndarray, p_b_upper: np.ndarray, N: int, k: int) -> np.ndarray:
    """m*(x): the largest m with p_A_lower - p_B_upper > 2 delta_m (ABSTAIN = -1 where not even m = 0).

    delta_m increases with m, so m* is found by a search over the table delta_0..delta_N.
    """
    gap = np.asarray(p_a_lower, dtype=np.float64) - np.asarray(p_b_upper, dtype=np.float64)
    table = 2.0 * np.minimum(delta_m(N, k, np.arange(N + 1)) * (1 + DELTA_ROUND_UP) + 1e-15, 1.0)  # nondecreasing
    table[0] = 0.0  # no malicious client moves nothing
    # number of m in 0..N with 2 delta_m < gap, minus one
    return (np.searchsorted(table, gap, side="left") - 1).astype(np.int64)


@dataclass(frozen=True)
class EnsembleCertificate:
    """Per test point: the ensemble's prediction, the votes for it and the runner-up, m*(x)."""

    prediction: np.ndarray  # c_A, or -1 where the sampled kind abstains
    m_star: np.ndarray  # the certified number of malicious clients (ABSTAIN = -1)
    counts: np.ndarray  # (n, C) votes
    p_a_lower: np.ndarray | None = None
    p_b_upper: np.ndarray | None = None


def certify_votes(groups: Groups, counts: np.ndarray, alpha: float) -> EnsembleCertificate:
    """The client-level certificate of an ensemble from its votes (partition: exact; sampled: with 1 - alpha)."""
    if groups.kind == "partition":
        pred, m = partition_certified(counts)
        m = np.minimum(m, groups.num_clients)
        return EnsembleCertificate(pred, m, counts)
    b = select_and_bound(counts, alpha, "clopper-pearson", "simultaneous")
    m = sampled_certified(b.p_a_lower, b.p_b_upper, groups.num_clients, int(groups.clients_per_model))
    pred = np.where(m >= 0, b.c_a, ABSTAIN)
    return EnsembleCertificate(pred, m, counts, b.p_a_lower, b.p_b_upper)


def certified_accuracy(cert: EnsembleCertificate, labels: np.ndarray, ms: np.ndarray) -> np.ndarray:
    """Fraction of points predicted right and certified for m malicious clients, for every m in ``ms``."""
    ok = cert.prediction == np.asarray(labels)
    return np.array([float((ok & (cert.m_star >= m)).mean()) if len(ok) else 0.0 for m in ms])


# ---------------------------------------------------------------------------------------------
# training: the G models in one batched round


def ensemble_predictions(setup: Setup, params: torch.Tensor, X: torch.Tensor, chunk: int = 4096) -> np.ndarray:
    """(G, n) predicted classes of the G models (rows of ``params``) on model inputs X.

    The linear model's G models are one product per chunk: the input map once, then
    X (n, d) @ [W_1; ...; W_G]^T (d, G C); other models are evaluated one after another.
    """
    G, n = params.shape[0], X.shape[0]
    out = np.empty((G, n), dtype=np.int64)
    model, P = setup.model, params.to(setup.dtype)
    if getattr(model, "is_linear", False):
        W, b = model.split(P)  # (G, C, d), (G, C)
        C = W.shape[1]
        Wt, bt = W.reshape(G * C, -1).T, b.reshape(G * C)
        for i in range(0, n, chunk):
            Xi = model.input_map(X[i : i + chunk].to(setup.dtype))
            out[:, i : i + chunk] = torch.addmm(bt, Xi, Wt).view(-1, G, C).argmax(dim=2).T.numpy()
        return out
    shared = getattr(model, "logits_shared", None)  # the CNN: G models on the same inputs in one pass
    if shared is not None:
        with torch.no_grad():
            for i in range(0, n, chunk):
                out[:, i : i + chunk] = shared(P, X[i : i + chunk].to(setup.dtype)).argmax(dim=2).numpy()
        return out
    for g in range(G):
        for i in range(0, n, chunk):
            out[g, i : i + chunk] = model.predict(P[g], X[i : i + chunk].to(setup.dtype)).numpy()
    return out


@dataclass
class EnsembleRound(BaseRound):
    """The simulator's round for an ensemble: the G group models of :class:`Groups` in one batched step.

    The state is the (G, D) stack of group models. Every (group, client) pair of
    :meth:`Groups.rows` trains from its group's model on the client's batches of round t (the
    batches depend on (seed, t, client) only), attackers included; each group aggregates its
    rows with the configured rule and the clients' configured weights (renormalized per group).
    """

    setup: Setup
    groups: Groups
    seed_drawn: bool | None = None  # sampled: the subsets' seed was drawn from the OS by this run (None: unknown, a resume)
    engine: str = field(default=rundir.SIMULATOR, init=False)
    trains_twin: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self._g, self._c = self.groups.rows()
        self._slices = [np.flatnonzero(self._g == g) for g in range(self.groups.G)]

    def __call__(self, params: torch.Tensor, t: int, *, trigger: bool = True) -> RoundOutput:
        setup, cfg, plan = self.setup, self.setup.cfg, self.setup.plan
        start = params.index_select(0, torch.from_numpy(self._g))
        loc = local_round(setup, start, t, self._c.tolist(), trigger=trigger, groups=self.group_info(params, t))
        updates, weights, fixed = self._aggregate(loc.updates)
        new = torch.empty_like(params)
        norms, clipped = [], []
        for g in range(self.groups.G):
            upd = updates[g].to(params.dtype)
            if cfg.ensemble.server_step:
                new[g], info = server_step(params[g], upd, t=t, rounds=setup.rounds, rho_t=setup.rho(t),
                                           sigma_t=setup.sigma(t), seed=cfg.seed, stream=noise_stream(self.groups, g))
                norms.append(info.norm_before_clip)
                clipped.append(info.clipped)
            else:
                new[g] = params[g] + upd
        if not cfg.ensemble.server_step:
            norms = torch.linalg.vector_norm(new.double(), dim=1).tolist()
        p_attackers: list[float] = []
        if plan.active(t) and weights is not None:
            p_attackers = [float(weights[r]) for r, c in enumerate(self._c) if plan.is_attacker(int(c))]
        row, entry = self.record(params, t, norms, clipped, fixed, p_attackers)
        return RoundOutput(new, row, entry)

    def _aggregate(self, updates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """(G, D) aggregated updates in float64, each row's effective weight in its group (None where the rule
        has none) and whether every group's weights were fixed before the updates were seen.

        FedAvg (the rule without options) is one weighted ``index_add_`` over the rows: sum_i p_i u_i / sum_i p_i
        per group; any other rule runs per group on its rows (:func:`crfl.aggregation.aggregate`).
        """
        cfg, setup = self.setup.cfg, self.setup
        g_t = torch.from_numpy(self._g)
        w = setup.weights[torch.from_numpy(self._c)].double()
        if cfg.aggregation.name == "fedavg" and not cfg.aggregation.options:
            if not bool(torch.isfinite(updates).all()):
                raise ConfigError("The client updates must be finite; some hold NaN or inf.")
            total = torch.zeros(self.groups.G, dtype=torch.float64).index_add_(0, g_t, w)
            p = w / total[g_t]
            out = torch.zeros(self.groups.G, updates.shape[1], dtype=torch.float64)
            return out.index_add_(0, g_t, updates.double() * p[:, None]), p, True
        out = torch.empty(self.groups.G, updates.shape[1], dtype=torch.float64)
        eff: torch.Tensor | None = torch.empty(len(self._g), dtype=torch.float64)
        fixed = True
        for g, rows in enumerate(self._slices):
            r = torch.from_numpy(rows)
            agg = aggregation.aggregate(cfg.aggregation.name, updates[r].double(), w[r], **cfg.aggregation.options)
            out[g] = agg.update
            fixed &= bool(agg.fixed_weights)
            if eff is not None and agg.weights is not None:
                eff[r] = agg.weights.double()
            else:
                eff = None
        return out, eff, fixed

    def record(self, params: torch.Tensor, t: int, norms: list[float], clipped: list[bool], fixed: bool,
               attacker_weights: list[float]) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Round t's rounds.csv fields and attack.json entry, from the groups' norms (before the clip with
        ``ensemble.server_step``, else of the new models), clip flags and the attackers' in-group weights."""
        setup, plan, step = self.setup, self.setup.plan, self.setup.cfg.ensemble.server_step
        row: dict[str, Any] = {
            "norm_before_clip": max(norms),
            "rho": setup.rho(t) if step else None,
            "sigma": (setup.sigma(t) if t < setup.rounds else 0.0) if step else None,
            "clipped": int(any(clipped)),
            "attack": int(plan.active(t)),
            "aggregation_fixed_weights": int(fixed),
        }
        entry = None
        if plan.active(t) and plan.attackers:
            first = self.groups.group_of(plan.attackers[0])
            entry = attack_record(setup, t, params[first[0] if first else 0], None, measured={
                "groups_of_attackers": {str(a): self.groups.group_of(a) for a in plan.attackers},
                "attacker_weights_in_groups": attacker_weights,
            })
        return row, entry

    def group_info(self, params: torch.Tensor, t: int) -> list[GroupInfo | None] | None:
        """What an attacker row knows of its group in an attack round (its start model, members, weights)."""
        plan = self.setup.plan
        if not plan.active(t) or not plan.attackers:
            return None
        out: list[GroupInfo | None] = []
        for g, c in zip(self._g, self._c):
            if plan.is_attacker(int(c)):
                members = self.groups.members[int(g)]
                out.append(GroupInfo(params[int(g)], members, self.setup.weights[list(members)].double(), int(g)))
            else:
                out.append(None)
        return out

    def init_params(self) -> torch.Tensor:
        """Every group model starts from the run's w_0 (one initial model for all, as in FLCert)."""
        return self.setup.w0.unsqueeze(0).repeat(self.groups.G, 1)

    def provenance(self) -> dict[str, Any]:
        return {"ensemble": {"kind": self.groups.kind, "groups": self.groups.G,
                             "clients_per_model": self.groups.clients_per_model,
                             "group_sizes": [len(m) for m in self.groups.members],
                             "sample_seed_drawn": self.seed_drawn}}

    def finish(self, state: Any) -> Finish:
        return Finish(extra={"ensemble": {"kind": self.groups.kind, "groups": self.groups.G}},
                      model={"ensemble": self.groups.to_dict()})

    def evaluate(self, params: torch.Tensor) -> tuple[float, float]:
        """(clean, backdoor) accuracy of the ensemble's plurality vote."""
        setup = self.setup
        c = evaluation_inputs(setup)
        X = c.get("X")
        if X is None:
            from crfl.setup import model_inputs

            X = model_inputs(setup.dataset, setup.dataset.x_test, setup.dtype)
        C = setup.dataset.num_classes
        pred = plurality(vote_counts(ensemble_predictions(setup, params, X), C))
        clean = float((pred == c["y"].numpy()).mean()) if len(pred) else math.nan
        mask = c["mask"]
        if mask.sum() == 0:
            return clean, math.nan
        Xb = c.get("Xb")
        if Xb is None:
            Xb = setup.plan.trigger.apply(X[torch.from_numpy(mask)])
        pb = plurality(vote_counts(ensemble_predictions(setup, params, Xb), C))
        return clean, float((pb == setup.plan.target).mean())


__all__ = [
    "ABSTAIN", "EnsembleCertificate", "EnsembleRound", "Groups", "build_groups", "certified_accuracy", "certify_votes",
    "delta_m", "fix_sample_seed", "is_ensemble", "partition_certified",
    "partition_groups", "plurality", "sampled_certified", "sampled_groups", "vote_counts",
]


# ---------------------------------------------------------------------------------------------
# certification of an ensemble run (crfl certify RUN_DIR on a run with ensemble.kind != none)

CLIENT_LEVEL_COLUMNS = ["index", "label", "prediction", "n_a", "n_b", "p_a_lower", "p_b_upper", "m_star", "correct"]

GUARANTEES = {
    "partition": (
        "With the server's groups fixed and the malicious clients fixed before training, any m <= m*(x) malicious "
        "clients, sending anything in any round, change at most m of the G group models, and the plurality vote of the "
        "ensemble at this input stays c_A (ties go to the smallest class): exact, for this run's randomness."
    ),
    "sampled": (
        "With the malicious clients fixed before the server drew the G subsets of k clients, any m <= m*(x) malicious "
        "clients, sending anything, leave the ensemble classifier's prediction c_A = argmax_c Pr_S[model trained on S "
        "predicts c] unchanged; the vote shares' bounds hold simultaneously with probability >= 1 - alpha over the "
        "draw of the subsets."
    ),
}


def stored_groups(final: dict[str, Any], setup: Setup, where: str) -> Groups:
    """The groups model_final.pt records, checked against the rule the configuration gives (one source of truth)."""
    rec = final.get("ensemble")
    if not isinstance(rec, dict) or "members" not in rec:
        raise ConfigError(f"{where} records no ensemble groups: retrain the run with this version of crfl.")
    want = build_groups(setup.cfg, setup.data.num_clients)
    got = Groups(str(rec.get("kind")), int(rec.get("num_clients", -1)), tuple(tuple(int(c) for c in m) for m in rec["members"]),
                 rec.get("clients_per_model"))
    if got != want:
        raise ConfigError(f"{where} records groups that the configuration's rule does not give: the file belongs to "
                          "another run or was edited; retrain.")
    if tuple(final["params"].shape) != (want.G, setup.model.num_params):
        raise ConfigError(f"{where} holds {tuple(final['params'].shape)} parameters; the ensemble has "
                          f"G = {want.G} models of {setup.model.num_params}.")
    return want


def certify_ensemble(
    run_dir: Any, cfg: Config, final: dict[str, Any], *, dataset: Any = None, module: Any = None, out_dir: Any = None,
) -> dict[str, Any]:
    """The client-level certificate of an ensemble run, for the clean and the backdoored test sets.

    Writes ``client_level_{clean,backdoor}.csv`` (one row per test point: votes, bounds, m*(x))
    and summary.json's ``certificate`` and ``client_level`` blocks (certified accuracy against m).
    """
    import time
    from pathlib import Path

    from crfl.setup import model_inputs, prepare

    t0 = time.perf_counter()
    src = Path(run_dir)
    setup = prepare(cfg, dataset, module)
    groups = stored_groups(final, setup, str(src / rundir.MODEL))
    e, cz = setup.cfg.ensemble, setup.cfg.certify
    ds = setup.dataset
    n = len(ds.y_test) if cz.num_test is None else min(cz.num_test, len(ds.y_test))
    X = model_inputs(ds, ds.x_test[:n], setup.dtype)
    y = ds.y_test[:n].astype(np.int64)
    sets = {"clean": X, "backdoor": setup.plan.trigger.apply(X)}
    C = ds.num_classes
    results: dict[str, Any] = {}
    rows: dict[str, list[list[Any]]] = {}
    top = 0
    certs = {}
    for k, Xk in sets.items():
        counts = vote_counts(ensemble_predictions(setup, final["params"], Xk), C)
        certs[k] = certify_votes(groups, counts, e.alpha)
        top = max(top, int(certs[k].m_star.max(initial=0)))
    ms = np.arange(0, min(top, groups.num_clients) + 2)
    for k, cert in certs.items():
        pred = cert.prediction
        order = np.argsort(-cert.counts, axis=1, kind="stable")
        n_a = cert.counts[np.arange(n), order[:, 0]]
        n_b = cert.counts[np.arange(n), order[:, 1]] if C > 1 else np.zeros(n, dtype=np.int64)
        acc = certified_accuracy(cert, y, ms)
        results[k] = {
            "points": n,
            "ensemble_accuracy": float((plurality(cert.counts) == y).mean()) if n else None,
            "abstain_rate": float((cert.m_star < 0).mean()) if n else None,
            "median_m_star": float(np.median(cert.m_star)) if n else None,
            "curve": [{"m": int(m), "certified_accuracy": float(a)} for m, a in zip(ms, acc)],
        }
        rows[k] = [
            [i, int(y[i]), int(pred[i]), int(n_a[i]), int(n_b[i]),
             None if cert.p_a_lower is None else float(cert.p_a_lower[i]),
             None if cert.p_b_upper is None else float(cert.p_b_upper[i]),
             int(cert.m_star[i]), int(pred[i] == y[i])]
            for i in range(n)
        ]
    prov = (rundir.RunDir(src).read_config().get("provenance") or {}).get("ensemble") or {}
    secret = e.kind != "sampled" or prov.get("sample_seed_drawn") is True
    block = {
        "reading": "client-level",
        "kind": groups.kind,
        "guarantee": GUARANTEES[groups.kind],
        "groups": groups.G,
        "num_clients": groups.num_clients,
        "clients_per_model": groups.clients_per_model,
        "group_sizes": [len(m) for m in groups.members],
        "tie_rule": "smallest class",
        "alpha": e.alpha if groups.kind == "sampled" else None,
        "bound": "clopper-pearson, simultaneous over the C classes" if groups.kind == "sampled" else "exact vote count",
        "radius_certified": False,
        "client_level_certified": secret,
        "note": "m*(x) counts malicious clients; the trigger-radius certificate of the paper does not apply to an ensemble",
    }
    assumptions = {
        "radius_certified": False,
        "client_level_certified": secret,
        "checks": {
            "groups_are_the_servers": {"holds": True, "detail": "the groups follow the configuration's rule "
                                       "(seeded permutation / subsets), checked against model_final.pt"},
            "malicious_clients_fixed_before_training": {
                "holds": secret,
                "detail": ("the subsets' seed was drawn from the OS when training started" if secret else
                           "the subsets' seed was given in the configuration: the statement holds only if the malicious "
                           "clients were chosen without knowing it") if groups.kind == "sampled"
                else "partition: the certificate holds for any set of m clients, wherever they sit"},
        },
        "scope": ["A malicious client controls its group's model entirely (any update, any round); "
                  "benign clients follow the protocol; the test input is fixed before training."],
    }
    blocks = {"certificate": block, "client_level": results, "assumptions": assumptions, "results": None, "twin": None}
    with rundir.results_for(out_dir if out_dir is not None else src, base=src) as rs:
        for k in sets:
            rs.write_csv(f"client_level_{k}.csv", CLIENT_LEVEL_COLUMNS, rows[k])
        blocks["certify_seconds"] = time.perf_counter() - t0
        summary = rs.update_summary(blocks)
    return summary
