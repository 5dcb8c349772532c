"""The mixture certificate: the paper's Theorem 1 read over training randomness (docs/theory.md (h)).

Theorem 2 compares the *laws* of the final model under D and D'; Theorem 3 then needs the class
probabilities of the smoothed classifier under that law, i.e. averaged over the training
randomness, not around one trained model. This module estimates them.

The law certified here conditions on everything before the noise of the first attack round
t_adv (the initial model, the batches of every round, the noise of rounds < t_adv: these are
the same under D and D', since the attackers are benign before t_adv) and averages over the
server noise eps_{t_adv}, ..., eps_{T-1} and the smoothing noise: a continuation starts from the
attack round's pre-noise aggregate a' = Clip_{rho_t_adv}(w'_{t_adv}) (kept by training), adds
fresh noise and trains rounds t_adv+1..T on the run's batches (no attack after t_adv). K
continuations are i.i.d. draws of that law; they are trained as one batched computation
(:func:`crfl.clients.local_updates_shared`: one wide product per client and step).

Under D the same continuation starts from a = Clip(w_{t_adv}) with ||a - a'|| <= Delta
(:mod:`crfl.closeness`, one attack round), and everything after the noise eps_{t_adv} is the same
Markov kernel under D and D'. By Neyman-Pearson (the Gaussian mechanism N(a, sigma_t_adv^2 I)),
the mixture prediction c_A is kept while Delta < sigma_t_adv (Phi^-1(p_A_lower) - Phi^-1(p_B_upper)) / 2.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from crfl import progress
from crfl.bounds import BoundResult, mixture_bound
from crfl.clients import local_updates_shared, round_batches
from crfl.rng import CertificationSeed, draw_certification_seed, torch_generator
from crfl.server import clip_to_norm
from crfl.setup import Setup
from crfl.smoothing import exact_class_bounds
from crfl.validation import ConfigError, check_int

__all__ = ["continuations", "mixture_class_bounds", "mixture_certificate"]


def _noise(setup: Setup, t: int, ks: range, sigma: float, D: int, stream: str, seed: CertificationSeed) -> torch.Tensor:
    """eps_t of continuations ks: one generator per (round, continuation), so chunking changes nothing.

    The noise of continuation k in round t comes from the stream ("mixture-noise", t, k) of the
    certification seed ``seed``, never from the config's seed. ``stream="server-noise"`` replays the
    run's own noise instead (every continuation then is the run itself: a test of the continuation engine).
    """
    out = torch.empty((len(ks), D), dtype=torch.float64)
    for j, k in enumerate(ks):
        gen = torch_generator(setup.cfg.seed, "server-noise", t) if stream == "server-noise" else \
            seed.torch_generator("mixture-noise", t, k)
        out[j] = torch.randn(D, generator=gen, dtype=torch.float64)
    return out.mul_(sigma)


def continuation_bytes(setup: Setup, K: int, chunk: int, D: int) -> int:
    """Bytes the K continuations need at once: the K final models, a chunk's models in float64 (state,
    update, noise) and the N clients' copies of the chunk's models in the shared local step."""
    item = torch.finfo(setup.dtype).bits // 8
    return K * D * item + chunk * D * (3 * 8 + item) + setup.data.num_clients * chunk * D * item


def _check_memory(setup: Setup, K: int, chunk: int, D: int) -> None:
    """Refuse a number of continuations whose memory exceeds 80% of this machine's before any work starts."""
    import os

    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    need = continuation_bytes(setup, K, chunk, D)
    if need > 0.8 * total:
        per = continuation_bytes(setup, 1, 1, D)
        raise ConfigError(
            f"The 'certify.training_samples' parameter must fit in memory: K = {K} continuations need about "
            f"{need / 2**30:.1f} GiB, and this machine has {total / 2**30:.1f} GiB (80% usable). "
            f"Got {K} instead; use at most about {max(1, int(0.8 * total // per))}."
        )


