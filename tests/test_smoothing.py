"""Tests of crfl.smoothing: Monte Carlo votes (GetCounts) and exact smoothing of linear models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, special

from crfl import smoothing as sm
from crfl.smoothing import (
    QUAD_ERROR,
    QUADRATURE_TOL,
    exact_class_probabilities,
    exact_error_bound,
    exact_top_two,
    exact_top_two_estimates,
    logit_noise_scale,
    monte_carlo_counts_linear,
    monte_carlo_counts_module,
    trapezoid_rule,
)
from crfl.validation import ConfigError


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def t64(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def logits_model(z: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A model whose logits at the input x = 0 are z, with noise scale s = sigma * sqrt(0 + 1) = sigma."""
    C = len(z)
    return torch.zeros(C, 1, dtype=torch.float64), t64(z), torch.zeros(1, 1, dtype=torch.float64)


def reference_probability(z: np.ndarray, c: int, s: float = 1.0) -> float:
    """P[class c wins] = int phi(t) prod_{j != c} Phi(t + (z_c - z_j)/s) dt by scipy.integrate.quad."""
    d = np.delete(z[c] - z, c) / s

    def f(t: float) -> float:
        return math.exp(-0.5 * t * t - 0.5 * math.log(2 * math.pi) + float(np.sum(special.log_ndtr(t + d))))

    v, _ = integrate.quad(f, -15.0, 15.0, epsabs=1e-17, epsrel=1e-13, limit=500)
    return v


# ---------------------------------------------------------------------------
# the quadrature rule
# ---------------------------------------------------------------------------


def test_rule_bound_and_size():
    for C, nodes in [(2, 33), (10, 61), (47, 121)]:
        u, h, bound = trapezoid_rule(C)
        assert u.numel() == nodes and bound <= QUADRATURE_TOL
        assert float(u[1] - u[0]) == pytest.approx(h)
    assert exact_error_bound(47) < QUAD_ERROR / 50


def test_rule_integrates_the_normal_density():
    # F = 1: sum_k h phi(k h) = 1 to the bound
    u, h, bound = trapezoid_rule(10)
    total = float(torch.exp(math.log(h) - 0.5 * u * u - 0.5 * math.log(2 * math.pi)).sum())
    assert abs(total - 1.0) <= bound + 1e-15


# ---------------------------------------------------------------------------
# exact probabilities against scipy.integrate.quad
# ---------------------------------------------------------------------------


def _cases() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    cases = []
    for C in (2, 3, 5, 10, 47):
        for scale in (0.1, 1.0, 3.0, 10.0):
            cases.append(rng.normal(0.0, scale, C))
    cases += [
        np.zeros(10),  # all tied
        np.array([0.0, 0.0, -1.0, -1.0, 5.0]),  # ties at the top and behind
        np.array([1000.0, 0.0, -3.0]),  # a huge margin
        np.array([0.0, 0.0, 1e-9]),  # near-tie
        np.concatenate([[2.0], np.full(46, 1.9)]),  # 46 close competitors
        np.linspace(0.0, -30.0, 47),
    ]
    return cases


@pytest.mark.parametrize("case", range(len(_cases())))
def test_exact_matches_quad(case):
    z = _cases()[case]
    C = len(z)
    W, b, X = logits_model(z)
    logp = exact_class_probabilities(W, b, X, 1.0)[0].numpy()
    p = np.exp(logp)
    assert abs(p.sum() - 1.0) < 1e-13
    rng = np.random.default_rng(case)
    for c in sorted(set([int(np.argmax(z)), *rng.choice(C, min(C, 4), replace=False).tolist()])):
        assert abs(p[c] - reference_probability(z, c)) <= 1e-15  # observed; QUAD_ERROR = 1e-13 is claimed


def test_exact_two_classes_closed_form_and_tiny_probabilities():
    # C = 2: P[class 0 wins] = Phi((z_0 - z_1) / (s sqrt 2)), in log space even when astronomically small
    for margin in [0.0, 0.3, -1.0, -5.0, -20.0, -50.0, -200.0, -1000.0]:
        W, b, X = logits_model(np.array([margin, 0.0]))
        for sigma in (0.5, 1.0, 3.0):
            logp = exact_class_probabilities(W, b, X, sigma)[0]
            exact = special.log_ndtr(margin / (sigma * math.sqrt(2.0)))
            assert float(logp[0]) == pytest.approx(exact, rel=1e-12, abs=1e-15)
            assert float(torch.logsumexp(logp, 0)) == pytest.approx(0.0, abs=1e-13)


