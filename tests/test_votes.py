"""Monte Carlo votes through the compiled kernel (crfl/kernels/votes.cpp) against the torch path.

The torch path (``CRFL_KERNELS=0``: torch.argmax and a scatter-add, float64 logits in float64) is the
reference: the counts must be identical, not close. The mixed path (float32 logits, a vote taken only
when the top-two gap beats the proven rounding bound, else from float64 logits under the same test, else
from exact integer arithmetic) is checked four ways: counts equal to the float64 ones, exact ties decided
exactly, the bound against exact rational arithmetic on adversarial inputs, and a run without the margin
that does change the votes (so the equality tests can fail).
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from crfl import exact_votes, kernels, smoothing
from crfl.validation import ConfigError
from crfl.smoothing import _count, _count_votes, _linear_votes, monte_carlo_counts_module

pytestmark = pytest.mark.skipif(kernels.load("votes") is None, reason="no C++ compiler: the votes kernel is not built")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def torch_counts(monkeypatch, fn):
    """fn() with the compiled kernels off (the torch reference)."""
    with monkeypatch.context() as mp:
        mp.setenv("CRFL_KERNELS", "0")
        assert smoothing._votes_kernel() is None
        return fn()


# ---------------------------------------------------------------------------------------------
# the argmax kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("C", [2, 10, 47])
@pytest.mark.parametrize("layout", ["points-models-classes", "class-major", "models-points-classes"])
def test_vote_kernel_equals_torch_argmax_with_ties_nan_and_inf(dtype, C, layout):
    g = gen(C)
    n, m = 37, 130  # m: two full SIMD passes of 64 models and a short one
    # small integers: many exact ties, which torch.argmax breaks towards the lowest index
    base = torch.randint(-3, 4, (n, m, C), generator=g).to(dtype)
    base[0, :5, 1] = math.nan  # the first NaN wins
    base[1, :5, 0] = math.nan
    base[2, 3, :] = math.nan
    base[3, :7, C - 1] = math.inf
    base[4, :7, :] = -math.inf
    base[5, 8:20, 0] = -0.0  # -0.0 == 0.0: a tie
    base[5, 8:20, C - 1] = 0.0
    if layout == "points-models-classes":
        logits = base.contiguous()
    elif layout == "class-major":  # the linear path's layout: (n, C, m) memory, viewed as (n, m, C)
        logits = base.transpose(1, 2).contiguous().transpose(1, 2)
    else:  # the module path's: (m, n, C) memory
        logits = base.transpose(0, 1).contiguous().transpose(0, 1)
    ref = torch.zeros((n + 3, C), dtype=torch.int64)
    _count(base.argmax(dim=-1), ref, 2, C)
    got = torch.zeros((n + 3, C), dtype=torch.int64)
    _count_votes(logits, got, 2)
    assert torch.equal(got, ref)
    assert got[2, 1] >= 5 and got[3, 0] >= 5  # points 0 and 1 (rows 2, 3) voted for their NaN class


# ---------------------------------------------------------------------------------------------
# the linear path: kernel (float32 votes, float64 votes from float32 logits) against torch


def _model(C: int, d: int, seed: int, scale: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    g = gen(seed)
    return torch.randn(C, d, generator=g, dtype=torch.float64) * scale, torch.randn(C, generator=g, dtype=torch.float64) * 0.1


def _points(W: torch.Tensor, b: torch.Tensor, n: int, seed: int, on_boundary: int = 40) -> torch.Tensor:
    """n points in [0, 1]^d, the first ``on_boundary`` moved onto the boundary of their top two classes (a
    tie of the noise-free logits: there the noisy top-two gap is as small as the noise)."""
    X = torch.rand(n, W.shape[1], generator=gen(seed), dtype=torch.float64)
    for i in range(on_boundary):
        z = W @ X[i] + b
        a, c = z.topk(2).indices.tolist()
        u = W[a] - W[c]
        X[i] -= (z[a] - z[c]) / (u @ u) * u
    return X


@pytest.mark.parametrize("C", [2, 10, 47])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_counts_identical_to_the_torch_path(monkeypatch, C, dtype):
    d, n, M, per = 40, 301, 157, 60  # n not a multiple of the 128-point blocks, M not of the 60-model chunks
    W, b = _model(C, d, C)
    X = _points(W, b, n, 1)
    recomputed = 0
    for sigma in (0.3, 1e-4):
        args = (W, b, X, sigma, M, None, per, 128, dtype)
        got, r, _ = _linear_votes(*args[:5], gen(4), *args[6:])
        ref, none, _ = torch_counts(monkeypatch, lambda: _linear_votes(*args[:5], gen(4), *args[6:]))
        assert none == 0
        assert torch.equal(got, ref), (sigma, (got != ref).sum())
        assert (got.sum(dim=1) == M).all()
        assert sigma < 0.1 or (got > 0).sum(dim=1).float().mean() > 1.2  # noisy votes, not one class
        recomputed += r
    if dtype == torch.float64:  # the mixed path ran, and some votes needed their float64 logits
        assert 0 < recomputed < 2 * n * M


def _in_float32_range(*ts: torch.Tensor) -> bool:
    """The torch statement of the range condition the compiled passes (scan_points, prep_mixed_f32) check: every
    nonzero entry has FLT_MIN <= |v| <= 1e37 (NaN fails), so its float32 cast has a relative error <= u."""
    for t in ts:
        a = t.reshape(-1).abs()
        if not bool(a.max() <= 1e37) or bool(((a < 2.0 ** -126) & (a > 0)).any()):  # a NaN fails the first test
            return False
    return True


def _without_float32_margin(monkeypatch) -> None:
    """The float32 margin set to 0 (every float32 argmax taken as the vote; float64's margin kept): the counts are
    then wrong where the tests use it, so their equality checks can fail."""
    real = exact_votes.margin_threshold
    monkeypatch.setattr(exact_votes, "margin_threshold",
                        lambda px, k, dtype: real(px, k, dtype) * (0.0 if dtype == torch.float32 else 1.0))


def test_mixed_counts_equal_float64_counts_where_float32_flips_votes(monkeypatch):
    """Points on decision boundaries at sigma = 1e-7: float32 rounding (~1e-6) is above the noise of the
    top-two gap, so most float32 argmaxes are not certified and their votes come from the float64 logits;
    the counts still equal float64's."""
    C, d, n, M = 10, 60, 200, 120
    W, b = _model(C, d, 3)
    X = _points(W, b, n, 2, on_boundary=n)
    got, recomputed, _ = _linear_votes(W, b, X, 1e-7, M, gen(5), 50, 64, torch.float64)
    ref, _, _ = torch_counts(monkeypatch, lambda: _linear_votes(W, b, X, 1e-7, M, gen(5), 50, 64, torch.float64))
    assert torch.equal(got, ref)
    assert recomputed > 0.2 * n * M
    with monkeypatch.context() as mp:  # one point per block: the pending pairs fill many buffers of 4 x 50 pairs
        mp.setattr(smoothing, "LINEAR_POINT_BLOCK", 1)
        small = _linear_votes(W, b, X, 1e-7, M, gen(5), 50, 64, torch.float64)
    assert torch.equal(small[0], ref) and small[1] == recomputed
    # without the margin (every float32 argmax taken as the vote) the counts are wrong: the test can fail
    _without_float32_margin(monkeypatch)
    bare, _, _ = _linear_votes(W, b, X, 1e-7, M, gen(5), 50, 64, torch.float64)
    assert not torch.equal(bare, ref)


def test_mixed_counts_on_sparse_points_equal_float64_counts(monkeypatch):
    """Mostly-zero points (the threshold counts each point's nonzero features only) with two nearly tied classes
    at sigma = 1e-7: the counts equal float64's, and with the float32 margin at 0 they do not."""
    C, d, n, M = 4, 200, 120, 100
    W, b = _model(C, d, 21)
    W[1], b[1] = W[0] + 1e-9 * torch.randn(d, generator=gen(22), dtype=torch.float64), b[0]
    X = torch.rand(n, d, generator=gen(23), dtype=torch.float64) * (torch.rand(n, d, generator=gen(24)) < 0.1)
    got, recomputed, _ = _linear_votes(W, b, X, 1e-7, M, gen(25), 50, 64, torch.float64)
    ref, _, _ = torch_counts(monkeypatch, lambda: _linear_votes(W, b, X, 1e-7, M, gen(25), 50, 64, torch.float64))
    assert torch.equal(got, ref) and recomputed > 0
    _without_float32_margin(monkeypatch)
    bare, _, _ = _linear_votes(W, b, X, 1e-7, M, gen(25), 50, 64, torch.float64)
    assert not torch.equal(bare, ref)


def test_exact_ties_go_to_exact_arithmetic(monkeypatch):
    """sigma = 0 on points where two classes tie exactly: neither float32 nor float64 can prove a vote, the
    exact integer argmax gives the lowest class index (torch's rule), as the float64 path does."""
    C, d, n, M = 3, 5, 12, 40
    W = torch.tensor([[1.0, 2, 0, 0, 1], [1.0, 2, 0, 0, 1], [0.0, 0, 1, 1, 0]], dtype=torch.float64)  # rows 0, 1 equal
    b = torch.tensor([0.25, 0.25, 0.0], dtype=torch.float64)
    X = torch.rand(n, d, generator=gen(3), dtype=torch.float64)
    got, recomputed, exact = _linear_votes(W, b, X, 0.0, M, gen(1), 16, 8, torch.float64)
    ref, _, _ = torch_counts(monkeypatch, lambda: _linear_votes(W, b, X, 0.0, M, gen(1), 16, 8, torch.float64))
    assert torch.equal(got, ref) and got[:, 1].sum() == 0
    top = (X @ W.T + b).argmax(dim=1)
    assert exact == (top == 0).sum() * M and recomputed >= exact


def test_default_counts_are_exact_and_refuse_only_for_time(monkeypatch):
    """dtype None: exact votes where the kernel runs, so sigma_T = 0 with exact ties (which the float64 criterion
    refuses: sigma_T = 0 resolves nothing) is counted; more near ties than EXACT_PAIR_LIMIT is refused, naming
    certify.sigma_T. On the torch path the summary's arithmetic is 'float64'."""
    if smoothing.votes_arithmetic() != "exact":
        pytest.skip("no compiled votes kernel here")
    W = torch.tensor([[1.0, 2, 0, 0, 1], [1.0, 2, 0, 0, 1], [0.0, 0, 1, 1, 0]], dtype=torch.float64)
    b = torch.tensor([0.25, 0.25, 0.0], dtype=torch.float64)
    X = torch.rand(12, 5, generator=gen(3), dtype=torch.float64)
    got = smoothing.monte_carlo_counts_linear(W, b, X, 1e-30, 40, gen(1))
    E = torch.randn((40, 3 * 5 + 3), generator=gen(1), dtype=torch.float64)  # the one chunk's noise, as drawn
    pts, mods = torch.arange(12).repeat_interleave(40), torch.arange(40).repeat(12)
    votes = exact_votes.exact_noisy_argmax(W, b, 1e-30, E[mods], X[pts])
    want = torch.zeros((12, 3), dtype=torch.int64).index_put_((pts, votes), torch.ones_like(votes), accumulate=True)
    top = (X @ W.T + b).argmax(dim=1)
    assert torch.equal(got, want) and got[top == 0, 1].sum() > 0  # the 1e-30 noise splits the tied classes' votes
    monkeypatch.setattr(smoothing, "EXACT_PAIR_LIMIT", int((top == 0).sum()) * 40 - 1)
    with pytest.raises(ConfigError, match="certify.sigma_T"):
        smoothing.monte_carlo_counts_linear(W, b, X, 1e-30, 40, gen(1))
    monkeypatch.setenv("CRFL_KERNELS", "0")
    assert smoothing.votes_arithmetic() == "float64"
    with pytest.raises(ConfigError, match="certify.sigma_T"):  # float64 votes cannot resolve sigma_T = 1e-30
        smoothing.monte_carlo_counts_linear(W, b, X, 1e-30, 40, gen(1))


def test_mixed_path_falls_back_where_float32_could_overflow(monkeypatch):
    C, d, n, M = 3, 8, 20, 30
    W, b = _model(C, d, 7, scale=1e37)  # float32 logits would overflow: the chunk runs in float64
    X = torch.rand(n, d, generator=gen(3), dtype=torch.float64)
    got, recomputed, exact = _linear_votes(W, b, X, 1e35, M, gen(6), 16, 8, torch.float64)
    ref, _, _ = torch_counts(monkeypatch, lambda: _linear_votes(W, b, X, 1e35, M, gen(6), 16, 8, torch.float64))
    assert recomputed == exact == 0 and torch.equal(got, ref)


def test_public_counts_use_the_kernel_and_match_the_reference(monkeypatch):
    """monte_carlo_counts_linear (the dtype chosen by monte_carlo_dtype) equals the torch path."""
    C, d, n = 10, 30, 150
    W, b = _model(C, d, 11, scale=0.5)
    X = torch.rand(n, d, generator=gen(8), dtype=torch.float64)
    for sigma in (0.5, 0.02):  # float32, then float64 (mixed) counts
        got = smoothing.monte_carlo_counts_linear(W, b, X, sigma, 500, gen(9))
        ref = torch_counts(monkeypatch, lambda: smoothing.monte_carlo_counts_linear(W, b, X, sigma, 500, gen(9)))
        assert torch.equal(got, ref)


# ---------------------------------------------------------------------------------------------
# the compiled preparation of a chunk (prep_mixed_f32) against torch's formulas


def _prep(W, b, sigma, E, lo=0, hi=None):
    """prep_mixed_f32 on models [lo, hi) of E (the other models' outputs left as they were: NaN / -1)."""
    lib = smoothing._votes_kernel()
    (C, d), m = W.shape, E.shape[0]
    hi = m if hi is None else hi
    w_norms = torch.linalg.vector_norm(torch.cat([W, b.unsqueeze(1)], dim=1), dim=1).contiguous()
    Wb = torch.full((C * m, d + 1), math.nan, dtype=torch.float32)
    pm, e_min = torch.full((m,), math.nan, dtype=torch.float64), torch.full((m,), math.nan, dtype=torch.float64)
    bad = torch.full((m,), -1, dtype=torch.int32)
    a = smoothing._addr
    lib.prep_mixed_f32(a(E), m, lo, hi, a(W), a(b), a(w_norms), C, d, sigma, a(Wb), a(pm), a(e_min), a(bad))
    return Wb[:, :d], Wb[:, d], pm, e_min, bad  # the weights, and the bias as the (d + 1)-th column


@pytest.mark.parametrize("sigma", [0.01, 0.37, 1e-300, 0.0])
def test_prepared_chunk_is_torchs_noisy_model_in_float32(sigma):
    """The float32 class-major operands are fl32(fl64(w + fl64(sigma e))) bit for bit (the floats torch's
    W + sigma * E gives), pm is exact_votes.logit_error_scales' pm up to the rounding of the norms (far inside
    the threshold's 1e-6 safety factor), e_min the smallest nonzero |e|; any split of the models gives the
    same bits."""
    C, d, m = 7, 53, 11
    W, b = _model(C, d, 12)
    E = torch.randn((m, C * d + C), generator=gen(13), dtype=torch.float64)
    E[3, 5] = 0.0  # a zero does not count as the smallest nonzero |e|
    E[4, C * d + 2] = 3e-9  # the smallest, in a bias entry
    Wcm, bcm, pm, e_min, bad = _prep(W, b, sigma, E)
    Wn = W.unsqueeze(0) + sigma * E[:, : C * d].view(m, C, d)
    bn = b.unsqueeze(0) + sigma * E[:, C * d :]
    assert torch.equal(Wcm, Wn.transpose(0, 1).float().reshape(C * m, d))
    assert torch.equal(bcm, bn.T.float().reshape(-1))
    _, want = exact_votes.logit_error_scales(W, b, sigma, E, W[:0])
    assert torch.allclose(pm, want, rtol=1e-13, atol=0) and (want > 0).all()
    assert float(e_min.min()) == 3e-9 and torch.equal(e_min, torch.where(E == 0, math.inf, E.abs()).amin(dim=1))
    assert (bad == 0).all()
    halves = [_prep(W, b, sigma, E, 0, 4), _prep(W, b, sigma, E, 4, m)]  # two threads' shares of the models
    rows = lambda j0, j1: torch.cat([torch.arange(c * m + j0, c * m + j1) for c in range(C)])  # noqa: E731
    for (W_, b_, pm_, e_, bad_), (j0, j1) in zip(halves, [(0, 4), (4, m)]):
        assert torch.equal(W_[rows(j0, j1)], Wcm[rows(j0, j1)]) and torch.equal(b_[rows(j0, j1)], bcm[rows(j0, j1)])
        assert torch.equal(pm_[j0:j1], pm[j0:j1]) and torch.equal(e_[j0:j1], e_min[j0:j1])
        assert torch.equal(bad_[j0:j1], bad[j0:j1]) and torch.isnan(pm_[:j0]).all() and torch.isnan(pm_[j1:]).all()


@pytest.mark.parametrize("where", ["weight", "bias"])
@pytest.mark.parametrize("value", [1e38, -2e37, 1e-39, -2.0 ** -130, math.inf, math.nan])
def test_prepared_chunk_flags_noisy_weights_outside_float32_range(where, value):
    """bad[j] is set exactly for the models with a nonzero noisy weight outside [FLT_MIN, 1e37] (or NaN), the
    condition _in_float32_range checks on the float64 noisy weights; FLT_MIN itself, 1e37 and 0 pass."""
    C, d, m = 3, 9, 6
    W, b = _model(C, d, 14)
    E = torch.randn((m, C * d + C), generator=gen(15), dtype=torch.float64)
    col = 2 * d + 4 if where == "weight" else C * d + 1
    E[2, col], E[5, col] = value, 0.0  # sigma = 1: the noisy weight is w + value; w + 0 stays in range
    if where == "weight":
        W[2, 4] = 0.0
    else:
        b[1] = 0.0
    E[4, col - 1] = 1e37 if where == "weight" else 2.0 ** -126  # the edges of the range are allowed
    if where == "weight":
        W[2, 3] = 0.0
    else:
        b[0], E[4, C * d] = 0.0, 2.0 ** -126
    _, _, _, _, bad = _prep(W, b, 1.0, E)
    assert bad.tolist() == [0, 0, 1, 0, 0, 0], (where, value, bad.tolist())
    Wn = W.unsqueeze(0) + E[:, : C * d].view(m, C, d)
    bn = b.unsqueeze(0) + E[:, C * d :]
    assert [not _in_float32_range(Wn[j], bn[j]) for j in range(m)] == [bool(v) for v in bad.tolist()]


@pytest.mark.parametrize("bad", [None, 1e38, 1e-39, 2.0 ** -149, math.nan, math.inf, 1e200])
def test_scanned_points_are_torchs_float32_norms_counts_and_range(bad):
    """scan_points: X32 = X.float() bit for bit, px = logit_error_scales' px up to the rounding of the norm, nnz =
    (X != 0).sum(1), and bad[p] exactly where _in_float32_range fails on the row; the edges 0, FLT_MIN, 1e37 pass."""
    n, d = 9, 37
    X = torch.rand(n, d, generator=gen(30), dtype=torch.float64) * (torch.rand(n, d, generator=gen(31)) < 0.4)
    X[1, :3] = torch.tensor([2.0 ** -126, -1e37, 0.0], dtype=torch.float64)
    X[5].zero_()
    if bad is not None:
        X[3, 7] = bad
    X32, px = torch.empty((n, d + 1), dtype=torch.float32), torch.empty(n, dtype=torch.float64)
    nnz, flags = torch.empty(n, dtype=torch.int64), torch.full((n,), -1, dtype=torch.int32)
    a = smoothing._addr
    smoothing._votes_kernel().scan_points(a(X), 0, n, d, a(X32), a(px), a(nnz), a(flags))
    assert torch.equal(X32[:, :d].view(torch.int32), X.float().view(torch.int32)) and (X32[:, d] == 1).all()
    assert torch.equal(nnz, (X != 0).sum(dim=1))
    assert flags.tolist() == [int(not _in_float32_range(X[p])) for p in range(n)]
    assert flags.tolist() == [int(p == 3 and bad is not None) for p in range(n)]
    want, _ = exact_votes.logit_error_scales(torch.zeros(2, d, dtype=torch.float64), torch.zeros(2, dtype=torch.float64),
                                             0.0, torch.zeros((0, 2 * d + 2), dtype=torch.float64), X)
    ok = torch.isfinite(want)
    assert torch.allclose(px[ok], want[ok], rtol=1e-13, atol=0) and px[5] == 1.0
    assert bad not in (math.nan, math.inf) or not torch.isfinite(px[3])


def test_counts_do_not_depend_on_the_block_size_or_the_threads(monkeypatch):
    """The blocks of points are handed to the threads in turn; the counts are the same for any block size and
    thread count (each block's votes go to its own points' rows)."""
    C, d, n, M = 10, 40, 300, 130
    W, b = _model(C, d, 16)
    X = _points(W, b, n, 17)
    runs = []
    threads = torch.get_num_threads()
    try:
        for block, t in [(128, threads), (1, 2), (7, 2), (300, 1), (64, 3)]:
            monkeypatch.setattr(smoothing, "LINEAR_POINT_BLOCK", block)
            torch.set_num_threads(t)
            runs.append(_linear_votes(W, b, X, 0.05, M, gen(18), 50, 2048, None))
    finally:
        torch.set_num_threads(threads)
    assert runs[0][1] > 0  # some votes needed their float64 logits
    for r in runs[1:]:
        assert torch.equal(r[0], runs[0][0]) and r[1:] == runs[0][1:]


def test_counter_based_noise_is_drawn_by_the_workers_and_gives_the_same_counts(monkeypatch):
    """With a counter-based noise source (_counter_noise gives a fill: crfl.noise's NoiseStream) the worker
    threads write and prepare their share of each chunk's noise rows; the counts equal those of the same rows
    drawn chunk by chunk on the helper thread (_noise), and rows are written only once each."""
    C, d, n, M, D = 10, 30, 200, 230, 10 * 30 + 10
    W, b = _model(C, d, 19)
    X = _points(W, b, n, 20)
    row = lambda j: torch.randn(D, generator=gen(1000 + j), dtype=torch.float64)  # noqa: E731  model j's noise
    written: list[int] = []

    def fill(first: int, out: torch.Tensor) -> None:
        for r in range(out.shape[0]):
            out[r] = row(first + r)
            written.append(first + r)

    drawn = [0]

    def sequential(m, D_, generator, dtype, device, first_model=0):  # the helper thread's draws, in chunk order
        rows = torch.stack([row(drawn[0] + r) for r in range(m)])
        drawn[0] += m
        return rows.to(dtype)

    monkeypatch.setattr(smoothing, "_noise", sequential)
    ref = _linear_votes(W, b, X, 0.05, M, gen(0), 64, 2048, None)
    monkeypatch.setattr(smoothing, "_counter_noise", lambda g: fill)
    got = _linear_votes(W, b, X, 0.05, M, gen(0), 64, 2048, None)
    assert drawn[0] == M and sorted(written) == list(range(M))
    assert torch.equal(got[0], ref[0]) and got[1:] == ref[1:] and ref[1] > 0


def test_noise_stream_counts_equal_the_helper_threads_draw(monkeypatch):
    """A crfl.noise.NoiseStream: the workers write and prepare each chunk's rows; the counts equal those of the
    same stream drawn chunk by chunk through _noise on the helper thread, and with other chunk sizes."""
    from crfl.noise import NoiseStream

    C, d, n, M = 10, 30, 150, 260
    W, b = _model(C, d, 26)
    X = _points(W, b, n, 27)
    got = _linear_votes(W, b, X, 0.05, M, NoiseStream(7), 100, 2048, None)
    other = _linear_votes(W, b, X, 0.05, M, NoiseStream(7), 64, 2048, None)
    narrow = _linear_votes(W, b, X, 0.05, M, NoiseStream(7), 6, 2048, None)  # fewer models than a vector's 8 lanes
    monkeypatch.setattr(smoothing, "_counter_noise", lambda g: None)
    ref = _linear_votes(W, b, X, 0.05, M, NoiseStream(7), 100, 2048, None)
    assert torch.equal(got[0], ref[0]) and got[1:] == ref[1:] and ref[1] > 0
    assert torch.equal(other[0], ref[0]) and torch.equal(narrow[0], ref[0])
    assert not torch.equal(_linear_votes(W, b, X, 0.05, M, NoiseStream(8), 100, 2048, None)[0], ref[0])


# ---------------------------------------------------------------------------------------------
# the bound itself: float32 logits against exact rational arithmetic


def _exact_logit(w: list[float], e: list[float], sigma: float, x: list[float]) -> Fraction:
    """(w + sigma e) . x~ in rationals (x~ = [x; 1]: w and e carry the bias last)."""
    s = Fraction(sigma)
    return sum((Fraction(a) + s * Fraction(c)) * Fraction(v) for a, c, v in zip(w, e, [*x, 1.0]))


@pytest.mark.parametrize("case", ["images", "cancellation", "dynamic-range", "sparse cancellation"])
def test_float32_logit_error_stays_under_half_the_margin(case):
    """|float32 logit - exact logit of w + sigma e| <= margin_threshold(px, k, float32) pm / 2 for logits computed
    as the mixed path does (float64 fl(w + fl(sigma e)), rounded to float32, class-major float32 addmm), with k
    the point's number of nonzero features (the zero features' terms are exact zeros)."""
    g = gen({"images": 1, "cancellation": 2, "dynamic-range": 3, "sparse cancellation": 4}[case])
    C, m, n, d, sigma = 4, 3, 6, 784, 0.37
    if case == "images":
        X = torch.rand(n, d, generator=g, dtype=torch.float64) * (torch.rand(n, d, generator=g) < 0.3)
        W = torch.randn(C, d, generator=g, dtype=torch.float64) * 0.05
    elif case == "cancellation":  # large terms of alternating sign that cancel almost exactly
        X = torch.full((n, d), 1.0, dtype=torch.float64) + torch.rand(n, d, generator=g, dtype=torch.float64) * 1e-3
        W = torch.where(torch.arange(d) % 2 == 0, 1.0, -1.0).double().repeat(C, 1) * 1e3
    elif case == "sparse cancellation":  # a few large cancelling terms among zeros: the bound with k << d terms
        X = (1.0 + torch.rand(n, d, generator=g, dtype=torch.float64) * 1e-3) * (torch.rand(n, d, generator=g) < 0.03)
        W = torch.where(torch.arange(d) % 2 == 0, 1.0, -1.0).double().repeat(C, 1) * 1e3
    else:  # entries spread over many binades
        X = torch.exp(torch.randn(n, d, generator=g, dtype=torch.float64) * 6)
        W = torch.exp(torch.randn(C, d, generator=g, dtype=torch.float64) * 6) * torch.randn(C, d, generator=g).sign()
    b = torch.randn(C, generator=g, dtype=torch.float64)
    E = torch.randn(m, C * d + C, generator=g, dtype=torch.float64)
    Wn = W.unsqueeze(0) + sigma * E[:, : C * d].view(m, C, d)
    bn = b.unsqueeze(0) + sigma * E[:, C * d :]
    Wcm = Wn.transpose(0, 1).float().contiguous().view(C * m, d)
    # as the kernel path: one product of [x, 1] with [w~, b~] (the bias the (d + 1)-th term)
    ones = torch.ones((n, 1), dtype=torch.float32)
    Wb = torch.cat([Wcm, bn.T.float().reshape(C * m, 1)], dim=1)
    L = torch.mm(torch.cat([X.float(), ones], dim=1), Wb.T).double().view(n, C, m)
    px, pm = exact_votes.logit_error_scales(W, b, sigma, E, X)
    half = exact_votes.margin_threshold(px, (X != 0).sum(dim=1), torch.float32) / 2
    assert case in ("cancellation", "dynamic-range") or (half < exact_votes.margin_threshold(px, d, torch.float32) / 4).all()
    worst = 0.0
    for p in range(n):
        for j in range(m):
            for c in range(C):
                w = [*W[c].tolist(), float(b[c])]
                e = [*E[j, c * d : (c + 1) * d].tolist(), float(E[j, C * d + c])]
                err = abs(Fraction(float(L[p, c, j])) - _exact_logit(w, e, sigma, X[p].tolist()))
                bound = Fraction(float(half[p])) * Fraction(float(pm[j]))
                assert err <= bound, (p, j, c, float(err), float(bound))
                worst = max(worst, float(err / bound))
    assert worst > 0  # rounding happened; the bound is a worst case (gamma_{d+5}), far above the realised error


# ---------------------------------------------------------------------------------------------
# the module path uses the same kernel


def test_module_counts_identical_with_and_without_the_kernel(monkeypatch):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(12, 9), torch.nn.ReLU(), torch.nn.Linear(9, 5)).double().eval()
    flat = torch.nn.utils.parameters_to_vector(net.parameters()).detach()
    X = torch.rand(77, 12, generator=gen(4), dtype=torch.float64)
    got = monte_carlo_counts_module(net, flat, X, 0.2, 130, gen(3), models_per_chunk=50, points_per_chunk=30)
    ref = torch_counts(monkeypatch, lambda: monte_carlo_counts_module(net, flat, X, 0.2, 130, gen(3),
                                                                      models_per_chunk=50, points_per_chunk=30))
    assert torch.equal(got, ref) and (got.sum(dim=1) == 130).all()


