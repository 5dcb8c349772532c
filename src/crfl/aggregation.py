"""Server aggregation rules: how K client updates become one global update.

CRFL (Xie et al., ICML 2021, Algorithm 1) clips and perturbs the *aggregated*
model, so it wraps any rule from this module. Each rule is a small free
function over a (K, D) tensor of client updates (row i is u_i = local model
minus global model, flattened over weights and bias; a model-replacement
attacker's row is already scaled by gamma) and the client weights p_i.

Rules (registry names):

- ``fedavg``: weighted mean sum_i p_i u_i (McMahan et al., 2017).
- ``rfa``: geometric median by the smoothed Weiszfeld algorithm (Pillutla,
  Kakade and Harchaoui, "Robust Aggregation for Federated Learning", 2019/2022),
  the robust aggregator the CRFL paper compares with.
- ``median``: coordinate-wise median (Yin et al., "Byzantine-Robust Distributed
  Learning: Towards Optimal Statistical Rates", ICML 2018).
- ``trimmed-mean``: coordinate-wise beta-trimmed mean (Yin et al., 2018).
- ``krum``: Krum and multi-Krum (Blanchard et al., "Machine Learning with
  Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017).

Every rule returns an :class:`AggregateResult`. Rules that are a weighted mean
of the updates (FedAvg, RFA, Krum) also return the effective weight of every
client, and the update is computed *from* those weights, so
``result.update == result.weights @ updates`` holds exactly. The certification
bound needs the attacker's effective weight, which is why it is kept.

Use :func:`aggregate` as the public entry point: it validates the inputs once,
normalizes the client weights and checks the rule's options by name. A
registered rule receives ``updates`` (K, D), finite, floating point, and
``client_weights`` (K,) non-negative, summing to 1, of the same dtype and device.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from crfl import registry
from crfl.validation import ConfigError, check_int, check_real

__all__ = [
    "AggregateResult",
    "ZeroWeightSum",
    "aggregate",
    "aggregator_names",
    "describe_aggregators",
    "register_aggregator",
    "fedavg",
    "rfa",
    "coordinate_median",
    "trimmed_mean",
    "krum",
]


@dataclass(frozen=True)
class AggregateResult:
    """The output of one aggregation.

    Attributes:
        update: (D,) aggregated update; new global model = old global model + update.
        weights: (K,) effective weight of each client, summing to 1, with
            ``update == weights @ updates``; None for rules that are not a weighted
            mean of the updates (coordinate median, trimmed mean).
        info: diagnostics (RFA iterations and objective values, Krum scores and
            selected clients, ...).
        fixed_weights: True when ``weights`` do not depend on the updates' values (FedAvg):
            the aggregation is then a fixed convex combination, nonexpansive in the updates,
            which the coupled certificate needs (docs/theory.md (g)).
    """

    update: torch.Tensor
    weights: torch.Tensor | None
    info: dict[str, Any] = field(default_factory=dict)
    fixed_weights: bool = False


Aggregator = Callable[..., AggregateResult]
_REGISTRY: registry.Entries[Aggregator] = {}


def register_aggregator(name: str, description: str) -> Callable[[Aggregator], Aggregator]:
    """Decorator: register ``fn(updates, client_weights, **options) -> AggregateResult``.

    Options must be keyword-only parameters of ``fn``; :func:`aggregate` rejects
    any other option name with a message listing the valid ones.
    """
    return registry.register(_REGISTRY, name, description)


def aggregator_names() -> list[str]:
    return registry.names(_REGISTRY)


def describe_aggregators() -> dict[str, str]:
    return registry.describe(_REGISTRY)


def aggregate(
    name: str, updates: torch.Tensor, client_weights: torch.Tensor, **options: Any
) -> AggregateResult:
    """Aggregate client updates with the registered rule ``name``.

    Args:
        name: registry name; an unknown name raises ConfigError listing the valid ones.
        updates: (K, D) client updates u_i, K >= 1, all finite.
        client_weights: (K,) non-negative p_i with a positive sum (uniform 1/K or
            proportional to sample counts; RFA's alpha_i); normalized here.
        **options: options of the rule (e.g. ``max_iter`` for ``rfa``, ``f`` and
            ``m`` for ``krum``).
    """
    fn = registry.lookup(_REGISTRY, "aggregator", name)
    _check_options(name, fn, options)
    u = _check_updates(updates)
    p = _check_client_weights(client_weights, u)
    return fn(u, p, **options)


# ---------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------


@register_aggregator("fedavg", "Weighted mean sum_i p_i u_i (McMahan et al., 2017).")
def fedavg(updates: torch.Tensor, client_weights: torch.Tensor) -> AggregateResult:
    """FedAvg: the weighted mean ``sum_i p_i u_i``; the effective weights are the p_i."""
    return AggregateResult(update=client_weights @ updates, weights=client_weights, info={}, fixed_weights=True)


@register_aggregator(
    "rfa",
    "Geometric median by smoothed Weiszfeld (Pillutla, Kakade, Harchaoui, 2019/2022).",
)
def rfa(
    updates: torch.Tensor,
    client_weights: torch.Tensor,
    *,
    max_iter: int = 10,
    ftol: float = 1e-6,
    eps: float = 1e-5,
) -> AggregateResult:
    """Robust Federated Aggregation: the geometric median of the updates.

    Approximately minimizes ``g(v) = sum_i alpha_i ||v - u_i||`` (Pillutla et al.,
    Algorithm 2, "smoothed Weiszfeld") with alpha_i the normalized client weights:
    start from the weighted mean v_0 = sum_i alpha_i u_i, then repeat

        beta_i = alpha_i / max(eps, ||v - u_i||),   v <- sum_i beta_i u_i / sum_i beta_i

    at most ``max_iter`` times, stopping once the relative change of the
    objective, |g(v_prev) - g(v)| <= ftol * g(v), is reached. The ``eps`` floor
    smooths the objective near the u_i, so a median that sits on an update (or
    all updates equal) never divides by zero. Defaults are those of the CRFL
    authors' code (10 iterations, ftol 1e-6, eps 1e-5).

    Distances and iterates are computed in float64; the returned weights are the
    last normalized beta in the input dtype, and the returned update is
    ``weights @ updates``. ``max_iter = 0`` gives the weighted mean.

    Accuracy: Weiszfeld converges linearly when the median lies away from every
    u_i. On federated updates (many clients, high D, clustered honest updates)
    the ftol test stops it after 2-5 steps within ~1e-4 relative of the exact
    median. On small low-dimensional problems 10 steps can leave the median
    ~1e-2 (relative to max_i ||u_i||) away, the objective within ~1e-3; and when
    the median coincides with an update (one dominant alpha_i, or 1-D data)
    convergence is only sublinear. Raise ``max_iter`` and lower ``ftol`` when
    the exact median matters.

    Info: ``iterations`` (Weiszfeld steps taken), ``objective`` (g at v_0, ..., v_n),
    ``converged`` (the ftol test was met).
    """
    max_iter = check_int("max_iter", max_iter, low=0)
    ftol = check_real("ftol", ftol, low=0.0)
    eps = check_real("eps", eps, low=0.0, low_open=True)

    u = updates.to(torch.float64)
    alpha = client_weights.to(torch.float64)
    w = alpha
    v = w @ u
    objective = [_weighted_distance_sum(u, v, alpha)]
    converged = False
    iterations = 0
    for _ in range(max_iter):
        dist = torch.linalg.vector_norm(u - v, dim=1)
        beta = alpha / dist.clamp_min(eps)
        w = beta / beta.sum()
        v = w @ u
        objective.append(_weighted_distance_sum(u, v, alpha))
        iterations += 1
        if abs(objective[-2] - objective[-1]) <= ftol * objective[-1]:
            converged = True
            break

    weights = w.to(updates.dtype)
    return AggregateResult(
        update=weights @ updates,
        weights=weights,
        info={"iterations": iterations, "objective": objective, "converged": converged},
    )


@register_aggregator(
    "median", "Coordinate-wise median, unweighted; mean of the two middle values for even K (Yin et al., 2018)."
)
def coordinate_median(updates: torch.Tensor, client_weights: torch.Tensor) -> AggregateResult:
    """Coordinate-wise median (Yin et al., 2018).

    Unweighted: ``client_weights`` are ignored (every client counts once), as in
    Yin et al. For even K each coordinate is the mean of its two middle values
    (``numpy.median``'s convention, not ``torch.median``'s lower middle value).
    """
    k = updates.shape[0]
    s = torch.sort(updates, dim=0).values
    if k % 2 == 1:
        update = s[k // 2].clone()
    else:
        update = (s[k // 2 - 1] + s[k // 2]) / 2
    return AggregateResult(update=update, weights=None, info={})


@register_aggregator(
    "trimmed-mean", "Coordinate-wise mean after dropping the beta fraction largest and smallest (Yin et al., 2018)."
)
def trimmed_mean(
    updates: torch.Tensor, client_weights: torch.Tensor, *, beta: float = 0.1
) -> AggregateResult:
    """Coordinate-wise beta-trimmed mean (Yin et al., 2018, Definition 2).

    In every coordinate drop the b = floor(beta * K) largest and the b smallest
    values and average the K - 2b that remain (``scipy.stats.trim_mean``'s
    convention). Unweighted: ``client_weights`` are ignored. Requires
    0 <= beta < 0.5, which always leaves at least one value.

    Info: ``trimmed_per_side`` (b).
    """
    beta = check_real("beta", beta, low=0.0, high=0.5, high_open=True)
    k = updates.shape[0]
    b = math.floor(beta * k)
    if k - 2 * b < 1:  # cannot happen for beta < 0.5; kept as a guard
        raise ConfigError(
            f"The 'beta' parameter must leave at least one of K = {k} values per coordinate. Got {beta!r} instead."
        )
    s = torch.sort(updates, dim=0).values
    update = s[b : k - b].mean(dim=0)
    return AggregateResult(update=update, weights=None, info={"trimmed_per_side": b})


@register_aggregator("krum", "Krum / multi-Krum with f Byzantine clients, averaging the m best (Blanchard et al., 2017).")
def krum(
    updates: torch.Tensor, client_weights: torch.Tensor, *, f: int = 1, m: int = 1
) -> AggregateResult:
    """Krum and multi-Krum (Blanchard et al., 2017).

    The score of client i is the sum of squared distances ||u_i - u_j||^2 to its
    K - f - 2 nearest other clients; Krum (m = 1) returns the update with the
    lowest score, multi-Krum the plain mean of the m lowest-scoring updates
    (ties broken by the lower client index). Requires K > 2f + 2. Unweighted:
    ``client_weights`` are ignored; the effective weights are 1/m on the selected
    clients and 0 elsewhere.

    Info: ``selected`` (client indices, best first), ``scores`` (all K scores).
    """
    k = updates.shape[0]
    f = check_int("f", f, low=0)
    if k <= 2 * f + 2:
        allowed = (
            f"an integer with K > 2f + 2 for K = {k} clients (so f <= {(k - 3) // 2})"
            if k >= 3
            else f"an integer with K > 2f + 2, impossible for K = {k} clients (Krum needs K >= 3)"
        )
        raise ConfigError(f"The 'f' parameter must be {allowed}. Got {f!r} instead.")
    m = check_int("m", m, low=1, high=k)

    u = updates.to(torch.float64)
    d2 = torch.cdist(u, u, compute_mode="donot_use_mm_for_euclid_dist").square()
    d2.fill_diagonal_(math.inf)  # a client is not its own neighbour
    nearest = torch.sort(d2, dim=1).values[:, : k - f - 2]
    scores = nearest.sum(dim=1)
    selected = torch.sort(scores, stable=True).indices[:m]

    weights = torch.zeros(k, dtype=updates.dtype, device=updates.device)
    weights[selected] = 1.0 / m
    return AggregateResult(
        update=weights @ updates,
        weights=weights,
        info={"selected": selected.tolist(), "scores": scores.tolist(), "f": f, "m": m},
    )


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _weighted_distance_sum(u: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor) -> float:
    """The geometric-median objective sum_i alpha_i ||v - u_i|| (unsmoothed)."""
    return float(alpha @ torch.linalg.vector_norm(u - v, dim=1))


class ZeroWeightSum(ConfigError):
    """The client weights of a round sum to 0: there is nothing to average (the caller skips the round)."""


def _bad(name: str, allowed: str, got: str) -> ConfigError:
    """The validation module's message format, for values too large to repr."""
    return ConfigError(f"The '{name}' parameter must be {allowed}. Got {got} instead.")


def _check_options(name: str, fn: Aggregator, options: dict[str, Any]) -> None:
    if not options:  # nothing to check (the signature's inspection costs more than a FedAvg of 20 clients)
        return
    valid = [
        p.name for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    for key in options:
        if key not in valid:
            listed = ", ".join(repr(v) for v in valid) if valid else "none"
            raise _bad("options", f"options of aggregator {name!r} (valid: {listed})", repr(key))


def _check_updates(updates: Any) -> torch.Tensor:
    allowed = "a floating-point tensor of shape (K, D) with K >= 1 clients"
    if not isinstance(updates, torch.Tensor):
        raise _bad("updates", allowed, f"an object of type {type(updates).__name__}")
    if updates.ndim != 2 or updates.shape[0] < 1:
        raise _bad("updates", allowed, f"a tensor of shape {tuple(updates.shape)}")
    if not updates.is_floating_point():
        raise _bad("updates", allowed, f"a tensor of dtype {updates.dtype}")
    # a finite row sum proves every entry of the row finite (a NaN or an infinity makes the sum NaN or
    # infinite): one pass over the updates; only a non-finite sum (or an overflow) checks entry by entry
    if bool(torch.isfinite(updates.sum(dim=1)).all()):
        return updates
    finite = torch.isfinite(updates).all(dim=1)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten().tolist()
        raise _bad(
            "updates", "finite (no NaN or inf) in every row", f"non-finite values in the rows of client index {_list(bad)}"
        )
    return updates


def _check_client_weights(client_weights: Any, updates: torch.Tensor) -> torch.Tensor:
    k = updates.shape[0]
    allowed = f"a tensor of shape ({k},) of finite non-negative weights with a positive sum"
    try:
        w = torch.as_tensor(client_weights)
    except (TypeError, ValueError, RuntimeError):
        raise _bad("client_weights", allowed, f"an object of type {type(client_weights).__name__}") from None
    if w.shape != (k,):
        raise _bad("client_weights", allowed, f"a tensor of shape {tuple(w.shape)}")
    w = w.to(dtype=torch.float64, device=updates.device)
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise _bad("client_weights", allowed, _list(w.tolist()))
    if not float(w.sum()) > 0:
        raise ZeroWeightSum(
            f"The 'client_weights' parameter must have a positive sum; the {k} weights {_list(w.tolist())} sum to 0, "
            "so the round has no weighted mean. Refusing to aggregate it."
        )
    return (w / w.sum()).to(updates.dtype)


def _list(values: list, limit: int = 8) -> str:
    """A short display of a list: the first ``limit`` items, then a count."""
    if len(values) <= limit:
        return repr(values)
    return repr(values[:limit])[:-1] + f", ... ({len(values)} in all)]"
