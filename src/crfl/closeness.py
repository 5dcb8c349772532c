"""Model closeness of the coupled runs: how far the attack can move the final model (docs/theory.md (g)).

Fix all training randomness omega (initial model, batches, server noise) and compare the
attacked run (data D', the trigger delta_x on the attackers' poisoned slots) with its
counterfactual twin on the same omega without the trigger (data D: same labels, same scaling).
Both runs are deterministic given omega. Under Assumption 1 (convex, beta-smooth loss) with
eta <= 2/beta a gradient step on a fixed batch is nonexpansive; FedAvg with weights fixed
before the updates are seen and summing to <= 1, the clip (a projection onto a ball) and the
shared noise are nonexpansive too. So, with d_t = ||w'_t - w_t||:

- a benign round keeps d_t <= d_{t-1};
- an attack round k (attackers i with weight p_i, scale gamma_i, step eta_i, Q_i = sum over
  the local steps of q_s/n_s) gives d_t <= Lip_k d_{t-1} + A_k ||delta||, where
  A_k = sum_i p_i gamma_i eta_i L_Z,i Q_i (the poisoned gradient differs from the clean one by
  at most (q_s/n_s) L_Z ||delta|| per step; the paper's Lemma 6 has a factor 2 too many) and
  Lip_k = |1 - P - sum_i p_i (gamma_i - 1)| + (P - sum_i p_i) + sum_i p_i gamma_i
  (P = sum of all weights of the round; = 1 + 2 sum_i p_i (gamma_i - 1) when P = 1) is the
  Lipschitz constant of the scaled aggregation w + sum_j p_j g_j (G_j(w) - w).

The final models therefore lie within D(||delta||) = ||delta|| c(B) of each other,
c(B) = sum_k A_k(B) prod_{k' > k} Lip_k'. L_Z (:func:`crfl.lipschitz.lz_centred`) depends on
the bound B on the inputs the attacked steps see, which must cover the triggered inputs
x + delta: B = B_0 + ||delta||, so the certified radius is the fixed point
r c(B_0 + r) = budget (:func:`solve_radius`), not an assumption. When the model itself projects
every input onto the ball of radius B_0 (``model.input_norm_bound``), the triggered inputs it sees
lie within B_0 too and the trigger still moves them by at most ||delta|| (the projection is
1-Lipschitz), so B = B_0 and the radius is budget / c(B_0) (``enforced=True``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from crfl.lipschitz import SupportGeometry, lz_centred_array, lz_support_array
from crfl.validation import ConfigError, check_real

__all__ = ["AttackTerm", "round_lipschitz", "attack_coefficient", "deviation_coefficient", "solve_radius"]


@dataclass(frozen=True)
class AttackTerm:
    """One attack round's ingredients, all server-owned (attack.json's entry)."""

    round: int
    p: tuple[float, ...]  # aggregation weight p_i of each attacker in this round
    gamma: tuple[float, ...]
    eta: tuple[float, ...]
    tau: tuple[int, ...]
    poison_ratio: tuple[float, ...]  # mean over the local steps of q_s / n_s; Q_i = tau_i * this
    start_opnorm: float  # ||(I - 11^T/C) W~_{t-1}||_2 of the broadcast model
    p_total: float = 1.0  # sum of all clients' weights in the round
    # the trigger's support S when the certificate covers triggers on S only (None: anywhere); see lz
    support: SupportGeometry | None = None

    def __post_init__(self) -> None:
        n = len(self.p)
        for name in ("gamma", "eta", "tau", "poison_ratio"):
            if len(getattr(self, name)) != n:
                raise ConfigError(
                    f"The '{name}' parameter must have one entry per attacker, like 'p' ({n}). "
                    f"Got {len(getattr(self, name))} entries instead."
                )
        for i in range(n):
            check_real(f"p[{i}]", self.p[i], low=0.0, high=1.0)
            check_real(f"gamma[{i}]", self.gamma[i], low=0.0, high=math.inf, high_open=True)
            check_real(f"eta[{i}]", self.eta[i], low=0.0, high=math.inf, high_open=True)
            check_real(f"tau[{i}]", self.tau[i], low=0.0, high=math.inf, high_open=True)
            check_real(f"poison_ratio[{i}]", self.poison_ratio[i], low=0.0, high=1.0)
        check_real("start_opnorm", self.start_opnorm, low=0.0, high=math.inf, high_open=True)
        check_real("p_total", self.p_total, low=0.0, high=math.inf, high_open=True)

    def lz(self, tau: float, eta: float, B: float | np.ndarray) -> np.ndarray:
        """L_Z of one attacker's local steps at input bound B: :func:`crfl.lipschitz.lz_centred` for triggers
        anywhere, :func:`crfl.lipschitz.lz_support` for triggers on the support S (docs/theory.md (g), steps 3, 3b)."""
        if self.support is None:
            return lz_centred_array(self.start_opnorm, tau, eta, B)
        return lz_support_array(self.start_opnorm, tau, eta, B, self.support)

    @property
    def Q(self) -> tuple[float, ...]:
        """Q_i = sum over attacker i's local steps of q_s / n_s."""
        return tuple(t * q for t, q in zip(self.tau, self.poison_ratio))

    @staticmethod
    def from_record(rec: Mapping[str, Any]) -> "AttackTerm":
        """From an attack.json entry (:func:`crfl.train.attack_record`)."""
        missing = [k for k in ("round", "p", "gamma", "eta", "tau", "poison_ratio", "start_centred_opnorm") if rec.get(k) is None]
        if missing:
            raise ConfigError(
                f"The attack record of round {rec.get('round')!r} lacks {missing}: the coupled certificate needs every "
                "attacker's aggregation weight and the broadcast model's centred operator norm."
            )
        return AttackTerm(
            round=int(rec["round"]), p=tuple(float(v) for v in rec["p"]), gamma=tuple(float(v) for v in rec["gamma"]),
            eta=tuple(float(v) for v in rec["eta"]), tau=tuple(int(v) for v in rec["tau"]),
            poison_ratio=tuple(float(v) for v in rec["poison_ratio"]),
            start_opnorm=float(rec["start_centred_opnorm"]), p_total=float(rec.get("p_total", 1.0)),
        )


