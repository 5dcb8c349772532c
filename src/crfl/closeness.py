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
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from crfl.lipschitz import SupportGeometry, lz_centred_array, lz_support_array
from crfl.validation import ConfigError, check_real

__all__ = [
    "AttackTerm", "round_lipschitz", "attack_coefficient", "deviation_coefficient", "solve_radius",
    "RoundingSpec", "RoundingBound", "certification_rounding", "unit_roundoff", "gamma_n", "round_errors", "rounding_error", "solve_radius_rounded",
]


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


# ---------------------------------------------------------------------------------------------
# floating point: the rounding of the realised trajectories (docs/theory.md (g), step 7)

#: Relative accuracy assumed of exp (in units of the unit roundoff u): torch's exp is within 2 ulp.
EXP_ULPS = 4.0
#: The bound refuses when the longest chain of roundings it composes, k u, exceeds this (the second-order
#: terms are then no longer below 1% of the first-order ones).
MAX_CHAIN = 0.01


def unit_roundoff(dtype: object) -> float:
    """u = 2^-p of round-to-nearest in the dtype (float32: 2^-24, float64: 2^-53)."""
    name = str(dtype).replace("torch.", "")
    table = {"float32": 2.0 ** -24, "float64": 2.0 ** -53}
    if name not in table:
        raise ConfigError(f"The 'dtype' parameter must be float32 or float64. Got {name!r} instead.")
    return table[name]


def gamma_n(n: float, u: float) -> float:
    """gamma_n = n u / (1 - n u): |fl(sum of n + 1 terms) - sum| <= gamma_n sum |terms| in any order (Higham, Thm 3.1)."""
    if not n * u < 1.0:
        raise ConfigError(f"The rounding bound needs n u < 1. Got n = {n}, u = {u:.3g} instead.")
    return n * u / (1.0 - n * u)


@dataclass(frozen=True)
class RoundingSpec:
    """What the rounding bound of a realised run is computed from (all known to the server before training)."""

    unit_roundoff: float  # u of the training dtype
    num_features: int  # d
    num_classes: int  # C
    num_params: int  # D = C d + C
    num_clients: int  # N
    batch_size: int  # n_B
    lr: float  # the largest eta of any client
    tau: int  # the largest number of local steps
    w0_norm: float  # ||w_0||
    rho: tuple[float, ...]  # rho_t, t = 1..T
    noise_norm: tuple[float, ...]  # ||eps~_t|| of the realised (shared) server noise, t = 1..T (0 without noise)
    clean_weight: tuple[float, ...]  # per round: sum of |weight| of the clients that train on clean inputs
    attack_weight: tuple[float, ...]  # per round: sum_i p_i |gamma_i| of the attackers (0 in benign rounds)
    lip: tuple[float, ...]  # per round: Lip_k of an attack round, 1 in a benign round
    input_bound: float  # B^ >= ||x^|| of every realised clean input the model multiplies
    attack_input_bound: float  # the same for the attackers' poisoned inputs
    box_norm: float  # sqrt(d): ||x|| of any input in the trigger's box [0, 1]^d (the inputs before the map)
    map_radius: float | None  # B_0 when the model projects its inputs (their rounding enters the trigger), else None
    agg_roundoff: float = 2.0 ** -53  # the aggregation and the clip run in float64


@dataclass(frozen=True)
class RoundingBound:
    """The proven rounding terms (docs/theory.md (g), step 7)."""

    per_round: tuple[float, ...]  # e_t: one realised round against the exact round map, from the same start
    total: float  # E = sum_t 2 e_t prod_{attack rounds k > t} Lip_k (run and twin both rounded)
    opnorm_slack: dict[int, float]  # per attack round: added to ||P W~||_2 (the realised local steps' rounding)
    trigger_scale: float  # iota_1: the realised input difference is <= (1 + iota_1) ||delta|| + iota_0
    trigger_offset: float  # iota_0
    input_bound: float  # B^
    step_error: float  # the largest per-step bound r
    certification: float = 0.0  # the certification's own float64 logits, as a parameter perturbation (in ``total``)
    trigger_offset_map: float = 0.0  # the part of iota_0 from the computed input map, which also leaves a support S

    def to_dict(self) -> dict[str, Any]:
        return {
            "rounding_error": self.total, "certification_rounding": self.certification, "largest_round_error": max(self.per_round, default=0.0),
            "largest_step_error": self.step_error, "trigger_rounding": [self.trigger_scale, self.trigger_offset],
            "realised_input_bound": self.input_bound, "opnorm_slack": {str(k): v for k, v in self.opnorm_slack.items()},
        }


