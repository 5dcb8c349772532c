"""The mixture certificate (crfl.mixture, bounds.mixture_bound): the continuation engine against the run
itself, chunking, coverage of the mixture probabilities over repeated K-sample draws, and the twin's law."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch


from crfl import mixture
from crfl.rng import replay_certification_seed
from crfl.bounds import mean_lower, mean_upper, mixture_bound
from crfl.certify import Certifier
from crfl.config import resolve
from crfl.rundir import load_run
from crfl.setup import model_inputs, prepare
from crfl.smoothing import exact_class_probabilities
from crfl.train import train
from tests.conftest import synthetic_images


@pytest.fixture(scope="module")
def imgs():
    return synthetic_images(n_train=360, n_test=40, side=6, classes=3, seed=4)


def _cfg(**over):
    base = {
        "data.num_clients": 4, "clients.batch_size": 30, "clients.lr": 0.05, "server.rounds": 5,
        "attack.rounds": [2], "attack.poison_per_batch": 6, "attack.gamma": 3.0, "attack.pixels": [[4, 4], [5, 5]],
        "attack.magnitude": 0.1, "attack.target": 0, "server.rho": 3.0, "server.sigma": 0.05,
        "certify.sigma_T": 0.05, "certify.twin": True, "certify.reading": "mixture", "run.eval_every": 100,
        "run.dtype": "float64",
    }
    base.update(over)
    return resolve(None, None, base)


@pytest.fixture(scope="module")
def run(tmp_path_factory, imgs):
    d = tmp_path_factory.mktemp("mix") / "run"
    train(_cfg(), d, dataset=imgs)
    return d


def _setup(run, imgs, **over):
    cfg, final, log = load_run(run, over or None)
    return prepare(cfg, imgs), final, log


def test_continuation_replaying_the_runs_noise_is_the_run(run, imgs):
    setup, final, _ = _setup(run, imgs)
    st = final["attack_state"]
    assert st["round"] == 2 and st["pre_noise"].shape == final["params"].shape
    replay = mixture.continuations(setup, st["pre_noise"], 2, 2, stream="server-noise")
    assert torch.allclose(replay[0], final["params"], atol=1e-10) and torch.allclose(replay[1], final["params"], atol=1e-10)
    twin = mixture.continuations(setup, st["twin_pre_noise"], 2, 1, stream="server-noise")
    assert torch.allclose(twin[0], final["twin_params"], atol=1e-10)


def test_continuations_are_independent_of_chunking_and_fresh_per_draw(run, imgs):
    setup, final, _ = _setup(run, imgs)
    pre = final["attack_state"]["pre_noise"]
    seed = replay_certification_seed(7)
    a = mixture.continuations(setup, pre, 2, 5, seed=seed)
    b = mixture.continuations(setup, pre, 2, 5, chunk=2, seed=seed)
    assert torch.allclose(a, b, rtol=0, atol=1e-12)  # same noise; only the GEMM blocking differs
    c = mixture.continuations(setup, pre, 2, 5, first=5, seed=seed)
    assert not torch.allclose(a, c)
    assert torch.allclose(mixture.continuations(setup, pre, 2, 3, first=2, seed=seed), a[2:], rtol=0, atol=1e-12)
    # without a seed every call draws a fresh one from the OS's entropy
    assert not torch.allclose(mixture.continuations(setup, pre, 2, 2), mixture.continuations(setup, pre, 2, 2))


def test_mixture_reading_refuses_what_it_does_not_cover(tmp_path, imgs):
    train(_cfg(**{"attack.rounds": [2, 4]}), tmp_path / "two", dataset=imgs)
    setup, final, log = _setup(tmp_path / "two", imgs)
    with pytest.raises(Exception, match="one attack round"):
        Certifier(setup, final, log, tmp_path / "two").certify(torch.zeros(1, 36, dtype=torch.float64))


@pytest.mark.parametrize("dist", ["bernoulli", "beta", "atoms"])
def test_mean_bounds_cover_at_level_alpha(dist):
    """Chernoff-KL bounds on the mean of K i.i.d. [0, 1] variables: failure frequency <= alpha (+3 SE)."""
    rng = np.random.default_rng(7)
    K, trials, alpha = 25, 4000, 0.1
    draw = {
        "bernoulli": (lambda n: rng.random(n) < 0.83, 0.83),
        "beta": (lambda n: rng.beta(0.3, 0.1, n), 0.75),
        "atoms": (lambda n: rng.choice([0.0, 0.5, 1.0], size=n, p=[0.05, 0.15, 0.8]), 0.875),
    }[dist]
    sample, mu = draw
    means = np.array([sample(K).mean() for _ in range(trials)])
    lo_fail = np.mean(mean_lower(means, K, alpha) > mu)
    up_fail = np.mean(mean_upper(means, K, alpha) < mu)
    tol = 3 * math.sqrt(alpha * (1 - alpha) / trials)
    assert lo_fail <= alpha + tol and up_fail <= alpha + tol
    # and not vacuous: the bounds are within the Hoeffding width of the mean
    h = math.sqrt(math.log(1 / alpha) / (2 * K))
    assert np.all(means - mean_lower(means, K, alpha) <= h + 1e-9)


def test_mean_bounds_by_hand():
    # all K runs give 1: kl(1 || q) = -log q <= log(1/alpha)/K  ->  q = alpha^(1/K)
    assert mean_lower(1.0, 50, 0.01) == pytest.approx(0.01 ** (1 / 50), rel=1e-12)
    assert mean_upper(0.0, 50, 0.01) == pytest.approx(1 - 0.01 ** (1 / 50), rel=1e-12)
    # against the binomial Chernoff bound solved by scipy
    k, K, a = 30, 40, 0.05
    f = lambda q: k / K * math.log(k / K / q) + (1 - k / K) * math.log((1 - k / K) / (1 - q)) - math.log(1 / a) / K  # noqa: E731
    from scipy.optimize import brentq

    assert mean_lower(k / K, K, a) == pytest.approx(brentq(f, 1e-9, k / K - 1e-12), rel=1e-9)


def test_mixture_bound_is_simultaneous_over_classes():
    lo = np.array([[0.7, 0.1, 0.0], [0.2, 0.3, 0.3]])
    up = np.array([[0.8, 0.2, 0.1], [0.3, 0.4, 0.45]])
    r = mixture_bound(lo, up, 30, 0.06)
    assert r.c_a.tolist() == [0, 2]  # argmax of the midpoints
    level = 0.06 / 6
    assert r.p_a_lower[0] == pytest.approx(float(mean_lower(0.7, 30, level)))
    assert r.p_b_upper[0] == pytest.approx(min(float(mean_upper(0.2, 30, level)), 1 - r.p_a_lower[0]))
    assert bool(r.abstain[1])


def test_mixture_probabilities_are_covered_over_repeated_draws(run, imgs):
    """p_A_lower <= p(c_A) and p_B_upper >= max_{c != c_A} p(c) for the true mixture p, in >= 1 - alpha of the
    (draw, point) pairs; p is estimated from 400 independent continuations (4 of its standard errors enter)."""
    setup, final, _ = _setup(run, imgs)
    pre = final["attack_state"]["pre_noise"]
    X = model_inputs(imgs, imgs.x_test, torch.float64)
    sigma_T, alpha, K = 0.05, 0.2, 20
    ref = mixture.continuations(setup, pre, 2, 400, first=100_000)
    per_run = np.stack([
        np.exp(exact_class_probabilities(*setup.model.split(w.double()), X, sigma_T).numpy()) for w in ref
    ])  # (800, n, C): every class's exact smoothed probability in every reference run
    p_true = per_run.mean(axis=0)
    se = 4.0 * per_run.std(axis=0) / math.sqrt(len(ref)) + 1e-12  # the reference's own error, 4 SE
    lo_ref, up_ref = mixture.mixture_class_bounds(setup, ref[:50], X, sigma_T)
    assert np.all(lo_ref <= per_run[:50].mean(axis=0) + 1e-12) and np.all(up_ref >= per_run[:50].mean(axis=0) - 1e-12)
    fails = total = 0
    gap_sum = 0.0
    for j in range(25):
        finals = mixture.continuations(setup, pre, 2, K, first=j * K)
        r = mixture.mixture_certificate(setup, finals, X, sigma_T, alpha)
        rows = np.arange(len(X))
        other = p_true.copy()
        other[rows, r.c_a] = -np.inf
        cb = other.argmax(axis=1)
        bad = (r.p_a_lower > p_true[rows, r.c_a] + se[rows, r.c_a]) | (r.p_b_upper < other[rows, cb] - se[rows, cb])
        fails += int(bad.sum())
        gap_sum += float(np.sum(p_true[rows, r.c_a] - r.p_a_lower))
        total += len(X)
    assert fails / total <= alpha
    # not vacuous: the lower bounds sit close below the true mixture probabilities
    assert 0.0 < gap_sum / total < 0.3


def test_mixture_certificate_agrees_with_the_twins_law(run, imgs):
    """Where the mixture reading certifies >= ||delta||, the twin's mixture (large K) predicts the same class."""
    setup, final, log = _setup(run, imgs, **{"certify.training_samples": 60, "certify.alpha": 0.05})
    cert = Certifier(setup, final, log, run)
    assert cert.report["radius_certified"], cert.report["checks"]
    X = model_inputs(imgs, imgs.x_test, torch.float64)
    sm, _, rad = cert.certify(torch.cat([X, setup.plan.trigger.apply(X)]))
    twin = mixture.continuations(setup, final["attack_state"]["twin_pre_noise"], 2, 300, first=50_000)
    lo, up = mixture.mixture_class_bounds(setup, twin, torch.cat([X, setup.plan.trigger.apply(X)]), 0.05)
    twin_pred = (0.5 * (lo + up)).argmax(axis=1)
    covered = (rad > cert.delta_norm) & ~sm.abstain
    assert covered.sum() >= 10
    assert np.mean(twin_pred[covered] != sm.c_a[covered]) <= 0.05