# ---------------------------------------------------------------------------------------------
# the range side conditions of exact votes (review of issue 20): inputs where float32 (or float64) rounding is not
# relative must not be called exact


def _exact_counts(W, b, X, sigma, M, seed, chunk=250):
    C, d = W.shape
    g, ref = gen(seed), torch.zeros((X.shape[0], C), dtype=torch.int64)
    for m0 in range(0, M, chunk):
        m = min(chunk, M - m0)
        E = torch.randn((m, C * d + C), generator=g, dtype=torch.float64)
        for p in range(X.shape[0]):
            ref[p] += torch.bincount(exact_votes.exact_noisy_argmax(W, b, sigma, E, X[p].expand(m, d)), minlength=C)
    return ref


@pytest.mark.parametrize("case", ["float32 underflow", "float32 overflow of x", "float64 underflow of sigma e"])
def test_votes_outside_the_proven_range_are_not_called_exact(case):
    if smoothing.votes_arithmetic() != "exact":
        pytest.skip("no compiled votes kernel here")
    z = torch.zeros(2, dtype=torch.float64)
    if case == "float32 underflow":  # weights below FLT_MIN lose more than a relative u in float32
        W, X, sigma, M = torch.tensor([[2.0 ** -134, 0.0], [0.0, 6e-46]], dtype=torch.float64), torch.tensor([[1e11, 1e16]], dtype=torch.float64), 1e-300, 100
    elif case == "float32 overflow of x":  # features beyond float32's range
        W, X, sigma, M = torch.tensor([[1e-10, 1e-40], [-1e-10, 3e-10]], dtype=torch.float64), torch.tensor([[4e38, 4e38]], dtype=torch.float64), 1e-300, 50
    else:  # a subnormal sigma: fl64(sigma e) loses up to 2^-1075 |x| absolutely
        W, X, sigma, M = torch.zeros(2, 2, dtype=torch.float64), torch.tensor([[1e38, 0.77e38]], dtype=torch.float64), 2e-322, 2000
    got, how = smoothing.monte_carlo_votes_linear(W, z, X, sigma, M, gen(0), dtype=torch.float64)
    assert how == "float64" or torch.equal(got, _exact_counts(W, z, X, sigma, M, 0)), (case, how)
    assert how == "float64"  # these inputs are outside the side conditions: the votes are float64 argmaxes
    with pytest.raises(ConfigError, match="certify.sigma_T"):  # and the default refuses what float64 cannot resolve
        smoothing.monte_carlo_votes_linear(W, z, X, sigma, M, gen(0))


