"""Tests of crfl.aggregation: hand-worked examples, a brute-force geometric median, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from scipy.optimize import minimize

from crfl import aggregation
from crfl.aggregation import AggregateResult, aggregate, aggregator_names, register_aggregator
from crfl.validation import ConfigError

ALL_RULES = ["fedavg", "krum", "median", "rfa", "trimmed-mean"]
WEIGHTED_MEAN_RULES = ["fedavg", "krum", "rfa"]


def t64(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def uniform(k: int) -> torch.Tensor:
    return torch.full((k,), 1.0 / k, dtype=torch.float64)


# ---------------------------------------------------------------------------
# FedAvg
# ---------------------------------------------------------------------------


def test_fedavg_hand_computation():
    # p = (2, 1, 1) / 4 = (0.5, 0.25, 0.25)
    # update = 0.5 * (1, 2) + 0.25 * (3, 0) + 0.25 * (-1, 4)
    #        = (0.5 + 0.75 - 0.25, 1 + 0 + 1) = (1.0, 2.0)
    u = t64([[1.0, 2.0], [3.0, 0.0], [-1.0, 4.0]])
    r = aggregate("fedavg", u, t64([2.0, 1.0, 1.0]))
    assert isinstance(r, AggregateResult)
    torch.testing.assert_close(r.update, t64([1.0, 2.0]), rtol=0, atol=1e-15)
    torch.testing.assert_close(r.weights, t64([0.5, 0.25, 0.25]), rtol=0, atol=1e-15)


def test_client_weights_may_be_a_list_and_are_normalized():
    u = t64([[1.0, 2.0], [3.0, 0.0], [-1.0, 4.0]])
    a = aggregate("fedavg", u, [2, 1, 1])
    b = aggregate("fedavg", u, t64([0.5, 0.25, 0.25]))
    torch.testing.assert_close(a.update, b.update)


# ---------------------------------------------------------------------------
# RFA (geometric median)
# ---------------------------------------------------------------------------


def brute_force_geometric_median(u: np.ndarray, alpha: np.ndarray) -> tuple[float, np.ndarray]:
    """argmin_v sum_i alpha_i ||v - u_i||: BFGS from several starts, plus every u_i as a candidate
    (the minimum may sit on a data point, where the objective is not differentiable)."""
    alpha = alpha / alpha.sum()

    def f(v):
        return float(alpha @ np.linalg.norm(u - v, axis=1))

    def grad(v):
        d = np.maximum(np.linalg.norm(u - v, axis=1), 1e-300)
        return (alpha[:, None] * (v - u) / d[:, None]).sum(axis=0)

    candidates = [(f(x), x) for x in u]
    starts = [alpha @ u, np.median(u, axis=0), u.mean(axis=0) + 0.1, u.max(axis=0)]
    for x0 in starts:
        res = minimize(f, x0, jac=grad, method="BFGS", options={"gtol": 1e-12, "maxiter": 10_000})
        candidates.append((float(res.fun), res.x))
    return min(candidates, key=lambda c: c[0])


def random_problems(seed: int, n: int):
    """Small low-dimensional problems with unequal client weights."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        k = int(rng.integers(5, 16))
        d = int(rng.integers(2, 9))
        u = rng.normal(size=(k, d)) * rng.uniform(0.5, 2.0, size=(k, 1))
        alpha = rng.uniform(0.5, 1.5, size=k)
        yield u, alpha


def test_rfa_converged_equals_brute_force_geometric_median():
    # Measured worst error over 100 such problems (seeds 0-4): 3.3e-6 of max_i ||u_i||.
    for u, alpha in random_problems(seed=0, n=20):
        f_star, v_star = brute_force_geometric_median(u, alpha)
        r = aggregate("rfa", torch.tensor(u), torch.tensor(alpha), max_iter=1000, ftol=1e-15)
        scale = np.linalg.norm(u, axis=1).max()
        assert np.linalg.norm(r.update.numpy() - v_star) <= 1e-4 * scale
        assert r.info["objective"][-1] <= f_star * (1 + 1e-5)


