"""crfl.noise: the counter-based float64 N(0, 1) stream of Monte Carlo certification.

The compiled kernel and the numpy reference agree bit for bit; Philox4x32-10 matches its published
known answers; the log and cos/sin are within the stated ulp bounds of the exact values; the
noise passes statistical tests whose tolerances come from the theory of the sample statistics
(fixed seeds: each test is deterministic; 5 standard deviations, or p > 1e-4, is the bar).
"""

from __future__ import annotations

import ctypes
import math

import numpy as np
import pytest
import torch
from scipy import special, stats

from crfl import kernels, noise, smoothing
from crfl.noise import GENERATOR, NoiseStream
from crfl.rng import CertificationSeed, replay_certification_seed
from crfl.validation import ConfigError

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
# the bits of philox4x32-10+box-muller/1, pinned (generated from the reviewed code at 40eaaf2): changing
# any of them is a new generator, i.e. a new GENERATOR name (recorded certifications replay by it)

GOLDEN = {  # model m -> noise.normal(STREAM, m, 2, 5), rows m and m + 1
    0: (("0x1.213d36e658533p+0", "0x1.d980b499e017ap-2", "0x1.f0da4098cd6dap-2", "-0x1.47f8f8bdeed96p-1", "0x1.11daa9f9710fbp+1"),
        ("0x1.45ba72c024216p-3", "-0x1.8784fff0c9d1cp-3", "0x1.79e24637ec563p+0", "-0x1.58495795ed4c5p+1", "0x1.3b14744ef9117p+0")),
    2**32 + 7: (("0x1.6408e98d91701p-4", "-0x1.257e4d521c71bp-1", "-0x1.92edaf28951dcp+0", "0x1.910d8fad09790p-8", "0x1.064f7f85852ccp-1"),
                ("0x1.53c30bd5a3c89p-1", "-0x1.b8aacf1e14afbp-4", "0x1.a12ca696ce154p-2", "-0x1.0579df8a6883fp+1", "0x1.3e85f81a1a312p-1")),
    2**63 + 1: (("0x1.df86855ec2305p-1", "-0x1.ee3b4d87f3b4ep+0", "0x1.14da07720d147p+0", "0x1.d8dd260512547p+0", "-0x1.ebb9990958db3p-3"),
                ("0x1.302a578607d49p-1", "0x1.478b3c0d5da38p+0", "0x1.97cb3f7b34a62p-2", "0x1.a4930acdd510ap-1", "0x1.73ca218f69b17p-1")),
    2**64 - 2: (("0x1.b9f6de8c486fcp-8", "0x1.242f94d0ee275p+0", "-0x1.8d969f16f54b6p+0", "-0x1.155ab28b8b697p+1", "0x1.81dfeb2c669acp-2"),
                ("0x1.3d252f526f545p-1", "-0x1.cb6182d951427p-1", "0x1.29bf00729e191p+0", "0x1.c885d5d8f5c3fp-1", "-0x1.db0ca7362535ep-1")),
}
GOLDEN_PAIRS = [  # (model m, pair p >= 2^32) -> entries 2p, 2p + 1 (the counter's second word in use)
    (5, 2**32, "-0x1.66e534c1dd9b8p+0", "0x1.1aa2578fa8b58p-2"),
    (2**40 + 3, 2**32 + 1, "-0x1.08afcf4286716p-3", "-0x1.e8b0e89b1b26ap+0"),
    (0, 2**63 + 5, "-0x1.22878ccc48a10p+0", "-0x1.8cbc9fcdce195p+0"),
]


@pytest.mark.parametrize("engine", ["default", "numpy"])
def test_golden_bits(engine, monkeypatch):
    assert GENERATOR == "philox4x32-10+box-muller/1"  # the name these bits stand for
    if engine == "numpy":
        monkeypatch.setenv("CRFL_KERNELS", "0")
    for m, rows in GOLDEN.items():
        want = np.array([[float.fromhex(h) for h in row] for row in rows])
        assert np.array_equal(_bits(noise.normal(STREAM, m, 2, 5)), _bits(want)), m
    for m, p, h0, h1 in GOLDEN_PAIRS:
        z0, z1 = noise._pairs(STREAM.key, np.array([m]), np.array([p]))
        assert (float(z0[0]).hex(), float(z1[0]).hex()) == (h0, h1)


# ---------------------------------------------------------------------------------------------
# kernel == numpy reference, bit for bit


