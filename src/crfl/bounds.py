"""Confidence bounds on the smoothed class probabilities (Algorithm 2, ``CalculateBound``).

Parameter smoothing (Section 4.2) needs, for a test point x_test, a class c_A and
two numbers with

    H_s^{c_A}(w'; x_test) >= p_A_lower >= p_B_upper >= max_{c != c_A} H_s^c(w'; x_test)

(the premise of Theorems 1 and 3). With Monte Carlo votes only an estimate of
every p_c is known, so these hold with some probability. This module turns
vote counts into (c_A, p_A_lower, p_B_upper) and the abstention flag of
Algorithm 2 (``abstain = p_A_lower <= p_B_upper``).

Two one-sided bounds on a binomial proportion p from k successes in M trials,
each failing with probability at most ``alpha``:

- Hoeffding (the paper, Section 4.2): p_hat -/+ sqrt(ln(1/alpha) / (2M)), clipped to [0, 1];
- Clopper-Pearson (exact): the alpha / (1 - alpha) quantiles of Beta(k, M - k + 1) /
  Beta(k + 1, M - k).

Simultaneous coverage
---------------------
Algorithm 2 picks c_A and c_B as the top two counts of the *same* sample that
the bounds are computed from, and bounds p_A and p_B each at level alpha. Two
things then go wrong: (i) the pair of bounds holds jointly only with
probability >= 1 - 2 alpha (union bound), and (ii) Theorem 3 needs an upper
bound on max_{c != c_A} p_c, while the runner-up's bound only covers the
runner-up's own p. And c_A, being chosen by the data, is not a fixed class, so a
fixed-class bound at level alpha is not a bound at level alpha for it. Three
``coverage`` modes (docs/theory.md, section (c)):

- ``"paper"``: reproduces Algorithm 2 exactly (each bound at alpha, top two of
  one sample). Kept for comparison with the paper.
- ``"simultaneous"`` (default): every class c gets a two-sided interval
  [L_c, U_c] with each side at level alpha / (2C) (Bonferroni over all 2C
  one-sided statements). With probability >= 1 - alpha *every* interval holds at
  once, whatever the data do; on that event the data-selected c_A satisfies
  p_{c_A} >= L_{c_A} and every other class satisfies p_c <= U_c, so
  p_A_lower = L_{c_A} and p_B_upper = max_{c != c_A} U_c (= U of the runner-up
  count, U being increasing in the count) are valid together.
- With ``selection_counts`` (Cohen et al.'s separate selection sample,
  independent of ``counts``): c_A is fixed before the estimation sample is seen,
  so only 1 + (C - 1) one-sided statements are needed: the lower bound of c_A
  at alpha / 2 and the upper bounds of the C - 1 other classes at
  alpha / (2 (C - 1)) each; the union bound gives joint failure <= alpha, and
  p_B_upper = min(max_{c != c_A} U_c, 1 - L_{c_A}) (on the same event
  max_{c != c_A} p_c <= 1 - p_{c_A} <= 1 - L_{c_A}; with the two levels unequal
  this can be the tighter of the two). With
  ``coverage="paper"`` and a selection sample, c_A and c_B come from the
  selection sample and each of the two bounds is at level alpha (the paper's
  per-bound rule).

Ties in counts are broken deterministically: the lowest class index wins.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import special

from crfl.validation import ConfigError, check_choice, check_int, check_real

__all__ = [
    "ABSTAIN",
    "BoundResult",
    "hoeffding_lower",
    "hoeffding_upper",
    "clopper_pearson_lower",
    "clopper_pearson_upper",
    "select_and_bound",
    "mean_lower",
    "mean_upper",
    "mixture_bound",
]

ABSTAIN = -1
"""The prediction of Algorithm 2 when p_A_lower <= p_B_upper (its certified radius is 0)."""

BOUNDS = ("hoeffding", "clopper-pearson")
COVERAGES = ("simultaneous", "paper")


@dataclass(frozen=True)
class BoundResult:
    """The output of :func:`select_and_bound`, one entry per test point (arrays of shape (n,)).

    Attributes:
        c_a: the predicted class c_A (int64).
        c_b: the runner-up class c_B (int64), reported for inspection.
        n_a: votes for c_A in the estimation sample ``counts`` (int64); None for exact smoothing.
        n_b: votes for c_B in the estimation sample (int64); None for exact smoothing.
        p_a_lower: lower confidence bound on p_{c_A} (float64).
        p_b_upper: upper confidence bound on max_{c != c_A} p_c (float64), or on p_{c_B}
            only for ``coverage="paper"``.
        abstain: p_a_lower <= p_b_upper (bool); Algorithm 2 outputs ABSTAIN and radius 0.
        seed: the :class:`crfl.rng.CertificationSeed` the bounds' randomness came from (Monte Carlo,
            mixture continuations); None for bounds that draw nothing (exact smoothing, margin).
    """

    c_a: np.ndarray
    c_b: np.ndarray
    n_a: np.ndarray | None
    n_b: np.ndarray | None
    p_a_lower: np.ndarray
    p_b_upper: np.ndarray
    abstain: np.ndarray
    log1m_p_a_lower: np.ndarray | None = None  # log(1 - p_a_lower), exact where p_a_lower rounds to 1
    log_p_b_upper: np.ndarray | None = None  # log(p_b_upper), exact where p_b_upper underflows
    seed: Any = None  # the CertificationSeed of statistical bounds (None: nothing drawn)

    def log1m_a(self) -> np.ndarray:
        """log(1 - p_A_lower): the stored exact value, else from p_a_lower."""
        if self.log1m_p_a_lower is not None:
            return self.log1m_p_a_lower
        with np.errstate(divide="ignore"):
            return np.log1p(-self.p_a_lower)

    def log_b(self) -> np.ndarray:
        """log(p_B_upper): the stored exact value, else from p_b_upper."""
        if self.log_p_b_upper is not None:
            return self.log_p_b_upper
        with np.errstate(divide="ignore"):
            return np.log(self.p_b_upper)

    def prediction(self) -> np.ndarray:
        """c_A where certified, ABSTAIN elsewhere."""
        return np.where(self.abstain, ABSTAIN, self.c_a)

    def slice(self, start: int, stop: int) -> "BoundResult":
        """The points start..stop-1 (e.g. the clean half of a clean + backdoored batch)."""
        cut = lambda v: None if v is None else v[start:stop]  # noqa: E731
        return BoundResult(*(getattr(self, f.name) if f.name == "seed" else cut(getattr(self, f.name))
                             for f in dataclasses.fields(self)))


# ---------------------------------------------------------------------------------------------
# one-sided bounds on a binomial proportion


def _check_counts(k: np.ndarray | int, M: int) -> tuple[np.ndarray, int]:
    M = check_int("M", M, low=1)
    arr = np.asarray(k)
    if arr.dtype.kind not in "iu" and not (arr.dtype.kind == "f" and np.all(arr == np.floor(arr))):
        raise ConfigError(f"The 'k' parameter must be integer counts in [0, {M}]. Got {k!r} instead.")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() > M):
        raise ConfigError(f"The 'k' parameter must be integer counts in [0, {M}]. Got {k!r} instead.")
    return arr, M


def _check_alpha(alpha: float) -> float:
    return check_real("alpha", alpha, low=0.0, high=1.0, low_open=True, high_open=True)


def _out(x: np.ndarray, like: object) -> np.ndarray | float:
    return float(x) if np.ndim(like) == 0 else x


def hoeffding_lower(k: np.ndarray | int, M: int, alpha: float) -> np.ndarray | float:
    """p_hat - sqrt(ln(1/alpha) / (2M)), clipped to [0, 1] (Section 4.2, Hoeffding 1963).

    P[p < bound] <= alpha for k ~ Binomial(M, p).
    """
    arr, M = _check_counts(k, M)
    alpha = _check_alpha(alpha)
    half = math.sqrt(-math.log(alpha) / (2.0 * M))
    return _out(np.clip(arr / M - half, 0.0, 1.0), k)


def hoeffding_upper(k: np.ndarray | int, M: int, alpha: float) -> np.ndarray | float:
    """p_hat + sqrt(ln(1/alpha) / (2M)), clipped to [0, 1] (Section 4.2).

    P[p > bound] <= alpha for k ~ Binomial(M, p).
    """
    arr, M = _check_counts(k, M)
    alpha = _check_alpha(alpha)
    half = math.sqrt(-math.log(alpha) / (2.0 * M))
    return _out(np.clip(arr / M + half, 0.0, 1.0), k)


def clopper_pearson_lower(k: np.ndarray | int, M: int, alpha: float) -> np.ndarray | float:
    """Exact one-sided lower bound: the alpha quantile of Beta(k, M - k + 1); 0 when k = 0.

    P[p < bound] <= alpha for k ~ Binomial(M, p) (Clopper and Pearson, 1934).
    """
    arr, M = _check_counts(k, M)
    alpha = _check_alpha(alpha)
    safe = np.maximum(arr, 1)
    lo = special.betaincinv(safe, M - safe + 1, alpha)  # = scipy.stats.beta.ppf, bit for bit (Boost's ibeta_inv)
    return _out(np.where(arr == 0, 0.0, lo).astype(np.float64), k)


def clopper_pearson_upper(k: np.ndarray | int, M: int, alpha: float) -> np.ndarray | float:
    """Exact one-sided upper bound: the 1 - alpha quantile of Beta(k + 1, M - k); 1 when k = M.

    P[p > bound] <= alpha for k ~ Binomial(M, p).
    """
    arr, M = _check_counts(k, M)
    alpha = _check_alpha(alpha)
    safe = np.minimum(arr, M - 1)
    up = special.betainccinv(safe + 1, M - safe, alpha)  # = scipy.stats.beta.isf, bit for bit (Boost's ibetac_inv)
    return _out(np.where(arr == M, 1.0, up).astype(np.float64), k)


_LOWER = {"hoeffding": hoeffding_lower, "clopper-pearson": clopper_pearson_lower}
_UPPER = {"hoeffding": hoeffding_upper, "clopper-pearson": clopper_pearson_upper}


# ---------------------------------------------------------------------------------------------
# CalculateBound


def _top_two(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the largest and second-largest count per row; ties: lowest class index first."""
    order = np.argsort(-counts, axis=1, kind="stable")
    return order[:, 0].astype(np.int64), order[:, 1].astype(np.int64)