def test_rfa_default_iterations_small_problems_are_close():
    # Low-dimensional problems are the slow case for Weiszfeld. Measured over 100 problems
    # (seeds 0-4), the default (10 iterations, ftol 1e-6) was at most 1.5e-2 of max_i ||u_i||
    # from the exact median and its objective at most 3.6e-4 (relative) above the minimum.
    for u, alpha in random_problems(seed=1, n=20):
        f_star, v_star = brute_force_geometric_median(u, alpha)
        r = aggregate("rfa", torch.tensor(u), torch.tensor(alpha))
        assert r.info["iterations"] <= 10
        scale = np.linalg.norm(u, axis=1).max()
        assert np.linalg.norm(r.update.numpy() - v_star) <= 5e-2 * scale
        assert r.info["objective"][-1] <= f_star * (1 + 2e-3)


def test_rfa_default_iterations_federated_problem_is_close():
    # The federated regime: K = 20 clients, high D, clustered honest updates and one
    # model-replacement attacker (x 100). The ftol test stops within 2-5 steps; measured:
    # 3e-5 relative distance to the converged median, objective 2e-9 relative above it.
    g = torch.Generator().manual_seed(3)
    k, d = 20, 2000
    u = torch.randn(d, generator=g, dtype=torch.float64) + 0.5 * torch.randn(k, d, generator=g, dtype=torch.float64)
    u[0] *= 100.0
    p = uniform(k)
    exact = aggregate("rfa", u, p, max_iter=5000, ftol=0.0)
    default = aggregate("rfa", u, p)
    assert default.info["converged"] and default.info["iterations"] < 10
    assert (default.update - exact.update).norm() <= 1e-3 * exact.update.norm()
    assert default.info["objective"][-1] <= exact.info["objective"][-1] * (1 + 1e-6)


def test_rfa_objective_history_is_non_increasing():
    # Weiszfeld is a majorize-minimize scheme: each step does not increase the objective.
    for u, alpha in random_problems(seed=2, n=10):
        r = aggregate("rfa", torch.tensor(u), torch.tensor(alpha), max_iter=50, ftol=0.0)
        obj = r.info["objective"]
        assert len(obj) == r.info["iterations"] + 1
        assert all(b <= a * (1 + 1e-12) for a, b in zip(obj, obj[1:]))


def test_rfa_down_weights_model_replacement_attacker():
    g = torch.Generator().manual_seed(0)
    k, d = 10, 50
    u = torch.randn(d, generator=g) + 0.3 * torch.randn(k, d, generator=g)
    u[3] *= 100.0  # model replacement: gamma = 100
    p = torch.full((k,), 1.0 / k)
    rfa = aggregate("rfa", u, p)
    avg = aggregate("fedavg", u, p)
    assert float(avg.weights[3]) == pytest.approx(1 / k)
    assert float(rfa.weights[3]) < 0.2 * (1 / k)
    # and the aggregate stays near the honest clients while FedAvg is dragged away
    honest = torch.cat([u[:3], u[4:]]).mean(dim=0)
    assert (rfa.update - honest).norm() < 0.1 * (avg.update - honest).norm()


def test_rfa_starts_from_weighted_mean_and_zero_iterations_is_fedavg():
    u = t64([[0.0, 0.0], [4.0, 0.0], [0.0, 8.0]])
    p = t64([1.0, 2.0, 1.0])
    r = aggregate("rfa", u, p, max_iter=0)
    torch.testing.assert_close(r.update, aggregate("fedavg", u, p).update)
    assert r.info["iterations"] == 0 and len(r.info["objective"]) == 1


@pytest.mark.parametrize("spread", [0.0, 1e-9])
def test_rfa_equal_updates_do_not_divide_by_zero(spread):
    # All distances are below eps = 1e-5: beta_i = alpha_i / eps, so the weights stay alpha.
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, generator=g, dtype=torch.float64)
    u = base + spread * torch.randn(4, 6, generator=g, dtype=torch.float64)
    p = t64([1.0, 2.0, 3.0, 4.0])
    r = aggregate("rfa", u, p)
    assert torch.isfinite(r.update).all() and torch.isfinite(r.weights).all()
    torch.testing.assert_close(r.weights, p / p.sum())
    torch.testing.assert_close(r.update, base, rtol=0, atol=1e-8)
    assert r.info["converged"]


def test_rfa_keeps_input_dtype():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(7, 30, generator=g, dtype=torch.float32)
    r = aggregate("rfa", u, torch.ones(7))
    assert r.update.dtype == torch.float32 and r.weights.dtype == torch.float32


