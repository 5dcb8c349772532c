"""The coupled certificate's math (crfl.closeness, the budgets of crfl.readings.coupled, lipschitz.lz_centred): hand computations,
independent re-derivations, edge cases and adversarial searches against the bounds it rests on."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import optimize
from scipy.stats import norm

from crfl import closeness, lipschitz
from crfl.readings import coupled
from crfl.closeness import AttackTerm
from crfl.validation import ConfigError


def term(**kw) -> AttackTerm:
    base = dict(round=3, p=(0.1,), gamma=(10.0,), eta=(0.01,), tau=(8,), poison_ratio=(0.25,), start_opnorm=2.0, p_total=1.0)
    base.update(kw)
    return AttackTerm(**base)


def test_attack_coefficient_by_hand():
    # L_Z = 1/2 (2 + 8 * 0.01 * sqrt2 * 3) sqrt(10) + sqrt2;  A = p gamma eta Q L_Z with Q = 8 * 0.25 = 2
    B = 3.0
    lz = 0.5 * (2.0 + 8 * 0.01 * math.sqrt(2) * 3.0) * math.sqrt(10.0) + math.sqrt(2)
    assert lipschitz.lz_centred(2.0, 8, 0.01, B) == pytest.approx(lz, rel=1e-15)
    assert closeness.attack_coefficient(term(), B) == pytest.approx(0.1 * 10 * 0.01 * 2.0 * lz, rel=1e-14)
    two = term(p=(0.1, 0.05), gamma=(10.0, 2.0), eta=(0.01, 0.02), tau=(8, 4), poison_ratio=(0.25, 0.5))
    lz2 = 0.5 * (2.0 + 4 * 0.02 * math.sqrt(2) * 3.0) * math.sqrt(10.0) + math.sqrt(2)
    assert closeness.attack_coefficient(two, B) == pytest.approx(0.1 * 10 * 0.01 * 2 * lz + 0.05 * 2 * 0.02 * 2 * lz2, rel=1e-14)


def test_round_lipschitz_by_hand_and_general_weights():
    assert closeness.round_lipschitz(term()) == pytest.approx(1 + 2 * 0.1 * 9)  # 1 + 2 sum p (gamma - 1)
    assert closeness.round_lipschitz(term(gamma=(1.0,))) == pytest.approx(1.0)  # no scaling: nonexpansive
    # P = 0.5 (half the weight missing), gamma = 3, p = 0.2: |1 - 0.5 - 0.4| + 0.3 + 0.6 = 1.0
    assert closeness.round_lipschitz(term(p=(0.2,), gamma=(3.0,), p_total=0.5)) == pytest.approx(1.0)
    # gamma < 1 (down-scaling): |1 - 1 + 0.1 * 0.5| + 0.9 + 0.05 = 1.0
    assert closeness.round_lipschitz(term(gamma=(0.5,))) == pytest.approx(1.0)


def test_round_lipschitz_is_attained_by_linear_maps():
    """The scaled FedAvg map with every G_j = -I (an isometry) reaches the bound."""
    p = np.array([0.1, 0.2, 0.7])
    gamma = np.array([5.0, 1.0, 1.0])  # client 0 attacks
    k = term(p=(0.1,), gamma=(5.0,))
    # F(w) = w + sum_j p_j gamma_j (G_j w - w) = (1 - 2 sum_j p_j gamma_j) w
    F = 1 - 2 * float(np.sum(p * gamma))
    assert abs(F) == pytest.approx(closeness.round_lipschitz(k))


def test_composition_of_attack_rounds():
    a, b = term(round=2), term(round=5, gamma=(3.0,), start_opnorm=4.0)
    B = 2.0
    expect = closeness.attack_coefficient(a, B) * closeness.round_lipschitz(b) + closeness.attack_coefficient(b, B)
    assert closeness.deviation_coefficient([b, a], B) == pytest.approx(expect, rel=1e-14)  # order by round


def test_solve_radius_is_the_fixed_point():
    terms = [term(), term(round=7, gamma=(2.0,))]
    B0 = 5.0
    budgets = np.array([0.0, -1.0, 1e-9, 0.01, 0.3, 2.0, 50.0, math.inf])
    r = closeness.solve_radius(budgets, terms, B0)
    assert r[0] == 0.0 and r[1] == 0.0 and r[-1] == math.inf
    for b, x in zip(budgets[2:-1], r[2:-1]):
        f = lambda s: s * closeness.deviation_coefficient(terms, B0 + s) - b  # noqa: E731
        root = optimize.brentq(f, 0.0, b / closeness.deviation_coefficient(terms, B0), xtol=1e-300, rtol=1e-15)
        assert x == pytest.approx(root, rel=1e-12)
        assert x * closeness.deviation_coefficient(terms, B0 + x) <= b * (1 + 1e-14)  # from below
    assert np.all(np.diff(r[2:-1]) > 0)
    # fixed point, not an assumption: the radius is below budget / c(B0) because L_Z grows with B0 + r
    assert r[5] < 2.0 / closeness.deviation_coefficient(terms, B0)


def test_solve_radius_edges():
    assert closeness.solve_radius(np.array([0.5]), [term(gamma=(0.0,))], 3.0)[0] == math.inf  # no attack effect
    assert closeness.solve_radius(np.array([0.5]), [term(p=(0.0,))], 3.0)[0] == math.inf
    huge = closeness.solve_radius(np.array([1e300]), [term()], 3.0)[0]
    assert np.isfinite(huge) and huge > 0
    with pytest.raises(ConfigError, match="budget"):
        closeness.solve_radius(np.array([math.nan]), [term()], 3.0)
    with pytest.raises(ConfigError, match="poison_ratio"):
        term(poison_ratio=(0.1, 0.2))
    with pytest.raises(ConfigError, match="gamma\\[0\\]"):
        term(gamma=(math.inf,))


def test_gaussian_margin_matches_scipy_and_keeps_precision():
    pa = np.array([0.6, 0.9, 0.999])
    pb = np.array([0.3, 0.05, 1e-4])
    expect = norm.ppf(pa) - norm.ppf(pb)
    assert coupled.gaussian_margin(np.log1p(-pa), np.log(pb)) == pytest.approx(expect, rel=1e-12)
    # p_A_lower = 1 - 1e-40 is 1.0 in float64, its margin is not infinite
    m = coupled.gaussian_margin(np.array([-40 * math.log(10)]), np.array([-40 * math.log(10)]))
    assert m[0] == pytest.approx(-2 * norm.ppf(1e-40), rel=1e-12)
    assert coupled.gaussian_margin(np.array([-math.inf]), np.array([math.log(0.1)]))[0] == math.inf  # p_A = 1
    assert coupled.gaussian_margin(np.array([math.log(0.7)]), np.array([math.log(0.4)]))[0] < 0  # p_A = 0.3 <= p_B
    assert coupled.neyman_pearson_budget(0.1, np.array([-0.2, 0.0]))[:2].tolist() == [0.0, 0.0]


def test_neyman_pearson_budget_is_the_exact_switch_point():
    """At distance Delta = budget the worst-case p_A and p_B meet (Cohen et al.'s tight condition)."""
    for pa, pb, s in [(0.8, 0.1, 0.01), (0.99, 0.005, 1.0), (0.55, 0.45, 1e-9)]:
        d = coupled.neyman_pearson_budget(s, coupled.gaussian_margin(np.log1p(-pa), np.log(pb)))
        worst_a = norm.cdf(norm.ppf(pa) - d / s)
        worst_b = norm.cdf(norm.ppf(pb) + d / s)
        assert worst_a == pytest.approx(worst_b, rel=1e-9)


def test_neyman_pearson_is_never_weaker_than_the_kl_form():
    pa = np.linspace(0.02, 1 - 1e-9, 200)
    for pb in [1e-12, 1e-3, 0.1, 0.4]:
        a = pa[pa > pb]
        b = np.full(a.shape, pb)
        np_b = coupled.neyman_pearson_budget(0.3, coupled.gaussian_margin(np.log1p(-a), np.log(b)))
        kl_b = coupled.kl_distance_budget(0.3, a, b)
        assert np.all(np_b >= kl_b)
        # KL form by hand: sigma sqrt(2 eps), eps = -log(1 - (sqrt pa - sqrt pb)^2)
        i = len(a) // 2
        eps = -math.log(1 - (math.sqrt(a[i]) - math.sqrt(pb)) ** 2)
        assert kl_b[i] == pytest.approx(0.3 * math.sqrt(2 * eps), rel=1e-10)


def _ce_grad(W, b, x, y):
    from crfl.lipschitz import cross_entropy_gradient

    return cross_entropy_gradient(W, b, x, y)


def test_lz_centred_bounds_adversarial_gradient_differences():
    """max over x, x' in the B-ball (same label) of ||grad(x) - grad(x')|| / ||x - x'|| stays below L_Z(W)."""
    torch.manual_seed(0)
    for C, d, scale in [(3, 5, 1.0), (10, 20, 3.0), (4, 8, 10.0)]:
        W = torch.randn(C, d, dtype=torch.float64) * scale
        W += torch.randn(1, d, dtype=torch.float64) * 50  # a common shift changes nothing (centring)
        b = torch.randn(C, dtype=torch.float64)
        B = 2.0
        bound = lipschitz.lz_centred(lipschitz.centred_operator_norm(W), 0, 0.0, B)
        x = (torch.randn(64, d, dtype=torch.float64)).requires_grad_(True)
        u = (torch.randn(64, d, dtype=torch.float64) * 0.1).requires_grad_(True)
        y = torch.randint(0, C, (64,))
        opt = torch.optim.Adam([x, u], lr=0.05)
        best = 0.0
        for _ in range(150):
            xa = x * (B / x.norm(dim=1, keepdim=True).clamp(min=B))  # stay in the ball
            xb = xa + u
            xb = xb * (B / xb.norm(dim=1, keepdim=True).clamp(min=B))
            ratio = (_ce_grad(W, b, xa, y) - _ce_grad(W, b, xb, y)).norm(dim=1) / (xa - xb).norm(dim=1).clamp(min=1e-12)
            best = max(best, float(ratio.max().detach()))
            opt.zero_grad()
            (-ratio.sum()).backward()
            opt.step()
        assert best <= bound
        assert best >= 0.2 * bound  # the search is not toothless
    assert lipschitz.centred_operator_norm(W) == pytest.approx(
        lipschitz.centred_operator_norm(W + torch.randn(1, W.shape[1], dtype=torch.float64)), rel=1e-12
    )


def test_logit_margin_budget_is_tight():
    """No parameter change of norm < budget flips the base prediction; one of norm budget (1 + 1e-6) does."""
    rng = np.random.default_rng(1)
    C, d = 5, 7
    W, b = rng.normal(size=(C, d)), rng.normal(size=C)
    x = rng.normal(size=d)
    z = W @ x + b
    budget = coupled.logit_margin_budget(z[None, :], np.array([np.linalg.norm(x)]))[0]
    A, j = int(np.argmax(z)), int(np.argsort(z)[-2])
    xt = np.append(x, 1.0)
    # worst direction: lower row A and raise row j along x~
    D = np.zeros((C, d + 1))
    D[A], D[j] = -xt / np.linalg.norm(xt) / math.sqrt(2), xt / np.linalg.norm(xt) / math.sqrt(2)
    for f, flips in [(1 - 1e-6, False), (1 + 1e-6, True)]:
        Wb = np.c_[W, b] + f * budget * D
        assert (int(np.argmax(Wb @ xt)) != A) == flips
    for _ in range(200):  # random directions at 0.999 budget never flip
        D = rng.normal(size=(C, d + 1))
        D *= 0.999 * budget / np.linalg.norm(D)
        assert int(np.argmax((np.c_[W, b] + D) @ xt)) == A


def test_drift_of_the_centred_weights_along_real_local_steps():
    """||P W_s||_2 <= ||P W_0||_2 + s eta sqrt(2) B along SGD on real batches (the drift term of lz_centred)."""
    from crfl.model import LinearModel

    g = torch.Generator().manual_seed(3)
    C, d, n = 6, 20, 32
    m = LinearModel(d, C)
    for eta in (0.05, 0.5):
        w = torch.randn(1, C * d + C, generator=g, dtype=torch.float64) * (0.0 if eta > 0.1 else 1.0)
        W0, _ = m.split(w[0])
        op0 = lipschitz.centred_operator_norm(W0)
        worst = 0.0
        for s in range(1, 26):
            X = torch.rand(1, n, d, generator=g, dtype=torch.float64) * 2
            B = float(X.norm(dim=2).max())
            Y = torch.randint(0, C, (1, n), generator=g)
            w = w - eta * m.loss_grad(w, X, Y, torch.full((1, n), 1.0 / n, dtype=torch.float64))
            W, _ = m.split(w[0])
            grown = lipschitz.centred_operator_norm(W) - op0
            assert grown <= s * eta * math.sqrt(2) * B * (1 + 1e-12)
            worst = max(worst, grown / (s * eta * math.sqrt(2) * B))
        if eta > 0.1:  # from W = 0 the centred norm can only grow: the bound is not vacuous
            assert worst > 0.01