def test_votes_label_is_exact_for_ordinary_inputs():
    if smoothing.votes_arithmetic() != "exact":
        pytest.skip("no compiled votes kernel here")
    W, b = _model(10, 30, 3, scale=0.5)
    X = torch.rand(40, 30, generator=gen(8), dtype=torch.float64)
    got, how = smoothing.monte_carlo_votes_linear(W, b, X, 0.01, 300, gen(2))
    assert how == "exact" and torch.equal(got, _exact_counts(W, b, X, 0.01, 300, 2))


# ---------------------------------------------------------------------------------------------
# MKL's packed products (the weights packed once per chunk)


def _spy_mkl(real, calls: list, scale: float = 1.0):
    """MKL's packed-product functions, counting the products and (scale != 1) scaling class 0's logits of every
    model in the product's output (columns 0 .. m - 1 of the class-major layout) by ``scale``."""
    import ctypes

    import numpy as np

    def compute(*a):
        calls.append(a[3])
        real.cblas_sgemm_compute(*a)
        if scale != 1.0:
            rows, N = a[3], a[4]
            out = np.frombuffer((ctypes.c_float * (rows * N)).from_address(a[11]), dtype=np.float32).reshape(rows, N)
            out[:, : N // 10] *= np.float32(scale)

    class Spy:
        def __getattr__(self, name):
            return compute if name == "cblas_sgemm_compute" else getattr(real, name)
    return Spy()


@pytest.mark.skipif(smoothing._mkl_packed() is None, reason="torch without MKL's packed sgemm")
@pytest.mark.parametrize("source", ["generator", "stream"])
def test_packed_products_count_the_same_votes(monkeypatch, source):
    """The mixed votes with MKL's packed products equal those with one torch.mm per block (both exact), for the
    helper-thread draws (a fresh packed buffer per chunk) and the counter-based stream (one buffer reused), with a
    last block padded with zero rows; a packed product with one class 1% off changes the counts (the comparison
    can fail)."""
    from crfl.noise import NoiseStream

    C, d, n, M = 10, 40, 300, 130  # 300 points: the last block of 128 is padded
    W, b = _model(C, d, 16)
    X = _points(W, b, n, 17)
    src = (lambda: gen(18)) if source == "generator" else (lambda: NoiseStream(18))
    real, calls = smoothing._mkl_packed(), []
    monkeypatch.setattr(smoothing, "_mkl_packed", lambda: _spy_mkl(real, calls))
    got = _linear_votes(W, b, X, 0.05, M, src(), 50, 2048, None)
    assert calls and set(calls) == {smoothing.LINEAR_POINT_BLOCK}  # every block's product ran packed, whole blocks
    monkeypatch.setattr(smoothing, "_mkl_packed", lambda: None)
    ref = _linear_votes(W, b, X, 0.05, M, src(), 50, 2048, None)
    assert torch.equal(got[0], ref[0]) and got[2] == ref[2] and ref[1] > 0
    monkeypatch.setattr(smoothing, "_mkl_packed", lambda: _spy_mkl(real, [], scale=1.01))
    assert not torch.equal(_linear_votes(W, b, X, 0.05, M, src(), 50, 2048, None)[0], ref[0])


def test_mkl_alternate_compute_modes_turn_exact_votes_off(monkeypatch):
    """MKL_BLAS_COMPUTE_MODE may let MKL's sgemm (behind torch.mm and the packed products) round to bfloat16 or
    TF32: then float32 products are not IEEE, and the votes are float64's (docs/theory.md (c))."""
    if smoothing._votes_kernel() is None:
        pytest.skip("no votes kernel")
    monkeypatch.setenv("MKL_BLAS_COMPUTE_MODE", "STANDARD")
    assert smoothing.votes_arithmetic() == "exact"
    monkeypatch.setenv("MKL_BLAS_COMPUTE_MODE", "FLOAT_TO_BF16")
    assert smoothing.votes_arithmetic() == "float64"


def test_flush_to_zero_turns_exact_votes_off():
    """The proof's underflow allowances assume gradual underflow: with flush-to-zero (torch.set_flush_denormal)
    the votes are float64's."""
    if smoothing._votes_kernel() is None:
        pytest.skip("no votes kernel")
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        assert smoothing.votes_arithmetic() == "float64"
    finally:
        torch.set_flush_denormal(False)
    assert smoothing.votes_arithmetic() == "exact"


def test_packed_product_check_refuses_a_wrong_product(monkeypatch):
    """MKL's packed product is used only after one small exact product matches torch.mm's (_packed_product_checks):
    a library whose compute is off is refused."""
    real = smoothing._mkl_packed()
    if real is None:
        pytest.skip("torch without MKL's packed sgemm")
    assert smoothing._packed_product_checks(real)
    assert not smoothing._packed_product_checks(_spy_mkl(real, [], scale=1.5))


def test_more_classes_than_the_candidate_mask_bits():
    """C = 70 (> 64 classes: the candidate mask is all ones past bit 63) with two near-tied classes 3 and 66:
    many votes go to the float64 recomputation, and the counts equal the float64 path's."""
    C, d, n, M = 70, 40, 130, 60
    W = torch.randn(C, d, generator=gen(1), dtype=torch.float64)
    b = torch.randn(C, generator=gen(2), dtype=torch.float64)
    W[66] = W[3] + 1e-9 * torch.randn(d, generator=gen(3), dtype=torch.float64)
    b[3] += 100
    b[66] = b[3]
    X = torch.rand(n, d, generator=gen(4), dtype=torch.float64)
    got, rec, _ = _linear_votes(W, b, X, 1e-7, M, gen(5), 25, 2048, None)
    ref, _, _ = _linear_votes(W, b, X, 1e-7, M, gen(5), 25, 2048, torch.float64, mixed=False)
    assert rec > n * M // 2 and torch.equal(got, ref)
    assert int(got[:, 3].sum()) > 0 and int(got[:, 66].sum()) > 0
