"""Parameter smoothing (Section 4.2, Algorithm 2's ``GetCounts``) and exact smoothing for linear models.

The smoothed classifier of Eq. 1 is h_s(w; x) = argmax_c H_s^c(w; x) with
H_s^c(w; x) = P_{W ~ N(w, sigma_T^2 I)}[h(W; x) = c]: every parameter, bias
included, gets independent N(0, sigma_T^2) noise.

Monte Carlo (any model)
-----------------------
:func:`monte_carlo_counts_linear` and :func:`monte_carlo_counts_module` draw M
noisy parameter vectors w + sigma E, E ~ N(0, I), and count the predicted class
of each on each test point. The flat parameter layout is that of
``torch.nn.utils.parameters_to_vector`` (for a linear layer: the weight (C, d)
row-major, then the bias (C,)). The noise is drawn from the explicit generator,
one (m, D) block per chunk of m models, in chunk order, and reused over all
chunks of test points, so the counts depend on the generator's state, M,
``models_per_chunk`` and ``dtype`` but not on ``points_per_chunk``; the linear and
the module versions draw the same noise and give the same counts.

Exact smoothing (logistic regression)
-------------------------------------
For a linear model the noisy logits of an input x are exactly Gaussian:
(W_c + sigma E_c) x + b_c + sigma e_c = z_c + sigma (E_c . x + e_c), and
E_c . x + e_c ~ N(0, ||x||^2 + 1), independent across classes (disjoint noise
entries). So the noisy logits are z + s xi with z = W x + b,
s = sigma sqrt(||x||^2 + 1) and xi ~ N(0, I_C), and

    p_c = P[class c wins] = E_{t ~ N(0,1)} [ prod_{j != c} Phi(t + (z_c - z_j) / s) ].

All classes share the noise scale s, so the ranking of p_c is the ranking of z_c
(docs/theory.md (a)): c_A is the top logit, and the largest p_c over c != c_A is
the runner-up logit's. The 1-D integral is computed in log space (log_ndtr,
logsumexp, float64) with the trapezoidal rule on t_k = c + k h, |k| <= K, centred
near the integrand's mode c (so that tiny probabilities keep their relative
accuracy), with h and K chosen per number of classes C so that the rule's error
is at most ``QUADRATURE_TOL`` (discretization, Trefethen & Weideman 2014, Thm 5.1,
for a function analytic in a strip, plus truncation; see :func:`trapezoid_rule`).
Classes far behind (shift (z_c - z_j) / s >= ``PRUNE_SHIFT``) are left out of the
product, which changes p_c by less than 2e-20 each and makes confident points
cheap. On top of that a floating-point allowance gives ``QUAD_ERROR``, the
absolute error bound on each probability used for the certificate.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy import special

from crfl import closeness, exact_votes, kernels, progress
from crfl.validation import ConfigError, check_int, check_real
from crfl import noise
from crfl.noise import NoiseStream

__all__ = [
    "QUADRATURE_TOL",
    "QUAD_ERROR",
    "monte_carlo_counts_linear",
    "MC_FLIP_LIMIT",
    "votes_arithmetic",
    "monte_carlo_votes_linear",
    "vote_flip_probability",
    "monte_carlo_dtype",
    "monte_carlo_counts_module",
    "logit_noise_scale",
    "trapezoid_rule",
    "exact_class_probabilities",
    "exact_top_two",
    "exact_top_two_estimates",
    "exact_error_bound",
    "PRUNE_SHIFT",
    "MODE_SLACK",
    "TopTwo",
    "TopTwoEstimates",
]

QUADRATURE_TOL = 1e-15
"""Proven bound on the quadrature's absolute error (discretization + truncation), each probability."""

QUAD_ERROR = 1e-13
"""Total absolute error allowed on each exact probability: the proven quadrature and pruning error
(< 1.1e-15, :func:`exact_error_bound`) plus an allowance for float64 rounding of the log-space sum
(observed below 1e-15 against scipy.integrate.quad, tests/test_smoothing.py)."""

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
_TINY = float(np.finfo(np.float64).tiny)


# ---------------------------------------------------------------------------------------------
# validation


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN or infinite entry: one pass of aminmax (which propagates NaN), without a boolean copy of t."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def _check_linear(weight: torch.Tensor, bias: torch.Tensor, X: torch.Tensor) -> None:
    for name, t, nd in (("weight", weight, 2), ("bias", bias, 1), ("X", X, 2)):
        if not isinstance(t, torch.Tensor) or t.ndim != nd or not t.is_floating_point():
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ConfigError(f"The '{name}' parameter must be a {nd}-D floating point tensor. Got {shape} instead.")
    C, d = weight.shape
    if C < 2:
        raise ConfigError(f"The 'weight' parameter must have C >= 2 rows (classes). Got {C} instead.")
    if bias.shape[0] != C:
        raise ConfigError(f"The 'bias' parameter must have C = {C} entries. Got {bias.shape[0]} instead.")
    if X.shape[1] != d:
        raise ConfigError(f"The 'X' parameter must have d = {d} columns. Got {X.shape[1]} instead.")
    for name, t in (("weight", weight), ("bias", bias), ("X", X)):
        if not _all_finite(t):
            raise ConfigError(f"The '{name}' parameter must hold finite values. Got a non-finite entry instead.")


def _check_mc(
    sigma: float, M: int, generator: torch.Generator | NoiseStream, models_per_chunk: int, points_per_chunk: int
) -> tuple[float, int]:
    sigma = check_real("sigma", sigma, low=0.0, high=math.inf, high_open=True)
    M = check_int("M", M, low=1)
    check_int("models_per_chunk", models_per_chunk, low=1)
    check_int("points_per_chunk", points_per_chunk, low=1)
    if not isinstance(generator, (torch.Generator, NoiseStream)):
        raise ConfigError("The 'generator' parameter must be a torch.Generator or a crfl.noise.NoiseStream. "
                          f"Got {type(generator).__name__} instead.")
    return sigma, M


def _noise(m: int, D: int, generator: torch.Generator | NoiseStream, dtype: torch.dtype, device: torch.device,
           first_model: int = 0) -> torch.Tensor:
    """One (m, D) block of N(0, 1) noise for m models in the flat parameter layout.

    From a torch.Generator: the generator's next draw (its state advances). From a
    :class:`crfl.noise.NoiseStream`: the noise of models first_model .. first_model + m - 1 (a pure function of
    the stream and the model index, float64, rounded to ``dtype``)."""
    if isinstance(generator, NoiseStream):
        return noise.normal(generator, first_model, m, D).to(device=device, dtype=dtype)
    E = torch.randn((m, D), generator=generator, dtype=dtype, device=generator.device)
    return E.to(device)


def _count(pred: torch.Tensor, counts: torch.Tensor, start: int, C: int) -> None:
    """counts[start + i, c] += #{models with prediction c on point i}; pred is (n_chunk, m).

    One scatter-add of ones into the chunk's rows of the counts (no flattened copy of the predictions)."""
    n_c, m = pred.shape
    ones = torch.ones((1, 1), dtype=counts.dtype, device=counts.device).expand(n_c, m)
    counts[start : start + n_c].scatter_add_(1, pred.to(counts.device), ones)


def _addr(t: torch.Tensor, offset: int = 0) -> ctypes.c_void_p:
    """The address ``offset`` elements past ``t``'s first element (any strides), for a kernel argument."""
    return ctypes.c_void_p(t.data_ptr() + offset * t.element_size())


_I64 = ctypes.c_int64


@functools.cache
def _typed(lib: ctypes.CDLL) -> ctypes.CDLL:
    """The votes kernel (crfl/kernels/votes.cpp) with its argument types declared (once per library)."""
    P = ctypes.c_void_p
    for f in (lib.votes_f32, lib.votes_f64):
        f.argtypes, f.restype = [P, _I64, _I64, _I64, _I64, _I64, _I64, P], None
    D = ctypes.c_double
    lib.votes_mixed_f32.argtypes = [P, _I64, _I64, _I64, _I64, _I64, P, P, P, _I64, P, P, _I64, P]
    lib.votes_mixed_f32.restype = _I64
    lib.recompute_f64.argtypes = [P, P, P, _I64, P, P, P, P, D, _I64, _I64, P, P, P, P]
    lib.recompute_f64.restype = None
    lib.prep_mixed_f32.argtypes = [P, _I64, _I64, _I64, P, P, P, _I64, _I64, D, P, P, P, P]
    lib.prep_mixed_f32.restype = None
    lib.scan_points.argtypes = [P, _I64, _I64, _I64, P, P, P, P]
    lib.scan_points.restype = None
    return lib


