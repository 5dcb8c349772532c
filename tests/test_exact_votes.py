"""Votes rounding cannot change (crfl.exact_votes): the exact argmax, the logit error bound, the margin test."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from crfl.exact_votes import exact_noisy_argmax, logit_error_scales, margin_threshold, margin_votes, unit_roundoff


def _computed_logits(W, b, sigma, E, X, dtype):
    """The noisy logits as crfl.smoothing computes them (fl(w + fl(sigma e)), one addmm), (n, m, C)."""
    C, d = W.shape
    m = E.shape[0]
    W, b, E, X = W.to(dtype), b.to(dtype), E.to(dtype), X.to(dtype)
    Wn = (W.unsqueeze(0) + sigma * E[:, : C * d].view(m, C, d)).reshape(m * C, d)
    bn = b.unsqueeze(0) + sigma * E[:, C * d :]
    return torch.addmm(bn.reshape(1, m * C), X, Wn.T).view(X.shape[0], m, C)


def _fraction_logits(W, b, sigma, e_row, x_row):
    C, d = W.shape
    s = Fraction(sigma)
    x = [Fraction(v) for v in x_row.double().tolist()] + [Fraction(1)]
    out = []
    for c in range(C):
        w = [Fraction(v) for v in W[c].double().tolist()] + [Fraction(float(b[c]))]
        e = [Fraction(v) for v in e_row[c * d : (c + 1) * d].double().tolist()] + [Fraction(float(e_row[C * d + c]))]
        out.append(sum((wj + s * ej) * xj for wj, ej, xj in zip(w, e, x)))
    return out


def _problem(seed, n, m, C, d, sigma, dtype=torch.float64, w_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(C, d, generator=g, dtype=torch.float64) * w_scale).to(dtype)
    b = (torch.randn(C, generator=g, dtype=torch.float64) * w_scale).to(dtype)
    E = torch.randn(m, C * d + C, generator=g, dtype=torch.float64).to(dtype)
    X = torch.rand(n, d, generator=g, dtype=torch.float64).to(dtype)
    return W, b, sigma, E, X


def test_exact_argmax_matches_fractions_and_breaks_ties_low():
    W, b, sigma, E, X = _problem(0, 6, 5, 4, 7, 0.3)
    pairs_E = E.repeat(6, 1)[:30]
    pairs_X = X.repeat_interleave(5, dim=0)[:30]
    got = exact_noisy_argmax(W, b, sigma, pairs_E, pairs_X)
    for k in range(30):
        z = _fraction_logits(W, b, sigma, pairs_E[k], pairs_X[k])
        assert got[k] == max(range(4), key=lambda c: (z[c], -c))
    # an exact tie between classes 1 and 3 (identical rows): the lower index wins; one ulp more on class 3 wins it
    W2, b2 = W.clone(), b.clone()
    W2[3], b2[3] = W2[1], b2[1] + 100.0
    b2[1] += 100.0
    Z = torch.zeros(1, E.shape[1], dtype=torch.float64)
    x = X[:1]
    assert exact_noisy_argmax(W2, b2, 0.0, Z, x).item() == 1
    b2[3] = torch.nextafter(b2[3], torch.tensor(1e300, dtype=torch.float64))
    assert exact_noisy_argmax(W2, b2, 0.0, Z, x).item() == 3


def test_exact_argmax_sees_what_float_rounding_hides():
    # logits that differ by far less than float64 rounding of a large sum: 1e16 + 1 vs 1e16 (+ cancellation)
    W = torch.tensor([[1e16, -1e16, 1.0], [1e16, -1e16, 0.0]], dtype=torch.float64)
    b = torch.zeros(2, dtype=torch.float64)
    x = torch.tensor([[1.0, 1.0, 1.0]], dtype=torch.float64)
    E = torch.zeros(1, 8, dtype=torch.float64)
    assert exact_noisy_argmax(W, b, 0.0, E, x).item() == 0  # class 0: exactly 1 more
    # with the noise carrying the difference: sigma e tiny against 1e16 terms
    W3 = torch.tensor([[1e16, -1e16, 0.0], [1e16, -1e16, 0.0]], dtype=torch.float64)
    E3 = torch.zeros(1, 8, dtype=torch.float64)
    E3[0, 5] = 1.0  # class 1's third weight
    assert exact_noisy_argmax(W3, b, 1e-300, E3, x).item() == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("w_scale", [1.0, 1e4])
def test_computed_logits_stay_within_the_error_bound(dtype, w_scale):
    W, b, sigma, E, X = _problem(1, 5, 4, 3, 40, 1e-3, w_scale=w_scale)
    Z = _computed_logits(W, b, sigma, E, X, dtype)
    px, pm = logit_error_scales(W, b, sigma, E, X)
    u = unit_roundoff(dtype)
    d = W.shape[1]
    gam = (d + 5) * u / (1 - (d + 5) * u)
    worst = 0.0
    for p in range(5):
        for m in range(4):
            exact = _fraction_logits(W, b, sigma, E[m], X[p])
            bound = gam * float(px[p]) * float(pm[m])
            for c in range(3):
                err = abs(Fraction(float(Z[p, m, c])) - exact[c])
                assert err <= Fraction(bound)
                worst = max(worst, float(err) / bound)
    assert worst > 1e-4  # the bound is not vacuous: rounding reaches a visible share of it


def test_threshold_per_point_counts_nonzero_features():
    """margin_threshold with per-point term counts is gamma_{k+5} of each count, as with the scalar d."""
    px = torch.tensor([2.0, 3.0, 5.0], dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        per_point = margin_threshold(px, torch.tensor([0, 7, 784]), dtype)
        assert torch.equal(per_point, torch.stack([margin_threshold(px[i : i + 1], k, dtype)[0]
                                                   for i, k in enumerate([0, 7, 784])]))
    assert torch.isinf(margin_threshold(px, torch.tensor([2, 2 ** 24, 3]), torch.float32)).tolist() == [False, True, False]


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("dtype,sigma", [(torch.float32, 1e-7), (torch.float32, 1e-5), (torch.float64, 1e-15)])
def test_no_unflagged_vote_differs_from_the_exact_vote(dtype, sigma, sparse):
    """Break search: at sigma_T so small that rounding flips many votes, every pair the margin test passes
    votes as the exact classifier, and the exact recomputation of the flagged pairs restores every vote.
    Sparse: most features zero and the threshold from each point's number of nonzero features."""
    C, d, n, m = 3, 30, 40, 30
    W, b, _, E, X = _problem(2, n, m, C, d, sigma)
    if sparse:
        X = X * (torch.rand(n, d, generator=torch.Generator().manual_seed(6), dtype=torch.float64) < 0.2)
    # a base model with near-ties: class 1 = class 0 plus a tiny offset, so the noise decides
    W[1] = W[0] + 1e-9 * torch.randn(d, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    b[1] = b[0]
    Z = _computed_logits(W, b, sigma, E, X, dtype)
    px, pm = logit_error_scales(W, b, sigma, E, X)
    pred, ambiguous = margin_votes(Z, margin_threshold(px, (X != 0).sum(dim=1) if sparse else d, dtype), pm)
    pairs = [(p, q) for p in range(n) for q in range(m)]
    exact = exact_noisy_argmax(W, b, sigma, E[[q for _, q in pairs]], X[[p for p, _ in pairs]]).view(n, m)
    flips = pred != exact
    assert flips.any() or dtype == torch.float64, "the search must reach rounding that changes votes"
    assert not (flips & ~ambiguous).any()  # every changed vote is flagged
    assert ambiguous.float().mean() < 1.0  # and the test passes the clear ones
    fixed = torch.where(ambiguous, exact, pred)
    assert torch.equal(fixed, exact)


def test_clear_margins_are_not_flagged():
    W, b, sigma, E, X = _problem(3, 50, 20, 10, 784, 0.5)
    Z = _computed_logits(W, b, sigma, E, X, torch.float64)
    px, pm = logit_error_scales(W, b, sigma, E, X)
    _, ambiguous = margin_votes(Z, margin_threshold(px, 784, torch.float64), pm)
    assert ambiguous.float().mean() < 1e-3