@needs_kernel
@pytest.mark.parametrize("rows,D,first", [
    (37, 7850, 0), (5, 1, 0), (3, 2, 7), (9, 17, 1000), (4, 63, 2**32 - 2), (2, 65, 2**40 + 3), (1, 129, 2**64 - 1),
    (64, 31, 5), (3, 33, 2**63 - 2),
])
def test_kernel_equals_reference(rows, D, first):
    a = noise.normal(STREAM, first, rows, D)
    b = noise.reference_normal(STREAM, first, rows, D)
    assert np.array_equal(_bits(a), _bits(b))


@needs_kernel
def test_kernel_counts_models_past_2_63_unsigned():
    # one kernel call whose models cross 2^63 (first_model + r in uint64: no signed overflow)
    a = noise.normal(STREAM, 2**63 - 2, 4, 70, threads=1)
    assert np.array_equal(_bits(a), _bits(noise.reference_normal(STREAM, 2**63 - 2, 4, 70)))
    assert torch.equal(a[2:], noise.normal(STREAM, 2**63, 2, 70, threads=1))


def test_u1_is_never_zero():
    # u1 = ((w0 >> 11) + 1) 2^-53: the smallest word gives 2^-53 (not 0: log 0 = -inf), the largest 1
    w0 = np.array([0, (1 << 11) - 1, 1 << 11, ((1 << 53) - 1) << 11, (1 << 64) - 1], dtype=np.uint64)
    want = [2.0 ** -53, 2.0 ** -53, 2.0 ** -52, 1.0, 1.0]
    assert list(noise._uniform1(w0)) == want
    if noise.engine() == "compiled":
        got = np.empty(len(w0))
        noise._lib().normal_uniform1(w0.ctypes.data, got.ctypes.data, len(w0))
        assert list(got) == want


@needs_kernel
def test_a_kernel_that_disagrees_with_the_reference_is_not_used(monkeypatch, caplog):
    lib = noise._lib()
    want = noise.normal(STREAM, 3, 2, 40)
    real = lib.normal_fill

    def off_by_one_ulp(key, first, rows, D, out):  # a build that rounds one entry of the self-check differently
        real(key, first, rows, D, out)
        last = ctypes.c_double.from_address(out + 8 * (rows * D - 1))
        last.value = math.nextafter(last.value, math.inf)

    monkeypatch.setattr(lib, "normal_fill", off_by_one_ulp)
    monkeypatch.setattr(lib, "_crfl_verdict", None)  # as when first loaded
    with caplog.at_level("WARNING", logger="crfl.noise"):
        assert noise.engine() == "numpy"
        assert torch.equal(noise.normal(STREAM, 3, 2, 40), want)  # the reference's noise, not the kernel's
        assert noise.engine() == "numpy"
    warnings = [r for r in caplog.records if "differs from the numpy reference" in r.getMessage()]
    assert len(warnings) == 1 and "1 of 258 entries" in warnings[0].getMessage()
    # the real kernel passes the same check
    monkeypatch.setattr(lib, "normal_fill", real)
    monkeypatch.setattr(lib, "_crfl_verdict", None)
    assert noise.engine() == "compiled"


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
    assert torch.equal(noise.normal(STREAM, np.int64(4), np.int32(2), np.uint16(5)), noise.normal(STREAM, 4, 2, 5))


@pytest.mark.parametrize("fn", [noise.normal, noise.reference_normal])
@pytest.mark.parametrize("first,rows,D,name,allowed", [
    (0, -1, 5, "rows", "[0, 2^63 - 1]"),
    (0, 2.5, 5, "rows", "[0, 2^63 - 1]"),
    (0, 2, "5", "D", "[0, 2^63 - 1]"),
    (0, 2, 2.5, "D", "[0, 2^63 - 1]"),
    (0, 2, 2**66, "D", "[0, 2^63 - 1]"),
    (0, 2**32, 2**32, "rows' and 'D", "rows * D at most 2^63 - 1"),
    (2**64 - 2, 3, 4, "first_model", "[0, 2^64 - 3]"),
    (2**64, 0, 4, "first_model", "[0, 2^64 - 1]"),
    (-1, 1, 4, "first_model", "[0, 2^64 - 1]"),
    (0.5, 1, 4, "first_model", "[0, 2^64 - 1]"),
])
def test_bad_sizes_raise_one_config_error_before_allocating(fn, first, rows, D, name, allowed):
    with pytest.raises(ConfigError, match="'" + name + "'") as e:
        fn(STREAM, first, rows, D)
    assert allowed in str(e.value) and "Got" in str(e.value)