def test_mixture_bound_each_one_sided_statement_at_its_level():
    """Every class's lower and upper bound fails with frequency <= alpha / (2C) (+3 SE): per-run class probabilities
    drawn from a Dirichlet with known mean, K runs per trial."""
    rng = np.random.default_rng(21)
    C, K, trials, alpha = 3, 30, 2000, 0.6
    conc = np.array([2.0, 1.0, 0.5])
    mu = conc / conc.sum()
    level = alpha / (2 * C)
    lo_fail = np.zeros(C)
    up_fail = np.zeros(C)
    for _ in range(trials):
        runs = rng.dirichlet(conc, size=K)  # exact per-run probabilities: lower = upper
        m = runs.mean(axis=0, keepdims=True)
        lo_fail += mean_lower(m[0], K, level) > mu
        up_fail += mean_upper(m[0], K, level) < mu
    tol = 3 * math.sqrt(level * (1 - level) / trials)
    assert np.all(lo_fail / trials <= level + tol) and np.all(up_fail / trials <= level + tol)
    # and mixture_bound's joint statement for its data-selected c_A holds at least 1 - alpha of the time
    ok = 0
    for _ in range(1000):
        runs = rng.dirichlet(conc, size=K)
        m = runs.mean(axis=0, keepdims=True)
        r = mixture_bound(m, m, K, alpha)
        others = np.delete(mu, r.c_a[0])
        ok += bool(r.p_a_lower[0] <= mu[r.c_a[0]] and r.p_b_upper[0] >= others.max())
    assert ok / 1000 >= 1 - alpha - 3 * math.sqrt(alpha * (1 - alpha) / 1000)