def _votes_kernel() -> ctypes.CDLL | None:
    lib = kernels.load("votes")
    return None if lib is None else _typed(lib)


def _count_votes(logits: torch.Tensor, counts: torch.Tensor, start: int) -> None:
    """counts[start + i, argmax_c logits[i, j, c]] += 1 for every point i and model j: the votes of a block
    of logits (n_c, m, C) (any strides), the lowest class index on ties (torch.argmax's rule, NaN counting
    as the largest).

    One pass of the compiled kernel (crfl/kernels/votes.cpp) over the logits, split over threads by
    points, where it applies (CPU, float32/float64); fastest when the models' logits of a class are
    contiguous (stride 1 along the models: the class-major layout of the linear path). Else torch's
    argmax and a scatter-add (:func:`_count`). Both give the same counts."""
    n_c, m, C = logits.shape
    lib = _votes_kernel()
    if (lib is None or logits.device.type != "cpu" or logits.dtype not in (torch.float32, torch.float64)
            or not counts.is_contiguous() or n_c * m == 0):
        _count(logits.argmax(dim=-1), counts, start, C)
        return
    fn = lib.votes_f32 if logits.dtype == torch.float32 else lib.votes_f64
    sp, sj, sc = logits.stride()

    def run(lo: int, hi: int) -> None:
        fn(_addr(logits, lo * sp), hi - lo, m, C, sp, sj, sc, _addr(counts, (start + lo) * C))

    kernels.parallel_for(n_c, run)


#: points per product in the linear path with the votes kernel: each thread multiplies its own blocks of this
#: many points single-threaded and counts their votes at once, while the block's logits (256 x 2500 float32:
#: 2.5 MB) are still in its cache; no barrier between the product and the votes. Without the kernel (torch
#: path) the products are blocks of points_per_chunk points, multi-threaded by torch. The votes do not depend
#: on either size (docs/benchmarks.md, certification).
LINEAR_POINT_BLOCK = 128


# ---------------------------------------------------------------------------------------------
# Monte Carlo precision: the dtype whose rounding cannot change the votes (docs/theory.md (c))

MC_FLIP_LIMIT = 1e-5
"""The largest allowed M kappa: the probability that rounding changes any of the M votes on a point (the
Monte Carlo statement then holds with probability >= 1 - alpha - MC_FLIP_LIMIT)."""

_NOISE_TAIL = 10.0  # ||E_c|| <= sqrt(d + 1) + 10 except with probability exp(-50) per class and model


def vote_flip_probability(weight_norm: float, sigma: float, num_features: int, num_classes: int, dtype: torch.dtype) -> float:
    """kappa: the probability that one noisy model's computed argmax differs from its exact-arithmetic argmax.

    The noisy logits of x are z~ = (W + sigma E) x~ (x~ = [x; 1]); computed in a dtype of unit roundoff u (the
    sum fl(W + sigma E) and a length-(d + 1) product), each is within e = gamma_{d+3} ||w_c + sigma E_c|| ||x~||
    of the exact one, ||w_c + sigma E_c|| <= ||w|| + sigma (sqrt(d + 1) + 10) except with probability
    C exp(-50). The argmax changes only if some pair of exact noisy logits is within 2e; z~_c - z~_j is
    N(z_c - z_j, 2 s^2), s = sigma ||x~||, whose density is <= 1 / (2 s sqrt(pi)), so each of the C(C-1)/2 pairs
    has probability <= 2e / (s sqrt(pi)):

        kappa <= C (C - 1) gamma_{d+3} (||w|| / sigma + sqrt(d + 1) + 10) / sqrt(pi) + C exp(-50),

    independent of x. inf where it cannot be bounded (sigma = 0, or (d + 3) u >= 1).
    """
    if sigma <= 0:
        return math.inf
    u = closeness.unit_roundoff(dtype)
    n = num_features + 3
    if n * u >= 1.0:
        return math.inf
    gam = closeness.gamma_n(n, u)
    C = num_classes
    return C * (C - 1) * gam * (weight_norm / sigma + math.sqrt(num_features + 1.0) + _NOISE_TAIL) / math.sqrt(math.pi) \
        + C * math.exp(-_NOISE_TAIL ** 2 / 2.0)


def smallest_sigma(weight_norm: float, M: int, num_features: int, num_classes: int, dtype: torch.dtype) -> float:
    """The smallest sigma_T at which M kappa <= MC_FLIP_LIMIT in the dtype (inf when no sigma_T is small enough)."""
    base = M * (vote_flip_probability(weight_norm, 1.0, num_features, num_classes, dtype))
    per_unit = M * (vote_flip_probability(weight_norm + 1.0, 1.0, num_features, num_classes, dtype)) - base  # d/d(||w||/sigma)
    rest = base - per_unit * weight_norm
    if per_unit <= 0 or rest >= MC_FLIP_LIMIT:
        return math.inf
    return weight_norm * per_unit / (MC_FLIP_LIMIT - rest)


def monte_carlo_dtype(weight_norm: float, sigma: float, M: int, num_features: int, num_classes: int) -> torch.dtype:
    """float32 when its rounding changes none of the M votes on a point except with probability <= MC_FLIP_LIMIT
    (:func:`vote_flip_probability`), else float64 when that does; else a ConfigError naming certify.sigma_T, its
    value and the smallest allowed. sigma = 0 (no noise: the base model's votes) counts in float64."""
    if sigma == 0:
        return torch.float64
    if sigma < 2.0 ** -900:  # fl(sigma e) could underflow: rounding is then absolute, outside kappa's proof
        raise ConfigError(f"The 'certify.sigma_T' parameter is too small for Monte Carlo counts: sigma_T = {sigma:.3g} "
                          f"is near float64's underflow. Use certify.sigma_T >= {2.0 ** -900:.3g} (or 0), or method exact.")
    for dt in (torch.float32, torch.float64):
        if M * vote_flip_probability(weight_norm, sigma, num_features, num_classes, dt) <= MC_FLIP_LIMIT:
            return dt
    low = smallest_sigma(weight_norm, M, num_features, num_classes, torch.float64)
    raise ConfigError(
        f"The 'certify.sigma_T' parameter is too small for Monte Carlo counts: with sigma_T = {sigma:.3g}, ||w|| = "
        f"{weight_norm:.4g} and M = {M}, float64 rounding could change a vote with probability above "
        f"{MC_FLIP_LIMIT:g} per point. Use certify.sigma_T >= {low:.3g}"
        + (", or method exact for a linear model." if math.isfinite(low) else " (no sigma_T is: lower certify.M), or method exact.")
    )


# ---------------------------------------------------------------------------------------------
# Monte Carlo


def _votes(
    noisy_model: Callable[[torch.Tensor], Callable[[int, int, torch.Tensor], None]],
    n: int, C: int, D: int, M: int, generator: torch.Generator | NoiseStream, dtype: torch.dtype, device: torch.device,
    models_per_chunk: int, points_per_chunk: int,
) -> torch.Tensor:
    """The chunk loops of ``GetCounts``, shared by the linear and the module versions.

    The M noisy models come in chunks of ``models_per_chunk``: for each chunk one (m, D) block
    of N(0, 1) noise E is drawn from ``generator`` (in ``dtype``, moved to ``device``) and
    ``noisy_model(E)`` gives the chunk's vote counter, which adds the chunk's votes on points
    [n0, n1) (at most ``points_per_chunk`` of them) into the (n, C) counts. Returns the (n, C)
    int64 counts of the argmax predictions. The draw and ``noisy_model(E)`` of chunk k + 1 run on
    a helper thread while chunk k's votes are counted, so ``noisy_model`` must not touch the counts.
    """
    counts = torch.zeros((n, C), dtype=torch.int64, device=device)
    starts = list(range(0, M, models_per_chunk))
    def prepare(m0: int) -> Callable[[int, int, torch.Tensor], None]:
        with torch.no_grad():
            return noisy_model(_noise(min(models_per_chunk, M - m0), D, generator, dtype, device, first_model=m0))

    # the next chunk's noise and noisy model are made on a helper thread while this chunk's votes are counted
    # (torch's normal sampler is serial); the draws stay in chunk order from the one generator: the same noise
    with torch.no_grad(), progress.bar(M, "Monte Carlo", unit="noisy models") as bar, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="crfl-noise") as helper:
        pending = helper.submit(prepare, starts[0])
        for i, m0 in enumerate(starts):
            add_votes = pending.result()
            if i + 1 < len(starts):
                pending = helper.submit(prepare, starts[i + 1])
            for n0 in range(0, n, points_per_chunk):
                add_votes(n0, min(n, n0 + points_per_chunk), counts)
            bar.update(min(M, m0 + models_per_chunk), f"{n} points")
    return counts