def test_the_limits_are_exact():
    # first_model + rows = 2^64 is allowed: the last model is 2^64 - 1
    a = noise.normal(STREAM, 2**64 - 3, 3, 4)
    assert torch.equal(a[2:], noise.normal(STREAM, 2**64 - 1, 1, 4))
    assert torch.equal(a[:1], noise.normal(STREAM, 2**64 - 3, 1, 4))
    assert noise.normal(STREAM, 2**64 - 1, 0, 4).shape == (0, 4)


# ---------------------------------------------------------------------------------------------
# the log and cos/sin against exact values (mpmath, 120 bits)


def _ulp_err(mp, got: float, exact) -> float:
    if exact == 0:
        return 0.0 if got == 0 else math.inf
    return float(abs(mp.mpf(got) - exact)) / math.ulp(float(exact))


def test_log_within_its_ulp_bound():
    mp = pytest.importorskip("mpmath")
    mp.mp.prec = 120
    rng = np.random.default_rng(2)
    edges = [2.0 ** -53, 1.0, 1 - 2.0 ** -53, 0.5, 0.5 + 2.0 ** -53, 2 ** -0.5,
             math.nextafter(2 ** -0.5, 0), math.nextafter(2 ** -0.5, 1)]
    binades = [math.ldexp(1 + float(f), e) for e in range(-53, 0) for f in rng.random(600)]  # every binade
    near_one = [1 - k * 2.0 ** -53 for k in range(1, 1500)]  # where log is smallest (relative accuracy)
    near_sqrt2 = [math.ldexp(2 ** 0.5 + j * 2.0 ** -52, e) for e in (-1, -7, -30) for j in range(-40, 40)]
    x = np.array([v for v in edges + binades + near_one + near_sqrt2 if 2.0 ** -53 <= v <= 1.0])
    y = noise._log(x)
    worst = max(_ulp_err(mp, float(yi), mp.log(mp.mpf(float(xi)))) for xi, yi in zip(x, y))
    assert worst <= noise.LOG_ULP
    # and against the C library's log (itself within 1 ulp)
    assert max(abs(float(yi) - math.log(xi)) / math.ulp(math.log(xi) or 1.0) for xi, yi in zip(x, y)) <= noise.LOG_ULP + 1
    assert noise._log(np.array([1.0]))[0] == 0.0


def test_sincos_within_their_ulp_bound():
    mp = pytest.importorskip("mpmath")
    mp.mp.prec = 120
    rng = np.random.default_rng(3)
    q = 1 << 51  # a quarter turn
    near = [n * q + j for n in range(5) for j in range(-60, 61)] + [n * q // 2 + j for n in range(9) for j in range(-20, 21)]
    k = np.array([v for v in near if 0 <= v < 2 ** 53] + list(rng.integers(0, 2 ** 53, 40000)), dtype=np.uint64)
    c, s = noise._sincos_turns(k)
    worst = 0.0
    for ki, ci, si in zip(k, c, s):
        t = mp.mpf(int(ki)) / 2 ** 52  # 2 u
        worst = max(worst, _ulp_err(mp, float(ci), mp.cospi(t)), _ulp_err(mp, float(si), mp.sinpi(t)))
    assert worst <= noise.SINCOS_ULP
    # the exact zeros and ones of the quarter turns
    c4, s4 = noise._sincos_turns(np.array([0, q, 2 * q, 3 * q], dtype=np.uint64))
    assert list(c4) == [1.0, 0.0, -1.0, 0.0] and [abs(v) for v in s4] == [0.0, 1.0, 0.0, 1.0]


def test_extreme_uniforms_give_the_stated_tail_cut():
    # the extreme words give u1 = 2^-53, the largest radius sqrt(2 * 53 ln 2), and u1 = 1, radius +0
    u1 = noise._uniform1(np.array([0, (1 << 64) - 1], dtype=np.uint64))
    r = np.sqrt(noise._log(u1) * -2.0 + 0.0)
    assert abs(r[0] - math.sqrt(2 * 53 * math.log(2))) < 1e-14 and r[1] == 0.0 and not math.copysign(1, r[1]) < 0


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


def test_the_noise_kernel_is_built_without_fused_multiply_adds():
    # numpy never fuses a * b + c; the kernel's bits equal numpy's only with these flags (test_kernels.py
    # shows the parser reads them and that GCC contracts without them)
    assert kernels._own_flags((kernels.SOURCE_DIR / "normal.cpp").read_bytes()) == ["-ffp-contract=off", "-fno-math-errno"]