def continuations(
    setup: Setup, pre_noise: torch.Tensor, t_adv: int, K: int, *, chunk: int | None = None, first: int = 0,
    stream: str = "mixture-noise", seed: CertificationSeed | None = None,
) -> torch.Tensor:
    """K i.i.d. final models Clip_{rho_T}(w_T) continuing the run from round t_adv's pre-noise aggregate.

    Round t_adv: w~ = pre_noise + eps_{t_adv} (fresh, sigma_t_adv); rounds t_adv+1..T: every
    client's benign local SGD on the run's batches (:func:`crfl.clients.round_batches`), FedAvg
    with the configured weights, Clip_{rho_t}, fresh eps_t for t <= T-1. Continuation k draws its
    noise from the stream ("mixture-noise", t, k) of the certification seed ``seed``, k = first, ...,
    first + K - 1 (a later ``first`` draws an independent set); ``seed`` None draws a fresh seed from the
    OS's entropy now. The batches are the run's (a function of the config's seed): the law is
    conditioned on them, as on everything before eps_{t_adv}.
    """
    K = check_int("certify.training_samples", K, low=1)
    cfg, T = setup.cfg, setup.rounds
    if not setup.model.is_linear:
        raise ConfigError(f"The mixture certificate needs the linear model. Got {setup.model.name!r} instead.")
    later = [t for t in setup.plan.rounds if t > t_adv]
    if later:
        raise ConfigError(
            f"The mixture certificate covers one attack round; this run attacks again in rounds {later}. "
            "Use the coupled reading (--reading coupled), which composes several attack rounds."
        )
    if cfg.aggregation.name != "fedavg":
        raise ConfigError(f"The mixture certificate needs FedAvg with fixed weights. Got 'aggregation.name' = {cfg.aggregation.name!r} instead.")
    D = setup.model.num_params
    chunk = K if chunk is None else max(1, int(chunk))
    _check_memory(setup, K, chunk, D)
    seed = draw_certification_seed() if seed is None else seed
    weights = setup.weights.to(torch.float64)
    out = torch.empty((K, D), dtype=setup.dtype)
    sigma_a = setup.sigma(t_adv)
    bar = progress.bar(-(-K // chunk) * (T - t_adv), "mixture continuations", unit="rounds")
    for k0 in range(0, K, chunk):
        ks = range(first + k0, first + min(K, k0 + chunk))
        w = pre_noise.to(torch.float64).unsqueeze(0).repeat(len(ks), 1)
        if sigma_a > 0:
            w += _noise(setup, t_adv, ks, sigma_a, D, stream, seed)
        w = w.to(setup.dtype)
        for t in range(t_adv + 1, T + 1):
            idx = round_batches(setup.data, cfg.clients.batch_size, setup.tau, cfg.seed, t)
            agg = local_updates_shared(setup.model, w, setup.data, idx, cfg.clients.lr, weights, setup.dtype)
            new = w.double() + agg.double()
            rho = setup.rho(t)
            for j in range(len(ks)):
                new[j] = clip_to_norm(new[j], rho)[0]
            sigma = setup.sigma(t)
            if sigma > 0:
                new += _noise(setup, t, ks, sigma, D, stream, seed)
            w = new.to(setup.dtype)
            bar.update(bar.done + 1, f"K = {K}")
        out[k0 : k0 + len(ks)] = w
    bar.close()
    return out


def mixture_class_bounds(setup: Setup, finals: torch.Tensor, X: torch.Tensor, sigma_T: float) -> tuple[np.ndarray, np.ndarray]:
    """Averages over the K runs of per-run bounds l_k(c) <= p_k(c) <= u_k(c) (exact smoothing), (n, C) each."""
    n, C = X.shape[0], setup.dataset.num_classes
    lo = torch.zeros((n, C), dtype=torch.float64)
    up = torch.zeros((n, C), dtype=torch.float64)
    Xd = setup.model.input_map(X.double())  # the inputs the model sees (a no-op without an input bound)
    bar = progress.bar(finals.shape[0], "mixture bounds", unit="models")
    for k in range(finals.shape[0]):
        W, b = setup.model.split(finals[k].double())
        lk, uk = exact_class_bounds(W, b, Xd, sigma_T)
        lo += lk
        up += uk
        bar.update(k + 1, f"{n} points")
    bar.close()
    K = finals.shape[0]
    return (lo / K).numpy(), (up / K).numpy()


def mixture_certificate(setup: Setup, finals: torch.Tensor, X: torch.Tensor, sigma_T: float, alpha: float,
                        seed: CertificationSeed | None = None) -> BoundResult:
    """c_A (the mixture's prediction), p_A_lower and p_B_upper of the mixture, simultaneous over classes
    (``seed``: the certification seed the continuations ``finals`` were drawn from, carried by the result)."""
    lo, up = mixture_class_bounds(setup, finals, X, sigma_T)
    return dataclasses.replace(mixture_bound(lo, up, finals.shape[0], alpha), seed=seed)