def _step_error(u: float, d: int, C: int, n: int, eta: float, X: float, L: float) -> float:
    """r: one realised local SGD step against the exact step from the same iterate (norm <= L, inputs ||x~|| <= X).

    Logits: |z^ - z| <= gamma_{d+3} sum|w||x~| <= gamma_{d+3} L X; softmax is 1/2-Lipschitz (||diag P - PP^T|| <= 1/2)
    and its own rounding is <= (2C + EXP_ULPS + 4) u; (P - Y) x~^T summed over n samples: gamma_{n+2}; the update
    fl(w - fl(eta g)): u (||w|| + eta ||g||)."""
    g_err = X * (0.5 * gamma_n(d + 3, u) * L * X + (2 * C + EXP_ULPS + 4) * u + 3.0 * math.sqrt(2.0) * u)
    g_err += math.sqrt(2.0) * X * gamma_n(n + 2, u)
    r = eta * g_err + u * (L + eta * math.sqrt(2.0) * X)
    return r * (1.0 + gamma_n(d + n + 2 * C + 16, u))  # second-order terms


def _local(u: float, spec: RoundingSpec, B: float, M: float) -> tuple[float, float, float]:
    """(R, U, r): a client's accumulated rounding, its update norm bound and the per-step bound, from a start of norm <= M."""
    X = math.sqrt(B * B + 1.0)
    g_max = math.sqrt(2.0) * X
    tau, eta = spec.tau, spec.lr
    L = M + tau * eta * g_max
    r = _step_error(u, spec.num_features, spec.num_classes, spec.batch_size, eta, X, L)
    L = L + tau * r
    r = _step_error(u, spec.num_features, spec.num_classes, spec.batch_size, eta, X, L)  # at the inflated iterate bound
    U = tau * (eta * g_max + r)
    R = tau * r + u * U  # the steps, then u_i = fl(w_tau - w_0)
    return R, U * (1.0 + u), r


def round_errors(spec: RoundingSpec, *, noise: bool = True) -> tuple[list[float], list[float], float]:
    """(e_t for t = 1..T, M_t bounds on the realised broadcast models' norms, largest step bound)."""
    u, u64 = spec.unit_roundoff, spec.agg_roundoff
    T = len(spec.rho)
    for name in ("noise_norm", "clean_weight", "attack_weight", "lip"):
        if len(getattr(spec, name)) != T:
            raise ConfigError(f"The '{name}' parameter must have one entry per round ({T}). Got {len(getattr(spec, name))} instead.")
    chain = (spec.num_features + spec.batch_size + 2 * spec.num_classes + 16) * u
    if chain > MAX_CHAIN:
        raise ConfigError(
            f"The rounding bound needs (d + n_B + 2C + 16) u <= {MAX_CHAIN}; got {chain:.3g} (d = {spec.num_features}, "
            f"n_B = {spec.batch_size}, u = {u:.3g}): train in float64 (run.dtype)."
        )
    errs, norms, worst = [], [], 0.0
    M = spec.w0_norm * (1.0 + u)
    for t in range(T):
        Rc, Uc, rc = _local(u, spec, spec.input_bound, M)
        Ra, Ua, ra = _local(u, spec, spec.attack_input_bound, M) if spec.attack_weight[t] > 0 else (0.0, 0.0, 0.0)
        worst = max(worst, rc, ra)
        cw, aw = spec.clean_weight[t], spec.attack_weight[t]
        U = cw * Uc + aw * Ua
        e = (cw * Rc + aw * (Ra + u * Ua)) * (1.0 + u)  # local rounding through the (scaled) weights; fl(gamma u_i)
        # a client that sends its model (Flower: w~ + gamma u_i in the dtype, the server takes w_i - w~ in the dtype)
        e += 2.0 * u * (cw * (M + Uc) + aw * (M + Ua))
        e += gamma_n(spec.num_clients + 1, u64) * U * (1.0 + u) + u * U  # float64 weighted sum, cast to the dtype
        e += u * (M + U * (1.0 + 2 * u))  # w~_{t-1} + update
        rho = spec.rho[t]
        pre = min(rho * (1.0 + 2 * gamma_n(spec.num_params + 4, u64)), (M + U) * (1.0 + 3 * u))
        e += (u + 2 * gamma_n(spec.num_params + 4, u64)) * pre  # the clip in float64, cast to the dtype
        nu = spec.noise_norm[t] if noise else 0.0
        if nu > 0:
            e += u * (pre * (1.0 + u) + nu) * (1.0 + u) + u * nu  # + eps~_t; the noise's own cast
        errs.append(e)
        M = (pre * (1.0 + u) + nu) * (1.0 + u)
        norms.append(M)
    return errs, norms, worst


