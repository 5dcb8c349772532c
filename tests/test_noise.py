"""crfl.noise: the counter-based float64 N(0, 1) stream of Monte Carlo certification.

The compiled kernel and the numpy reference agree bit for bit; Philox4x32-10 matches its published
known answers; the log and cos/sin are within the stated ulp bounds of the exact values; the
noise passes statistical tests whose tolerances come from the theory of the sample statistics
(fixed seeds: each test is deterministic; 5 standard deviations, or p > 1e-4, is the bar).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import special, stats

from crfl import kernels, noise, smoothing
from crfl.noise import GENERATOR, NoiseStream
from crfl.rng import CertificationSeed, replay_certification_seed
from crfl.validation import ConfigError

mp = pytest.importorskip("mpmath")

needs_kernel = pytest.mark.skipif(noise.engine() != "compiled", reason="the normal kernel is not available here")

STREAM = NoiseStream(0x243F6A8885A308D3)


def _bits(a: np.ndarray | torch.Tensor) -> np.ndarray:
    a = a.numpy() if isinstance(a, torch.Tensor) else a
    return np.ascontiguousarray(a, dtype=np.float64).view(np.uint64)


# ---------------------------------------------------------------------------------------------
# Philox4x32-10: the published known answers (Random123's kat_vectors)

KAT = [  # counter words, key (k0 + 2^32 k1), output words
    ((0, 0, 0, 0), 0, (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, 0xFFFFFFFFFFFFFFFF, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), 0x299F31D0A4093822, (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def test_philox_reference_matches_known_answers():
    for ctr, key, want in KAT:
        got = noise._philox([np.array([c], dtype=np.uint64) for c in ctr], key)
        assert tuple(int(w[0]) for w in got) == want


@needs_kernel
def test_philox_kernel_matches_known_answers():
    lib = noise._lib()
    ctr = np.array([k[0] for k in KAT] * 3, dtype=np.uint32)  # 9 counters: more than one vector
    for key in {k[1] for k in KAT}:
        out = np.zeros_like(ctr)
        lib.normal_philox(ctr.ctypes.data, key, out.ctypes.data, len(ctr))
        for row, (c, k, want) in zip(out, KAT * 3):
            if k == key:
                assert tuple(int(x) for x in row) == want


# ---------------------------------------------------------------------------------------------
# kernel == numpy reference, bit for bit


@needs_kernel
@pytest.mark.parametrize("rows,D,first", [
    (37, 7850, 0), (5, 1, 0), (3, 2, 7), (9, 17, 1000), (4, 63, 2**32 - 2), (2, 65, 2**40 + 3), (1, 129, 2**64 - 1),
    (64, 31, 5),
])
def test_kernel_equals_reference(rows, D, first):
    a = noise.normal(STREAM, first, rows, D)
    b = noise.reference_normal(STREAM, first, rows, D)
    assert np.array_equal(_bits(a), _bits(b))


@needs_kernel
def test_log_and_sincos_kernel_equal_reference():
    lib = noise._lib()
    rng = np.random.default_rng(1)
    x = np.concatenate([[2.0 ** -53, 1.0, 0.5, 2 ** -0.5], rng.integers(1, 2 ** 53, 1001).astype(np.float64) * 2.0 ** -53])
    y = np.empty_like(x)
    lib.normal_log(x.ctypes.data, y.ctypes.data, len(x))
    assert np.array_equal(_bits(y), _bits(noise._log(x)))
    k = np.concatenate([np.array([0, 1, 2 ** 50, 2 ** 51, 2 ** 53 - 1], dtype=np.uint64),
                        rng.integers(0, 2 ** 53, 1003, dtype=np.uint64)])
    c, s = np.empty(len(k)), np.empty(len(k))
    lib.normal_sincos_turns(k.ctypes.data, c.ctypes.data, s.ctypes.data, len(k))
    rc, rs = noise._sincos_turns(k)
    assert np.array_equal(_bits(c), _bits(rc)) and np.array_equal(_bits(s), _bits(rs))


def test_rows_in_pieces_and_in_parallel_equal_one_fill():
    rows, D = 23, 1001
    whole = noise.normal(STREAM, 100, rows, D, threads=1)
    for threads in (2, 3, 7):
        assert torch.equal(noise.normal(STREAM, 100, rows, D, threads=threads), whole)
    pieces = torch.empty(rows, D, dtype=torch.float64)
    cuts = [0, 1, 6, 7, 15, 23]
    for lo, hi in reversed(list(zip(cuts, cuts[1:]))):  # any order
        noise.fill_normal(STREAM, 100 + lo, pieces[lo:hi])
    assert torch.equal(pieces, whole)
    # a row's first entries do not depend on D (entry i is a function of (key, model, i) alone)
    assert torch.equal(noise.normal(STREAM, 100, rows, 10), whole[:, :10])


def test_fallback_without_kernels_gives_the_same_bits(monkeypatch):
    want = noise.normal(STREAM, 3, 6, 99)
    monkeypatch.setenv("CRFL_KERNELS", "0")
    assert noise.engine() == "numpy"
    assert torch.equal(noise.normal(STREAM, 3, 6, 99), want)
    assert np.array_equal(_bits(want), _bits(noise.reference_normal(STREAM, 3, 6, 99)))


def test_bad_inputs_raise_one_clear_error():
    with pytest.raises(ConfigError, match="'key'"):
        NoiseStream(-1)
    with pytest.raises(ConfigError, match="'key'"):
        NoiseStream(1 << 64)
    with pytest.raises(ConfigError, match="'generator'"):
        NoiseStream(1, "torch")
    with pytest.raises(ConfigError, match="'out'"):
        noise.fill_normal(STREAM, 0, torch.empty(3, 4, dtype=torch.float32))
    with pytest.raises(ConfigError, match="'out'"):
        noise.fill_normal(STREAM, 0, torch.empty(4, 3, dtype=torch.float64).t())
    with pytest.raises(ConfigError, match="'first_model'"):
        noise.fill_normal(STREAM, -1, torch.empty(3, 4, dtype=torch.float64))
    with pytest.raises(ConfigError, match="'first_model'"):
        noise.normal(STREAM, 2 ** 64 - 2, 3, 4)  # models past 2^64 - 1
    with pytest.raises(ConfigError, match="'stream'"):
        noise.normal(torch.Generator(), 0, 3, 4)
    assert noise.normal(STREAM, 0, 0, 5).shape == (0, 5)
    assert torch.equal(noise.normal(STREAM, np.int64(4), 2, 5), noise.normal(STREAM, 4, 2, 5))


# ---------------------------------------------------------------------------------------------
# the log and cos/sin against exact values (mpmath, 120 bits)


def _ulp_err(got: float, exact) -> float:
    if exact == 0:
        return 0.0 if got == 0 else math.inf
    return float(abs(mp.mpf(got) - exact)) / math.ulp(float(exact))


def test_log_within_its_ulp_bound():
    mp.mp.prec = 120
    rng = np.random.default_rng(2)
    edges = [2.0 ** -53, 1.0, 1 - 2.0 ** -53, 0.5, 0.5 + 2.0 ** -53, 2 ** -0.5,
             math.nextafter(2 ** -0.5, 0), math.nextafter(2 ** -0.5, 1)]
    binades = [math.ldexp(1 + float(f), e) for e in range(-53, 0) for f in rng.random(60)]  # every binade
    near_one = [1 - k * 2.0 ** -53 for k in range(1, 1500)]  # where log is smallest (relative accuracy)
    near_sqrt2 = [math.ldexp(2 ** 0.5 + j * 2.0 ** -52, e) for e in (-1, -7, -30) for j in range(-40, 40)]
    x = np.array([v for v in edges + binades + near_one + near_sqrt2 if 2.0 ** -53 <= v <= 1.0])
    y = noise._log(x)
    worst = max(_ulp_err(float(yi), mp.log(mp.mpf(float(xi)))) for xi, yi in zip(x, y))
    assert worst <= noise.LOG_ULP
    # and against the C library's log (itself within 1 ulp)
    assert max(abs(float(yi) - math.log(xi)) / math.ulp(math.log(xi) or 1.0) for xi, yi in zip(x, y)) <= noise.LOG_ULP + 1
    assert noise._log(np.array([1.0]))[0] == 0.0


def test_sincos_within_their_ulp_bound():
    mp.mp.prec = 120
    rng = np.random.default_rng(3)
    q = 1 << 51  # a quarter turn
    near = [n * q + j for n in range(5) for j in range(-60, 61)] + [n * q // 2 + j for n in range(9) for j in range(-20, 21)]
    k = np.array([v for v in near if 0 <= v < 2 ** 53] + list(rng.integers(0, 2 ** 53, 6000)), dtype=np.uint64)
    c, s = noise._sincos_turns(k)
    worst = 0.0
    for ki, ci, si in zip(k, c, s):
        t = mp.mpf(int(ki)) / 2 ** 52  # 2 u
        worst = max(worst, _ulp_err(float(ci), mp.cospi(t)), _ulp_err(float(si), mp.sinpi(t)))
    assert worst <= noise.SINCOS_ULP
    # the exact zeros and ones of the quarter turns
    c4, s4 = noise._sincos_turns(np.array([0, q, 2 * q, 3 * q], dtype=np.uint64))
    assert list(c4) == [1.0, 0.0, -1.0, 0.0] and [abs(v) for v in s4] == [0.0, 1.0, 0.0, 1.0]


def test_extreme_uniforms_give_the_stated_tail_cut():
    # u1 = 2^-53 gives the largest radius sqrt(2 * 53 ln 2); u1 = 1 gives +0
    r = np.sqrt(noise._log(np.array([2.0 ** -53, 1.0])) * -2.0 + 0.0)
    assert abs(r[0] - math.sqrt(2 * 53 * math.log(2))) < 1e-14 and r[1] == 0.0 and not math.copysign(1, r[1]) < 0
    assert float(noise.normal(STREAM, 0, 200, 5000).abs().max()) <= math.sqrt(2 * 53 * math.log(2))


# ---------------------------------------------------------------------------------------------
# the law: statistical tests with tolerances from the sample statistics' theory (5 sd)

N_ROWS, N_D = 256, 8192  # 2^21 entries


@pytest.fixture(scope="module")
def sample() -> np.ndarray:
    return noise.normal(NoiseStream(20210701), 0, N_ROWS, N_D).numpy()


def test_moments(sample):
    e = sample.ravel()
    n = e.size
    assert abs(e.mean()) < 5 / math.sqrt(n)                   # sd of the mean: 1 / sqrt(n)
    assert abs((e ** 2).mean() - 1) < 5 * math.sqrt(2 / n)   # Var e^2 = 2
    assert abs((e ** 4).mean() - 3) < 5 * math.sqrt(96 / n)  # E e^4 = 3, Var e^4 = 105 - 9
    assert abs((e ** 3).mean()) < 5 * math.sqrt(15 / n)      # E e^3 = 0, Var e^3 = 15


def test_kolmogorov_smirnov(sample):
    for part in (sample.ravel(), sample[:, 0::2].ravel(), sample[:, 1::2].ravel()):  # all, cos entries, sin entries
        assert stats.kstest(part, "norm").pvalue > 1e-4


@pytest.mark.parametrize("t", [2.0, 3.0, 4.0])
def test_tail_frequencies(sample, t):
    n = sample.size
    p = float(special.erfc(t / math.sqrt(2)))  # P[|e| > t]
    k = int((np.abs(sample) > t).sum())
    assert abs(k - n * p) < 5 * math.sqrt(n * p * (1 - p))


def test_no_correlation_within_pairs_between_pairs_and_between_models(sample):
    def corr_ok(a, b):
        a, b = a.ravel(), b.ravel()
        return abs(np.corrcoef(a, b)[0, 1]) < 5 / math.sqrt(a.size)  # sd of a sample correlation: 1 / sqrt(n)

    assert corr_ok(sample[:, 0::2], sample[:, 1::2])          # cos/sin of one pair
    assert corr_ok(sample[:, 1:-1:2], sample[:, 2::2])        # sin of pair p, cos of pair p + 1
    assert corr_ok(sample[:-1], sample[1:])                   # model m and m + 1, same entry
    assert corr_ok(sample[:, 0::2] ** 2, sample[:, 1::2] ** 2)  # the pair's radius is shared, yet e0^2, e1^2 uncorrelated
    assert corr_ok(np.abs(sample[:-1]), np.abs(sample[1:]))


def test_pair_angle_is_uniform(sample):
    # (e0, e1) / r is uniform on the circle: the angle's KS test against U(-pi, pi)
    ang = np.arctan2(sample[:, 1::2], sample[:, 0::2]).ravel()
    assert stats.kstest(ang, stats.uniform(loc=-math.pi, scale=2 * math.pi).cdf).pvalue > 1e-4


def test_different_keys_streams_and_models_differ():
    seed = replay_certification_seed(7)
    streams = [seed.noise_stream("smoothing", 0), seed.noise_stream("selection", 0), seed.noise_stream("smoothing", 1),
               replay_certification_seed(8).noise_stream("smoothing", 0), NoiseStream(STREAM.key ^ 1)]
    assert len({s.key for s in streams}) == len(streams)
    rows = [noise.normal(s, 0, 2, 4096).numpy() for s in streams] + [noise.normal(streams[0], 2, 2, 4096).numpy()]
    flat = np.concatenate(rows)
    c = np.corrcoef(flat)
    off = c[~np.eye(len(flat), dtype=bool)]
    assert np.abs(off).max() < 5 / math.sqrt(4096)
    assert seed.noise_stream("smoothing", 0) == replay_certification_seed(7).noise_stream("smoothing", 0)
    with pytest.raises(ValueError, match="'stream'"):
        seed.noise_stream("batches", 0)


# ---------------------------------------------------------------------------------------------
# in the Monte Carlo counts


def _linear(seed: int = 0, d: int = 20, C: int = 4, n: int = 60):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(C, d, generator=g, dtype=torch.float64)
    b = torch.randn(C, generator=g, dtype=torch.float64)
    X = torch.rand(n, d, generator=g, dtype=torch.float64)
    return W, b, X


def test_monte_carlo_counts_are_the_stream_s_noisy_models():
    W, b, X = _linear()
    sigma, M = 0.7, 130
    stream = CertificationSeed(11, "replay", None).noise_stream("smoothing", 0)
    E = noise.normal(stream, 0, M, W.numel() + b.numel())
    Wn = W.reshape(1, -1) + sigma * E[:, : W.numel()]
    bn = b + sigma * E[:, W.numel():]
    logits = torch.einsum("nd,mcd->nmc", X, Wn.reshape(M, *W.shape)) + bn[None]
    want = torch.nn.functional.one_hot(logits.argmax(-1), W.shape[0]).sum(1)
    for chunk in (1000, 50, 7):  # a stream's counts do not depend on the chunking
        got = smoothing.monte_carlo_counts_linear(W, b, X, sigma, M, stream, models_per_chunk=chunk,
                                                  dtype=torch.float64)
        assert torch.equal(got, want)


def test_monte_carlo_still_takes_a_torch_generator_and_refuses_others():
    W, b, X = _linear(1)
    a = smoothing.monte_carlo_counts_linear(W, b, X, 0.5, 40, torch.Generator().manual_seed(3), dtype=torch.float64)
    assert int(a.sum()) == 40 * X.shape[0]
    with pytest.raises(ConfigError, match="'generator'"):
        smoothing.monte_carlo_counts_linear(W, b, X, 0.5, 40, 3, dtype=torch.float64)


def test_kernels_module_loads_the_noise_kernel_with_its_own_flags():
    text = (kernels.SOURCE_DIR / "normal.cpp").read_bytes()
    assert "-ffp-contract=off" in kernels._own_flags(text)
    assert kernels._own_flags(b"// nothing\n") == []
    assert GENERATOR == "philox4x32-10+box-muller/1"
