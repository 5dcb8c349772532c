"""Tests of crfl.bounds: one-sided binomial bounds, top-two selection, coverage of the three modes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from crfl.bounds import (
    ABSTAIN,
    BoundResult,
    clopper_pearson_lower,
    clopper_pearson_upper,
    hoeffding_lower,
    hoeffding_upper,
    select_and_bound,
)
from crfl.validation import ConfigError

# ---------------------------------------------------------------------------
# one-sided bounds
# ---------------------------------------------------------------------------


def test_hoeffding_by_hand():
    # k = 70, M = 100, alpha = 0.05: half-width sqrt(ln 20 / 200) = sqrt(2.9957323 / 200) = 0.1223873
    assert hoeffding_lower(70, 100, 0.05) == pytest.approx(0.7 - 0.1223873, abs=1e-7)
    assert hoeffding_upper(70, 100, 0.05) == pytest.approx(0.7 + 0.1223873, abs=1e-7)
    # clipped to [0, 1]
    assert hoeffding_lower(5, 100, 0.05) == 0.0
    assert hoeffding_upper(95, 100, 0.05) == 1.0
    out = hoeffding_lower(np.array([0, 50, 100]), 100, 0.05)
    assert out.shape == (3,) and out[0] == 0.0


def test_clopper_pearson_matches_scipy_exact_interval():
    for k, M, alpha in [(0, 10, 0.05), (3, 10, 0.05), (70, 100, 0.001), (100, 100, 0.01), (999, 1000, 0.001)]:
        ci = stats.binomtest(k, M).proportion_ci(confidence_level=1 - 2 * alpha, method="exact")
        assert clopper_pearson_lower(k, M, alpha) == pytest.approx(ci.low, rel=1e-10, abs=1e-14)
        assert clopper_pearson_upper(k, M, alpha) == pytest.approx(ci.high, rel=1e-10, abs=1e-14)
    assert clopper_pearson_lower(0, 50, 0.01) == 0.0
    assert clopper_pearson_upper(50, 50, 0.01) == 1.0


def test_clopper_pearson_defining_property():
    # at p = lower bound, P[X >= k] = alpha; at p = upper bound, P[X <= k] = alpha
    for k, M, alpha in [(1, 20, 0.05), (17, 40, 0.01), (990, 1000, 0.001)]:
        lo = clopper_pearson_lower(k, M, alpha)
        up = clopper_pearson_upper(k, M, alpha)
        assert stats.binom.sf(k - 1, M, lo) == pytest.approx(alpha, rel=1e-8)
        assert stats.binom.cdf(k, M, up) == pytest.approx(alpha, rel=1e-8)


def test_clopper_pearson_tighter_than_hoeffding_for_extreme_counts():
    assert clopper_pearson_lower(1000, 1000, 0.001) > hoeffding_lower(1000, 1000, 0.001)
    assert clopper_pearson_upper(0, 1000, 0.001) < hoeffding_upper(0, 1000, 0.001)


@pytest.mark.parametrize("fn", [hoeffding_lower, hoeffding_upper, clopper_pearson_lower, clopper_pearson_upper])
def test_bounds_validate(fn):
    with pytest.raises(ConfigError, match="'alpha'"):
        fn(3, 10, 1.5)
    with pytest.raises(ConfigError, match="'M'"):
        fn(3, 0, 0.1)
    with pytest.raises(ConfigError, match="'k'"):
        fn(11, 10, 0.1)
    with pytest.raises(ConfigError, match="'k'"):
        fn(2.5, 10, 0.1)


# ---------------------------------------------------------------------------
# select_and_bound
# ---------------------------------------------------------------------------


def test_paper_mode_is_algorithm_2():
    counts = np.array([[10, 700, 290], [500, 0, 500], [0, 0, 1000]])
    r = select_and_bound(counts, 0.001, "hoeffding", "paper")
    assert isinstance(r, BoundResult)
    assert r.c_a.tolist() == [1, 0, 2] and r.c_b.tolist() == [2, 2, 0]  # ties: lowest index wins
    assert r.n_a.tolist() == [700, 500, 1000] and r.n_b.tolist() == [290, 500, 0]
    half = math.sqrt(math.log(1000) / 2000)
    np.testing.assert_allclose(r.p_a_lower, [0.7 - half, 0.5 - half, 1 - half])
    np.testing.assert_allclose(r.p_b_upper, [0.29 + half, 0.5 + half, half])
    assert r.abstain.tolist() == [False, True, False]
    assert r.prediction().tolist() == [1, ABSTAIN, 2]
    assert r.c_a.dtype == np.int64 and r.p_a_lower.dtype == np.float64 and r.abstain.dtype == bool


def test_simultaneous_mode_levels():
    counts = np.array([[600, 300, 100, 0], [250, 250, 250, 250]])
    alpha, C, M = 0.01, 4, 1000
    r = select_and_bound(counts, alpha, "clopper-pearson", "simultaneous")
    level = alpha / (2 * C)
    np.testing.assert_allclose(r.p_a_lower, clopper_pearson_lower(np.array([600, 250]), M, level))
    np.testing.assert_allclose(r.p_b_upper, clopper_pearson_upper(np.array([300, 250]), M, level))
    assert r.c_a.tolist() == [0, 0] and r.c_b.tolist() == [1, 1]
    assert r.abstain.tolist() == [False, True]


def test_selection_sample_mode():
    sel = np.array([[10, 60, 30], [50, 30, 20]])
    counts = np.array([[100, 500, 400], [300, 600, 100]])
    alpha, C, M = 0.02, 3, 1000
    r = select_and_bound(counts, alpha, "clopper-pearson", "simultaneous", selection_counts=sel)
    assert r.c_a.tolist() == [1, 0]  # from the selection sample, even where the estimation sample disagrees
    assert r.n_a.tolist() == [500, 300]
    assert r.c_b.tolist() == [2, 1]  # the strongest competitor in the estimation sample
    lo = clopper_pearson_lower(np.array([500, 300]), M, alpha / 2)
    up = clopper_pearson_upper(np.array([400, 600]), M, alpha / (2 * (C - 1)))
    np.testing.assert_allclose(r.p_a_lower, lo)
    np.testing.assert_allclose(r.p_b_upper, np.minimum(up, 1 - lo))
    assert r.abstain.tolist() == [False, True]
    # 1 - p_A_lower also bounds max_{c != c_A} p_c; with unequal levels it can be the tighter one
    r2 = select_and_bound(np.array([[600, 400, 0]]), alpha, "clopper-pearson", selection_counts=np.array([[9, 1, 0]]))
    assert r2.p_b_upper[0] == pytest.approx(1 - r2.p_a_lower[0])
    assert r2.p_b_upper[0] < clopper_pearson_upper(400, M, alpha / 4)
    rp = select_and_bound(counts, alpha, "hoeffding", "paper", selection_counts=sel)
    assert rp.c_a.tolist() == [1, 0] and rp.c_b.tolist() == [2, 1]


def test_select_and_bound_validates():
    good = np.array([[3, 7], [5, 5]])
    with pytest.raises(ConfigError, match="'bound'"):
        select_and_bound(good, 0.01, "wilson")
    with pytest.raises(ConfigError, match="'coverage'"):
        select_and_bound(good, 0.01, "hoeffding", "both")
    with pytest.raises(ConfigError, match="'alpha'"):
        select_and_bound(good, 0.0)
    with pytest.raises(ConfigError, match="'counts'"):
        select_and_bound(np.array([[3, 7], [5, 4]]), 0.01)  # different M per row
    with pytest.raises(ConfigError, match="'counts'"):
        select_and_bound(np.array([[10], [10]]), 0.01)  # C = 1
    with pytest.raises(ConfigError, match="'counts'"):
        select_and_bound(np.array([[3.5, 6.5]]), 0.01)
    with pytest.raises(ConfigError, match="'selection_counts'"):
        select_and_bound(good, 0.01, selection_counts=np.array([[1, 2, 3]]))


def test_empty_input():
    r = select_and_bound(np.zeros((0, 3), dtype=np.int64), 0.01)
    assert r.c_a.shape == (0,) and r.abstain.shape == (0,)


# ---------------------------------------------------------------------------
# coverage (statistical; fixed seeds)
#
# The event that matters for Theorem 3 is E = {p_{c_A} >= p_A_lower and max_{c != c_A} p_c <= p_B_upper}.
# With the empirical failure rate over n independent trials, a true rate <= a passes
# rate <= a + 3 sqrt(a (1 - a) / n) with probability > 0.998 (normal approximation).
# ---------------------------------------------------------------------------

TRIALS = 2000
ALPHA = 0.05
SLACK = 3 * math.sqrt(ALPHA * (1 - ALPHA) / TRIALS)

CASES = [
    (0.45, 0.45, 0.10),  # a tie for the top: c_A is chosen by the data
    (0.2, 0.2, 0.2, 0.2, 0.2),  # all tied
    (0.6, 0.1, 0.1, 0.1, 0.1),
    (0.3, 0.3, 0.3, 0.1),
    (0.5, 0.5),
    (0.97, 0.02, 0.01),
]


def _failures(p, M, bound, coverage, seed, selection=False, pair_only=False):
    rng = np.random.default_rng(seed)
    p = np.asarray(p)
    C = len(p)
    counts = rng.multinomial(M, p, size=TRIALS)
    sel = rng.multinomial(M // 2, p, size=TRIALS) if selection else None
    r = select_and_bound(counts, ALPHA, bound, coverage, selection_counts=sel)
    comp = p[r.c_b] if pair_only else np.where(np.arange(C)[None, :] == r.c_a[:, None], -1.0, p[None, :]).max(axis=1)
    return float(np.mean((p[r.c_a] < r.p_a_lower) | (comp > r.p_b_upper)))


@pytest.mark.parametrize("bound", ["hoeffding", "clopper-pearson"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_simultaneous_coverage(bound, case):
    for M, seed in [(40, 10 + case), (400, 20 + case)]:
        assert _failures(CASES[case], M, bound, "simultaneous", seed) <= ALPHA + SLACK
        assert _failures(CASES[case], M, bound, "simultaneous", seed + 100, selection=True) <= ALPHA + SLACK


@pytest.mark.parametrize("bound", ["hoeffding", "clopper-pearson"])
def test_paper_coverage_with_clear_winner_is_two_alpha(bound):
    # When c_A is not in doubt the paper's pair of bounds holds with probability >= 1 - 2 alpha.
    for p in [(0.6, 0.1, 0.1, 0.1, 0.1), (0.97, 0.02, 0.01)]:
        two = 2 * ALPHA
        assert _failures(p, 400, bound, "paper", 7, pair_only=True) <= two + 3 * math.sqrt(two * (1 - two) / TRIALS)


def test_paper_coverage_fails_when_the_data_choose_c_A():
    # Five tied classes, Clopper-Pearson at alpha each: the winner's lower bound is selected for
    # being high, and the statement E fails far more often than alpha (about 18%, even > 2 alpha).
    rate = _failures((0.2,) * 5, 100, "clopper-pearson", "paper", 3)
    assert rate > 2 * ALPHA + SLACK
    assert _failures((0.2,) * 5, 100, "clopper-pearson", "simultaneous", 3) <= ALPHA + SLACK