def reference_log_probability(z: np.ndarray, c: int) -> float:
    """log P[class c wins] for tiny probabilities: quad of exp(g - g(t*)) around the mode t* of g."""
    d = np.delete(z[c] - z, c)

    def g(t: float) -> float:
        return -0.5 * t * t - 0.5 * math.log(2 * math.pi) + float(np.sum(special.log_ndtr(t + d)))

    grid = np.linspace(-5.0, 60.0, 65001)
    vals = np.array([g(t) for t in grid])
    tm, gm = float(grid[np.argmax(vals)]), float(vals.max())
    v, _ = integrate.quad(lambda t: math.exp(g(t) - gm), tm - 15, tm + 15, epsabs=0, epsrel=1e-13, limit=500)
    return gm + math.log(v)


@pytest.mark.parametrize("z, c", [
    (np.array([0.0, 0.5, -40.0]), 2),
    (np.array([3.0, 0.0, -25.0, -26.0, -30.0]), 3),
    (np.array([10.0, 9.0, 8.0, -20.0]), 3),
])
def test_exact_tiny_probabilities_in_log_space(z, c):
    W, b, X = logits_model(z)
    logp = float(exact_class_probabilities(W, b, X, 1.0, classes=[c])[0, 0])
    assert logp < -100
    assert logp == pytest.approx(reference_log_probability(z, c), rel=1e-11)


def test_grid_centre_is_near_the_mode():
    # the quadrature grid is centred within MODE_SLACK of the mode of phi(t) prod Phi(t + d_j)
    g = gen(11)
    for scale in (0.1, 1.0, 10.0, 1000.0, 1e5):
        d = torch.sort(torch.randn(5000, 12, generator=g, dtype=torch.float64) * scale, dim=-1).values
        c = sm._mode(d)
        slope = sm._score(c, d)[0]  # g'(c); |g'(c)| < MODE_SLACK implies |c - t*| < MODE_SLACK (g'' <= -1)
        assert float((slope.abs() < 1e-6).double().mean()) > 0.999
        ok = (sm._score(c - sm.MODE_SLACK, d)[0] > 0) & (sm._score(c + sm.MODE_SLACK, d)[0] < 0)
        assert bool(ok.all())


def test_identical_logits_and_sigma_zero():
    W, b, X = logits_model(np.zeros(7))
    p = exact_class_probabilities(W, b, X, 0.3)[0].exp()
    torch.testing.assert_close(p, torch.full((7,), 1 / 7, dtype=torch.float64), rtol=0, atol=1e-14)
    W, b, X = logits_model(np.array([0.0, 2.0, 2.0, -1.0]))
    logp = exact_class_probabilities(W, b, X, 0.0)[0]
    assert logp.tolist() == [-math.inf, 0.0, -math.inf, -math.inf]  # deterministic; ties: lowest index
    est = exact_top_two(W, b, X, 0.0)
    assert est.c_a.tolist() == [1] and est.c_b.tolist() == [2]
    assert est.p_a_lower.tolist() == [1.0] and est.p_b_upper.tolist() == [0.0]


def test_ranking_of_probabilities_is_ranking_of_logits():
    g = gen(3)
    W = torch.randn(12, 5, generator=g, dtype=torch.float64)
    b = torch.randn(12, generator=g, dtype=torch.float64)
    X = torch.randn(40, 5, generator=g, dtype=torch.float64)
    logp = exact_class_probabilities(W, b, X, 0.4)
    z = X @ W.T + b
    for i in range(40):
        order_z = torch.argsort(z[i], descending=True)
        assert torch.all(logp[i, order_z][:-1] >= logp[i, order_z][1:])
    est = exact_top_two_estimates(W, b, X, 0.4)
    assert torch.equal(est.c_a, logp.argmax(1))
    masked = logp.clone()
    masked[torch.arange(40), est.c_a] = -math.inf
    torch.testing.assert_close(est.log_p_b, masked.max(1).values)


