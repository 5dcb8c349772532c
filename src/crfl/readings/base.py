"""What every reading of the certificate shares: the :class:`Reading` interface, the smoothing of one
run's final model (Algorithm 2's prediction step), and the training inputs the radii are bounded on.

A reading owns one promise about a counterfactual (its ``guarantee``), the ingredients it is
computed from, the bounds at an input (c_A, p_A_lower, p_B_upper, or the base model's logit
margin), the radius on the trigger's norm ||delta||, the check of its assumptions for this run
(``report``, summary.json's ``assumptions`` block) and its ``certificate`` block. :mod:`crfl.certify`
chooses one by name (:data:`crfl.readings.READINGS`) and writes the result set; it never branches
on the reading.

The pipeline per input follows locuslab/smoothing's split: sample votes or integrate exactly
(:mod:`crfl.smoothing`) -> confidence bound (:mod:`crfl.bounds`) -> radius (the reading).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from crfl import bounds, lipschitz, smoothing
from crfl.bounds import BoundResult
from crfl.rng import CertificationSeed, draw_certification_seed
from crfl import noise
from crfl.noise import NoiseStream
from crfl.setup import Setup, model_inputs
from crfl.validation import ConfigError

# ---------------------------------------------------------------------------------------------
# the training inputs (B_0 of the sound readings, B of Lemma 1)


def training_inputs(setup: Setup, chunk: int = 16384) -> Iterator[torch.Tensor]:
    """The clean training inputs in model units (float64), in chunks."""
    xs = torch.from_numpy(setup.dataset.x_train)
    for i in range(0, len(xs), chunk):
        yield model_inputs(setup.dataset, xs[i : i + chunk], torch.float64)


def training_input_stats(setup: Setup) -> tuple[float, float, float]:
    """(max ||x||, min x_j, max x_j) over the clean training inputs in model units (cached on the setup)."""
    if setup.train_input_stats is None:
        x = setup.dataset.x_train
        if x.dtype == np.uint8 and x.size:
            setup.train_input_stats = _uint8_input_stats(setup, x)
        else:
            best, lo, hi = 0.0, math.inf, -math.inf
            for X in training_inputs(setup):
                best = max(best, lipschitz.input_norm_bound(X))
                if X.numel():
                    lo, hi = min(lo, float(X.min())), max(hi, float(X.max()))
            setup.train_input_stats = (best, lo, hi)
    return setup.train_input_stats


def _uint8_input_stats(setup: Setup, x: np.ndarray) -> tuple[float, float, float]:
    """:func:`training_input_stats` of uint8 rows, the same floats without converting all of them.

    The squared norms sum(x_j^2) of the stored integers are exact (int64), and x / s scales every row
    alike, so the longest rows in model units are those with the largest integer sum: only the rows
    within a relative 1e-9 of it (far above float64's rounding of a norm, about d * 2^-53) are
    converted and measured as before, and min / max x_j are the stored extremes divided by s (division
    is monotone). tests/test_e2e.py compares both paths bit for bit.
    """
    sq = np.einsum("ij,ij->i", x, x, dtype=np.int64)
    top = np.flatnonzero(sq >= sq.max() * (1 - 1e-9))
    best = lipschitz.input_norm_bound(model_inputs(setup.dataset, x[top], torch.float64))
    ends = model_inputs(setup.dataset, np.array([[x.min(), x.max()]], dtype=np.uint8), torch.float64)
    return best, float(ends[0, 0]), float(ends[0, 1])


def radius_blockers(setup: Setup, attack_log: list[dict[str, Any]]) -> list[str]:
    """Why no radius can be computed for this run at all, under any reading (empty: a radius can be computed)."""
    out = []
    if setup.plan.attack != "backdoor":
        out.append(f"The attack kind {setup.plan.attack!r} is not the paper's backdoor (a trigger of norm ||delta|| with the "
                   "label swap and gamma scaling): the certificate's threat model does not cover it, so no radius is "
                   "certified; the vote margins (p_a_lower, p_b_upper) are reported.")
    if not setup.model.is_linear:
        out.append(f"The model {setup.model.name!r} is not linear: the certificates need a convex, smooth loss with a known "
                   "L_Z, so no radius is certified; the vote margins (p_a_lower, p_b_upper) are reported.")
    elif any(rec.get("p") is None for rec in attack_log):
        out.append(f"The aggregation rule {setup.cfg.aggregation.name!r} gives no per-client weight p_i, which the "
                   "certificate needs, so no radius is certified; the vote margins (p_a_lower, p_b_upper) are reported.")
    return out


# ---------------------------------------------------------------------------------------------
# smoothing one run's final model: N(w, sigma_T^2 I) (Algorithm 2)


def smooth(setup: Setup, params: torch.Tensor, X: torch.Tensor, method: str,
           seed: CertificationSeed | None = None) -> BoundResult:
    """c_A, p_A_lower, p_B_upper (and votes) for inputs X under N(params, sigma_T^2 I).

    ``method``: ``exact`` (linear models, :func:`crfl.smoothing.exact_top_two`; draws nothing) or
    ``monte-carlo`` (M noisy models, then :func:`crfl.bounds.select_and_bound`). The noisy models
    come from the noise stream ("smoothing", 0) of the certification seed ``seed`` (:mod:`crfl.noise`), the
    selection sample from ("selection", 0) -- never from the config's seed (:mod:`crfl.rng`); ``seed`` None draws a
    fresh one from the OS's entropy now, after X is fixed. The result carries the seed it used.
    """
    cz = setup.cfg.certify
    X = setup.model.input_map(X)  # the inputs the model sees (a no-op without an input bound)
    if method == "exact":
        W, b = setup.model.split(params.double())
        tt = smoothing.exact_top_two(W, b, X.double(), cz.sigma_T)
        p_a_lo, p_b_up = np.asarray(tt.p_a_lower, dtype=float), np.asarray(tt.p_b_upper, dtype=float)
        return BoundResult(np.asarray(tt.c_a), np.asarray(tt.c_b), None, None, p_a_lo, p_b_up, p_a_lo <= p_b_up,
                           np.asarray(tt.log1m_p_a_lower, dtype=float), np.asarray(tt.log_p_b_upper, dtype=float))
    seed = draw_certification_seed() if seed is None else seed
    counts, votes = _counts(setup, params, X, cz.M, seed.noise_stream("smoothing", 0))
    sel = None
    if cz.selection > 0:
        sel_counts, sel_votes = _counts(setup, params, X, cz.selection, seed.noise_stream("selection", 0))
        sel = sel_counts.numpy()
        votes = votes if sel_votes == votes else "float64"  # exact only if both samples' votes were
    res = bounds.select_and_bound(counts.numpy(), cz.alpha, cz.bound, cz.coverage, selection_counts=sel)
    return dataclasses.replace(res, seed=seed, votes=votes)


def _counts(setup: Setup, params: torch.Tensor, X: torch.Tensor, M: int, gen: NoiseStream) -> tuple[torch.Tensor, str]:
    """The M votes on X and how they were computed ('exact', 'float64'; 'module dtype' for a module model)."""
    sigma = setup.cfg.certify.sigma_T
    if setup.model.is_linear:
        W, b = setup.model.split(params)  # exact votes where the votes kernel runs and the inputs allow it
        return smoothing.monte_carlo_votes_linear(W, b, X, sigma, M, gen)
    return smoothing.monte_carlo_counts_module(setup.model.module, params.float(), X.float(), sigma, M, gen), "module dtype"


# ---------------------------------------------------------------------------------------------
# the interface


class Reading:
    """One reading of the certificate for one finished run (``certify.reading`` = :attr:`name`).

    Built from a prepared setup and the run's files (``final``: model_final.pt, ``attack_log``:
    attack.json's records). A subclass sets :attr:`name` and :attr:`GUARANTEE`, builds its
    ingredients ``ing``, its assumptions ``report``, ``delta_norm`` and ``radius_ok`` in
    ``__init__``, and implements :meth:`radii` and :meth:`ingredients_block`. The defaults smooth
    the run's final model (or its twin) with sigma_T.
    """

    name: ClassVar[str]
    GUARANTEE: ClassVar[str]
    #: Whether ``method: margin`` (the linear base model's own certificate, no smoothing) is defined.
    CERTIFIES_BASE_MODEL: ClassVar[bool] = False

    ing: Any  # the reading's ingredients (a frozen dataclass)
    report: dict[str, Any]  # summary.json's ``assumptions`` block
    delta_norm: float  # the attack's ||delta||
    radius_ok: bool  # a radius is computed at all (else only the bounds are reported)

    def __init__(self, setup: Setup, final: dict[str, Any], attack_log: list[dict[str, Any]], run_dir: Path) -> None:
        self.setup, self.final, self.attack_log, self.run_dir = setup, final, attack_log, Path(run_dir)
        self.method = self.resolve_method(setup)
        self.params = final["params"]
        self.twin_params = final.get("twin_params")
        self.state = final.get("attack_state") or {}
        self.linear = bool(setup.model.is_linear)

    # -- configuration ------------------------------------------------------------------------

    def resolve_method(self, setup: Setup) -> str:
        """``certify.method`` for this model and reading (``auto``: exact for linear models, else Monte Carlo)."""
        m = setup.cfg.certify.method
        if m == "auto":
            return "exact" if setup.model.is_linear else "monte-carlo"
        if m in ("exact", "margin") and not setup.model.is_linear:
            raise ConfigError(
                f"The 'certify.method' parameter must be 'monte-carlo' for the non-linear model {setup.model.name!r}. Got {m!r} instead."
            )
        self.check_method(m)
        return m

    def check_method(self, method: str) -> None:
        """Refuse a method this reading does not define (only the coupled reading certifies the base model)."""
        if method == "margin" and not self.CERTIFIES_BASE_MODEL:
            raise ConfigError(f"The 'certify.method' parameter 'margin' certifies the base model under the coupled reading only. "
                              f"Got 'certify.reading' = {self.name!r} instead.")

    # -- per input ------------------------------------------------------------------------------

    @property
    def has_twin(self) -> bool:
        """Whether the run kept what the twin check needs (trained with --twin)."""
        return self.twin_params is not None

    @property
    def statistical(self) -> bool:
        """Whether the bounds draw randomness (a :class:`crfl.rng.CertificationSeed`): Monte Carlo here."""
        return self.method == "monte-carlo"

    def bounds(self, X: torch.Tensor, *, twin: bool = False, seed: CertificationSeed | None = None) -> BoundResult:
        """c_A and (p_A_lower, p_B_upper) at inputs X, for the run's model (or its twin).

        Statistical bounds draw from ``seed`` (None: a fresh one from the OS's entropy, drawn now);
        the result's ``seed`` says which. Exact and margin bounds draw nothing (``seed`` unused, None).
        """
        params = self.twin_params if twin else self.params
        if twin and not self.has_twin:
            raise ConfigError(f"The run directory {str(self.run_dir)!r} has no twin: train it with --twin.")
        return smooth(self.setup, params, X, self.method, seed)

    def certify(self, X: torch.Tensor, *, seed: CertificationSeed | None = None) -> tuple[BoundResult, np.ndarray | None, np.ndarray]:
        """(bounds, budget, radius) per point at X: sample or integrate -> bound -> radius (0 where no radius)."""
        sm = self.bounds(X, seed=seed)
        if not self.radius_ok:
            return sm, None, np.zeros(len(sm.p_a_lower))
        return (sm, *self.radii(sm))

    def radii(self, sm: BoundResult) -> tuple[np.ndarray | None, np.ndarray]:
        """(parameter-distance budget or None, radius on ||delta||) per point from the bounds."""
        raise NotImplementedError

    # -- what is written ------------------------------------------------------------------------

    @property
    def guarantee(self) -> str:
        return self.GUARANTEE

    @property
    def bound_form(self) -> str | None:
        """``certify.bound_form`` where the reading turns probabilities into a distance budget, else None."""
        return None

    @property
    def training_samples(self) -> int | None:
        return None

    def ingredients_block(self) -> dict[str, Any]:
        """The reading's ingredients as written into the ``certificate`` block."""
        raise NotImplementedError

    def block(self) -> dict[str, Any]:
        """summary.json's ``certificate`` block."""
        out: dict[str, Any] = {
            "reading": self.name,
            "guarantee": self.guarantee,
            "bound_form": self.bound_form,
            "training_samples": self.training_samples,
            "method": self.method,
            "delta_norm": self.delta_norm,
        }
        out.update(self.ingredients_block())
        out["radius_certified"] = bool(self.report["radius_certified"])
        return out

    def confidence(self) -> tuple[float | None, str | None, str | None]:
        """(alpha, bound, coverage) of the probability bounds; None for exact ones."""
        cz = self.setup.cfg.certify
        if self.method == "monte-carlo":
            return cz.alpha, cz.bound, cz.coverage
        return None, None, None

    def smoothing_block(self, seconds: float, seed: CertificationSeed | None = None, votes: str | None = None) -> dict[str, Any]:
        """summary.json's ``smoothing`` block (``seconds``: the time the bounds and radii took; ``seed``: the
        certification seed the statistical bounds drew from, recorded as ``seed``, ``seed_source``,
        ``seed_drawn_at``; all None where nothing was drawn)."""
        cz = self.setup.cfg.certify
        mc = self.method == "monte-carlo"
        alpha, bound, coverage = self.confidence()
        drawn = seed.to_dict() if seed is not None and self.statistical else {}
        return {
            "method": self.method, "M": cz.M if mc else None, "alpha": alpha, "bound": bound, "coverage": coverage,
            "selection": cz.selection if mc else None,
            "sigma_T": cz.sigma_T if self.method != "margin" else None, "seconds": seconds,
            "seed": drawn.get("seed"), "seed_source": drawn.get("seed_source"), "seed_drawn_at": drawn.get("seed_drawn_at"),
            # how the votes were computed: exact (proven margins, docs/theory.md (c)) or float64 (a vote may differ
            # from the exact one with probability <= MC_FLIP_LIMIT / M: the statement then holds at 1 - alpha - 1e-5)
            "votes": votes if mc else None,
            "noise_dtype": ("float64" if self.setup.model.is_linear else "float32") if mc else None,
            # the noise's generator (crfl.noise): certifications recorded before it drew torch's sampler (theory (j))
            "noise_generator": noise.GENERATOR if mc else None,
        }

    def randomness_note(self, seed: CertificationSeed | None) -> str:
        """The sentence the guarantee gets about its randomness (empty for bounds that draw nothing)."""
        if not self.statistical or seed is None:
            return ""
        if seed.source == "replay":
            return (f" Replayed with the given certification seed {seed.seed}: the confidence statement holds only for "
                    "inputs fixed before that seed was first drawn.")
        return (f" The confidence statement rests on the certification seed {seed.seed}, drawn from the operating "
                f"system's entropy at {seed.drawn_at}, after these inputs were fixed; it holds for inputs that did "
                "not depend on it.")

    def tables(self, sm: BoundResult) -> list[tuple[str, list[str], list[list[Any]]]]:
        """Further per-point tables of one test set: (file stem, columns, rows); written as ``STEM_{clean,backdoor}.csv``."""
        return []

    # -- the twin check -------------------------------------------------------------------------

    @property
    def twin_compared_with(self) -> str:
        """What the twin check compares this run's prediction with."""
        return "smoothed prediction of the twin's final model"

    @property
    def twin_exact(self) -> bool:
        """Whether the bounds are exact, so a disagreement at a covered point is a violated certificate."""
        return False
