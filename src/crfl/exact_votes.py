"""Votes of noisy linear models that rounding cannot change (docs/theory.md (c), "Precision of the counts").

A Monte Carlo vote is the argmax of the noisy logits z~_c = (w_c + sigma e_c) . [x; 1] of the drawn
noise e (the floats the generator gave). The code computes them in floating point; this module
says when a computed argmax is provably the exact one, and computes the exact one otherwise:

* :func:`logit_error_scales`: with unit roundoff u of the dtype the logits are computed in, every
  computed noisy logit is within ``gamma_{d+5} * px[p] * pm[m]`` of the exact one, where
  ``px[p] = ||[x_p; 1]||`` and ``pm[m] = max_c (||[w_c; b_c]|| + sigma ||e_{m,c}||)`` (theory (c)).
* :func:`margin_threshold`: a computed top-two gap above ``thr[p] * pm[m]`` proves that the computed
  argmax is the exact argmax (strictly larger than every other exact logit, so no tie either).
* :func:`exact_noisy_argmax`: the exact argmax for the few (point, model) pairs whose gap is not
  that large, in integer arithmetic (every float is an integer times 2^-1074; no rounding at all),
  the lowest class index on an exact tie, as torch's argmax.

Together: counts equal to the exact classifier's votes on the drawn noise, whatever sigma_T is, in
any dtype, with no allowance for rounding flips in the statement.
"""

from __future__ import annotations

import math

import torch

from crfl.closeness import gamma_n, unit_roundoff

__all__ = ["unit_roundoff", "logit_error_scales", "margin_threshold", "exact_noisy_argmax", "margin_votes"]

_SCALE_BITS = 1074  # 2^-1074 is the smallest positive float64: every float64 times 2^1074 is an integer
_SAFETY = 1.0 + 1e-6  # covers the rounding of the float64 norms and products that make the threshold


def _gamma(n: int, u: float) -> float:
    """gamma_n, or inf where it is not defined (n u >= 1): the margin test then proves nothing."""
    return gamma_n(n, u) if n * u < 1.0 else math.inf


def logit_error_scales(
    weight: torch.Tensor, bias: torch.Tensor, sigma: float, E: torch.Tensor, X: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(px (n,), pm (m,)) float64: ||[x_p; 1]|| per point and max_c (||[w_c; b_c]|| + sigma ||e_{m,c}||)
    per noisy model; E is (m, C d + C) in the flat layout (class-major weights, then the biases)."""
    C, d = weight.shape
    Wb = torch.cat([weight.double(), bias.double().unsqueeze(1)], dim=1)  # (C, d + 1)
    w_norm = torch.linalg.vector_norm(Wb, dim=1)  # (C,)
    Ed = E.double()
    one = torch.ones((), dtype=torch.float64)
    # vector_norm and hypot: one pass each, no squared copies (the safety factor covers their rounding too)
    e_norm = torch.hypot(torch.linalg.vector_norm(Ed[:, : C * d].view(-1, C, d), dim=2), Ed[:, C * d :])  # (m, C)
    pm = (w_norm.unsqueeze(0) + abs(sigma) * e_norm).amax(dim=1)
    px = torch.hypot(torch.linalg.vector_norm(X.double(), dim=1), one)
    return px, pm


def margin_threshold(px: torch.Tensor, num_features: int | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """thr (n,) float64: a computed top-two gap > thr[p] * pm[m] proves the computed argmax exact.

    Each computed logit is within e = gamma_{d+5} px pm of the exact one (theory (c): gamma_2 for
    fl(w + fl(sigma e)), gamma_{d+1} for the length-(d + 1) product in any summation order, and two
    more for casting x and e into the dtype), so a computed gap g with g (1 - u) > 2 e leaves the
    exact top logit strictly above every other. Returns 2 gamma_{d+5} px (1 + u) times a safety factor
    for the float64 arithmetic of the threshold itself; inf where gamma is not defined ((d + 5) u >= 1).

    ``num_features`` is d, or per point (an (n,) integer tensor) the number of its nonzero features: a zero
    feature's term is an exact zero and adding it is exact, so only the nonzero terms carry roundings (theory (c),
    "zero features"); d may then be replaced by that count.
    """
    u = unit_roundoff(dtype)
    if not isinstance(num_features, torch.Tensor):
        return px.double() * (2.0 * _gamma(num_features + 5, u) * (1.0 + 2.0 * u) * _SAFETY)
    nu = (num_features.to(torch.float64) + 5.0) * u  # gamma_n = n u / (1 - n u), elementwise (closeness.gamma_n)
    g = torch.where(nu < 1.0, nu / (1.0 - nu), math.inf)
    return px.double() * (2.0 * g * (1.0 + 2.0 * u) * _SAFETY)


def _as_int(v: float) -> int:
    """v * 2^1074 exactly (v a float64: its denominator is a power of two <= 2^1074)."""
    num, den = float(v).as_integer_ratio()
    return num * ((1 << _SCALE_BITS) // den)


def exact_noisy_argmax(
    weight: torch.Tensor, bias: torch.Tensor, sigma: float, E: torch.Tensor, X: torch.Tensor,
) -> torch.Tensor:
    """argmax_c of the exact noisy logits (w_c + sigma e_{k,c}) . [x_k; 1] for k pairs (row k of E: the
    model's noise (C d + C,), row k of X: the point), lowest class on exact ties; (k,) int64.

    Everything is a float64 value (float32 inputs are exact in float64); each is an integer times
    2^-1074, so with every term brought to the scale 2^-3222 the logits are integers and compare exactly.
    Costs about 3 (d + 1) C big-integer operations per pair: for the rare pairs :func:`margin_votes` leaves.
    """
    C, d = weight.shape
    k = E.shape[0]
    out = torch.empty(k, dtype=torch.int64)
    if k == 0:
        return out
    W = [[_as_int(v) for v in row] for row in weight.double().tolist()]
    b = [_as_int(v) for v in bias.double().tolist()]
    s = _as_int(sigma)
    S = _SCALE_BITS
    for i, (e_row, x_row) in enumerate(zip(E.double().tolist(), X.double().tolist(), strict=True)):
        x = [_as_int(v) for v in x_row]
        best, best_c = None, 0
        for c in range(C):
            e = e_row[c * d : (c + 1) * d]
            # (w . x) 2^-2148 and (sigma e . x) 2^-3222, brought to 2^-3222; the bias terms likewise
            wx = sum(wj * xj for wj, xj in zip(W[c], x, strict=True))
            ex = sum(_as_int(ej) * xj for ej, xj in zip(e, x, strict=True))
            z = (wx << S) + s * ex + (b[c] << (2 * S)) + ((s * _as_int(e_row[C * d + c])) << S)
            if best is None or z > best:
                best, best_c = z, c
        out[i] = best_c
    return out


def margin_votes(
    logits: torch.Tensor, thr: torch.Tensor, pm: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The computed argmax (n, m) of logits (n, m, C) and the mask (n, m) of pairs whose computed top-two
    gap is not above thr[p] * pm[m] (those need :func:`exact_noisy_argmax`). Reference implementation
    (torch); a compiled kernel may do the same in one pass."""
    top2 = logits.topk(2, dim=-1) if logits.shape[-1] > 1 else None
    pred = logits.argmax(dim=-1)
    if top2 is None:
        return pred, torch.zeros(pred.shape, dtype=torch.bool)
    gap = (top2.values[..., 0] - top2.values[..., 1]).double()
    ambiguous = ~(gap > thr.unsqueeze(1) * pm.unsqueeze(0))
    return pred, ambiguous