_Fill = Callable[[int, torch.Tensor], None]


def _counter_noise(generator: torch.Generator | NoiseStream) -> _Fill | None:
    """fill(first_model, out) writing the float64 noise rows of models first_model, first_model + 1, ... into
    ``out`` (single-threaded) where the noise source is counter-based (a :class:`crfl.noise.NoiseStream`: any row
    range can be written by any thread, the rows :func:`_noise` gives); None for a torch.Generator (one
    sequential draw per chunk)."""
    if not isinstance(generator, NoiseStream):
        return None
    return lambda first, out: noise.fill_normal(generator, first, out, threads=1)


def _single_threaded_products(work: Callable[[int], None]) -> None:
    """work(threads) with torch's intra-op threads set to 1 for its duration: ``work`` splits its points over
    ``threads`` Python threads (crfl.kernels.parallel_for), each running its own single-threaded products."""
    threads = torch.get_num_threads()
    if threads == 1:
        work(1)
        return
    torch.set_num_threads(1)
    try:
        work(threads)
    finally:
        torch.set_num_threads(threads)


def _float32_products_are_ieee() -> bool:
    """True when float32 products run in IEEE float32 (no TF32/bf16 shortcuts a setting could turn on): torch's
    matmul precision, oneDNN's fp32 precision, and MKL's alternate compute modes (the MKL_BLAS_COMPUTE_MODE
    environment variable may let MKL's sgemm, behind torch.mm and the packed products, round to bfloat16/TF32)."""
    if torch.get_float32_matmul_precision() != "highest":
        return False
    if os.environ.get("MKL_BLAS_COMPUTE_MODE", "").strip().upper() not in ("", "STANDARD"):
        return False
    # gradual underflow (no flush-to-zero / denormals-are-zero, e.g. torch.set_flush_denormal(True)): the proof's
    # absolute underflow allowances assume it (docs/theory.md (c), side conditions)
    for v, dt in ((2.0 ** -1070, torch.float64), (2.0 ** -140, torch.float32)):  # a subnormal of each dtype
        if float(torch.tensor(v, dtype=dt) * torch.tensor(1.0, dtype=dt)) != v:
            return False
    mk = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    return getattr(mk, "fp32_precision", "none") in ("none", "ieee")


_CBLAS_ROW_MAJOR, _CBLAS_NO_TRANS, _CBLAS_TRANS, _CBLAS_PACKED, _CBLAS_B_MATRIX = 101, 111, 112, 151, 162


@functools.cache
def _mkl_packed() -> ctypes.CDLL | None:
    """MKL's packed float32 product (cblas_sgemm_pack / cblas_sgemm_compute), where torch's own CPU library
    exports it (torch built with MKL, as the x86-64 wheels are); None elsewhere, or with CRFL_MKL_PACKED=0.

    The mixed votes multiply every block of points by the same chunk of noisy weights: packed once per chunk,
    the weights are not re-packed by every block's product (about 15% of torch.mm's time at these shapes,
    docs/benchmarks.md). The same IEEE float32 sgemm as torch.mm's (docs/theory.md (c): any summation order)."""
    if os.environ.get("CRFL_MKL_PACKED", "1") == "0" or not torch.backends.mkl.is_available():
        return None
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        I, P = ctypes.c_int, ctypes.c_void_p  # MKL_INT: 32 bits (the LP64 interface these symbols are)
        lib.cblas_sgemm_pack_get_size.argtypes, lib.cblas_sgemm_pack_get_size.restype = [I, I, I, I], ctypes.c_size_t
        lib.cblas_sgemm_pack.argtypes = [I, I, I, I, I, I, ctypes.c_float, P, I, P]
        lib.cblas_sgemm_pack.restype = None
        lib.cblas_sgemm_compute.argtypes = [I, I, I, I, I, I, P, I, P, I, ctypes.c_float, P, I]
        lib.cblas_sgemm_compute.restype = None
    except (OSError, AttributeError):
        return None
    return lib if _packed_product_checks(lib) else None