def _check_count_matrix(name: str, counts: np.ndarray) -> np.ndarray:
    arr = np.asarray(counts)
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise ConfigError(f"The '{name}' parameter must be an (n, C) array of counts with C >= 2. Got shape {arr.shape} instead.")
    if arr.dtype.kind not in "iu":
        if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.floor(arr)):
            arr = arr.astype(np.int64)
        else:
            raise ConfigError(f"The '{name}' parameter must hold integer counts. Got dtype {arr.dtype} instead.")
    arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise ConfigError(f"The '{name}' parameter must hold counts >= 0. Got {int(arr.min())} instead.")
    totals = arr.sum(axis=1)
    if arr.shape[0] and (totals.min() != totals.max() or totals[0] < 1):
        raise ConfigError(
            f"The '{name}' parameter must have the same number M >= 1 of votes in every row. "
            f"Got row sums from {int(totals.min())} to {int(totals.max())} instead."
        )
    return arr


def select_and_bound(
    counts: np.ndarray,
    alpha: float,
    bound: str = "clopper-pearson",
    coverage: str = "simultaneous",
    selection_counts: np.ndarray | None = None,
) -> BoundResult:
    """Algorithm 2's top-two selection and ``CalculateBound`` for n test points at once.

    Args:
        counts: (n, C) integer votes of M noisy models (every row sums to M): the
            estimation sample.
        alpha: total error tolerance; the returned statement
            p_{c_A} >= p_a_lower and max_{c != c_A} p_c <= p_b_upper holds with
            probability >= 1 - alpha per test point (``coverage="simultaneous"``), or
            the paper's per-bound level (``"paper"``: each of the two bounds at alpha).
        bound: ``"hoeffding"`` (the paper) or ``"clopper-pearson"`` (exact).
        coverage: ``"simultaneous"`` or ``"paper"``; see the module docstring.
        selection_counts: optional (n, C) votes from an independent selection sample
            (any M'); c_A and c_B are then chosen from it.

    Returns:
        A :class:`BoundResult`; ``abstain = p_a_lower <= p_b_upper`` (Algorithm 2).
    """
    alpha = _check_alpha(alpha)
    bound = check_choice("bound", bound, BOUNDS)
    coverage = check_choice("coverage", coverage, COVERAGES)
    counts = _check_count_matrix("counts", counts)
    n, C = counts.shape
    M = int(counts[0].sum()) if n else 1
    lower, upper = _LOWER[bound], _UPPER[bound]
    rows = np.arange(n)

    if selection_counts is not None:
        sel = _check_count_matrix("selection_counts", selection_counts)
        if sel.shape != counts.shape:
            raise ConfigError(
                f"The 'selection_counts' parameter must have the shape of 'counts' {counts.shape}. Got {sel.shape} instead."
            )
        c_a, c_b_sel = _top_two(sel)
        n_a = counts[rows, c_a]
        if coverage == "paper":
            c_b = c_b_sel
            n_b = counts[rows, c_b]
            p_a_lower = np.asarray(lower(n_a, M, alpha), dtype=np.float64)
            p_b_upper = np.asarray(upper(n_b, M, alpha), dtype=np.float64)
        else:
            # c_A is fixed by the independent selection sample: 1 lower bound at alpha / 2 and
            # C - 1 upper bounds at alpha / (2 (C - 1)) each; union bound <= alpha.
            others = counts.copy()
            others[rows, c_a] = -1
            c_b = np.argmax(others, axis=1).astype(np.int64)  # strongest competitor, lowest index on ties
            n_b = counts[rows, c_b]
            p_a_lower = np.asarray(lower(n_a, M, alpha / 2.0), dtype=np.float64)
            p_b_upper = np.asarray(upper(n_b, M, alpha / (2.0 * (C - 1))), dtype=np.float64)
            p_b_upper = np.minimum(p_b_upper, 1.0 - p_a_lower)
    else:
        c_a, c_b = _top_two(counts)
        n_a, n_b = counts[rows, c_a], counts[rows, c_b]
        if coverage == "paper":
            p_a_lower = np.asarray(lower(n_a, M, alpha), dtype=np.float64)
            p_b_upper = np.asarray(upper(n_b, M, alpha), dtype=np.float64)
        else:
            # All C two-sided intervals at once: 2C one-sided statements at alpha / (2C) each.
            # The upper bound is increasing in the count, so max_{c != c_A} U_c = U(n_b). (Here
            # 1 - L(n_a) = U(M - n_a) >= U(n_b) for both bounds, so 1 - p_A_lower never binds.)
            level = alpha / (2.0 * C)
            p_a_lower = np.asarray(lower(n_a, M, level), dtype=np.float64)
            p_b_upper = np.asarray(upper(n_b, M, level), dtype=np.float64)

    return BoundResult(
        c_a=np.asarray(c_a, dtype=np.int64),
        c_b=np.asarray(c_b, dtype=np.int64),
        n_a=np.asarray(n_a, dtype=np.int64),
        n_b=np.asarray(n_b, dtype=np.int64),
        p_a_lower=p_a_lower,
        p_b_upper=p_b_upper,
        abstain=p_a_lower <= p_b_upper,
    )


