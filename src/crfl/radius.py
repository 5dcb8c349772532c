"""The paper's certified radius: Corollary 1 (Eq. 2) with Theorems 1-3 and the inverse questions, in log space.

This module is the paper's formula and nothing else: the ``paper`` reading
(:mod:`crfl.readings.paper`) evaluates it on a run, sweeps and benchmarks on synthetic
ingredients. The sound readings' parameter-distance budgets (Neyman-Pearson, the KL form, the
base model's logit margin) live with them in :mod:`crfl.readings.coupled`; they use only
:func:`kl_budget` (Theorem 3, Eq. 39) from here.

Symbols (Section 3, Theorem 1): R attackers i = 1..R with aggregation weight p_i,
scale factor gamma_i, local iterations tau_i, learning rate eta_i and poison
ratio q_i = q_{B_i} / n_{B_i}; backdoor magnitudes ||delta_i||; the attack round
t_adv with training noise sigma_{t_adv}; clipping thresholds rho_t and noise
sigma_t for t = t_adv+1..T (sigma_T is the smoothing noise); L_Z of
Assumption 2 (:mod:`crfl.lipschitz`); p_A_lower, p_B_upper from
:mod:`crfl.bounds` or :mod:`crfl.smoothing`.

Quantities (docs/theory.md, sections (d) and (e)):

- eps = -log(1 - (sqrt(p_A) - sqrt(p_B))^2)       (Theorem 3, Eq. 39) :func:`kl_budget`
- log kappa = sum_t log(2 Phi(rho_t / sigma_t) - 1) (Lemma 10, Eq. 21) :func:`log_contraction`
- KL <= 2 R sum_i (p_i gamma_i tau_i eta_i q_i L_Z ||delta_i||)^2 kappa / sigma_{t_adv}^2
                                                     (Theorem 2)         :func:`kl_bound`
- certified iff R sum_i (a_i ||delta_i||)^2 <= eps sigma_{t_adv}^2 / (2 L_Z^2 kappa),
  a_i = p_i gamma_i tau_i eta_i q_i                  (Theorems 2 + 3)    :func:`theorem1_holds`
- RAD = sqrt(eps sigma_{t_adv}^2 / (2 R L_Z^2 sum_i a_i^2 kappa))
                                                     (Corollary 1, Eq. 2) :func:`certified_radius`

Note on Theorem 1 as printed: its condition has the factor R on *both* sides,
``R sum_i (...)^2 <= eps sigma^2 / (2 R L_Z^2 kappa)``, i.e. R^2 sum_i (...)^2 on the
left. Theorem 2 combined with Theorem 3 (which is how Theorem 1 is proved) gives
only one factor R, and so does Corollary 1 (Eq. 2). :func:`theorem1_holds` uses the
derived condition, which agrees with Eq. 2; ``as_printed=True`` evaluates the
printed one (stricter by the factor R, hence also sound).

Everything is computed with logarithms: the radius is
log RAD = (log eps + 2 log sigma_{t_adv} - log 2 - log R - 2 log L_Z - log S - log kappa) / 2
with S = sum_i a_i^2 (a log-sum-exp), so no product over rounds ever under- or
overflows. Zero is ``-inf`` in log space; an infinite radius is ``math.inf``;
an abstaining point (p_A_lower <= p_B_upper) has radius 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, TypedDict, Unpack

import numpy as np
from scipy import special

from crfl.validation import ConfigError, check_int, check_real

__all__ = [
    "kl_budget",
    "log_kl_budget",
    "log_contraction",
    "certified_radius",
    "theorem1_holds",
    "kl_bound",
    "max_attackers",
    "max_scale",
    "max_poison_ratio",
]

_LOG2 = math.log(2.0)

# Below this argument y = x / sqrt(2) of erf, log(erf(y)) is accurate; above it erfc(y) <= 0.157 is
# computed to full relative precision, and log1p(-erfc(y)) is accurate.
_ERF_SWITCH = 1.0


# ---------------------------------------------------------------------------------------------
# validation helpers


def _probabilities(p_a_lower: np.ndarray | float, p_b_upper: np.ndarray | float) -> tuple[np.ndarray, np.ndarray, bool]:
    scalar = np.ndim(p_a_lower) == 0 and np.ndim(p_b_upper) == 0
    a = np.asarray(p_a_lower, dtype=np.float64)
    b = np.asarray(p_b_upper, dtype=np.float64)
    for name, v in (("p_a_lower", a), ("p_b_upper", b)):
        if np.any(~((v >= 0.0) & (v <= 1.0))):
            bad = v[~((v >= 0.0) & (v <= 1.0))].ravel()[0]
            raise ConfigError(f"The '{name}' parameter must be a float in [0, 1]. Got {float(bad)!r} instead.")
    try:
        a, b = np.broadcast_arrays(a, b)
    except ValueError as err:
        raise ConfigError(
            f"The 'p_a_lower' and 'p_b_upper' parameters must have the same shape. Got {a.shape} and {b.shape} instead."
        ) from err
    return a, b, scalar


def _attackers(p, gamma, tau, eta, poison_ratio) -> tuple[np.ndarray, ...]:
    """Validate the per-attacker lists; return them as float arrays of a common length R >= 1."""
    lists = {"p": p, "gamma": gamma, "tau": tau, "eta": eta, "poison_ratio": poison_ratio}
    for name, v in lists.items():
        if isinstance(v, (str, bytes)) or not isinstance(v, (Sequence, np.ndarray)):
            raise ConfigError(f"The '{name}' parameter must be a sequence with one entry per attacker. Got {v!r} instead.")
    lengths = {name: len(v) for name, v in lists.items()}
    R = lengths["p"]
    if R < 1:
        raise ConfigError(f"The 'p' parameter must have one entry per attacker (R >= 1). Got {list(p)!r} instead.")
    for name, n in lengths.items():
        if n != R:
            raise ConfigError(
                f"The '{name}' parameter must have one entry per attacker, like 'p' (R = {R}). Got {n} entries instead."
            )
    inf = dict(high=math.inf, high_open=True)
    ranges = {
        "p": dict(low=0.0, high=1.0),
        "gamma": dict(low=0.0, **inf),
        "tau": dict(low=1.0, **inf),
        "eta": dict(low=0.0, low_open=True, **inf),
        "poison_ratio": dict(low=0.0, high=1.0),
    }
    out = []
    for name, v in lists.items():
        vals = [_scalar(f"{name}[{i}]", x, **ranges[name]) for i, x in enumerate(v)]
        out.append(np.asarray(vals, dtype=np.float64))
    return tuple(out)


def _scalar(name: str, v: object, **kw) -> float:
    if isinstance(v, (np.floating, np.integer)):
        v = v.item()
    return check_real(name, v, **kw)


def _common(sigma_t_adv, L_Z, log_contraction) -> tuple[float, float, float]:
    sigma = _scalar("sigma_t_adv", sigma_t_adv, low=0.0, low_open=True, high=math.inf, high_open=True)
    L = _scalar("L_Z", L_Z, low=0.0, low_open=True, high=math.inf, high_open=True)
    # -inf is a valid log contraction (a round with rho_t = 0 forgets its input)
    neg_inf = isinstance(log_contraction, (float, np.floating)) and float(log_contraction) == -math.inf
    lc = -math.inf if neg_inf else _scalar("log_contraction", log_contraction, high=0.0)
    return sigma, L, lc


def _deltas(delta_norms: Sequence[float], R: int) -> np.ndarray:
    d = list(delta_norms)
    if len(d) != R:
        raise ConfigError(
            f"The 'delta_norms' parameter must have one entry per attacker (R = {R}). Got {len(d)} entries instead."
        )
    return np.asarray([_scalar(f"delta_norms[{i}]", x, low=0.0, high=math.inf, high_open=True) for i, x in enumerate(d)])


def _log_sum_sq(a: np.ndarray) -> float:
    """log sum_i a_i^2 for a_i >= 0; -inf when all a_i are 0."""
    with np.errstate(divide="ignore"):
        logs = 2.0 * np.log(a)
    if np.all(logs == -np.inf):
        return -math.inf
    return float(special.logsumexp(logs))


# ---------------------------------------------------------------------------------------------
# Theorem 3: the KL budget


def log_kl_budget(p_a_lower: np.ndarray | float, p_b_upper: np.ndarray | float) -> np.ndarray | float:
    """log eps with eps = -log(1 - (sqrt(p_A) - sqrt(p_B))^2) (Theorem 3, Eq. 39).

    -inf where p_A <= p_B (no budget), +inf where p_A = 1 and p_B = 0. Accurate also
    when eps is tiny (p_A - p_B near the smallest double) or 1 - (...)^2 is tiny.
    """
    a, b, scalar = _probabilities(p_a_lower, p_b_upper)
    out = np.full(a.shape, -np.inf)
    ok = a > b
    if np.any(ok):
        pa, pb = a[ok], b[ok]
        sa, sb = np.sqrt(pa), np.sqrt(pb)
        # x = (sqrt pA - sqrt pB)^2, log x = 2 (log(pA - pB) - log(sqrt pA + sqrt pB))
        log_x = 2.0 * (np.log(pa - pb) - np.log(sa + sb))
        x = np.exp(log_x)
        with np.errstate(divide="ignore"):
            # 1 - x = (1 - sqrt pA + sqrt pB)(1 + sqrt pA - sqrt pB), 1 - sqrt pA = (1 - pA) / (1 + sqrt pA)
            log_one_minus_x = np.log((1.0 - pa) / (1.0 + sa) + sb) + np.log1p(sa - sb)
            eps = -log_one_minus_x
            # for small x: eps = x (1 + x/2 + x^2/3 + ...), log eps = log x + log(eps / x)
            small = x < 1e-3
            log_eps = np.where(
                small,
                log_x + np.log1p(x / 2.0 + x * x / 3.0 + x**3 / 4.0),
                np.log(np.where(small, 1.0, eps)),
            )
        out[ok] = log_eps
    return float(out) if scalar else out


def kl_budget(
    p_a_lower: np.ndarray | float, p_b_upper: np.ndarray | float, one_minus_p_a: np.ndarray | None = None
) -> np.ndarray | float:
    """eps = -log(1 - (sqrt(p_A_lower) - sqrt(p_B_upper))^2) (Theorem 3, Eq. 39; Lemma 12).

    The KL divergence D_KL(mu(w) || mu(w')) the smoothed prediction c_A tolerates.
    0 where p_A <= p_B (Algorithm 2 abstains; the formula itself is symmetric in p_A
    and p_B and would give a positive number), ``math.inf`` where p_A = 1 and p_B = 0.
    With x = (sqrt p_A - sqrt p_B)^2 = ((p_A - p_B) / (sqrt p_A + sqrt p_B))^2 (no cancellation:
    p_A - p_B is exact for close values), eps = -log1p(-x) for x <= 1/2, and for x > 1/2
    eps = -log((1 - p_A)/(1 + sqrt p_A) + sqrt p_B) - log1p(sqrt p_A - sqrt p_B) (the product
    form of 1 - x), which keeps full precision as p_A -> 1 and p_B -> 0; ``one_minus_p_a``
    (1 - p_A_lower known more precisely than p_A_lower itself, e.g. from exact smoothing)
    replaces 1 - p_A there. The product form alone loses accuracy for p_A close to p_B: its two
    logs, each about sqrt p_A - sqrt p_B, cancel to eps ~ (sqrt p_A - sqrt p_B)^2 (relative
    error 4e-9 at p_A - p_B = 2e-4), while eps is only as ill-conditioned as p_A - p_B itself.
    Both branches are within a few ulp times that conditioning of the exact value.
    """
    a, b, scalar = _probabilities(p_a_lower, p_b_upper)
    out = np.zeros(a.shape)
    ok = a > b
    if np.any(ok):
        pa, pb = a[ok], b[ok]
        sa, sb = np.sqrt(pa), np.sqrt(pb)
        q = 1.0 - pa if one_minus_p_a is None else np.broadcast_to(np.asarray(one_minus_p_a, dtype=np.float64), a.shape)[ok]
        x = ((pa - pb) / (sa + sb)) ** 2
        with np.errstate(divide="ignore"):
            product = -(np.log(q / (1.0 + sa) + sb) + np.log1p(sa - sb))
        out[ok] = np.where(x <= 0.5, -np.log1p(-np.minimum(x, 0.5)), product)
    return float(out) if scalar else out


# ---------------------------------------------------------------------------------------------
# Lemma 10: the contraction over rounds t_adv+1..T


def _log_two_phi_minus_one(x: np.ndarray) -> np.ndarray:
    """log(2 Phi(x) - 1) = log erf(x / sqrt 2) for x >= 0, stably.

    y = x / sqrt(2) < 1: log(erf(y)) (erf keeps full relative precision near 0);
    y >= 1: log1p(-erfc(y)) (erfc(y) is tiny but exact in relative terms).
    x = 0 gives -inf, x = inf gives 0. For y > ~27 erfc(y) underflows and the result
    is 0.0: the true value, about -2 phi(x) / x, is below the smallest double.
    """
    y = x / math.sqrt(2.0)
    with np.errstate(divide="ignore"):
        small = np.log(special.erf(np.minimum(y, _ERF_SWITCH)))
        large = np.log1p(-special.erfc(np.maximum(y, _ERF_SWITCH)))
    return np.where(y < _ERF_SWITCH, small, large)


def log_contraction(rho: Sequence[float], sigma: Sequence[float]) -> float:
    """log prod_{t=t_adv+1}^{T} (2 Phi(rho_t / sigma_t) - 1) (Lemma 10, Eq. 21; Theorem 2).

    Each factor bounds the TV contraction coefficient eta_TV(K_t) of round t (Lemma 10)
    and so the KL contraction (Lemma 4). Summed as logs: the naive product underflows
    to 0 for small rho/sigma over many rounds (giving an infinite radius) and is
    exactly 1.0 for rho/sigma >~ 8.3.

    Args:
        rho: rho_t for t = t_adv+1..T, each >= 0.
        sigma: sigma_t for the same rounds (sigma_T last), each >= 0.

    Returns:
        A float <= 0. Empty sequences (T = t_adv) give 0.0 (empty product 1). A round
        with sigma_t = 0 contributes 0.0 (factor 2 Phi(inf) - 1 = 1: no contraction); a
        round with rho_t = 0 contributes -inf (every clipped model is 0, so the kernel
        forgets its input; factor 0), also when sigma_t = 0.
    """
    rho_l, sigma_l = list(rho), list(sigma)
    if len(rho_l) != len(sigma_l):
        raise ConfigError(
            f"The 'sigma' parameter must have one entry per round, like 'rho' ({len(rho_l)}). Got {len(sigma_l)} instead."
        )
    r = np.asarray([_scalar(f"rho[{i}]", v, low=0.0) for i, v in enumerate(rho_l)], dtype=np.float64)
    s = np.asarray([_scalar(f"sigma[{i}]", v, low=0.0) for i, v in enumerate(sigma_l)], dtype=np.float64)
    if r.size == 0:
        return 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(r == 0.0, 0.0, np.where(s == 0.0, np.inf, r / s))
    return float(np.sum(_log_two_phi_minus_one(ratio)))


# ---------------------------------------------------------------------------------------------
# Corollary 1


def _log_threshold(log_eps: np.ndarray, sigma: float, L: float, lc: float) -> np.ndarray:
    """log of eps sigma^2 / (2 L_Z^2 kappa), the right-hand side shared by Eq. 2 and Theorem 1."""
    with np.errstate(invalid="ignore"):
        return log_eps + 2.0 * math.log(sigma) - _LOG2 - 2.0 * math.log(L) - lc


def _log_radius(log_eps: np.ndarray, sigma: float, L: float, lc: float, log_R: float, log_S: float) -> np.ndarray:
    """log RAD of Eq. 2 given log eps (per point), log R and log S = log sum_i a_i^2."""
    if log_S == -math.inf or lc == -math.inf:
        return np.where(log_eps == -np.inf, -np.inf, np.inf)
    return 0.5 * (_log_threshold(log_eps, sigma, L, lc) - log_R - log_S)


class Eq2Terms(TypedDict):
    """Corollary 1's ingredients besides the probabilities (one entry per attacker in the lists):
    the training noise sigma_{t_adv} > 0 at the attack round, L_Z > 0 (Assumption 2), each
    attacker's aggregation weight p_i in [0, 1], scale factor gamma_i >= 0, local iterations
    tau_i >= 1, learning rate eta_i > 0, poison ratio q_{B_i} / n_{B_i} in [0, 1], and
    :func:`log_contraction` of the rounds after t_adv (<= 0)."""

    sigma_t_adv: float
    L_Z: float
    p: Sequence[float]
    gamma: Sequence[float]
    tau: Sequence[float]
    eta: Sequence[float]
    poison_ratio: Sequence[float]
    log_contraction: float


class InverseTerms(TypedDict, total=False):
    """The inverse questions' ingredients: Eq2Terms for R identical attackers (scalars), with R itself
    for :func:`max_scale` and :func:`max_poison_ratio`; the quantity asked for is left out."""

    sigma_t_adv: float
    L_Z: float
    log_contraction: float
    R: int
    p: float
    gamma: float
    tau: float
    eta: float
    poison_ratio: float


_EQ2_KEYS = tuple(Eq2Terms.__annotations__)
_INVERSE_COMMON = ("sigma_t_adv", "L_Z", "log_contraction", "p", "tau", "eta")


def _take(func: str, given: Mapping[str, Any], required: tuple[str, ...]) -> dict[str, Any]:
    """The keyword arguments ``required`` of ``func``, with Python's own errors for missing or unknown ones."""
    missing = [k for k in required if k not in given]
    if missing:
        raise TypeError(f"{func}() missing required keyword-only argument(s): {', '.join(map(repr, missing))}")
    unknown = sorted(set(given) - set(required))
    if unknown:
        raise TypeError(f"{func}() got an unexpected keyword argument {unknown[0]!r}")
    return dict(given)


def _eq2(func: str, terms: Mapping[str, Any]) -> tuple[float, float, float, tuple[np.ndarray, ...]]:
    """(sigma_t_adv, L_Z, log_contraction, (p, gamma, tau, eta, poison_ratio) arrays), validated."""
    t = _take(func, terms, _EQ2_KEYS)
    sigma, L, lc = _common(t["sigma_t_adv"], t["L_Z"], t["log_contraction"])
    return sigma, L, lc, _attackers(t["p"], t["gamma"], t["tau"], t["eta"], t["poison_ratio"])


def certified_radius(
    p_a_lower: np.ndarray | float, p_b_upper: np.ndarray | float, **terms: Unpack[Eq2Terms]
) -> np.ndarray | float:
    """RAD of Corollary 1 (Eq. 2) for every test point.

        RAD = sqrt( eps sigma_{t_adv}^2 / (2 R L_Z^2 S kappa) ),
        eps = -log(1 - (sqrt p_A - sqrt p_B)^2),  S = sum_i (p_i gamma_i tau_i eta_i q_i)^2,
        kappa = prod_{t=t_adv+1}^T (2 Phi(rho_t / sigma_t) - 1) = exp(log_contraction).

    The prediction c_A is certified for every backdoor with ||delta|| < RAD (and, by
    Theorem 1, = RAD) for all R attackers.

    Args:
        p_a_lower, p_b_upper: arrays (or floats) of bounds per test point.
        sigma_t_adv: training noise at the attack round, > 0.
        L_Z: Lipschitz constant of the gradient w.r.t. data (Assumption 2), > 0.
        p, gamma, tau, eta, poison_ratio: one entry per attacker (R = their length):
            aggregation weight in [0, 1], scale factor >= 0, local iterations >= 1,
            learning rate > 0, poison ratio q_{B_i} / n_{B_i} in [0, 1].
        log_contraction: :func:`log_contraction` of the rounds after t_adv, <= 0.

    Returns:
        RAD per point (float64): 0.0 where p_A_lower <= p_B_upper (abstain);
        ``math.inf`` where eps is infinite, where S = 0 (the attackers cannot move
        the model) or where log_contraction = -inf.
    """
    a, b, scalar = _probabilities(p_a_lower, p_b_upper)
    sigma, L, lc, (pv, gv, tv, ev, qv) = _eq2("certified_radius", terms)
    R = len(pv)
    log_S = _log_sum_sq(pv * gv * tv * ev * qv)
    log_eps = np.asarray(log_kl_budget(a, b), dtype=np.float64)
    log_rad = _log_radius(log_eps, sigma, L, lc, math.log(R), log_S)
    rad = np.where(log_eps == -np.inf, 0.0, np.exp(log_rad))
    return float(rad) if scalar else rad


def theorem1_holds(
    p_a_lower: np.ndarray | float,
    p_b_upper: np.ndarray | float,
    delta_norms: Sequence[float],
    *,
    as_printed: bool = False,
    **terms: Unpack[Eq2Terms],
) -> np.ndarray | bool:
    """Theorem 1's condition with one backdoor magnitude ||delta_i|| per attacker.

    Derived from Theorems 2 and 3 (KL bound <= eps):

        R sum_i (p_i gamma_i tau_i eta_i q_i ||delta_i||)^2 <= eps sigma_{t_adv}^2 / (2 L_Z^2 kappa),

    which with all ||delta_i|| equal is exactly ||delta|| <= RAD of Eq. 2. With
    ``as_printed=True`` the right-hand side is divided by R once more, as Theorem 1 is
    printed in the paper (``... / (2 R L_Z^2 kappa)``); see the module docstring.

    Returns:
        Per test point, whether the prediction c_A is certified; False where
        p_A_lower <= p_B_upper (abstain).
    """
    a, b, scalar = _probabilities(p_a_lower, p_b_upper)
    sigma, L, lc, (pv, gv, tv, ev, qv) = _eq2("theorem1_holds", terms)
    R = len(pv)
    dv = _deltas(delta_norms, R)
    log_lhs = math.log(R) + _log_sum_sq(pv * gv * tv * ev * qv * dv)
    if as_printed:
        log_lhs += math.log(R)
    log_eps = np.asarray(log_kl_budget(a, b), dtype=np.float64)
    if lc == -math.inf:
        log_rhs = np.where(log_eps == -np.inf, -np.inf, np.inf)
    else:
        log_rhs = _log_threshold(log_eps, sigma, L, lc)
    holds = (log_eps > -np.inf) & (log_lhs <= log_rhs)
    return bool(holds) if scalar else holds


def kl_bound(delta_norms: Sequence[float], **terms: Unpack[Eq2Terms]) -> float:
    """Theorem 2's bound on D_KL(mu(M(D)) || mu(M(D'))):

        2 R sum_i (p_i gamma_i tau_i eta_i q_i L_Z ||delta_i||)^2 / sigma_{t_adv}^2 * kappa.
    """
    sigma, L, lc, (pv, gv, tv, ev, qv) = _eq2("kl_bound", terms)
    R = len(pv)
    dv = _deltas(delta_norms, R)
    log_s = _log_sum_sq(pv * gv * tv * ev * qv * dv)
    log_kl = _LOG2 + math.log(R) + log_s + 2.0 * math.log(L) - 2.0 * math.log(sigma) + lc
    return math.exp(log_kl) if log_kl != -math.inf else 0.0


# ---------------------------------------------------------------------------------------------
# Inverse questions (Section 5.1: feature, sample and client level), identical attackers
#
# With R identical attackers, a = p gamma tau eta q, Eq. 2 reads
#     ||delta|| <= RAD  <=>  R^2 a^2 ||delta||^2 <= eps sigma^2 / (2 L_Z^2 kappa) =: Q
# (R sum_i a^2 = R^2 a^2), so the largest R is floor(sqrt(Q) / (a ||delta||)), the largest
# gamma is sqrt(Q) / (R p tau eta q ||delta||), the largest q is sqrt(Q) / (R p gamma tau eta ||delta||).


def _identical(name_value: dict[str, object]) -> dict[str, float]:
    ranges = {
        "p": dict(low=0.0, high=1.0),
        "gamma": dict(low=0.0, high=math.inf, high_open=True),
        "tau": dict(low=1.0, high=math.inf, high_open=True),
        "eta": dict(low=0.0, low_open=True, high=math.inf, high_open=True),
        "poison_ratio": dict(low=0.0, high=1.0),
        "delta_norm": dict(low=0.0, high=math.inf, high_open=True),
    }
    return {k: _scalar(k, v, **ranges[k]) for k, v in name_value.items()}


def _log_sqrt_q(p_a_lower, p_b_upper, sigma_t_adv, L_Z, log_contraction) -> tuple[np.ndarray, np.ndarray, bool]:
    a, b, scalar = _probabilities(p_a_lower, p_b_upper)
    sigma, L, lc = _common(sigma_t_adv, L_Z, log_contraction)
    log_eps = np.asarray(log_kl_budget(a, b), dtype=np.float64)
    if lc == -math.inf:
        half_log_q = np.where(log_eps == -np.inf, -np.inf, np.inf)
    else:
        half_log_q = 0.5 * _log_threshold(log_eps, sigma, L, lc)
    return half_log_q, log_eps, scalar


def _safe_log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


class _Inverse(NamedTuple):
    """Eq. 2 in log space, shared by the inverse questions; build it with :meth:`of`.

    Q = eps sigma_{t_adv}^2 / (2 L_Z^2 kappa); ``log_a`` is the log of the product of the known
    factors among p, gamma, tau, eta, q, ``log_d`` = log ||delta||.
    """

    half_log_q: np.ndarray  # log sqrt(Q) per point
    log_eps: np.ndarray  # log eps per point; -inf where the point abstains
    log_a: float
    log_d: float
    scalar: bool  # the probabilities were scalars: answer with a float

    @classmethod
    def of(cls, p_a_lower, p_b_upper, delta_norm, terms: Mapping[str, Any], factor_names: tuple[str, ...]) -> _Inverse:
        """Validate the arguments (the factors named, in the order p, gamma, tau, eta, poison_ratio) and take logs."""
        factors = {k: terms[k] for k in factor_names}
        v = _identical({**factors, "delta_norm": delta_norm})
        half_log_q, log_eps, scalar = _log_sqrt_q(
            p_a_lower, p_b_upper, terms["sigma_t_adv"], terms["L_Z"], terms["log_contraction"]
        )
        log_a = _safe_log(math.prod(v[k] for k in factors))
        return cls(half_log_q, log_eps, log_a, _safe_log(v["delta_norm"]), scalar)

    def solve(self, log_rest: float) -> np.ndarray:
        """sqrt(Q) / e^log_rest per point: inf where log_rest = -inf, 0 where the point abstains."""
        with np.errstate(over="ignore"):
            x = np.exp(self.half_log_q - log_rest) if log_rest > -math.inf else np.full(self.half_log_q.shape, np.inf)
        return np.where(self.log_eps > -np.inf, x, 0.0)

    def answer(self, out: np.ndarray) -> np.ndarray | float:
        return float(out) if self.scalar else out


def max_attackers(
    p_a_lower: np.ndarray | float, p_b_upper: np.ndarray | float, delta_norm: float, **terms: Unpack[InverseTerms]
) -> np.ndarray | float:
    """Client level: the largest number R >= 0 of identical attackers still certified at ||delta||.

    From Eq. 2 with R identical attackers: R <= sqrt(Q) / (p gamma tau eta q ||delta||),
    Q = eps sigma_{t_adv}^2 / (2 L_Z^2 kappa). Returned as float64 holding whole numbers
    (``math.inf`` where the attackers cannot move the model, e.g. ||delta|| = 0), 0 where
    the point abstains. The value R satisfies certified_radius(R copies) >= ||delta|| and
    R + 1 copies give a radius < ||delta||.
    """
    t = _take("max_attackers", terms, _INVERSE_COMMON + ("gamma", "poison_ratio"))
    inv = _Inverse.of(p_a_lower, p_b_upper, delta_norm, t, ("p", "gamma", "tau", "eta", "poison_ratio"))
    sigma, L, lc = _common(t["sigma_t_adv"], t["L_Z"], t["log_contraction"])
    log_eps, log_a, log_d = inv.log_eps, inv.log_a, inv.log_d
    out = np.zeros(inv.half_log_q.shape)
    live = log_eps > -np.inf
    if log_a == -math.inf or log_d == -math.inf:
        out[live] = np.inf
        return inv.answer(out)
    with np.errstate(over="ignore"):
        r_real = np.exp(inv.half_log_q - log_a - log_d)
    r = np.floor(np.where(live, r_real, 0.0))
    # Fix rounding at integer boundaries with the exact test used by certified_radius:
    # R is certified iff log ||delta|| <= log RAD(R), log S = log R + 2 log a.
    exact = live & np.isfinite(r) & (r < 2.0**52)

    def ok(rr: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore"):
            log_r = np.log(np.maximum(rr, 1.0))
        lr = 0.5 * (_log_threshold(log_eps, sigma, L, lc) - log_r - (log_r + 2.0 * log_a))
        return (rr == 0) | (log_d <= lr)

    for _ in range(3):
        down = exact & ~ok(r)
        r = np.where(down, r - 1.0, r)
        up = exact & ok(r + 1.0)
        r = np.where(up, r + 1.0, r)
    out[live] = np.maximum(r[live], 0.0)
    return inv.answer(out)


def max_scale(
    p_a_lower: np.ndarray | float, p_b_upper: np.ndarray | float, delta_norm: float, **terms: Unpack[InverseTerms]
) -> np.ndarray | float:
    """Feature/client level: the largest scale factor gamma still certified for R identical attackers.

    gamma_max = sqrt(Q) / (R p tau eta q ||delta||) from Eq. 2; ``math.inf`` when
    p tau eta q ||delta|| = 0; 0 where the point abstains.
    """
    t = _take("max_scale", terms, _INVERSE_COMMON + ("R", "poison_ratio"))
    R = _int_r(t["R"])
    inv = _Inverse.of(p_a_lower, p_b_upper, delta_norm, t, ("p", "tau", "eta", "poison_ratio"))
    return inv.answer(inv.solve(math.log(R) + inv.log_a + inv.log_d))


def max_poison_ratio(
    p_a_lower: np.ndarray | float, p_b_upper: np.ndarray | float, delta_norm: float, **terms: Unpack[InverseTerms]
) -> np.ndarray | float:
    """Sample level: the largest poison ratio q = q_B / n_B still certified, capped at 1.

    q_max = min(1, sqrt(Q) / (R p gamma tau eta ||delta||)) from Eq. 2; 1 when the
    attackers cannot move the model; 0 where the point abstains.
    """
    t = _take("max_poison_ratio", terms, _INVERSE_COMMON + ("R", "gamma"))
    R = _int_r(t["R"])
    inv = _Inverse.of(p_a_lower, p_b_upper, delta_norm, t, ("p", "gamma", "tau", "eta"))
    return inv.answer(np.minimum(inv.solve(math.log(R) + inv.log_a + inv.log_d), 1.0))


def _int_r(R: object) -> int:
    if isinstance(R, np.integer):
        R = int(R)
    return check_int("R", R, low=1)
