"""The smoothing noise: a counter-based N(0, 1) float64 stream for Monte Carlo certification.

Monte Carlo certification (Algorithm 2's ``GetCounts``, :mod:`crfl.smoothing`) needs M noisy models
w + sigma_T e, e ~ N(0, I_D) (the smoothing distribution N(w, sigma_T^2 I), docs/theory.md (c)).
A :class:`NoiseStream` gives that noise as a pure function: entry i of model m is a function of
(key, m, i) alone, so any rows can be filled by any thread in any order with the same bits, and a
recorded certification seed replays every vote (docs/theory.md (j)).

The generator (:data:`GENERATOR`, ``philox4x32-10+box-muller/1``):

1. Pair p = i // 2 of model m is the Philox4x32-10 block (Salmon, Moraes, Dror, Shaw, SC 2011) of
   the 128-bit counter (p mod 2^32, p // 2^32, m mod 2^32, m // 2^32) under the 64-bit key
   (k mod 2^32, k // 2^32).
2. Its words x0..x3 make w0 = x0 + 2^32 x1 and w1 = x2 + 2^32 x3, and two 53-bit uniforms
   u1 = ((w0 >> 11) + 1) 2^-53 in (0, 1] (so log u1 is finite) and u2 = (w1 >> 11) 2^-53 in [0, 1).
3. Box-Muller: entries 2p and 2p + 1 are sqrt(-2 log u1) cos(2 pi u2) and sqrt(-2 log u1) sin(2 pi u2);
   an odd D drops the last pair's sine.

Law. With exact uniforms on (0, 1] x [0, 1) Box-Muller gives independent N(0, 1) pairs. Here the
uniforms are on the grid of 2^-53 (as torch's and numpy's samplers), so every |entry| <= sqrt(2 * 53
ln 2) = 8.57 (the tail beyond it has probability 1e-17, as in torch's sampler), and the log and
cos/sin are our own polynomials, tested within :data:`LOG_ULP` and :data:`SINCOS_ULP` units in the last
place of the exact values on [2^-53, 1] and on every quarter-turn phase (tests/test_noise.py); the
entries are N(0, 1) to that resolution, the same standing as torch's ``randn``.

Two implementations compute the same bits: the compiled kernel ``crfl/kernels/normal.cpp`` (8 SIMD
lanes, no fused multiply-adds, its own log and sin/cos so that no libm version can change a bit) and
the numpy reference here (:func:`reference_normal`: uint64 for Philox's 32 x 32 -> 64-bit products,
the same float64 operations in the same order). The reference runs where the kernel cannot
(``CRFL_KERNELS=0``, no compiler) or where it fails its self-check when first loaded (a small fill
compared with the reference bit for bit: a compiler that builds it differently; the log says so):
slower, same noise.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from dataclasses import dataclass

import numpy as np
import torch

from crfl import kernels
from crfl.validation import ConfigError, check_int

log = logging.getLogger("crfl.noise")

__all__ = [
    "GENERATOR", "LOG_ULP", "SINCOS_ULP", "NoiseStream", "engine", "fill_normal", "normal", "reference_normal",
]

#: The generator's name and version, recorded in summary.json (``smoothing.noise_generator``).
GENERATOR = "philox4x32-10+box-muller/1"
#: The tested error bounds (units in the last place of the exact value) of the log and of cos/sin.
LOG_ULP = 2.5
SINCOS_ULP = 2.5

_MAX_U64 = (1 << 64) - 1
_MAX_I64 = (1 << 63) - 1
_LO32 = np.uint64(0xFFFFFFFF)
_PHILOX_M = (np.uint64(0xD2511F53), np.uint64(0xCD9E8D57))
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)

# The polynomials' coefficients: Taylor coefficients rounded to float64 from 200-bit values (the same
# literals as normal.cpp). log: 1/(2k+1), k = 9 .. 1. sin (pi/2 r): (-1)^k (pi/2)^(2k+1) / (2k+1)!,
# k = 7 .. 1, then k = 0 (pi/2). cos (pi/2 r): (-1)^k (pi/2)^(2k) / (2k)!, k = 8 .. 1.
_LOG_Q = tuple(float.fromhex(h) for h in (
    "0x1.af286bca1af28p-5", "0x1.e1e1e1e1e1e1ep-5", "0x1.1111111111111p-4", "0x1.3b13b13b13b14p-4",
    "0x1.745d1745d1746p-4", "0x1.c71c71c71c71cp-4", "0x1.2492492492492p-3", "0x1.999999999999ap-3",
    "0x1.5555555555555p-2"))
_SQRT2 = float.fromhex("0x1.6a09e667f3bcdp+0")
_LN2_HI = float.fromhex("0x1.62e42fefa3800p-1")  # 44 bits: e * _LN2_HI is exact for |e| < 2^9
_LN2_LO = float.fromhex("0x1.ef35793c76730p-45")
_SIN_P = tuple(float.fromhex(h) for h in (
    "-0x1.6fadb9f155744p-31", "0x1.e8f434d018d63p-25", "-0x1.e3074fde8871fp-19", "0x1.50783487ee782p-13",
    "-0x1.32d2cce62bd86p-8", "0x1.466bc6775aae2p-4", "-0x1.4abbce625be53p-1"))
_HALF_PI = float.fromhex("0x1.921fb54442d18p+0")
_COS_P = tuple(float.fromhex(h) for h in (
    "0x1.20c62c2f2d7f5p-34", "-0x1.b6e24f44b128fp-28", "0x1.f9d38a3763cc3p-22", "-0x1.a6d1f2a204a8cp-16",
    "0x1.e1f506891babbp-11", "-0x1.55d3c7e3cbffap-6", "0x1.03c1f081b5ac4p-2", "-0x1.3bd3cc9be45dep+0"))


@dataclass(frozen=True)
class NoiseStream:
    """One stream of smoothing noise: ``key`` (64 bits, derived from the certification seed and the
    stream's name and indices, :meth:`crfl.rng.CertificationSeed.noise_stream`) and ``generator``
    (:data:`GENERATOR`, the law and the bits it stands for). Model m's noise is :func:`fill_normal`'s row m."""

    key: int
    generator: str = GENERATOR

    def __post_init__(self) -> None:
        check_int("key", self.key, low=0, high=_MAX_U64)
        if self.generator != GENERATOR:
            raise ConfigError(f"The 'generator' parameter of NoiseStream must be {GENERATOR!r}. Got {self.generator!r} instead.")


# ---------------------------------------------------------------------------------------------
# the numpy reference (the kernel's bits)


def _philox(c: list[np.ndarray], key: int) -> list[np.ndarray]:
    """Philox4x32-10 of the counters c = [c0, c1, c2, c3] (uint64 arrays holding 32-bit words)."""
    c0, c1, c2, c3 = c
    k0, k1 = np.uint64(key & 0xFFFFFFFF), np.uint64(key >> 32)
    for _ in range(10):
        p0 = c0 * _PHILOX_M[0]  # 32 x 32 -> 64 bits, exact in uint64
        p1 = c2 * _PHILOX_M[1]
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & _LO32, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & _LO32
        k0 = np.uint64((int(k0) + _PHILOX_W[0]) & 0xFFFFFFFF)
        k1 = np.uint64((int(k1) + _PHILOX_W[1]) & 0xFFFFFFFF)
    return [c0, c1, c2, c3]


def _log(x: np.ndarray) -> np.ndarray:
    """log x for float64 x in [2^-53, 1]: x = 2^e m, m in [sqrt(1/2), sqrt(2)] (exact), log m =
    2 atanh(s), s = f / (2 + f), f = m - 1, by 2 s (1 + s^2/3 + ... + s^18/19), |s| <= 0.1716."""
    bits = np.ascontiguousarray(x, dtype=np.float64).view(np.uint64)
    e = (bits >> np.uint64(52)).astype(np.int64) - 1023
    m = ((bits & np.uint64(0x000FFFFFFFFFFFFF)) | np.uint64(0x3FF0000000000000)).view(np.float64)
    big = m > _SQRT2
    m = np.where(big, m * 0.5, m)
    e = np.where(big, e + 1, e)
    f = m - 1.0
    s = f / (2.0 + f)
    z = s * s
    q = z * _LOG_Q[0] + _LOG_Q[1]
    for a in _LOG_Q[2:]:
        q = q * z + a
    t = s * 2.0
    logm = t + t * (z * q)
    ed = e.astype(np.float64)
    return ed * _LN2_HI + (ed * _LN2_LO + logm)


def _sincos_turns(k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cos 2 pi u, sin 2 pi u) for u = k 2^-53 (uint64 k < 2^53): 4u = n + r exactly (integer
    arithmetic, r in [-1/2, 1/2)), then polynomials in r and the quadrant n mod 4."""
    k = np.asarray(k, dtype=np.uint64)
    n = (k + np.uint64(1 << 50)) >> np.uint64(51)
    r = (k.astype(np.int64) - (n << np.uint64(51)).astype(np.int64)).astype(np.float64) * 2.0 ** -51
    z = r * r
    sp = z * _SIN_P[0] + _SIN_P[1]
    for a in _SIN_P[2:]:
        sp = sp * z + a
    sn = r * _HALF_PI + (r * z) * sp
    cp = z * _COS_P[0] + _COS_P[1]
    for a in _COS_P[2:]:
        cp = cp * z + a
    cs = 1.0 + z * cp
    q = n & np.uint64(3)
    swap = (q & np.uint64(1)) != 0
    cm, sm = np.where(swap, sn, cs), np.where(swap, cs, sn)
    c = np.where(((q + np.uint64(1)) & np.uint64(2)) != 0, -cm, cm)
    s = np.where((q & np.uint64(2)) != 0, -sm, sm)
    return c, s


def _uniform1(w0: np.ndarray) -> np.ndarray:
    """u1 = ((w0 >> 11) + 1) 2^-53 in (0, 1] of 64-bit words w0: the + 1 keeps u1 = 0 (log u1 = -inf) out."""
    return ((np.asarray(w0, dtype=np.uint64) >> np.uint64(11)) + np.uint64(1)).astype(np.float64) * 2.0 ** -53


def _pairs(key: int, m: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The Box-Muller pairs (entries 2p, 2p + 1) of models m (uint64 arrays, broadcast together)."""
    m, p = np.broadcast_arrays(np.asarray(m, dtype=np.uint64), np.asarray(p, dtype=np.uint64))
    x = _philox([p & _LO32, p >> np.uint64(32), m & _LO32, m >> np.uint64(32)], key)
    w0 = x[0] | (x[1] << np.uint64(32))
    w1 = x[2] | (x[3] << np.uint64(32))
    rad = np.sqrt(_log(_uniform1(w0)) * -2.0 + 0.0)  # + 0.0: u1 = 1 gives +0, not -0
    c, s = _sincos_turns(w1 >> np.uint64(11))
    return rad * c, rad * s


def reference_normal(stream: NoiseStream, first_model: int, rows: int, D: int) -> np.ndarray:
    """The (rows, D) float64 noise of models first_model .. first_model + rows - 1, in numpy (the bits the
    kernel computes; the fallback where it cannot run)."""
    first_model, rows, D = _check(stream, first_model, rows, D)
    out = np.empty((rows, D), dtype=np.float64)
    pairs = np.arange((D + 1) // 2, dtype=np.uint64)
    block = max(1, (1 << 18) // max(1, len(pairs)))  # rows per block: ~2^18 pairs of temporaries
    for r0 in range(0, rows, block):
        r1 = min(rows, r0 + block)
        m = np.arange(first_model + r0, first_model + r1, dtype=np.uint64)[:, None]
        z0, z1 = _pairs(stream.key, m, pairs[None, :])
        both = np.empty((r1 - r0, 2 * len(pairs)), dtype=np.float64)
        both[:, 0::2], both[:, 1::2] = z0, z1
        out[r0:r1] = both[:, :D]
    return out


# ---------------------------------------------------------------------------------------------
# the kernel


#: The self-check of a freshly loaded kernel (:func:`_lib`): key, first model, rows, D. 129 entries are
#: two whole blocks of 32 pairs and a tail with a lone cos entry; models 2^32 - 1 and 2^32 change the
#: model counter's high word.
_SELF_CHECK = (0x243F6A8885A308D3, (1 << 32) - 1, 2, 129)
_lib_lock = threading.Lock()


def _declare(lib: ctypes.CDLL) -> None:
    u64, i64, P = ctypes.c_uint64, ctypes.c_int64, ctypes.c_void_p
    lib.normal_fill.argtypes, lib.normal_fill.restype = [u64, u64, i64, i64, P], None
    lib.normal_log.argtypes, lib.normal_log.restype = [P, P, i64], None
    lib.normal_sincos_turns.argtypes, lib.normal_sincos_turns.restype = [P, P, P, i64], None
    lib.normal_philox.argtypes, lib.normal_philox.restype = [P, u64, P, i64], None
    lib.normal_uniform1.argtypes, lib.normal_uniform1.restype = [P, P, i64], None


def _self_check(lib: ctypes.CDLL) -> bool:
    """Whether the kernel, as this machine's compiler built it, computes the reference's bits on
    :data:`_SELF_CHECK`'s rows (else the log says why the numpy reference runs instead)."""
    key, first, rows, D = _SELF_CHECK
    got = np.empty((rows, D), dtype=np.float64)
    lib.normal_fill(key, first, rows, D, got.ctypes.data)
    differ = int((got.view(np.uint64) != reference_normal(NoiseStream(key), first, rows, D).view(np.uint64)).sum())
    if differ:
        log.warning("the compiled noise kernel (crfl/kernels/normal.cpp) differs from the numpy reference in %d of "
                    "%d entries of its self-check on this machine (compiler or CPU); using the numpy reference "
                    "(the same noise, slower)", differ, rows * D)
    return differ == 0


def _lib() -> ctypes.CDLL | None:
    """The compiled kernel, once it has passed its self-check in this process; else None (numpy runs)."""
    lib = kernels.load("normal")
    if lib is None:
        return None
    with _lib_lock:
        verdict = getattr(lib, "_crfl_verdict", None)
        if verdict is None:
            _declare(lib)
            verdict = lib._crfl_verdict = _self_check(lib)
    return lib if verdict else None


def engine() -> str:
    """'compiled' (crfl/kernels/normal.cpp) or 'numpy' (the reference): which computes the noise here."""
    return "compiled" if _lib() is not None else "numpy"


def _index(name: str, value: object, high: int, allowed: str) -> int:
    value = int(value) if isinstance(value, np.integer) else value  # numpy indices too
    try:
        return check_int(name, value, low=0, high=high)
    except ConfigError:
        raise ConfigError(f"The '{name}' parameter must be {allowed}. Got {value!r} instead.") from None


def _check(stream: NoiseStream, first_model: int, rows: int, D: int) -> tuple[int, int, int]:
    """Validate the arguments. The limits are exact: rows, D and rows * D are tensor sizes (int64, as
    the kernel's arguments), so D < 2^63 and a row's pair index p < 2^62 never wraps its 64-bit counter;
    the models first_model .. first_model + rows - 1 must fit the model counter's 64 bits."""
    if not isinstance(stream, NoiseStream):
        raise ConfigError(f"The 'stream' parameter must be a crfl.noise.NoiseStream. Got {type(stream).__name__} instead.")
    rows = _index("rows", rows, _MAX_I64, "an integer in [0, 2^63 - 1] (a tensor dimension)")
    D = _index("D", D, _MAX_I64, "an integer in [0, 2^63 - 1] (a tensor dimension)")
    if rows * D > _MAX_I64:
        raise ConfigError(f"The 'rows' and 'D' parameters must have rows * D at most 2^63 - 1 (a tensor's size). "
                          f"Got rows = {rows}, D = {D} instead.")
    last = max(rows, 1)  # rows = 0: first_model is still a model index
    first_model = _index("first_model", first_model, (1 << 64) - last,
                         f"an integer in [0, 2^64 - {last}] (models first_model .. first_model + rows - 1 are "
                         f"numbered by the counter's 64 bits: first_model + rows <= 2^64)")
    return first_model, rows, D


def fill_normal(stream: NoiseStream, first_model: int, out: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """Write N(0, 1) float64 noise into ``out`` (rows, D): row r is the noise of model first_model + r,
    entry i a pure function of (stream.key, model, i). Rows are split over ``threads`` (default
    torch.get_num_threads(); :func:`crfl.kernels.parallel_for`); the bits do not depend on the split.
    ``out`` must be a contiguous float64 CPU tensor. Returns ``out``."""
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.dtype != torch.float64 \
            or out.device.type != "cpu" or not out.is_contiguous():
        got = f"{out.dtype} {tuple(out.shape)} on {out.device}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"The 'out' parameter must be a contiguous float64 CPU tensor of shape (rows, D). Got {got} instead.")
    first_model, rows, D = _check(stream, first_model, *out.shape)
    if rows == 0 or D == 0:
        return out
    lib = _lib()
    if lib is None:
        out.numpy()[:] = reference_normal(stream, first_model, rows, D)
        return out
    base = out.data_ptr()
    key = stream.key

    def work(lo: int, hi: int) -> None:
        lib.normal_fill(key, first_model + lo, hi - lo, D, base + lo * D * 8)

    kernels.parallel_for(rows, work, threads)
    return out


def normal(stream: NoiseStream, first_model: int, rows: int, D: int, threads: int | None = None) -> torch.Tensor:
    """A new (rows, D) float64 tensor of the noise of models first_model .. first_model + rows - 1."""
    first_model, rows, D = _check(stream, first_model, rows, D)  # before the allocation: one clear error
    return fill_normal(stream, first_model, torch.empty((rows, D), dtype=torch.float64), threads)