# ---------------------------------------------------------------------------------------------
# means of [0, 1] variables (the mixture certificate: one value per independent training run)


def _kl_bernoulli(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """kl(p || q) = p log(p/q) + (1-p) log((1-p)/(1-q)), with 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
        b = np.where(p < 1, (1 - p) * (np.log1p(-p) - np.log1p(-q)), 0.0)
    return a + b


def _mean_bound(mean: np.ndarray, K: int, alpha: float, upper: bool) -> np.ndarray:
    m = np.clip(np.asarray(mean, dtype=np.float64), 0.0, 1.0)
    level = math.log(1.0 / alpha) / K
    # the feasible set {q : kl(m || q) <= level} is an interval around m; bisect its far end
    lo, hi = (m.copy(), np.ones_like(m)) if upper else (np.zeros_like(m), m.copy())
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        inside = _kl_bernoulli(m, mid) <= level
        if upper:
            lo, hi = np.where(inside, mid, lo), np.where(inside, hi, mid)
        else:
            lo, hi = np.where(inside, lo, mid), np.where(inside, mid, hi)
    return hi if upper else lo


def mean_lower(mean: np.ndarray | float, K: int, alpha: float) -> np.ndarray:
    """Lower confidence bound at level alpha on E[X] from the mean of K i.i.d. X in [0, 1].

    The Chernoff bound in binomial-KL form: P[mean - E X >= t] <= exp(-K kl(E X + t || E X)) holds
    for every [0, 1]-valued X (Hoeffding 1963, Thm 1), so {q <= mean : K kl(mean || q) <= log(1/alpha)}
    contains E X with probability >= 1 - alpha; the bound is its smallest point (bisection, returned
    from below). Tighter than the additive Hoeffding bound near 0 and 1; for 0/1 variables it is the
    Chernoff bound on a binomial proportion.
    """
    K = check_int("K", K, low=1)
    return _mean_bound(np.asarray(mean), K, _check_alpha(alpha), upper=False)


def mean_upper(mean: np.ndarray | float, K: int, alpha: float) -> np.ndarray:
    """Upper confidence bound at level alpha on E[X] (see :func:`mean_lower`); returned from above."""
    K = check_int("K", K, low=1)
    return _mean_bound(np.asarray(mean), K, _check_alpha(alpha), upper=True)


def mixture_bound(lower_mean: np.ndarray, upper_mean: np.ndarray, K: int, alpha: float) -> BoundResult:
    """c_A, p_A_lower, p_B_upper of the mixture over K independent training runs.

    Args:
        lower_mean, upper_mean: (n, C) averages over the K runs of per-run lower / upper bounds
            l_k(c) <= p_k(c) <= u_k(c) on the smoothed class probabilities of run k (exact
            quadrature bounds for linear models: :func:`crfl.smoothing.exact_class_bounds`). The
            mixture probability is p(c) = E_k p_k(c), with E l_k(c) <= p(c) <= E u_k(c).
        K: the number of i.i.d. runs; alpha: total failure probability per point.

    c_A is the argmax of the estimated mixture probability (the midpoint of the two means;
    lowest index on ties). Every class gets both one-sided bounds at alpha / (2C) (Bonferroni
    over 2C statements), so the data-selected c_A is covered: p_A_lower = L(c_A) and
    p_B_upper = min(max_{c != c_A} U(c), 1 - p_A_lower), valid together with probability >= 1 - alpha.
    """
    lo = np.asarray(lower_mean, dtype=np.float64)
    up = np.asarray(upper_mean, dtype=np.float64)
    if lo.shape != up.shape or lo.ndim != 2 or lo.shape[1] < 2:
        raise ConfigError(
            f"The 'lower_mean' and 'upper_mean' parameters must be (n, C) arrays of one shape. Got {lo.shape} and {up.shape} instead."
        )
    n, C = lo.shape
    level = _check_alpha(alpha) / (2.0 * C)
    c_a = np.argmax(0.5 * (lo + up), axis=1).astype(np.int64)
    rows = np.arange(n)
    L = mean_lower(lo[rows, c_a], K, level)
    U = mean_upper(up, K, level)
    U[rows, c_a] = -np.inf
    c_b = np.argmax(U, axis=1).astype(np.int64)
    p_b = np.minimum(U[rows, c_b], 1.0 - L)
    with np.errstate(divide="ignore"):
        log1m = np.log1p(-L)
        log_b = np.log(p_b)
    return BoundResult(c_a, c_b, None, None, L, p_b, L <= p_b, log1m, log_b)