# ---------------------------------------------------------------------------
# Properties shared by the weighted-mean rules and by all rules
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", WEIGHTED_MEAN_RULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_update_is_exactly_weights_times_updates(name, dtype):
    g = torch.Generator().manual_seed(5)
    u = torch.randn(9, 40, generator=g, dtype=dtype)
    u[2] *= 50.0
    p = torch.rand(9, generator=g, dtype=dtype) + 0.1
    r = aggregate(name, u, p)
    assert r.weights.shape == (9,) and r.weights.dtype == dtype
    assert torch.equal(r.update, r.weights @ u)
    assert float(r.weights.sum()) == pytest.approx(1.0, abs=1e-6)
    assert bool((r.weights >= 0).all())


@pytest.mark.parametrize("name", ["median", "trimmed-mean"])
def test_coordinate_rules_have_no_weights(name):
    r = aggregate(name, torch.randn(5, 3), torch.ones(5))
    assert r.weights is None and r.update.shape == (3,)


@settings(max_examples=20, deadline=None)
@given(
    name=st.sampled_from(ALL_RULES),
    seed=st.integers(0, 2**31 - 1),
    k=st.integers(5, 12),
    d=st.integers(1, 6),
)
def test_translation_and_permutation_equivariance(name, seed, k, d):
    """agg(u + c) = agg(u) + c and agg(u[perm]) = agg(u) for every rule."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(k, d, generator=g, dtype=torch.float64)
    p = torch.rand(k, generator=g, dtype=torch.float64) + 0.5
    c = 3.0 * torch.randn(d, generator=g, dtype=torch.float64)
    perm = torch.randperm(k, generator=g)
    base = aggregate(name, u, p).update
    torch.testing.assert_close(aggregate(name, u + c, p).update, base + c, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(aggregate(name, u[perm], p[perm]).update, base, rtol=1e-7, atol=1e-7)


# ---------------------------------------------------------------------------
# Median and trimmed mean
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 5, 6])
def test_median_matches_numpy(k):
    rng = np.random.default_rng(k)
    u = rng.normal(size=(k, 7))
    r = aggregate("median", torch.tensor(u), torch.ones(k))
    # numpy.median averages the two middle values for even K, as documented.
    np.testing.assert_allclose(r.update.numpy(), np.median(u, axis=0), rtol=0, atol=1e-15)


def test_median_even_k_hand_computation():
    # coordinate 0: sorted (1, 2, 4, 10) -> (2 + 4) / 2 = 3; coordinate 1: (-5, 0, 0, 7) -> 0
    u = t64([[10.0, 0.0], [1.0, -5.0], [4.0, 7.0], [2.0, 0.0]])
    r = aggregate("median", u, t64([100.0, 1.0, 1.0, 1.0]))  # weights are ignored
    torch.testing.assert_close(r.update, t64([3.0, 0.0]))


@pytest.mark.parametrize("k,beta,b", [(10, 0.1, 1), (10, 0.25, 2), (7, 0.0, 0), (7, 0.49, 3), (3, 0.2, 0)])
def test_trimmed_mean_matches_numpy_and_scipy(k, beta, b):
    rng = np.random.default_rng(k)
    u = rng.normal(size=(k, 5)) * rng.uniform(0.1, 100, size=(k, 1))
    r = aggregate("trimmed-mean", torch.tensor(u), torch.ones(k), beta=beta)
    by_hand = np.sort(u, axis=0)[b : k - b].mean(axis=0)  # drop b = floor(beta K) per side
    assert r.info["trimmed_per_side"] == b
    np.testing.assert_allclose(r.update.numpy(), by_hand, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(r.update.numpy(), stats.trim_mean(u, beta, axis=0), rtol=1e-12, atol=1e-12)


def test_trimmed_mean_default_beta_removes_attacker():
    # K = 10, beta = 0.1: one value per side is dropped, so a single huge update has no effect.
    u = torch.zeros(10, 3, dtype=torch.float64)
    u[:, 0] = torch.arange(10, dtype=torch.float64)  # 0..9 -> mean of 1..8 = 4.5
    u[4, 1] = 1e6
    r = aggregate("trimmed-mean", u, uniform(10))
    torch.testing.assert_close(r.update, t64([4.5, 0.0, 0.0]))


# ---------------------------------------------------------------------------
# Krum
# ---------------------------------------------------------------------------


def test_krum_hand_computation():
    # 1-D values (second coordinate 0): 0, 1, -1, 3, 50, 100; K = 6, f = 1 -> 3 nearest neighbours.
    # Squared-distance scores:
    #   client 0 (0):   1 + 1 + 9          = 11
    #   client 1 (1):   1 + 4 + 4          = 9    <- lowest: Krum picks it
    #   client 2 (-1):  1 + 4 + 16         = 21
    #   client 3 (3):   4 + 9 + 16         = 29
    #   client 4 (50):  2209 + 2401 + 2500 = 7110
    #   client 5 (100): 2500 + 9409 + 9801 = 21710
    x = t64([0.0, 1.0, -1.0, 3.0, 50.0, 100.0])
    u = torch.stack([x, torch.zeros(6, dtype=torch.float64)], dim=1)
    r = aggregate("krum", u, uniform(6), f=1)
    assert r.info["selected"] == [1]
    assert r.info["scores"] == pytest.approx([11, 9, 21, 29, 7110, 21710])
    torch.testing.assert_close(r.update, t64([1.0, 0.0]))
    torch.testing.assert_close(r.weights, t64([0, 1, 0, 0, 0, 0]))
    # multi-Krum, m = 2: clients 1 and 0 -> (1 + 0) / 2
    r2 = aggregate("krum", u, uniform(6), f=1, m=2)
    assert r2.info["selected"] == [1, 0]
    torch.testing.assert_close(r2.update, t64([0.5, 0.0]))
    torch.testing.assert_close(r2.weights, t64([0.5, 0.5, 0, 0, 0, 0]))


def test_multi_krum_excludes_attackers():
    g = torch.Generator().manual_seed(0)
    k, f, d = 12, 3, 20
    u = 0.1 * torch.randn(k, d, generator=g, dtype=torch.float64)
    attackers = [2, 7, 11]
    u[attackers] += 10.0
    r = aggregate("krum", u, uniform(k), f=f, m=k - f)
    assert sorted(r.info["selected"]) == [i for i in range(k) if i not in attackers]
    assert float(r.weights[attackers].sum()) == 0.0


@pytest.mark.parametrize("k,f", [(4, 1), (6, 2), (2, 0), (1, 0)])
def test_krum_rejects_too_few_clients(k, f):
    with pytest.raises(ConfigError, match=rf"'f' parameter.*K > 2f \+ 2.*K = {k}.*Got {f} instead"):
        aggregate("krum", torch.randn(k, 3), torch.ones(k), f=f)


def test_krum_smallest_allowed_k():
    r = aggregate("krum", torch.randn(5, 3), torch.ones(5), f=1)  # 5 > 2 * 1 + 2
    assert len(r.info["selected"]) == 1


# ---------------------------------------------------------------------------
# Registry and validation
# ---------------------------------------------------------------------------


def test_registry_names():
    assert set(ALL_RULES) <= set(aggregator_names())
    assert aggregator_names() == sorted(aggregator_names())
    assert all(aggregation.describe_aggregators()[n] for n in ALL_RULES)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ConfigError) as e:
        aggregate("bulyan", torch.randn(3, 2), torch.ones(3))
    msg = str(e.value)
    assert "'aggregator'" in msg and "'bulyan'" in msg
    for n in ALL_RULES:
        assert repr(n) in msg


def test_register_custom_aggregator(monkeypatch):
    monkeypatch.setattr(aggregation, "_REGISTRY", dict(aggregation._REGISTRY))

    @register_aggregator("first", "Take client 0.")
    def first(updates, client_weights, *, scale=1.0):
        w = torch.zeros_like(client_weights)
        w[0] = 1.0
        return AggregateResult(update=scale * updates[0], weights=w, info={})

    assert "first" in aggregator_names()
    u = torch.randn(3, 2)
    torch.testing.assert_close(aggregate("first", u, torch.ones(3), scale=2.0).update, 2.0 * u[0])
    with pytest.raises(ConfigError, match=r"'options'.*'first'.*'scale'.*Got 'scal' instead"):
        aggregate("first", u, torch.ones(3), scal=2.0)


GOOD_U = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
NAN_U = GOOD_U.clone()
NAN_U[2, 1] = math.nan
INF_U = GOOD_U.clone()
INF_U[4, 0] = -math.inf

BAD_INPUTS = [
    # (rule, updates, client_weights, options, substrings the message must contain)
    ("fedavg", torch.randn(3), torch.ones(3), {}, ["'updates'", "shape (3,)"]),
    ("fedavg", torch.randn(2, 3, 4), torch.ones(2), {}, ["'updates'", "shape (2, 3, 4)"]),
    ("fedavg", torch.randn(0, 3), torch.ones(0), {}, ["'updates'", "K >= 1", "shape (0, 3)"]),
    ("fedavg", [[1.0, 2.0]], torch.ones(1), {}, ["'updates'", "type list"]),
    ("fedavg", torch.ones(2, 3, dtype=torch.int64), torch.ones(2), {}, ["'updates'", "torch.int64"]),
    ("fedavg", NAN_U, torch.ones(6), {}, ["'updates'", "finite", "client index [2]"]),
    ("rfa", INF_U, torch.ones(6), {}, ["'updates'", "finite", "client index [4]"]),
    ("fedavg", GOOD_U, torch.ones(5), {}, ["'client_weights'", "shape (6,)", "shape (5,)"]),
    ("fedavg", GOOD_U, torch.ones(6, 1), {}, ["'client_weights'", "shape (6, 1)"]),
    ("fedavg", GOOD_U, t64([1, 1, -1, 1, 1, 1]), {}, ["'client_weights'", "non-negative", "-1.0"]),
    ("fedavg", GOOD_U, torch.zeros(6), {}, ["'client_weights'", "positive sum", "[0.0, 0.0"]),
    ("fedavg", GOOD_U, t64([1, math.nan, 1, 1, 1, 1]), {}, ["'client_weights'", "nan"]),
    ("rfa", GOOD_U, torch.ones(6), {"max_iter": -1}, ["'max_iter'", "Got -1 instead"]),
    ("rfa", GOOD_U, torch.ones(6), {"max_iter": 2.5}, ["'max_iter'", "Got 2.5 instead"]),
    ("rfa", GOOD_U, torch.ones(6), {"ftol": -1e-6}, ["'ftol'", "Got -1e-06 instead"]),
    ("rfa", GOOD_U, torch.ones(6), {"eps": 0.0}, ["'eps'", "(0, inf)", "Got 0.0 instead"]),
    ("rfa", GOOD_U, torch.ones(6), {"eps": "1e-5"}, ["'eps'", "Got '1e-5' instead"]),
    ("rfa", GOOD_U, torch.ones(6), {"tol": 1e-6}, ["'options'", "'rfa'", "'ftol'", "Got 'tol' instead"]),
    ("trimmed-mean", GOOD_U, torch.ones(6), {"beta": 0.5}, ["'beta'", "[0, 0.5)", "Got 0.5 instead"]),
    ("trimmed-mean", GOOD_U, torch.ones(6), {"beta": -0.1}, ["'beta'", "Got -0.1 instead"]),
    ("krum", GOOD_U, torch.ones(6), {"f": -1}, ["'f'", "Got -1 instead"]),
    ("krum", GOOD_U, torch.ones(6), {"f": 2}, ["'f'", "K = 6", "f <= 1", "Got 2 instead"]),
    ("krum", GOOD_U, torch.ones(6), {"m": 0}, ["'m'", "[1, 6]", "Got 0 instead"]),
    ("krum", GOOD_U, torch.ones(6), {"m": 7}, ["'m'", "[1, 6]", "Got 7 instead"]),
    ("median", GOOD_U, torch.ones(6), {"beta": 0.1}, ["'options'", "'median'", "none", "Got 'beta' instead"]),
]


@pytest.mark.parametrize("name,updates,weights,options,expected", BAD_INPUTS)
def test_bad_inputs_name_parameter_and_value(name, updates, weights, options, expected):
    with pytest.raises(ConfigError) as e:
        aggregate(name, updates, weights, **options)
    msg = str(e.value)
    assert msg.startswith("The '"), msg
    for s in expected:
        assert s in msg, f"{s!r} not in {msg!r}"
