"""Tests of crfl.radius: Theorem 3's budget, Lemma 10's contraction, Corollary 1, Theorem 1, inverses."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from crfl import radius
from crfl.radius import (
    certified_radius,
    kl_bound,
    kl_budget,
    log_contraction,
    log_kl_budget,
    max_attackers,
    max_poison_ratio,
    max_scale,
    theorem1_holds,
)
from crfl.validation import ConfigError

ATTACK = dict(p=[0.1], gamma=[10.0], tau=[30.0], eta=[0.001], poison_ratio=[0.2])


def plain_radius(pa, pb, sigma, L, p, gamma, tau, eta, q, rho, sig) -> float:
    """Eq. 2 written out again with math and scipy only (not our code)."""
    eps = -math.log(1.0 - (math.sqrt(pa) - math.sqrt(pb)) ** 2)
    R = len(p)
    S = sum((p[i] * gamma[i] * tau[i] * eta[i] * q[i]) ** 2 for i in range(R))
    prod = 1.0
    for r, s in zip(rho, sig):
        prod *= 2.0 * stats.norm.cdf(r / s) - 1.0
    return math.sqrt(eps * sigma**2 / (2.0 * R * L**2 * S * prod))


# ---------------------------------------------------------------------------
# Theorem 3 (Eq. 39)
# ---------------------------------------------------------------------------


def test_kl_budget_by_hand():
    # sqrt(0.7) = 0.8366600265, sqrt(0.1) = 0.3162277660, difference 0.5204322605,
    # squared 0.2708497377, 1 - that = 0.7291502623, -ln(0.7291502623) = 0.3158754472
    assert kl_budget(0.7, 0.1) == pytest.approx(0.3158754472, rel=1e-9)
    assert log_kl_budget(0.7, 0.1) == pytest.approx(math.log(0.3158754472), rel=1e-9)


def test_kl_budget_edges():
    assert kl_budget(1.0, 0.0) == math.inf
    assert log_kl_budget(1.0, 0.0) == math.inf
    assert kl_budget(0.5, 0.5) == 0.0
    # the formula is symmetric in p_A, p_B; the budget is 0 when p_A <= p_B (abstain)
    assert kl_budget(0.3, 0.6) == 0.0
    assert log_kl_budget(0.3, 0.6) == -math.inf
    out = kl_budget(np.array([0.9, 0.2, 1.0]), np.array([0.05, 0.2, 0.0]))
    assert out.shape == (3,) and out[1] == 0.0 and out[2] == math.inf


def test_kl_budget_precision_near_one_and_tiny():
    mpmath = pytest.importorskip("mpmath")
    for pa, pb in [(1 - 2**-50, 1e-30), (1 - 1e-12, 1e-300), (0.5 + 2**-40, 0.5), (2e-300, 1e-300), (0.9, 0.1)]:
        with mpmath.workdps(60):
            x = (mpmath.sqrt(mpmath.mpf(pa)) - mpmath.sqrt(mpmath.mpf(pb))) ** 2
            exact = -mpmath.log1p(-x)
        assert log_kl_budget(pa, pb) == pytest.approx(float(mpmath.log(exact)), rel=1e-12, abs=1e-12)
        if float(exact) > 1e-300:
            assert kl_budget(pa, pb) == pytest.approx(float(exact), rel=1e-12)


def test_kl_budget_validates():
    with pytest.raises(ConfigError, match="'p_a_lower'"):
        kl_budget(1.5, 0.1)
    with pytest.raises(ConfigError, match="'p_b_upper'"):
        kl_budget(0.5, float("nan"))


# ---------------------------------------------------------------------------
# Lemma 10: the contraction in log space
# ---------------------------------------------------------------------------


def test_log_contraction_empty_and_degenerate_rounds():
    assert log_contraction([], []) == 0.0  # T = t_adv: empty product 1
    assert log_contraction([1.0], [0.0]) == 0.0  # sigma_t = 0: factor 2 Phi(inf) - 1 = 1
    assert log_contraction([0.0], [1.0]) == -math.inf  # rho_t = 0: factor 0
    assert log_contraction([0.0], [0.0]) == -math.inf
    assert log_contraction([2.0, 0.0], [0.01, 0.01]) == -math.inf


def test_log_contraction_large_ratio_tiny_but_finite():
    # rho/sigma = 10: log(2 Phi(10) - 1) = log1p(-erfc(10/sqrt 2)) = -1.5239706e-23 per round
    rho, sig = [10.0] * 100, [1.0] * 100
    lc = log_contraction(rho, sig)
    assert lc == pytest.approx(-100 * 1.5239706048321162e-23, rel=1e-12)
    assert lc < 0.0
    naive = math.prod(2 * stats.norm.cdf(r / s) - 1 for r, s in zip(rho, sig))
    assert naive == 1.0  # the naive product cannot see it


def test_log_contraction_paper_settings_are_exactly_one():
    # rho_t / sigma_t = 200 (rho = 2, sigma = 0.01): the true log factor is about -2 phi(200) / 200,
    # ~ -10^-8688, below the smallest double: both the naive product and the log sum give exactly 1 / 0.
    rho = [min(0.1 * t + 2, 15) for t in range(11, 201)]
    assert log_contraction(rho, [0.01] * len(rho)) == 0.0
    assert math.prod(2 * stats.norm.cdf(r / 0.01) - 1 for r in rho) == 1.0


def test_log_contraction_against_direct_sum_and_underflow():
    rng = np.random.default_rng(0)
    x = rng.uniform(0.05, 4.0, 50)
    direct = sum(math.log(2 * stats.norm.cdf(v) - 1) for v in x)
    assert log_contraction(list(x), [1.0] * 50) == pytest.approx(direct, rel=1e-12)
    # tiny ratios: 2 Phi(x) - 1 ~ x sqrt(2/pi)
    assert log_contraction([1e-12], [1.0]) == pytest.approx(math.log(1e-12 * math.sqrt(2 / math.pi)), rel=1e-12)
    # many rounds at rho/sigma = 0.5: the naive product underflows to 0 (an infinite radius),
    # the log sum stays finite
    n = 1000
    assert math.prod([2 * stats.norm.cdf(0.5) - 1] * n) == 0.0
    assert log_contraction([0.5] * n, [1.0] * n) == pytest.approx(n * math.log(2 * stats.norm.cdf(0.5) - 1), rel=1e-12)
    # at rho/sigma = 1 (factor 0.68 > 1/2) it gets stuck at the smallest subnormal, 5e-324
    assert math.prod([2 * stats.norm.cdf(1.0) - 1] * 3000) == 5e-324


def test_log_contraction_switch_is_continuous():
    x = math.sqrt(2.0) * radius._ERF_SWITCH
    below, above = log_contraction([x * (1 - 1e-12)], [1.0]), log_contraction([x], [1.0])
    assert below == pytest.approx(above, rel=1e-10)


def test_log_contraction_validates():
    with pytest.raises(ConfigError, match="'sigma'"):
        log_contraction([1.0, 2.0], [1.0])
    with pytest.raises(ConfigError, match=r"'rho\[1\]'"):
        log_contraction([1.0, -2.0], [1.0, 1.0])
    with pytest.raises(ConfigError, match=r"'sigma\[0\]'"):
        log_contraction([1.0], [-1.0])


# ---------------------------------------------------------------------------
# Corollary 1 (Eq. 2)
# ---------------------------------------------------------------------------


def test_corollary1_by_hand():
    # p_A = 0.9, p_B = 0.05: sqrt 0.9 - sqrt 0.05 = 0.9486832981 - 0.2236067977 = 0.7250765004,
    #   squared 0.5257359313, eps = -ln(1 - 0.5257359313) = -ln(0.4742640687) = 0.7459910054
    # a = p gamma tau eta q = 0.1 * 10 * 30 * 0.001 * 0.2 = 0.006, S = 3.6e-5, R = 1
    # kappa = e^-0.5 = 0.6065306597, sigma_t_adv = 0.01, L_Z = 2
    # RAD^2 = 0.7459910054 * 1e-4 / (2 * 1 * 4 * 3.6e-5 * 0.6065306597)
    #       = 7.459910054e-5 / 1.746808300e-4 = 0.4270594578,  RAD = 0.6534978636
    eps = -math.log(1 - (math.sqrt(0.9) - math.sqrt(0.05)) ** 2)
    assert eps == pytest.approx(0.7459910054, rel=1e-9)
    rad = certified_radius(0.9, 0.05, sigma_t_adv=0.01, L_Z=2.0, log_contraction=-0.5, **ATTACK)
    assert isinstance(rad, float)
    assert rad == pytest.approx(0.6534978636, rel=1e-9)
    assert rad == pytest.approx(math.sqrt(eps * 1e-4 / (2 * 4 * 3.6e-5 * math.exp(-0.5))), rel=1e-12)


def test_corollary1_matches_plain_formula_on_random_inputs():
    rng = np.random.default_rng(1)
    for _ in range(300):
        R = int(rng.integers(1, 6))
        p = list(rng.uniform(0.01, 1.0, R))
        gamma = list(rng.uniform(0.1, 100.0, R))
        tau = list(rng.integers(1, 200, R).astype(float))
        eta = list(rng.uniform(1e-4, 0.5, R))
        q = list(rng.uniform(0.01, 1.0, R))
        T = int(rng.integers(0, 20))
        rho = list(rng.uniform(0.05, 3.0, T))
        sig = list(rng.uniform(0.5, 2.0, T))
        pa = float(rng.uniform(0.2, 0.999))
        pb = float(rng.uniform(0.0, pa * 0.99))
        sigma, L = float(rng.uniform(1e-3, 1.0)), float(rng.uniform(0.5, 50.0))
        ours = certified_radius(
            pa, pb, sigma_t_adv=sigma, L_Z=L, p=p, gamma=gamma, tau=tau, eta=eta, poison_ratio=q,
            log_contraction=log_contraction(rho, sig),
        )
        assert ours == pytest.approx(plain_radius(pa, pb, sigma, L, p, gamma, tau, eta, q, rho, sig), rel=1e-9)


def test_radius_edges():
    kw = dict(sigma_t_adv=0.01, L_Z=2.0, log_contraction=-0.5)
    out = certified_radius(np.array([1.0, 0.5, 0.4, 0.8]), np.array([0.0, 0.5, 0.45, 0.1]), **kw, **ATTACK)
    assert out[0] == math.inf  # eps = inf
    assert out[1] == 0.0 and out[2] == 0.0  # abstain
    assert 0 < out[3] < math.inf
    # the attackers cannot move the model: S = 0
    assert certified_radius(0.8, 0.1, **kw, p=[0.1], gamma=[0.0], tau=[1], eta=[0.1], poison_ratio=[0.5]) == math.inf
    # rho_t = 0 in some round: the contraction is 0, every radius is infinite (abstentions stay 0)
    lc = log_contraction([0.0], [0.01])
    out = certified_radius(np.array([0.8, 0.3]), np.array([0.1, 0.3]), sigma_t_adv=0.01, L_Z=2.0, log_contraction=lc, **ATTACK)
    assert out[0] == math.inf and out[1] == 0.0


def test_radius_huge_ratio_contraction_equals_no_contraction():
    kw = dict(sigma_t_adv=0.01, L_Z=2.0, **ATTACK)
    r0 = certified_radius(0.8, 0.1, log_contraction=0.0, **kw)
    lc = log_contraction([10.0] * 100, [1.0] * 100)
    r1 = certified_radius(0.8, 0.1, log_contraction=lc, **kw)
    assert r1 >= r0 and r1 == pytest.approx(r0, rel=1e-15)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(sigma_t_adv=0.0), "sigma_t_adv"),
        (dict(L_Z=0.0), "L_Z"),
        (dict(L_Z=math.inf), "L_Z"),
        (dict(log_contraction=0.5), "log_contraction"),
        (dict(p=[1.5]), r"p\[0\]"),
        (dict(gamma=[-1.0]), r"gamma\[0\]"),
        (dict(tau=[0.5]), r"tau\[0\]"),
        (dict(eta=[0.0]), r"eta\[0\]"),
        (dict(poison_ratio=[1.2]), r"poison_ratio\[0\]"),
        (dict(p=[0.1, 0.1]), "gamma"),
        (dict(p=[], gamma=[], tau=[], eta=[], poison_ratio=[]), "'p'"),
        (dict(p=0.1), "'p'"),
    ],
)
def test_radius_validates(kwargs, name):
    base = dict(sigma_t_adv=0.01, L_Z=2.0, log_contraction=0.0, **ATTACK)
    base.update(kwargs)
    with pytest.raises(ConfigError, match=name):
        certified_radius(0.8, 0.1, **base)


# ---------------------------------------------------------------------------
# The paper's remarks after Corollary 1: monotonicity
# ---------------------------------------------------------------------------

prob = st.floats(0.0, 1.0)
pos = st.floats(0.01, 10.0)


def _rad(pa=0.8, pb=0.1, sigma=0.01, L=2.0, p=(0.1,), gamma=(10.0,), tau=(30.0,), eta=(0.001,), q=(0.2,), rho=(2.0,), sig=(1.0,)):
    return certified_radius(
        pa, pb, sigma_t_adv=sigma, L_Z=L, p=list(p), gamma=list(gamma), tau=list(tau), eta=list(eta),
        poison_ratio=list(q), log_contraction=log_contraction(list(rho), list(sig)),
    )


@settings(max_examples=60, deadline=None)
@given(pa=st.floats(0.3, 0.99), pb=st.floats(0.0, 0.29), f=st.floats(1.01, 3.0), dp=st.floats(0.001, 0.2))
def test_radius_grows_with_margin_and_sigma(pa, pb, f, dp):
    base = _rad(pa=pa, pb=pb)
    assert _rad(pa=min(1.0, pa + dp), pb=pb) >= base
    assert _rad(pa=pa, pb=max(0.0, pb - dp)) >= base
    assert _rad(pa=pa, pb=pb, sigma=0.01 * f) > base


@settings(max_examples=60, deadline=None)
@given(f=st.floats(1.01, 5.0), which=st.sampled_from(["p", "gamma", "tau", "eta", "q"]))
def test_radius_shrinks_with_attacker_strength(f, which):
    base = dict(p=(0.1,), gamma=(10.0,), tau=(30.0,), eta=(0.001,), q=(0.2,))
    stronger = dict(base)
    v = base[which][0] * f
    if which in ("p", "q"):
        v = min(v, 1.0)
    stronger[which] = (v,)
    assert _rad(**stronger) < _rad(**base)


@settings(max_examples=40, deadline=None)
@given(R=st.integers(1, 8))
def test_radius_shrinks_with_more_attackers(R):
    def rad(r):
        return _rad(p=(0.05,) * r, gamma=(10.0,) * r, tau=(30.0,) * r, eta=(0.001,) * r, q=(0.2,) * r)

    assert rad(R + 1) < rad(R)
    assert rad(R) == pytest.approx(rad(1) / R, rel=1e-12)  # R * sum of R equal terms = R^2


@settings(max_examples=60, deadline=None)
@given(rho=st.floats(0.01, 5.0), f=st.floats(1.01, 3.0), T=st.integers(0, 30))
def test_radius_shrinks_with_rho_and_grows_with_rounds(rho, f, T):
    assert _rad(rho=(rho * f,), sig=(1.0,)) < _rad(rho=(rho,), sig=(1.0,))
    assert _rad(rho=(rho,) * (T + 1), sig=(1.0,) * (T + 1)) > _rad(rho=(rho,) * T, sig=(1.0,) * T)


# ---------------------------------------------------------------------------
# Theorem 1, Theorem 2
# ---------------------------------------------------------------------------


def test_theorem1_agrees_with_radius_for_equal_deltas():
    rng = np.random.default_rng(2)
    for _ in range(200):
        R = int(rng.integers(1, 5))
        att = dict(
            p=list(rng.uniform(0.01, 1, R)), gamma=list(rng.uniform(0.5, 50, R)), tau=list(rng.integers(1, 50, R)),
            eta=list(rng.uniform(1e-3, 0.1, R)), poison_ratio=list(rng.uniform(0.05, 1, R)),
        )
        kw = dict(
            sigma_t_adv=float(rng.uniform(0.01, 1)), L_Z=float(rng.uniform(1, 20)), log_contraction=float(-rng.exponential())
        )
        pa = rng.uniform(0.3, 1.0, 20)
        pb = rng.uniform(0.0, 0.6, 20)
        rad = certified_radius(pa, pb, **kw, **att)
        for i in range(20):
            if rad[i] == 0.0:
                assert not theorem1_holds(pa[i], pb[i], [0.1] * R, **kw, **att)
                continue
            assert theorem1_holds(pa[i], pb[i], [rad[i] * (1 - 1e-9)] * R, **kw, **att)
            assert not theorem1_holds(pa[i], pb[i], [rad[i] * (1 + 1e-9)] * R, **kw, **att)
            # the condition as printed (factor R on both sides) is R times stricter in ||delta||^2
            printed = theorem1_holds(pa[i], pb[i], [rad[i] / math.sqrt(R) * (1 - 1e-9)] * R, as_printed=True, **kw, **att)
            assert printed
            if R > 1:
                assert not theorem1_holds(pa[i], pb[i], [rad[i] * (1 - 1e-9)] * R, as_printed=True, **kw, **att)


def test_theorem1_heterogeneous_deltas_plain():
    att = dict(p=[0.1, 0.2], gamma=[10.0, 5.0], tau=[30, 20], eta=[0.001, 0.002], poison_ratio=[0.2, 0.5])
    kw = dict(sigma_t_adv=0.05, L_Z=3.0, log_contraction=-0.2)
    eps = kl_budget(0.85, 0.1)
    rhs = eps * 0.05**2 / (2 * 3.0**2 * math.exp(-0.2))
    for d in ([0.1, 0.1], [0.5, 0.01], [0.01, 2.0], [3.0, 3.0], [0.0, 0.0]):
        lhs = 2 * sum((a * b * c * e * q * x) ** 2 for a, b, c, e, q, x in zip(*att.values(), d))
        assert bool(theorem1_holds(0.85, 0.1, d, **kw, **att)) == (lhs <= rhs)
    out = theorem1_holds(np.array([0.85, 0.5]), np.array([0.1, 0.5]), [0.0, 0.0], **kw, **att)
    assert out.tolist() == [True, False]


def test_kl_bound_meets_budget_at_radius():
    kw = dict(sigma_t_adv=0.02, L_Z=4.0, log_contraction=-1.3)
    att = dict(p=[0.1, 0.05], gamma=[3.0, 8.0], tau=[10, 40], eta=[0.01, 0.001], poison_ratio=[0.3, 0.6])
    rad = certified_radius(0.9, 0.02, **kw, **att)
    assert kl_bound([rad, rad], **kw, **att) == pytest.approx(kl_budget(0.9, 0.02), rel=1e-12)
    # Theorem 2 by hand for one attacker: 2 * 1 * (0.1*10*30*0.001*0.2 * 2 * 0.5)^2 / 0.01^2 * e^-0.5
    hand = 2 * (0.006 * 2 * 0.5) ** 2 / 1e-4 * math.exp(-0.5)
    assert kl_bound([0.5], sigma_t_adv=0.01, L_Z=2.0, log_contraction=-0.5, **ATTACK) == pytest.approx(hand, rel=1e-12)
    with pytest.raises(ConfigError, match="delta_norms"):
        kl_bound([0.5, 0.5], sigma_t_adv=0.01, L_Z=2.0, log_contraction=-0.5, **ATTACK)


# ---------------------------------------------------------------------------
# Inverse questions (identical attackers)
# ---------------------------------------------------------------------------

COMMON = dict(sigma_t_adv=0.05, L_Z=3.0, log_contraction=-0.3)


def _rad_identical(pa, pb, R, p, gamma, tau, eta, q):
    return certified_radius(pa, pb, **COMMON, p=[p] * R, gamma=[gamma] * R, tau=[tau] * R, eta=[eta] * R, poison_ratio=[q] * R)


def test_max_attackers_plug_back():
    rng = np.random.default_rng(3)
    pa = rng.uniform(0.5, 1.0, 40)
    pb = rng.uniform(0.0, 0.5, 40)
    att = dict(p=0.02, gamma=2.0, tau=5.0, eta=0.01, poison_ratio=0.3)
    delta = 0.05
    R = max_attackers(pa, pb, delta, **COMMON, **att)
    assert R.dtype == np.float64 and np.all(R == np.floor(R))
    assert R.max() > 3  # the test exercises real values
    for i in range(40):
        r = int(R[i])
        if pa[i] <= pb[i]:
            assert r == 0
            continue
        args = (pa[i], pb[i])
        if r >= 1:
            assert _rad_identical(*args, r, 0.02, 2.0, 5.0, 0.01, 0.3) >= delta
        assert _rad_identical(*args, r + 1, 0.02, 2.0, 5.0, 0.01, 0.3) < delta


def test_max_attackers_edges():
    att = dict(p=0.02, gamma=2.0, tau=5.0, eta=0.01, poison_ratio=0.3)
    assert max_attackers(0.9, 0.05, 0.0, **COMMON, **att) == math.inf
    assert max_attackers(0.9, 0.05, 0.1, **COMMON, **{**att, "gamma": 0.0}) == math.inf
    assert max_attackers(0.4, 0.5, 0.1, **COMMON, **att) == 0.0
    assert max_attackers(0.9, 0.05, 1e6, **COMMON, **att) == 0.0
    assert isinstance(max_attackers(0.9, 0.05, 0.1, **COMMON, **att), float)


def test_max_scale_plug_back():
    pa, pb = np.array([0.9, 0.7, 0.99, 0.3]), np.array([0.05, 0.2, 0.0, 0.4])
    g = max_scale(pa, pb, 0.1, **COMMON, R=3, p=0.05, tau=10, eta=0.01, poison_ratio=0.2)
    assert g[3] == 0.0
    for i in range(3):
        r = _rad_identical(pa[i], pb[i], 3, 0.05, g[i], 10, 0.01, 0.2)
        assert r == pytest.approx(0.1, rel=1e-12)
        assert _rad_identical(pa[i], pb[i], 3, 0.05, g[i] * 1.001, 10, 0.01, 0.2) < 0.1
    assert max_scale(0.9, 0.05, 0.0, **COMMON, R=3, p=0.05, tau=10, eta=0.01, poison_ratio=0.2) == math.inf


def test_max_poison_ratio_plug_back_and_cap():
    pa, pb = np.array([0.9, 0.6, 0.99999]), np.array([0.05, 0.3, 0.0])
    q = max_poison_ratio(pa, pb, 0.2, **COMMON, R=2, p=0.05, gamma=5.0, tau=10, eta=0.01)
    assert np.all((q >= 0) & (q <= 1))
    for i in range(3):
        r = _rad_identical(pa[i], pb[i], 2, 0.05, 5.0, 10, 0.01, q[i])
        if q[i] < 1.0:
            assert r == pytest.approx(0.2, rel=1e-12)
        else:
            assert r >= 0.2
    assert q[2] == 1.0  # certified for every poison ratio
    assert max_poison_ratio(0.5, 0.5, 0.2, **COMMON, R=2, p=0.05, gamma=5.0, tau=10, eta=0.01) == 0.0


def test_inverse_validates():
    with pytest.raises(ConfigError, match="'R'"):
        max_scale(0.9, 0.1, 0.1, **COMMON, R=0, p=0.05, tau=10, eta=0.01, poison_ratio=0.2)
    with pytest.raises(ConfigError, match="'delta_norm'"):
        max_attackers(0.9, 0.1, -1.0, **COMMON, p=0.05, gamma=1.0, tau=10, eta=0.01, poison_ratio=0.2)
    with pytest.raises(ConfigError, match="'poison_ratio'"):
        max_attackers(0.9, 0.1, 1.0, **COMMON, p=0.05, gamma=1.0, tau=10, eta=0.01, poison_ratio=2.0)


def test_kl_budget_is_accurate_where_p_a_is_close_to_p_b():
    """eps within a few ulp times its condition number (p/(p_A - p_B)) of 50-digit mpmath, also for p_A ~ p_B,
    where the product form -log((1-p_A)/(1+sqrt p_A) + sqrt p_B) - log1p(sqrt p_A - sqrt p_B) cancels."""
    import mpmath as mp

    from crfl.radius import kl_budget

    rng = np.random.default_rng(0)
    with mp.workdps(50):
        for _ in range(400):
            pb = rng.uniform(0.0, 0.6)
            pa = min(pb + 10 ** rng.uniform(-12, -0.3), 1.0 - 1e-9)
            exact = -mp.log(1 - (mp.sqrt(pa) - mp.sqrt(pb)) ** 2)
            kappa = float(abs(mp.diff(lambda t: mp.log(-mp.log(1 - (mp.sqrt(t) - mp.sqrt(pb)) ** 2)), pa) * pa))
            assert kl_budget(pa, pb) == pytest.approx(float(exact), rel=1e-15 + 4 * 2.0**-53 * kappa), (pa, pb)
    # the row of tests/test_certify.py's coupled-kl case that the product form missed by 4.4e-9 (relative)
    pa, pb = 0.4622623653487048, 0.46204712772384293
    assert kl_budget(pa, pb) == pytest.approx(2.5060456866396290465e-08, rel=1e-12)