def round_lipschitz(term: AttackTerm) -> float:
    """Lip_k of the twin's aggregation in an attack round: how a deviation present before it grows.

    The scaled round maps w to (1 - P - sum_i p_i (gamma_i - 1)) w + sum_{benign} p_j G_j(w)
    + sum_i p_i gamma_i G_i(w) with every G nonexpansive, so its constant is the sum of the
    absolute coefficients.
    """
    sp = sum(term.p)
    spg = sum(p * g for p, g in zip(term.p, term.gamma))
    return abs(1.0 - term.p_total - (spg - sp)) + (term.p_total - sp) + spg


def attack_coefficient(term: AttackTerm, B: float | np.ndarray) -> float | np.ndarray:
    """A_k(B) = sum_i p_i gamma_i eta_i L_Z,i(B) Q_i: the deviation added per unit of ||delta||.

    L_Z,i is :func:`crfl.lipschitz.lz_centred` for attacker i, or :func:`crfl.lipschitz.lz_support` when the
    term carries a trigger support (:meth:`AttackTerm.lz`, vectorised over B)."""
    out = np.zeros(np.shape(B))
    for p, g, e, t, Q in zip(term.p, term.gamma, term.eta, term.tau, term.Q):
        out = out + p * g * e * Q * term.lz(t, e, B)
    return float(out) if np.ndim(B) == 0 else out


def deviation_coefficient(terms: Sequence[AttackTerm], B: float | np.ndarray) -> float | np.ndarray:
    """c(B) with ||w'_T - w_T|| <= c(B) ||delta|| (attack rounds composed in order, benign rounds 1-Lipschitz)."""
    c = np.zeros(np.shape(B))
    for term in sorted(terms, key=lambda k: k.round):
        c = round_lipschitz(term) * c + attack_coefficient(term, B)
    return float(c) if np.ndim(B) == 0 else c


def solve_radius(
    budget: np.ndarray | float, terms: Sequence[AttackTerm], input_norm_bound: float, *, enforced: bool = False
) -> np.ndarray:
    """The largest r with r c(B_0 + r) <= budget, per entry (the certified radius).

    ``budget`` is the parameter distance the smoothed (or base) prediction tolerates. r c(B_0 + r)
    is continuous and increasing from 0, so the solution is unique; found by bisection in
    [0, budget / c(B_0)] (geometric steps first) to relative precision 1e-15. budget <= 0 gives 0; an infinite budget
    or c = 0 gives inf.

    ``enforced=True``: the model projects every input, triggered ones included, onto ||x|| <= B_0, so
    L_Z is taken at B_0 and the radius is budget / c(B_0) (docs/theory.md (g)).
    """
    B0 = check_real("input_norm_bound", input_norm_bound, low=0.0, high=math.inf, high_open=True)
    b = np.atleast_1d(np.asarray(budget, dtype=np.float64))
    if np.any(np.isnan(b)):
        raise ConfigError("The 'budget' parameter must not be NaN.")
    out = np.zeros_like(b)
    c0 = deviation_coefficient(terms, B0)
    if c0 == 0.0:
        out[b > 0] = math.inf
        return out
    pos = (b > 0) & np.isfinite(b)
    out[b == math.inf] = math.inf
    if not pos.any():
        return out
    if enforced:
        with np.errstate(over="ignore"):
            out[pos] = b[pos] / c0  # r c(B_0) <= budget; an overflow is an infinite radius
        return out
    hi = np.minimum(b[pos] / c0, np.finfo(np.float64).max)  # r c(B_0 + r) >= r c(B_0): the root is below this
    lo = hi * 1e-300
    target = b[pos]
    with np.errstate(over="ignore", invalid="ignore"):
        lo = np.where(lo * deviation_coefficient(terms, B0 + lo) <= target, lo, 0.0)
        for _ in range(400):
            # geometric steps while the bracket spans orders of magnitude (huge budgets), then halving
            wide = (lo > 0) & (hi > 4.0 * lo)
            mid = np.where(wide, np.sqrt(lo) * np.sqrt(hi), lo + 0.5 * (hi - lo))
            over = ~(mid * deviation_coefficient(terms, B0 + mid) <= target)
            hi = np.where(over, mid, hi)
            lo = np.where(over, lo, mid)
            if np.all(hi - lo <= 1e-15 * hi):
                break
    out[pos] = lo  # lo always satisfies r c(B_0 + r) <= budget
    return out