def test_logit_noise_scale_and_classes_argument():
    X = t64([[3.0, 4.0], [0.0, 0.0]])
    torch.testing.assert_close(logit_noise_scale(X, 0.1), t64([0.1 * math.sqrt(26.0), 0.1]))
    g = gen(4)
    W, b = torch.randn(6, 2, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    full = exact_class_probabilities(W, b, X, 0.5)
    some = exact_class_probabilities(W, b, X, 0.5, classes=[4, 0])
    torch.testing.assert_close(some, full[:, [4, 0]])
    per_point = exact_class_probabilities(W, b, X, 0.5, classes=torch.tensor([[1], [5]]))
    torch.testing.assert_close(per_point[:, 0], torch.stack([full[0, 1], full[1, 5]]))
    with pytest.raises(ConfigError, match="'classes'"):
        exact_class_probabilities(W, b, X, 0.5, classes=[6])
    with pytest.raises(ConfigError, match="'sigma'"):
        exact_class_probabilities(W, b, X, -0.5)
    with pytest.raises(ConfigError, match="'bias'"):
        exact_class_probabilities(W, b[:3], X, 0.5)


def test_exact_top_two_bounds():
    g = gen(5)
    W = torch.randn(10, 8, generator=g, dtype=torch.float64)
    b = torch.randn(10, generator=g, dtype=torch.float64)
    X = torch.randn(200, 8, generator=g, dtype=torch.float64)
    for sigma in (0.05, 0.5, 3.0):
        est = exact_top_two_estimates(W, b, X, sigma)
        cert = exact_top_two(W, b, X, sigma)
        assert torch.equal(est.c_a, cert.c_a) and torch.equal(est.c_b, cert.c_b)
        # the quadrature value +- QUAD_ERROR, or the tighter closed-form bound
        assert torch.all((cert.p_a_lower - est.p_a).abs() <= QUAD_ERROR + 1e-15)
        assert torch.all((cert.p_b_upper - est.p_b).abs() <= QUAD_ERROR + 1e-15)
        # the closed-form pairwise bound is exact for the runner-up's duel with c_A
        z = X @ W.T + b
        s = logit_noise_scale(X, sigma)
        # (torch.special.ndtr loses the lower tail: ndtr(-10) = 0.0 in float64; log_ndtr keeps it)
        gap = (z.gather(1, est.c_b[:, None]) - z.gather(1, est.c_a[:, None])).squeeze(1)
        pair = torch.special.log_ndtr(gap / (s * math.sqrt(2))).exp()
        assert torch.all(cert.p_b_upper <= pair.clamp_min(sm._TINY) * (1 + 1e-12))
    # very confident points: p_B_upper far below QUAD_ERROR, floored at the smallest normal double
    cert = exact_top_two(W * 100, b, X, 0.05)
    assert float(cert.p_b_upper.min()) == pytest.approx(sm._TINY)
    assert float(torch.median(cert.p_b_upper)) < QUAD_ERROR


# ---------------------------------------------------------------------------
# Monte Carlo
# ---------------------------------------------------------------------------


def test_mc_counts_shape_sum_and_reproducibility():
    g = gen(6)
    W, b = torch.randn(4, 9, generator=g), torch.randn(4, generator=g)
    X = torch.randn(50, 9, generator=g)
    a = monte_carlo_counts_linear(W, b, X, 0.5, 333, gen(1), models_per_chunk=100)
    assert a.shape == (50, 4) and a.dtype == torch.int64 and torch.all(a.sum(1) == 333)
    assert torch.equal(a, monte_carlo_counts_linear(W, b, X, 0.5, 333, gen(1), models_per_chunk=100))
    assert not torch.equal(a, monte_carlo_counts_linear(W, b, X, 0.5, 333, gen(2), models_per_chunk=100))
    for ppc in (1, 7, 50, 4096):
        assert torch.equal(a, monte_carlo_counts_linear(W, b, X, 0.5, 333, gen(1), models_per_chunk=100, points_per_chunk=ppc))
    # sigma = 0: every noisy model is the model itself
    base = (X @ W.T + b).argmax(1)
    zero = monte_carlo_counts_linear(W, b, X, 0.0, 10, gen(1))
    assert torch.equal(zero.argmax(1), base) and torch.all(zero.max(1).values == 10)


def test_mc_validates():
    W, b, X = torch.zeros(3, 2), torch.zeros(3), torch.zeros(4, 2)
    with pytest.raises(ConfigError, match="'M'"):
        monte_carlo_counts_linear(W, b, X, 0.1, 0, gen(0))
    with pytest.raises(ConfigError, match="'generator'"):
        monte_carlo_counts_linear(W, b, X, 0.1, 10, 0)
    with pytest.raises(ConfigError, match="'X'"):
        monte_carlo_counts_linear(W, b, torch.zeros(4, 3), 0.1, 10, gen(0))
    with pytest.raises(ConfigError, match="'flat_params'"):
        monte_carlo_counts_module(torch.nn.Linear(2, 3), torch.zeros(5), X, 0.1, 10, gen(0))


def test_mc_two_classes_against_closed_form():
    # C = 2, d = 3: P[class 0] = Phi((z_0 - z_1) / (s sqrt 2)), s = sigma sqrt(||x||^2 + 1)
    W = t64([[0.3, -0.2, 0.1], [0.0, 0.1, -0.1]])
    b = t64([0.05, 0.0])
    X = t64([[0.5, 0.5, 0.5], [1.0, -1.0, 0.0], [0.0, 0.0, 0.0], [2.0, 0.0, 1.0]])
    M, sigma = 100_000, 0.4
    counts = monte_carlo_counts_linear(W, b, X, sigma, M, gen(7), dtype=torch.float64)
    z = X @ W.T + b
    p0 = torch.special.log_ndtr((z[:, 0] - z[:, 1]) / (logit_noise_scale(X, sigma) * math.sqrt(2))).exp()
    se = torch.sqrt(p0 * (1 - p0) / M)
    assert torch.all((counts[:, 0] / M - p0).abs() <= 4 * se)


def test_exact_agrees_with_large_monte_carlo():
    g = gen(8)
    C, d = 6, 5
    W = torch.randn(C, d, generator=g, dtype=torch.float64) * 0.5
    b = torch.randn(C, generator=g, dtype=torch.float64) * 0.2
    X = torch.randn(5, d, generator=g, dtype=torch.float64)
    M, sigma = 200_000, 0.3
    counts = monte_carlo_counts_linear(W, b, X, sigma, M, gen(9), models_per_chunk=4096, dtype=torch.float64)
    p = exact_class_probabilities(W, b, X, sigma).exp()
    se = torch.sqrt(p * (1 - p) / M).clamp_min(1e-12)
    assert torch.all((counts / M - p).abs() <= 4 * se)


def test_module_version_gives_the_same_counts_as_the_linear_version():
    torch.manual_seed(0)
    X = torch.rand(120, 20, dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):
        lin = torch.nn.Linear(20, 5).to(dtype)
        flat = torch.nn.utils.parameters_to_vector(lin.parameters()).detach()
        W, b = lin.weight.detach(), lin.bias.detach()
        a = monte_carlo_counts_linear(W, b, X, 0.3, 500, gen(5), models_per_chunk=64, dtype=dtype)
        m = monte_carlo_counts_module(lin, flat, X, 0.3, 500, gen(5), models_per_chunk=64, points_per_chunk=50)
        assert torch.equal(a, m)


def test_module_version_runs_a_small_network_and_refuses_global_randomness():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    flat = torch.nn.utils.parameters_to_vector(net.parameters()).detach()
    X = torch.randn(30, 6)
    c = monte_carlo_counts_module(net, flat, X, 0.05, 200, gen(1))
    assert c.shape == (30, 3) and torch.all(c.sum(1) == 200)
    assert torch.equal(c, monte_carlo_counts_module(net, flat, X, 0.05, 200, gen(1), points_per_chunk=7))
    noisy = torch.nn.Sequential(torch.nn.Linear(6, 3), torch.nn.Dropout(0.5)).train()
    with pytest.raises(RuntimeError):
        monte_carlo_counts_module(noisy, torch.nn.utils.parameters_to_vector(noisy.parameters()).detach(), X, 0.05, 10, gen(1))


def test_exact_class_bounds_bracket_every_class_probability():
    """l(c) <= H_s^c <= u(c) for all classes: closed form for confident points, quadrature near boundaries."""
    from crfl.smoothing import exact_class_bounds, exact_class_probabilities

    g = torch.Generator().manual_seed(5)
    for C, scale, sigma in [(3, 0.3, 0.05), (10, 3.0, 0.01), (10, 0.05, 0.2), (47, 1.0, 0.02)]:
        W = torch.randn(C, 12, generator=g, dtype=torch.float64) * scale
        b = torch.randn(C, generator=g, dtype=torch.float64) * scale
        X = torch.rand(300, 12, generator=g, dtype=torch.float64)
        lo, up = exact_class_bounds(W, b, X, sigma)
        p = exact_class_probabilities(W, b, X, sigma).exp()
        assert torch.all(lo <= p + 1e-15) and torch.all(p <= up + 1e-15)
        assert torch.all(lo.sum(dim=1) <= 1 + 1e-12) and torch.all(up.sum(dim=1) >= 1 - 1e-12)
        top = p.argmax(dim=1)
        r = torch.arange(len(X))
        assert float((up[r, top] - lo[r, top]).max()) < 1e-6  # the top class is pinned down
