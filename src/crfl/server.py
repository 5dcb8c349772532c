"""The CRFL server step (Algorithm 1): aggregate, clip the model norm to rho_t, perturb.

The step wraps any aggregation rule: given the aggregated update it forms
w_t = w~_{t-1} + update, clips the *global model's* whole parameter vector
(weights and bias) to norm rho_t, and for t <= T-1 adds N(0, sigma_t^2 I) drawn
from the round's own generator. The output of round T is Clip_{rho_T}(w_T).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from crfl.rng import torch_generator


def clip_to_norm(w: torch.Tensor, rho: float) -> tuple[torch.Tensor, float]:
    """Clip_rho(w) = w / max(1, ||w|| / rho) (Section 4.1). Returns (clipped, ||w|| before).

    The norm and the division are computed in float64 and the result is cast back to w's dtype:
    a float32 model with entries near 3e38 has a norm (and a scale ||w|| / rho) beyond float32's
    range, and dividing by that scale in float32 (inf) would turn the model into zeros. A model
    with a NaN or infinite entry has no norm to clip to and raises ValueError.
    """
    wd = w.double()
    norm = float(torch.linalg.vector_norm(wd))
    if not math.isfinite(norm):
        bad = int((~torch.isfinite(wd)).sum())
        raise ValueError(
            f"The model to clip must be finite; it has {bad} NaN or infinite entries (norm {norm}). "
            "Refusing to clip it to rho_t."
        )
    if norm <= rho:
        return w.clone(), norm
    return (wd / (norm / rho)).to(w.dtype), norm


def gaussian_noise(shape: torch.Size | tuple[int, ...], sigma: float, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """epsilon ~ N(0, sigma^2 I) from an explicit generator."""
    return torch.randn(shape, generator=generator, dtype=dtype) * sigma


@dataclass(frozen=True)
class ServerStepInfo:
    norm_before_clip: float
    rho: float
    sigma: float
    clipped: bool
    pre_noise: torch.Tensor | None = None  # Clip_{rho_t}(w_t), before eps_t is added


def server_step(
    w_prev: torch.Tensor,
    update: torch.Tensor,
    *,
    t: int,
    rounds: int,
    rho_t: float,
    sigma_t: float,
    seed: int,
    stream: tuple[int, ...] = (),
) -> tuple[torch.Tensor, ServerStepInfo]:
    """One server update of Algorithm 1: w_t = w~_{t-1} + update; Clip_{rho_t}; + eps_t if t <= T-1.

    The noise of round t comes from ``torch_generator(seed, "server-noise", t, *stream)``, so a
    resumed run and a clean twin run draw the same noise (``stream``: e.g. the group model g of an
    ensemble, which draws its own).
    """
    w = w_prev + update
    clipped, norm = clip_to_norm(w, rho_t)
    sigma = sigma_t if t < rounds else 0.0
    pre_noise = clipped
    if sigma > 0:
        gen = torch_generator(seed, "server-noise", t, *stream)
        clipped = clipped + gaussian_noise(clipped.shape, sigma, gen, torch.float64).to(clipped.dtype)
    return clipped, ServerStepInfo(norm_before_clip=norm, rho=rho_t, sigma=sigma, clipped=norm > rho_t, pre_noise=pre_noise)