def rounding_error(spec: RoundingSpec) -> RoundingBound:
    """E: the realised run and its realised twin end within ||delta^|| c'(B^ + ||delta^||) + E of each other.

    Each realised round t is the exact round map applied to the realised start plus an error of norm <= e_t
    (:func:`round_errors`: the local steps, the aggregation, the clip and the noise, in the unit roundoff u of the
    training dtype times the norm bounds both trajectories share). The exact maps compose as in steps 1-5
    (benign rounds 1-Lipschitz, attack round k Lip_k), so E = sum_t 2 e_t prod_{attack rounds k > t} Lip_k.
    The realised trigger moves a model input by <= (1 + iota_1) ||delta|| + iota_0, and the realised local steps
    move ||P W||_2 by tau r more than the exact ones (``opnorm_slack``). docs/theory.md (g), step 7.
    """
    u = spec.unit_roundoff
    errs, norms, worst = round_errors(spec)
    total = 0.0
    for t, e in enumerate(errs):
        total += 2.0 * e * math.prod(spec.lip[t + 1 :])
    slack = {}
    for t in range(len(errs)):
        if spec.attack_weight[t] > 0:
            start = spec.w0_norm * (1.0 + u) if t == 0 else norms[t - 1]
            slack[t + 1] = spec.tau * _local(u, spec, spec.attack_input_bound, start)[2]
    iota1 = 6.0 * u
    iota_map = 2.0 * gamma_n(spec.num_features + 4, u) * spec.map_radius if spec.map_radius is not None else 0.0
    iota0 = 4.0 * u * spec.box_norm + iota_map
    return RoundingBound(tuple(errs), total, slack, iota1, iota0, spec.input_bound, worst, trigger_offset_map=iota_map)


def certification_rounding(model_norm: float, num_features: int) -> float:
    """The float64 logits z^ = fl(W x + b) that certification computes are the exact logits of a model w + dw_x with
    |dw| <= gamma_{d+1} |w| componentwise (backward error of a dot product), so they certify a model within
    gamma_{d+2} ||w|| of the deployed one; the twin is then within that much more (docs/theory.md (g) step 7e)."""
    return gamma_n(num_features + 2, 2.0 ** -53) * model_norm


def inflate_opnorms(terms: Sequence[AttackTerm], rounding: RoundingBound) -> list[AttackTerm]:
    """The attack terms with ||P W~||_2 (and a support's ||P W~_S||_2) raised by the realised local steps' rounding."""
    out = []
    for k in terms:
        s = rounding.opnorm_slack.get(k.round, 0.0)
        sup = getattr(k, "support", None)
        extra = {"support": replace(sup, start_opnorm=sup.start_opnorm + s)} if sup is not None else {}
        out.append(replace(k, start_opnorm=k.start_opnorm + s, **extra))
    return out


def support_leak(terms: Sequence[AttackTerm], rounding: RoundingBound, enforced: bool) -> float:
    """The deviation the computed input map's rounding adds outside a trigger support S: L_Z on S bounds the gradient
    gap of an input change on S (plus the exact map's leak kappa), not the rounding's iota_map spread over every
    coordinate, so that part is carried by the any-direction coefficient: iota_map c(B^) (enforced bound only)."""
    if not enforced or rounding.trigger_offset_map == 0.0 or all(getattr(k, "support", None) is None for k in terms):
        return 0.0
    anywhere = [replace(k, support=None) for k in terms]
    return rounding.trigger_offset_map * float(deviation_coefficient(anywhere, rounding.input_bound))


def solve_radius_rounded(
    budget: np.ndarray | float, terms: Sequence[AttackTerm], rounding: RoundingBound, *, enforced: bool = False
) -> np.ndarray:
    """The certified radius with the rounding terms: the largest r whose realised trigger
    r^ = (1 + iota_1) r + iota_0 has r^ c'(B^ + r^) + E <= budget (c' with the opnorm slack); 0 where budget <= E
    or r^ would be below iota_0."""
    b = np.atleast_1d(np.asarray(budget, dtype=np.float64))
    if np.any(np.isnan(b)):
        raise ConfigError("The 'budget' parameter must not be NaN.")
    inflated = inflate_opnorms(terms, rounding)
    total = rounding.total + support_leak(inflated, rounding, enforced)
    left = np.where(b > total, b - total, 0.0)
    r_hat = solve_radius(left, inflated, rounding.input_bound, enforced=enforced)
    with np.errstate(invalid="ignore"):
        out = (r_hat - rounding.trigger_offset) / (1.0 + rounding.trigger_scale)
    return np.where(np.isnan(out), 0.0, np.maximum(out, 0.0))