def pack_operand(lib: ctypes.CDLL, B: torch.Tensor, rows: int, into: torch.Tensor | None = None) -> torch.Tensor:
    """MKL's packed form of B^T for B a contiguous float32 (n, k) (the votes' operand: one row per class and
    model), for products with blocks of ``rows`` rows (cblas_sgemm_pack: the same floats, laid out for MKL's
    kernels); into ``into`` where it is large enough, else a new buffer."""
    n, k = B.shape
    size = lib.cblas_sgemm_pack_get_size(_CBLAS_B_MATRIX, rows, n, k)
    if into is None or into.numel() * 4 < size:
        into = torch.empty(size // 4 + 16, dtype=torch.float32)
    lib.cblas_sgemm_pack(_CBLAS_ROW_MAJOR, _CBLAS_B_MATRIX, _CBLAS_TRANS, rows, n, k, 1.0, B.data_ptr(), k,
                         into.data_ptr())
    return into


def packed_product(lib: ctypes.CDLL, a_at: int, rows: int, packed_at: int, n: int, k: int, out_at: int) -> None:
    """out (rows, n) = A (rows, k) B^T at the addresses given (row-major, contiguous), B^T packed by
    :func:`pack_operand` for blocks of ``rows`` rows (cblas_sgemm_compute)."""
    lib.cblas_sgemm_compute(_CBLAS_ROW_MAJOR, _CBLAS_NO_TRANS, _CBLAS_PACKED, rows, n, k, a_at, k, packed_at, k, 0.0,
                            out_at, n)


def _packed_product_checks(lib: ctypes.CDLL) -> bool:
    """One small packed product with integer entries (exact in float32, in any order) equals torch.mm's: the
    symbols take the arguments as declared here (a 32-bit MKL_INT, row-major, the packed identifiers)."""
    m, n, k = LINEAR_POINT_BLOCK, 24, 37
    g = torch.Generator().manual_seed(0)
    A = torch.randint(-8, 9, (m, k), generator=g).float()
    B = torch.randint(-8, 9, (n, k), generator=g).float()  # the operand as the votes lay it out: rows of B^T
    if not 0 < lib.cblas_sgemm_pack_get_size(_CBLAS_B_MATRIX, m, n, k) < 1 << 30:
        return False
    packed, out = pack_operand(lib, B, m), torch.full((m, n), math.nan, dtype=torch.float32)
    packed_product(lib, A.data_ptr(), m, packed.data_ptr(), n, k, out.data_ptr())
    return bool(torch.equal(out, A @ B.T))


#: at most this many votes (over all chunks of one count) go to exact integer arithmetic (about 5 ms each); more
#: means sigma_T is so small that near ties are common even in float64, and the count is refused (ConfigError)
EXACT_PAIR_LIMIT = 20_000


def votes_arithmetic(device: torch.device | str = "cpu") -> str:
    """How a linear model's Monte Carlo votes are computed here: 'exact' (the compiled votes kernel's proven
    margins, float64 and integer arithmetic for near ties: docs/theory.md (c)) or 'float64' (torch; a vote may
    differ from the exact one with probability <= MC_FLIP_LIMIT / M, else sigma_T is refused)."""
    return "exact" if _mixed_votes_kernel(torch.device(device)) is not None else "float64"


def _mixed_votes_kernel(device: torch.device) -> ctypes.CDLL | None:
    """The votes kernel where exact (mixed float32/float64) votes can run: CPU tensors, the compiled kernel and
    IEEE float32 products; else None."""
    lib = _votes_kernel() if device.type == "cpu" else None
    return lib if lib is not None and _float32_products_are_ieee() else None


def _linear_votes(
    weight: torch.Tensor, bias: torch.Tensor, X: torch.Tensor, sigma: float, M: int, generator: torch.Generator | NoiseStream,
    models_per_chunk: int, points_per_chunk: int, dtype: torch.dtype | None, mixed: bool | None = None,
    info: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, int, int]:
    """:func:`monte_carlo_counts_linear`, and how many (point, model) votes the mixed path took from float64
    logits and from exact arithmetic (0, 0 where it does not run). ``mixed`` None: the mixed path runs where it
    applies (float64 counts, the compiled votes kernel, a CPU tensor and IEEE float32 products); False: never."""
    _check_linear(weight, bias, X)
    sigma, M = _check_mc(sigma, M, generator, models_per_chunk, points_per_chunk)
    (C, d), n = weight.shape, X.shape[0]
    device = weight.device
    lib = _votes_kernel() if device.type == "cpu" else None
    mixed_ok = _mixed_votes_kernel(device) is not None
    w_norm = float(torch.linalg.vector_norm(torch.cat([weight.double().flatten(), bias.double()])))
    default = dtype is None
    if default:
        # float64 noise; exact votes where the mixed path runs, else float64 votes if their rounding cannot
        # change a vote except with probability <= MC_FLIP_LIMIT (a ConfigError naming certify.sigma_T otherwise)
        dtype = torch.float64
        if not (mixed is not False and mixed_ok):
            monte_carlo_dtype(w_norm, sigma, M, d, C)
    W, b = weight.to(dtype).contiguous(), bias.to(dtype).contiguous()
    Xd = X.to(device=device, dtype=dtype).contiguous()
    if mixed is None:
        mixed = dtype == torch.float64 and mixed_ok
    if mixed and lib is None:
        raise ConfigError("The 'mixed' parameter needs the compiled votes kernel (crfl/kernels/votes.cpp) and CPU "
                          "tensors; the kernel is not available here (CRFL_KERNELS=0, no C++ compiler, or another device).")
    stats: list[tuple[int, int]] = []  # (float64, exact) per kernel call (list.append is atomic across threads)
    if mixed:
        # one compiled pass over the points (votes.cpp, scan_points): their float32 copy, px = ||[x; 1]|| (as
        # exact_votes.logit_error_scales), the number of nonzero features (only those terms of a logit carry
        # roundings) and whether every nonzero |x| is in [FLT_MIN, 1e37] (it converts to float32 with a relative
        # error: no underflow to a subnormal, no overflow; docs/theory.md (c), side conditions)
        # [fl32(x), 1]: the bias is the product's last term; rows up to a whole number of point blocks (zeros past
        # n), so that every block's product has the same shape (the packed products' requirement)
        n_pad = -(-n // LINEAR_POINT_BLOCK) * LINEAR_POINT_BLOCK
        X32 = torch.empty((n_pad, d + 1), dtype=torch.float32)
        X32[n:].zero_()
        px, terms = torch.empty(n, dtype=torch.float64), torch.empty(n, dtype=torch.int64)
        bad_x = torch.zeros(n, dtype=torch.int32)
        kernels.parallel_for(n, lambda lo, hi: lib.scan_points(_addr(Xd), lo, hi, d, _addr(X32), _addr(px),
                                                               _addr(terms), _addr(bad_x)))
        thr32 = exact_votes.margin_threshold(px, terms, torch.float32).contiguous()
        thr64 = exact_votes.margin_threshold(px, terms, torch.float64).contiguous()
        x_max = float(px.max()) if n else 0.0
        # gamma_{k+5} exists in float32 for every point, and its features are in float32's range
        mixed = bool(torch.isfinite(thr32).all()) and not bool(bad_x.any())
        if default and not mixed:
            monte_carlo_dtype(w_norm, sigma, M, d, C)  # float64 votes after all: their rounding must be resolved
    exact_pairs = [0]  # votes the margins left to exact arithmetic, over all chunks so far
    rounded = [not mixed]  # some votes came from float64 (or float32) argmaxes, not proven exact

    if mixed:  # ||[w_c; b_c]|| per class, for the per-model error scales pm (exact_votes.logit_error_scales)
        w_norms = torch.linalg.vector_norm(torch.cat([W, b.unsqueeze(1)], dim=1), dim=1).contiguous()

    def prepare_mixed(E: torch.Tensor, fill: _Fill | None = None, m0: int = 0, into: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """One compiled pass over the chunk's noise (crfl/kernels/votes.cpp, prep_mixed_f32): the float32
        class-major operands fl32(fl64(w + fl64(sigma e))) (row c m + j: class c of model j), the per-model error
        scales pm, and whether the chunk meets the side conditions of exact votes from float32 logits: every
        nonzero noisy weight in [FLT_MIN, 1e37], no float32 logit can overflow (max pm * max px <= 1e37) and
        fl64(sigma e) does not underflow (docs/theory.md (c)). No float64 noisy weights are kept. Without ``fill``:
        one thread over E as drawn. With ``fill`` (counter-based noise): the threads each write the noise rows of
        their share of the models (models m0 + lo .. m0 + hi - 1) into E and prepare them at once. ``into``: a
        float32 buffer of at least C m (d + 1) entries for the operands (reused from chunk to chunk)."""
        m = E.shape[0]
        # row c m + j: [fl32(w~_c), fl32(b~_c)] of model j
        Wcm = (torch.empty((C * m, d + 1), dtype=torch.float32) if into is None
               else into.view(-1)[: C * m * (d + 1)].view(C * m, d + 1))
        pm, e_min = torch.empty(m, dtype=torch.float64), torch.empty(m, dtype=torch.float64)
        bad = torch.empty(m, dtype=torch.int32)

        def work(lo: int, hi: int) -> None:
            if fill is not None:
                fill(m0 + lo, E[lo:hi])
            lib.prep_mixed_f32(_addr(E), m, lo, hi, _addr(W), _addr(b), _addr(w_norms), C, d, sigma, _addr(Wcm),
                               _addr(pm), _addr(e_min), _addr(bad))

        if fill is None:
            work(0, m)
        else:
            _single_threaded_products(lambda threads: kernels.parallel_for(m, work, threads=threads))
        ok = (not bool(bad.any()) and float(pm.max()) * x_max <= 1e37
              and (sigma == 0.0 or sigma * float(e_min.min()) >= 2.0 * _DBL_MIN))
        return Wcm, pm, ok

    mkl = _mkl_packed() if mixed else None
    packed_buf: list[torch.Tensor] = []  # MKL's packed copy of a chunk's float32 operands (reused from chunk to chunk)

    def pack(Wcm: torch.Tensor, reuse: bool) -> torch.Tensor:
        """The chunk's operand packed for blocks of LINEAR_POINT_BLOCK points (:func:`pack_operand`). ``reuse``:
        into the buffer of the previous chunk (only where chunks run one after another: not while a helper thread
        prepares the next)."""
        packed_buf[:] = [pack_operand(mkl, Wcm, LINEAR_POINT_BLOCK, packed_buf[0] if reuse and packed_buf else None)]
        return packed_buf[0]

    def noisy_model(E: torch.Tensor, fill: _Fill | None = None, m0: int = 0, into: torch.Tensor | None = None
                    ) -> Callable[[int, int, torch.Tensor], None]:
        m = E.shape[0]
        here = False
        if mixed:
            E = E.contiguous()
            Wcm, pm, here = prepare_mixed(E, fill, m0, into)
            if not here:  # this chunk's votes come from float64 logits, not proven exact
                rounded[0] = True
                if default:
                    monte_carlo_dtype(w_norm, sigma, M, d, C)
        packed = pack(Wcm, reuse=fill is not None) if here and mkl is not None else None  # (held by add_votes)
        if not here:  # float64 (or float32 counts') products of the noisy weights, torch's arithmetic
            Wn = W.unsqueeze(0) + sigma * E[:, : C * d].view(m, C, d)  # (m, C, d), contiguous
            bn = b.unsqueeze(0) + sigma * E[:, C * d :]  # (m, C)
            # the product's columns class-major (column c m + j: class c of model j), so that each class's logits
            # of the m models are contiguous for the votes kernel; a layout, not a change of any logit's terms
            Wcm = torch.empty((C, m, d), dtype=dtype, device=device).copy_(Wn.transpose(0, 1)).view(C * m, d)
            bcm = bn.T.to(dtype).reshape(1, C * m)

        def logits(n0: int, n1: int) -> torch.Tensor:  # (n1 - n0, C m), row p: [class 0 of models 0..m-1, ...]
            return torch.addmm(bcm, Xd[n0:n1], Wcm.T)  # (not here: float64 or float32 counts' products)

        if lib is None:  # the torch path: one multi-threaded product per block, torch.argmax, a scatter-add
            def add_torch(n0: int, n1: int, counts: torch.Tensor) -> None:
                _count_votes(logits(n0, n1).view(n1 - n0, C, m).transpose(1, 2), counts, n0)

            return add_torch
        votes_fn = lib.votes_f32 if Wcm.dtype == torch.float32 else lib.votes_f64

        def add_votes(n0: int, n1: int, counts: torch.Tensor) -> None:
            near_ties: list[torch.Tensor] = []  # per thread: the pairs even float64 leaves to exact arithmetic
            blocks, lock = iter(range(n0, n1, LINEAR_POINT_BLOCK)), threading.Lock()

            def run(_lo: int, _hi: int) -> None:  # one per thread: takes the next block of points until none is left
                if not here:
                    while (a := next_block()) is not None:
                        z = min(n1, a + LINEAR_POINT_BLOCK)
                        L = logits(a, z)  # (held while the kernel reads it)
                        votes_fn(_addr(L), z - a, m, C, m * C, 1, m, _addr(counts, a * C))
                    return
                # this thread's buffers: the block's products, the pending pairs and their candidate classes (a new
                # pair of buffers when one is full); the kernel's arguments as plain addresses, so that a block costs
                # no torch operation besides its product (Python work holds the GIL the other thread may need)
                buf = torch.empty((LINEAR_POINT_BLOCK, C * m), dtype=torch.float32)
                cap = 4 * LINEAR_POINT_BLOCK * m
                pending, cand = torch.empty(cap, dtype=torch.int64), torch.empty(cap, dtype=torch.int64)  # cand: uint64
                used, done, left = 0, ctypes.c_int64(0), []
                thr_at, cnt_at, pm_at = thr32.data_ptr(), counts.data_ptr(), ctypes.c_void_p(pm.data_ptr())
                x_at, buf_at, packed_at = X32.data_ptr(), buf.data_ptr(), None if packed is None else packed.data_ptr()
                while (a := next_block()) is not None:
                    z = min(n1, a + LINEAR_POINT_BLOCK)
                    # float32 logits: one torch.mm with the bias as the (d + 1)-th term (an addmm would first copy
                    # the bias into the output); each vote whose float32 top-two gap proves it exact, the rest pending
                    if packed_at is not None:  # the whole block (X32's rows past n are zeros): MKL's packed product
                        packed_product(mkl, x_at + a * (d + 1) * 4, LINEAR_POINT_BLOCK, packed_at, C * m, d + 1, buf_at)
                        lp = buf_at
                    else:
                        lp = torch.mm(X32[a:z], Wcm.T, out=buf[: z - a]).data_ptr()  # (buf holds the products)
                    p0 = a
                    while p0 < z:
                        k = lib.votes_mixed_f32(
                            ctypes.c_void_p(lp + (p0 - a) * m * C * 4), z - p0, m, C, m * C, m,
                            ctypes.c_void_p(thr_at + p0 * 8), pm_at, ctypes.c_void_p(cnt_at + p0 * C * 8), p0,
                            ctypes.c_void_p(pending.data_ptr() + used * 8), ctypes.c_void_p(cand.data_ptr() + used * 8),
                            cap - used, ctypes.byref(done))
                        used, p0 = used + k, p0 + done.value
                        if p0 < z:  # the buffers are full: keep them, go on in new ones
                            left.append((pending[:used], cand[:used]))
                            pending, cand, used = torch.empty(cap, dtype=torch.int64), torch.empty(cap, dtype=torch.int64), 0
                left.append((pending[:used], cand[:used]))
                settle(left)

            def settle(left: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
                """This thread's pending pairs (its own points: no other thread adds into their counts) get the
                float64 logits of their candidate classes, sorted by model so that each model's noise row is read
                into the cache once; the votes they prove are added, the near ties even in float64 kept for exact
                arithmetic. Run by each thread as soon as it finds no more blocks (no barrier before it)."""
                pend, cnd = torch.cat([p for p, _ in left]), torch.cat([c for _, c in left])
                order = torch.argsort(pend % m, stable=True)
                pend, cnd = pend[order], cnd[order].contiguous()
                pts, mods = (pend // m).contiguous(), (pend % m).contiguous()
                won = torch.empty_like(pts)
                if pts.numel():
                    lib.recompute_f64(_addr(pts), _addr(mods), _addr(cnd), pts.numel(), _addr(Xd), _addr(W), _addr(b),
                                      _addr(E), sigma, C, d, _addr(thr64), _addr(pm), _addr(won), _addr(counts))
                ties = pend[won < 0]
                stats.append((int(pend.numel()), int(ties.numel())))
                near_ties.append(ties)

            def next_block() -> int | None:  # blocks handed out in turn: a thread slowed by another process takes fewer
                with lock:
                    return next(blocks, None)

            _single_threaded_products(lambda threads: kernels.parallel_for(threads, run, threads=threads))
            # the near ties even in float64: exact arithmetic (crfl.exact_votes)
            pairs = torch.cat(near_ties) if near_ties else torch.zeros(0, dtype=torch.int64)
            exact_pairs[0] += int(pairs.numel())
            if exact_pairs[0] > EXACT_PAIR_LIMIT:
                raise ConfigError(
                    f"The 'certify.sigma_T' parameter is too small for Monte Carlo counts in reasonable time: with "
                    f"sigma_T = {sigma:.3g} more than {EXACT_PAIR_LIMIT} votes are near ties even in float64 and would "
                    "each need exact integer arithmetic. Use a larger certify.sigma_T, or method exact for a linear model.")
            if pairs.numel():
                pts, mods = pairs // m, pairs % m
                votes = exact_votes.exact_noisy_argmax(W, b, sigma, E[mods], Xd[pts])
                counts.index_put_((pts, votes), torch.ones_like(votes), accumulate=True)

        return add_votes

    fill = _counter_noise(generator) if mixed else None
    if fill is not None:
        # counter-based noise (any model's rows can be written by any thread): per chunk, the worker threads
        # write and prepare their share of the models' noise, then take the chunk's blocks of points; no helper
        # thread. The same noise rows as _noise gives, so the same counts. One chunk at a time: the noise and the
        # operands' buffers are reused (no fresh pages to fault in per chunk).
        counts = torch.zeros((n, C), dtype=torch.int64, device=device)
        mc = min(models_per_chunk, M)
        E_buf = torch.empty((mc, C * d + C), dtype=torch.float64)
        W_buf = torch.empty(C * mc * (d + 1), dtype=torch.float32)
        with torch.no_grad(), progress.bar(M, "Monte Carlo", unit="noisy models") as bar:
            for m0 in range(0, M, models_per_chunk):
                m = min(models_per_chunk, M - m0)
                noisy_model(E_buf[:m], fill, m0, W_buf)(0, n, counts)
                bar.update(m0 + m, f"{n} points")
    else:
        # the kernel path takes all points of a chunk in one pass (blocks handed to the threads in turn: no barrier
        # between blocks); the counts do not depend on points_per_chunk
        counts = _votes(noisy_model, Xd.shape[0], C, C * d + C, M, generator, dtype, device, models_per_chunk,
                        max(1, n) if lib is not None else points_per_chunk)
    if info is not None:
        info["votes"] = "exact" if not rounded[0] else str(dtype).replace("torch.", "")
    return counts, sum(r for r, _ in stats), sum(k for _, k in stats)


_DBL_MIN = 2.0 ** -1022


def monte_carlo_votes_linear(
    weight: torch.Tensor, bias: torch.Tensor, X: torch.Tensor, sigma: float, M: int, generator: torch.Generator | NoiseStream,
    **kw: Any,
) -> tuple[torch.Tensor, str]:
    """:func:`monte_carlo_counts_linear` and how its votes were computed: 'exact' (every vote proven the exact vote
    of its noisy model, docs/theory.md (c)) or the dtype of the argmaxes ('float64': a vote may differ from the
    exact one with probability <= MC_FLIP_LIMIT / M). What summary.json's ``smoothing.votes`` records."""
    info: dict[str, Any] = {}
    counts, _, _ = _linear_votes(weight, bias, X, sigma, M, generator, kw.pop("models_per_chunk", 250),
                                 kw.pop("points_per_chunk", 2048), kw.pop("dtype", None), info=info, **kw)
    return counts, info["votes"]


def monte_carlo_counts_linear(
    weight: torch.Tensor, bias: torch.Tensor,  # the model
    X: torch.Tensor, sigma: float, M: int, generator: torch.Generator | NoiseStream,  # GetCounts' inputs
    *,
    models_per_chunk: int = 250,
    points_per_chunk: int = 2048,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Algorithm 2's ``GetCounts`` for a linear model: votes of M noisy models on every point.

    Args:
        weight: (C, d), bias: (C,): the model Clip_{rho_T}(w_T).
        X: (n, d) inputs in the model's input scale.
        sigma: smoothing noise sigma_T >= 0, added to every parameter (bias included).
        M: number of noisy models.
        generator: the only source of randomness: a torch.Generator (one draw per chunk, in chunk order) or a
            crfl.noise.NoiseStream (model j's noise a function of the stream and j; with the compiled votes
            kernel the worker threads write each chunk's rows).
        models_per_chunk, points_per_chunk: work sizes; memory is
            O(models_per_chunk * (C d + points_per_chunk * C)) (the compiled path takes the points in blocks of
            LINEAR_POINT_BLOCK instead of points_per_chunk).
        dtype: precision of the noise and votes; None (default): float64 noise and exact votes where the
            compiled votes kernel runs (:func:`votes_arithmetic`, below), else float64 votes when their rounding
            changes no vote except with probability <= MC_FLIP_LIMIT per point (:func:`monte_carlo_dtype`; a
            ConfigError naming certify.sigma_T when it cannot). A given dtype is used as it is.

    Float64 counts come from float32 products where the compiled votes kernel is available
    (docs/theory.md (c), "Float32 logits, exact votes"): a vote is taken from the float32 logits
    only when their top-two gap exceeds the proven bound on twice their rounding error
    (:func:`crfl.exact_votes.margin_threshold`), else from the float64 logits of the classes that
    can still win under the same test in float64, else (near ties even in float64) from exact
    integer arithmetic (:func:`crfl.exact_votes.exact_noisy_argmax`). Every vote is then the exact
    vote of its noisy model; they equal the float64 products' votes except where float64 rounding
    could flip one (the event :func:`vote_flip_probability` bounds). ``CRFL_KERNELS=0`` computes
    every logit in float64 with torch.

    Returns:
        (n, C) int64 counts; each row sums to M. The prediction of a noisy model is the
        argmax of its logits (the lowest class index on exact ties).
    """
    return _linear_votes(weight, bias, X, sigma, M, generator, models_per_chunk, points_per_chunk, dtype)[0]


def monte_carlo_counts_module(
    module: torch.nn.Module, flat_params: torch.Tensor,  # the model
    X: torch.Tensor, sigma: float, M: int, generator: torch.Generator | NoiseStream,  # GetCounts' inputs
    *,
    models_per_chunk: int = 64,
    points_per_chunk: int = 4096,
) -> torch.Tensor:
    """``GetCounts`` for any ``nn.Module`` evaluated at the flat parameters ``flat_params``.

    The noisy parameter vectors of one chunk, flat_params + sigma E (E: (m, D) in the
    ``parameters_to_vector`` layout of ``module.parameters()``), are split into the
    module's parameter shapes and evaluated together with
    ``torch.vmap(torch.func.functional_call)``; the only Python loops are over chunks
    of models and of points. The module's buffers are used as they are, and it should be
    in eval mode; randomness inside the module (dropout in train mode) is refused by
    vmap, since no global RNG may be used. Noise is drawn in ``flat_params.dtype``.

    For ``nn.Linear`` this gives the same counts as :func:`monte_carlo_counts_linear` with
    the same generator state, ``models_per_chunk`` and dtype (up to rounding of the
    logits in the last bit).

    Returns:
        (n, C) int64 counts, C the module's output size; each row sums to M.
    """
    sigma, M = _check_mc(sigma, M, generator, models_per_chunk, points_per_chunk)
    if not isinstance(module, torch.nn.Module):
        raise ConfigError(f"The 'module' parameter must be a torch.nn.Module. Got {type(module).__name__} instead.")
    names_shapes = [(name, p.shape) for name, p in module.named_parameters()]
    D = sum(math.prod(s) for _, s in names_shapes)
    if not isinstance(flat_params, torch.Tensor) or flat_params.ndim != 1 or flat_params.shape[0] != D:
        got = tuple(flat_params.shape) if isinstance(flat_params, torch.Tensor) else type(flat_params).__name__
        raise ConfigError(
            f"The 'flat_params' parameter must be a 1-D tensor of the module's D = {D} parameters. Got {got} instead."
        )
    if not flat_params.is_floating_point() or not bool(torch.isfinite(flat_params).all()):
        raise ConfigError("The 'flat_params' parameter must hold finite floating point values. Got other values instead.")
    if not isinstance(X, torch.Tensor) or not X.is_floating_point():
        raise ConfigError(f"The 'X' parameter must be a floating point tensor. Got {type(X).__name__} instead.")
    Xd = X.to(device=flat_params.device, dtype=flat_params.dtype)

    def split(flat: torch.Tensor) -> dict[str, torch.Tensor]:
        out, i = {}, 0
        for name, shape in names_shapes:
            k = math.prod(shape)
            out[name] = flat[..., i : i + k].reshape(*flat.shape[:-1], *shape)
            i += k
        return out

    def one_model(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(module, params, (x,))

    batched = torch.vmap(one_model, in_dims=(0, None))

    def noisy_model(E: torch.Tensor) -> Callable[[int, int, torch.Tensor], None]:
        params = split(flat_params.unsqueeze(0) + sigma * E)

        def add_votes(n0: int, n1: int, counts: torch.Tensor) -> None:
            _count_votes(batched(params, Xd[n0:n1]).transpose(0, 1), counts, n0)  # (m, n_c, C) -> (n_c, m, C)

        return add_votes

    with torch.no_grad():
        C = one_model(split(flat_params), Xd[:1]).shape[-1]  # the number of classes (one point evaluated)
    return _votes(noisy_model, Xd.shape[0], C, D, M, generator, Xd.dtype, Xd.device, models_per_chunk, points_per_chunk)


# ---------------------------------------------------------------------------------------------
# Exact smoothing for linear models


def logit_noise_scale(X: torch.Tensor, sigma: float) -> torch.Tensor:
    """s = sigma sqrt(||x||^2 + 1): the standard deviation of every noisy logit of x (float64)."""
    Xd = X.to(torch.float64)
    return sigma * torch.sqrt((Xd * Xd).sum(dim=1) + 1.0)


def _log_strip_mass(a: float, C: int) -> float:
    """log M(a): M(a) = e^{a^2/2} (1 + K(a)/sqrt(2 pi))^{C-1} >= sup_{|y|<a} int |f(x + i y)| dx.

    f(t) = phi(t) prod_{j} Phi(t + d_j), |phi(x+iy)| = phi(x) e^{y^2/2} and
    |Phi(u+iy)| <= Phi(u) + phi(u) K(|y|) <= 1 + K(|y|)/sqrt(2 pi), K(y) = int_0^y e^{s^2/2} ds.
    """
    K = math.sqrt(math.pi / 2.0) * float(special.erfi(a / math.sqrt(2.0)))
    return 0.5 * a * a + (C - 1) * math.log1p(K / math.sqrt(2.0 * math.pi))


MODE_SLACK = 0.5
"""How far the grid's centre may be from the integrand's mode; the window is widened by as much."""


@functools.lru_cache(maxsize=256)
def _rule(C: int, tol: float) -> tuple[float, int, float]:
    """(h, K, bound): step, half-width in steps, and the proven error bound for C classes."""
    # Discretization (half of tol): |I_h - I| <= 2 M(a) / (exp(2 pi a / h) - 1) for any a > 0 and any
    # grid offset; take the largest h over a grid of a. Truncation (the other half): the nodes beyond
    # distance K h - MODE_SLACK from the mode add at most 2 Phi(-(K h - MODE_SLACK)) (section (a)).
    target = 0.5 * tol
    best_h, best_a = 0.0, 0.0
    for a in np.linspace(0.02, 8.0, 800):
        lm = _log_strip_mass(float(a), C)
        x = float(np.logaddexp(0.0, math.log(2.0) + lm - math.log(target)))  # exp(x) = 1 + 2M/target
        h = 2.0 * math.pi * a / x
        if h > best_h:
            best_h, best_a = h, float(a)
    h = best_h
    L = -float(special.ndtri(target / 2.0))
    K = int(math.ceil((L + MODE_SLACK) / h))
    disc = 2.0 * math.exp(_log_strip_mass(best_a, C)) / math.expm1(2.0 * math.pi * best_a / h)
    trunc = 2.0 * float(special.ndtr(-(K * h - MODE_SLACK)))
    return h, K, disc + trunc


def trapezoid_rule(num_classes: int, tol: float = QUADRATURE_TOL) -> tuple[torch.Tensor, float, float]:
    """The trapezoid rule for p = E_{t~N(0,1)}[F(t)], F(t) = prod_j Phi(t + d_j) (num_classes - 1 shifts).

    The rule is sum_k h phi(c + u_k) F(c + u_k) over the offsets u_k = k h, |k| <= K, around a centre
    c within MODE_SLACK of the mode of phi F (c = 0 is always allowed: then phi F <= phi gives
    the same tail bound). The returned ``bound`` <= tol is a proven bound on |rule - p| whatever
    the shifts: the trapezoid error 2 M(a) / (exp(2 pi a / h) - 1) (Trefethen & Weideman 2014,
    Thm 5.1, for functions analytic in the strip |Im t| < a; M(a) bounds the integrand's L1 norm
    on the lines Im t = +-a, see :func:`_log_strip_mass`; h is the largest step meeting tol / 2
    for some a) plus the truncation error 2 Phi(-(K h - MODE_SLACK)) <= tol / 2.

    Returns:
        (offsets (2K+1,) float64, step h, bound). C = 10: 61 nodes; C = 47: 121.
    """
    C = check_int("num_classes", num_classes, low=2)
    tol = check_real("tol", tol, low=0.0, high=1.0, low_open=True)
    h, K, bound = _rule(C, tol)
    return h * torch.arange(-K, K + 1, dtype=torch.float64), h, bound


PRUNE_SHIFT = 13.0
"""Classes j with shift d_j = (z_c - z_j) / s >= PRUNE_SHIFT are left out of p_c's integrand.

Dropping the factor Phi(t + d_j) raises the integral by at most
int phi(t) Phi(-t - d_j) dt = Phi(-d_j / sqrt 2) <= Phi(-13 / sqrt 2) < 2e-20 per class."""

_PRUNE_ERROR = float(special.ndtr(-PRUNE_SHIFT / math.sqrt(2.0)))


def _log_phi(t: torch.Tensor) -> torch.Tensor:
    return -0.5 * t * t - _LOG_SQRT_2PI


def _score(t: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """g'(t) and g''(t) for g(t) = log phi(t) + sum_j log Phi(t + d_j); t (...), d (..., A)."""
    x = t.unsqueeze(-1) + d
    # r = phi / Phi (the inverse Mills ratio), = sqrt(2/pi) / erfcx(-x/sqrt 2) without cancellation for x < 0
    neg = torch.clamp(x, max=0.0)
    r = torch.where(
        x < 0,
        math.sqrt(2.0 / math.pi) / torch.special.erfcx(-neg / math.sqrt(2.0)),
        torch.exp(_log_phi(torch.clamp(x, min=0.0))) / torch.special.ndtr(torch.clamp(x, min=0.0)),
    )
    curv = torch.where(r > 0, r * (x + r), 0.0).clamp(0.0, 1.0)  # -(log Phi)''(x) in (0, 1); 0 at x = inf
    return -t + r.sum(-1), -1.0 - curv.sum(-1)


def _mode(d: torch.Tensor, iterations: int = 10) -> torch.Tensor:
    """A centre within MODE_SLACK of the mode t* of phi(t) prod_j Phi(t + d_j), else 0.

    g = log(phi F) is strongly concave (g'' <= -1: log Phi is concave), g'(0) > 0 and
    g'(t) <= g'(0) - t, so t* lies in [0, g'(0)]; safeguarded Newton on g' in that bracket, then
    a check that g'(c - MODE_SLACK) > 0 > g'(c + MODE_SLACK) (|g'| >= MODE_SLACK there, so the
    signs are robust); rows that fail the check get c = 0.
    """
    zero = torch.zeros(d.shape[:-1], dtype=d.dtype, device=d.device)
    if d.shape[-1] == 0:
        return zero
    lo, hi = zero.clone(), _score(zero, d)[0].clamp_min(0.0)
    t = 0.5 * (lo + hi)
    for _ in range(iterations):
        g1, g2 = _score(t, d)
        lo = torch.where(g1 > 0, t, lo)
        hi = torch.where(g1 < 0, t, hi)
        step = t - g1 / g2
        inside = (step >= lo) & (step <= hi) & torch.isfinite(step)
        t = torch.where(inside, step, 0.5 * (lo + hi))
    ok = (_score(t - MODE_SLACK, d)[0] > 0) & (_score(t + MODE_SLACK, d)[0] < 0)
    return torch.where(ok, t, zero)


def _log_win_probability(d: torch.Tensor, u: torch.Tensor, h: float) -> torch.Tensor:
    """log sum_k h phi(t_k) prod_j Phi(t_k + d_j), t_k = c + u_k around the mode, for d (..., A) -> (...)."""
    c = _mode(d)
    t = c.unsqueeze(-1) + u  # (..., K)
    log_w = math.log(h) + _log_phi(t)
    if d.shape[-1] == 0:
        return torch.logsumexp(log_w, dim=-1)
    terms = torch.special.log_ndtr(t.unsqueeze(-1) + d.unsqueeze(-2))  # (..., K, A)
    return torch.logsumexp(log_w + terms.sum(dim=-1), dim=-1)


def _exact_log_probabilities(z: torch.Tensor, s: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """log p_c for logits z (n, C) (float64), noise scales s (n,) > 0 and classes cls (n, k)."""
    n, C = z.shape
    k = cls.shape[1]
    out = torch.empty((n, k), dtype=torch.float64, device=z.device)
    if n == 0 or k == 0:
        return out
    d = (z.gather(1, cls).unsqueeze(-1) - z.unsqueeze(1)) / s.view(-1, 1, 1)  # (n, k, C): (z_c - z_j) / s
    d.scatter_(2, cls.unsqueeze(-1), math.inf)  # the class itself: Phi(inf) = 1
    d = torch.sort(d, dim=-1).values  # the classes that matter first
    active = (d < PRUNE_SHIFT).sum(dim=-1).amax(dim=1)  # (n,) classes kept per point
    for a in torch.unique(active).tolist():
        idx = torch.nonzero(active == a).squeeze(1)
        u, h, _ = trapezoid_rule(max(a + 1, 2))
        u = u.to(z.device)
        step = max(1, 4_000_000 // max(1, k * u.numel() * max(a, 1)))
        for i in range(0, idx.numel(), step):
            rows = idx[i : i + step]
            out[rows] = _log_win_probability(d[rows, :, :a], u, h)
    return out


def exact_error_bound(num_classes: int) -> float:
    """The proven part of the error of each exact probability: quadrature + pruning (< 1e-15)."""
    C = check_int("num_classes", num_classes, low=2)
    return max(_rule(c, QUADRATURE_TOL)[2] for c in range(2, C + 1)) + (C - 1) * _PRUNE_ERROR


def _prepare(
    weight: torch.Tensor, bias: torch.Tensor, X: torch.Tensor, sigma: float
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Validate; return the float64 logits z (n, C), the noise scales s (n,) and sigma."""
    _check_linear(weight, bias, X)
    sigma = check_real("sigma", sigma, low=0.0, high=math.inf, high_open=True)
    W, b = weight.to(torch.float64), bias.to(torch.float64)
    Xd = X.to(device=weight.device, dtype=torch.float64)
    return Xd @ W.T + b, logit_noise_scale(Xd, sigma), sigma


def exact_class_probabilities(
    weight: torch.Tensor,
    bias: torch.Tensor,
    X: torch.Tensor,
    sigma: float,
    classes: torch.Tensor | list[int] | None = None,
) -> torch.Tensor:
    """log H_s^c(w; x) exactly for a linear model under N(w, sigma^2 I) on all parameters.

        p_c = E_{t ~ N(0,1)} [ prod_{j != c} Phi(t + (z_c - z_j) / s) ],  z = W x + b,
        s = sigma sqrt(||x||^2 + 1)

    by the trapezoid rule of :func:`trapezoid_rule` in log space (float64); classes j with
    (z_c - z_j) / s >= PRUNE_SHIFT are left out (error < 2e-20 each). The absolute error of
    exp(result) is at most QUAD_ERROR. sigma = 0 is the base classifier: log 1 = 0 for
    argmax_c z_c (lowest index on ties) and -inf elsewhere.

    Args:
        weight (C, d), bias (C,), X (n, d): the model and inputs (cast to float64).
        sigma: smoothing noise sigma_T >= 0.
        classes: None (all C classes), a list of class indices (the same for every point), or an
            (n, k) integer tensor of classes per point.

    Returns:
        (n, k) float64 log-probabilities (k = C when classes is None).
    """
    z, s, sigma = _prepare(weight, bias, X, sigma)
    n, C = z.shape
    if classes is None:
        cls = torch.arange(C, device=z.device).expand(n, C)
    else:
        cls = torch.as_tensor(classes, device=z.device)
        if cls.dtype.is_floating_point or cls.dtype.is_complex or cls.dtype == torch.bool:
            raise ConfigError(f"The 'classes' parameter must hold integer class indices. Got dtype {cls.dtype} instead.")
        cls = cls.long()
        if cls.ndim == 1:
            cls = cls.expand(n, cls.shape[0])
        if cls.ndim != 2 or cls.shape[0] != n:
            raise ConfigError(
                f"The 'classes' parameter must be a list of classes or an (n, k) tensor. Got shape {tuple(cls.shape)} instead."
            )
        if cls.numel() and (int(cls.min()) < 0 or int(cls.max()) >= C):
            raise ConfigError(f"The 'classes' parameter must hold class indices in [0, {C - 1}]. Got {cls.tolist()!r} instead.")
    if sigma == 0.0:
        top = z.argmax(dim=1, keepdim=True)
        return torch.where(cls == top, 0.0, -math.inf).to(torch.float64)
    return _exact_log_probabilities(z, s, cls)


class TopTwoEstimates(NamedTuple):
    """Exact top two of the smoothed linear classifier (:func:`exact_top_two_estimates`)."""

    c_a: torch.Tensor  # (n,) int64, the top logit (lowest index on ties)
    c_b: torch.Tensor  # (n,) int64, the runner-up logit
    p_a: torch.Tensor  # (n,) float64, H_s^{c_A} by quadrature
    p_b: torch.Tensor  # (n,) float64, H_s^{c_B} = max_{c != c_A} H_s^c by quadrature
    log_p_a: torch.Tensor
    log_p_b: torch.Tensor
    err: torch.Tensor  # (n,) float64, absolute error bound on p_a and p_b (0 where sigma = 0)


class TopTwo(NamedTuple):
    """Certified bounds for Algorithm 2 from exact smoothing (:func:`exact_top_two`).

    ``log1m_p_a_lower`` = log(1 - p_A_lower) and ``log_p_b_upper`` = log(p_B_upper), computed
    without rounding p_A_lower to 1 or p_B_upper to 0: a confident point's p_A_lower is 1.0 in
    float64 while 1 - p_A_lower ~ 1e-40 still decides Phi^-1(p_A_lower).
    """

    c_a: torch.Tensor
    c_b: torch.Tensor
    p_a_lower: torch.Tensor
    p_b_upper: torch.Tensor
    log1m_p_a_lower: torch.Tensor | None = None
    log_p_b_upper: torch.Tensor | None = None


def _top_two_estimates(z: torch.Tensor, s: torch.Tensor, sigma: float) -> TopTwoEstimates:
    order = torch.sort(z, dim=1, descending=True, stable=True).indices[:, :2]
    c_a, c_b = order[:, 0].contiguous(), order[:, 1].contiguous()
    if sigma == 0.0:
        logp = torch.zeros((z.shape[0], 2), dtype=torch.float64, device=z.device)
        logp[:, 1] = -math.inf
    else:
        logp = _exact_log_probabilities(z, s, order)
    err = torch.full((z.shape[0],), 0.0 if sigma == 0.0 else QUAD_ERROR, dtype=torch.float64, device=z.device)
    return TopTwoEstimates(c_a, c_b, logp[:, 0].exp(), logp[:, 1].exp(), logp[:, 0], logp[:, 1], err)


def exact_top_two_estimates(weight: torch.Tensor, bias: torch.Tensor, X: torch.Tensor, sigma: float) -> TopTwoEstimates:
    """c_A, c_B and their exact smoothed probabilities, with the error bound err = QUAD_ERROR.

    Every noisy logit has the same scale s, so p_c is increasing in z_c (docs/theory.md (a)):
    c_A = argmax z (lowest index on ties) and the runner-up logit c_B attains
    max_{c != c_A} p_c. Only these two integrals are computed.
    """
    z, s, sigma = _prepare(weight, bias, X, sigma)
    return _top_two_estimates(z, s, sigma)


def exact_top_two(weight: torch.Tensor, bias: torch.Tensor, X: torch.Tensor, sigma: float) -> TopTwo:
    """(c_A, c_B, p_A_lower, p_B_upper) for Algorithm 2 and Corollary 1, from exact smoothing.

    p_A_lower = max(p_A - err, 1 - sum_{j != A} Phi((z_j - z_A) / (s sqrt 2))) and
    p_B_upper = min(p_B + err, Phi((z_B - z_A) / (s sqrt 2))): the quadrature value with its
    error bound err = QUAD_ERROR, or the closed-form bounds P[j wins] <= P[j beats c_A]
    (and the union bound for c_A), whichever is tighter. Both hold with certainty: these are
    exact probabilities, no confidence level is spent. For confident points the pairwise
    bound keeps p_B_upper far below QUAD_ERROR; p_B_upper is floored at the smallest normal
    double (2.2e-308) so that eps (Eq. 39) stays finite. sigma = 0 gives (1, 0).
    """
    z, s, sigma = _prepare(weight, bias, X, sigma)
    est = _top_two_estimates(z, s, sigma)
    if sigma == 0.0:
        return TopTwo(est.c_a, est.c_b, est.p_a, est.p_b, torch.full_like(est.p_a, -math.inf), torch.log(est.p_b))
    return _certified_top_two(z, s, est)


def _log_pairwise(z: torch.Tensor, s: torch.Tensor, c_a: torch.Tensor) -> torch.Tensor:
    """log P[z_j + s xi_j > z_A + s xi_A] = log Phi((z_j - z_A) / (s sqrt 2)) >= log P[j wins], -inf at c_A itself."""
    za = z.gather(1, c_a.unsqueeze(1))
    log_pair = torch.special.log_ndtr((z - za) / (s.unsqueeze(1) * math.sqrt(2.0)))
    return log_pair.scatter(1, c_a.unsqueeze(1), -math.inf)


def _certified_top_two(z: torch.Tensor, s: torch.Tensor, est: TopTwoEstimates) -> TopTwo:
    """:func:`exact_top_two`'s bounds from the logits, the noise scales and the quadrature estimates."""
    log_pair = _log_pairwise(z, s, est.c_a)
    log_pair_b = log_pair.gather(1, est.c_b.unsqueeze(1)).squeeze(1)
    log_union = torch.logsumexp(log_pair, dim=1)  # log sum_{j != A} P[j beats A] >= log(1 - p_A)
    p_a_lower = torch.maximum(est.p_a - est.err, 1.0 - log_union.exp()).clamp(0.0, 1.0)
    p_b_upper = torch.minimum(est.p_b + est.err, log_pair_b.exp()).clamp(_TINY, 1.0)
    # log(1 - p_A_lower) = min(log(1 - p_A + err), log_union), each accurate where it is the smaller
    log1m = torch.minimum(torch.log1p(-(est.p_a - est.err).clamp(max=1.0)), log_union).clamp(max=0.0)
    # not floored: a p_B_upper far below the smallest double still has an exact log (the NP margin needs it)
    log_pb = torch.minimum(torch.log(est.p_b + est.err), log_pair_b).clamp(max=0.0)
    return TopTwo(est.c_a, est.c_b, p_a_lower, p_b_upper, log1m, log_pb)


def exact_class_bounds(
    weight: torch.Tensor, bias: torch.Tensor, X: torch.Tensor, sigma: float, tol: float = 1e-7
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class bounds l(c) <= H_s^c(w; x) <= u(c) for every class (the mixture certificate's per-run values).

    Closed form first: with c_A the top logit, P[c wins] <= P[c beats c_A] = Phi((z_c - z_A)/(s sqrt 2))
    = u(c) for c != c_A, and the union bound l(c_A) = 1 - sum_{c != c_A} u(c), u(c_A) = 1, l(c) = 0
    otherwise. Where the union bound leaves more than ``tol`` open (points near a decision boundary),
    two quadratures refine the top two classes: c_A gets [p_A_lower, p_A + err], the runner-up c_B
    [p_B - err, p_B_upper], and the others min(pairwise, p_B_upper) above (p_c <= p_{c_B}: the
    ranking of the smoothed probabilities is that of the logits, section (a)). Confident points
    therefore cost one product and a few log_ndtr. Returns two (n, C) float64 tensors; sigma = 0
    gives the base classifier's one-hot vector twice.
    """
    z, s, sigma = _prepare(weight, bias, X, sigma)
    n, C = z.shape
    rows = torch.arange(n)
    top = z.argmax(dim=1)
    if sigma == 0.0:
        one = torch.zeros((n, C), dtype=torch.float64)
        one[rows, top] = 1.0
        return one, one.clone()
    log_pair = _log_pairwise(z, s, top)
    union = torch.logsumexp(log_pair, dim=1).exp()
    upper = log_pair.exp()
    upper[rows, top] = 1.0
    lower = torch.zeros((n, C), dtype=torch.float64)
    lower[rows, top] = (1.0 - union).clamp(min=0.0)
    loose = torch.nonzero(union > tol).flatten()
    if len(loose):
        zl, sl = z[loose], s[loose]
        est = _top_two_estimates(zl, sl, sigma)
        cert = _certified_top_two(zl, sl, est)
        r = torch.arange(len(loose))
        up = torch.minimum(upper[loose], cert.p_b_upper.unsqueeze(1))
        up[r, est.c_a] = (est.p_a + est.err).clamp(max=1.0)
        lo = torch.zeros((len(loose), C), dtype=torch.float64)
        lo[r, est.c_a] = cert.p_a_lower
        lo[r, est.c_b] = (est.p_b - est.err).clamp(min=0.0)
        upper[loose], lower[loose] = up, lo
    return lower, upper
