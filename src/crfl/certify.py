"""Certification of a training run (Algorithm 2) under one of three readings of the guarantee.

A certificate is a promise about a counterfactual. ``certify.reading`` says which one:

- ``coupled`` (default, :mod:`crfl.closeness`): fix this run's training randomness omega
  (initial model, batches, server noise). The counterfactual is the run on the same omega whose
  attackers' poisoned samples carry no trigger (same labels, same gamma scaling): the paper's D
  against D'. The two final models are two fixed centres at distance <= ||delta|| c(B_0 + ||delta||)
  (<= ||delta|| c(B_0) when the model enforces B_0, ``model.input_norm_bound``);
  parameter smoothing with sigma_T keeps c_A while that distance is below
  sigma_T (Phi^-1(p_A_lower) - Phi^-1(p_B_upper)) / 2 (Neyman-Pearson). p_A, p_B are the
  smoothed probabilities around this run's final model (exact for linear models). With
  ``method: margin`` the deployed linear base model itself is certified (no smoothing).
- ``mixture`` (:mod:`crfl.mixture`): the law of the trained model over the server noise from the
  attack round on (the paper's Theorems 2-3 read as written). p_A, p_B are mixture probabilities,
  bounded from K independent continuations; the Gaussian mechanism at t_adv gives the radius.
- ``paper``: Corollary 1 (Eq. 2) as printed, for reproduction only; written with
  ``radius_certified: false``.

Every reading: the test points (clean, and backdoored = trigger added, true label kept,
Appendix A.3), their prediction or ABSTAIN, and the radius on ||delta||. Outputs in the run
directory: ``certificates_clean.csv``, ``certificates_backdoor.csv`` (and ``inverse_*.csv`` for
the paper reading), and the blocks ``certificate``, ``smoothing``, ``results``, ``assumptions``
(and ``twin``) of ``summary.json``. Printing and plotting belong to the CLI.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crfl import bounds, closeness, ensemble, lipschitz, mixture, radius as radius_mod, rundir, smoothing
from crfl.bounds import BoundResult
from crfl.clients import nominal_poison_ratio
from crfl.closeness import AttackTerm
from crfl.config import Config
from crfl.data import Dataset
from crfl.metrics import covered, curve_table, finite_max, radius_grid
from crfl.rng import torch_generator
from crfl.schedule import contraction_schedule, noise_after_round
from crfl.setup import Setup, model_inputs, prepare
from crfl.validation import ConfigError

CERT_COLUMNS = [
    "index", "label", "prediction", "n_a", "n_b", "p_a_lower", "p_b_upper", "log1m_p_a_lower", "log_p_b_upper",
    "budget", "radius", "correct",
]

GUARANTEES = {
    "coupled": (
        "With this run's training randomness fixed (initial model, batches, server noise), the counterfactual run on "
        "the same randomness whose attackers' poisoned samples carry no trigger (same labels, same scaling: data D "
        "instead of D') gives the same parameter-smoothed prediction (sigma_T) at this input whenever the trigger's "
        "norm ||delta|| is below the radius."
    ),
    "coupled-margin": (
        "With this run's training randomness fixed (initial model, batches, server noise), the counterfactual run on "
        "the same randomness whose attackers' poisoned samples carry no trigger (same labels, same scaling: data D "
        "instead of D') deploys a linear model with the same prediction at this input whenever the trigger's norm "
        "||delta|| is below the radius (no smoothing)."
    ),
    "mixture": (
        "Averaged over the server noise from the attack round t_adv on (initial model, batches and earlier noise as in "
        "this run) and the smoothing noise, training on data without the trigger (D) predicts the same class at this "
        "input as the mixture of runs on D' does, whenever ||delta|| is below the radius; the mixture probabilities are "
        "bounded from K independent continuations, with confidence 1 - alpha per point."
    ),
    "paper": (
        "Corollary 1 (Eq. 2) as printed, for reproduction only: it combines one run's smoothing probabilities with a "
        "bound on the laws of the final model over all training randomness, and its Lemma 1 L_Z assumes ||x|| <= 1, so "
        "this number is not a certified radius."
    ),
}


# ---------------------------------------------------------------------------------------------
# the inputs of the sound readings


@dataclass(frozen=True)
class SoundIngredients:
    """What the coupled and mixture radii are computed from (all written to summary.json)."""

    reading: str
    terms: tuple[AttackTerm, ...]  # the attack rounds, in order
    input_norm_bound: float  # B_0 >= ||x|| of every clean training input (triggered ones: B_0 + ||delta||)
    input_norm_source: str
    input_norm_enforced: bool  # the model projects every input onto ||x|| <= B_0: triggered ones too
    sigma: float  # the Gaussian noise of the Neyman-Pearson step: sigma_T (coupled) or sigma_t_adv (mixture)
    bound_form: str
    delta_norm: float

    def to_dict(self) -> dict[str, Any]:
        terms = []
        for k in self.terms:
            terms.append({
                "round": k.round, "p": list(k.p), "gamma": list(k.gamma), "eta": list(k.eta), "tau": list(k.tau),
                "poison_ratio": list(k.poison_ratio), "Q": list(k.Q), "p_total": k.p_total,
                "start_centred_opnorm": k.start_opnorm, "round_lipschitz": closeness.round_lipschitz(k),
                "L_Z_at_B0": [lipschitz.lz_centred(k.start_opnorm, t, e, self.input_norm_bound) for t, e in zip(k.tau, k.eta)],
            })
        return {
            "attack_rounds": terms,
            "input_norm_bound": self.input_norm_bound,
            "input_norm_source": self.input_norm_source,
            "input_norm_enforced": self.input_norm_enforced,
            "deviation_coefficient_at_B0": closeness.deviation_coefficient(self.terms, self.input_norm_bound),
            "sigma": self.sigma,
            "delta_norm": self.delta_norm,
        }


def clean_input_norm_bound(setup: Setup) -> float:
    """B_0 = max ||x|| over the clean training inputs (what only a simulator knows; a federation sets it)."""
    return training_input_stats(setup)[0]


def _training_inputs(setup: Setup, chunk: int = 16384) -> Iterator[torch.Tensor]:
    """The clean training inputs in model units (float64), in chunks."""
    xs = torch.from_numpy(setup.dataset.x_train)
    for i in range(0, len(xs), chunk):
        yield model_inputs(setup.dataset, xs[i : i + chunk], torch.float64)


def training_input_stats(setup: Setup) -> tuple[float, float, float]:
    """(max ||x||, min x_j, max x_j) over the clean training inputs in model units (cached on the setup)."""
    if setup.train_input_stats is None:
        best, lo, hi = 0.0, math.inf, -math.inf
        for X in _training_inputs(setup):
            best = max(best, lipschitz.input_norm_bound(X))
            if X.numel():
                lo, hi = min(lo, float(X.min())), max(hi, float(X.max()))
        setup.train_input_stats = (best, lo, hi)
    return setup.train_input_stats


ENFORCED_SOURCE = "model.input_norm_bound (enforced by the model)"


def _input_norm_bound(setup: Setup) -> tuple[float, str, bool]:
    """(B_0, where it comes from, whether the model enforces it on every input, triggered ones included).

    ``model.input_norm_bound`` supersedes everything: the model maps every input into the ball of radius
    B_0, so no data needs to be seen (the config refuses ``certify.input_norm_bound`` next to it).
    """
    bound = getattr(setup.model, "input_bound", None)
    if bound is not None:
        return float(bound.radius), ENFORCED_SOURCE, True
    given = setup.cfg.certify.input_norm_bound
    if given is not None:
        return float(given), "certify.input_norm_bound (server-owned)", False
    return clean_input_norm_bound(setup), "max ||x|| over the clean training inputs", False


def _terms(attack_log: list[dict[str, Any]]) -> tuple[AttackTerm, ...]:
    if not attack_log:
        raise ConfigError(
            "The run's attack.json records no attack round: the coupled and mixture certificates bound what an attack "
            "that happened did. Train with 'attack.num_attackers' >= 1 and 'attack.rounds' set, or use --reading paper."
        )
    return tuple(AttackTerm.from_record(rec) for rec in attack_log)


def radius_blockers(setup: Setup, attack_log: list[dict[str, Any]]) -> list[str]:
    """Why no radius can be computed for this run at all (empty: a radius can be computed)."""
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


def sound_ingredients(setup: Setup, attack_log: list[dict[str, Any]], reading: str) -> SoundIngredients:
    cz = setup.cfg.certify
    terms = _terms(attack_log) if not radius_blockers(setup, attack_log) else ()
    B0, source, enforced = _input_norm_bound(setup)
    if reading == "mixture" and terms:
        sigma = noise_after_round(setup.sigma, terms[0].round, setup.rounds, cz.sigma_T)
    else:
        sigma = float(cz.sigma_T)
    return SoundIngredients(reading, terms, B0, source, enforced, sigma, cz.bound_form, float(setup.plan.trigger.norm))


def sound_radii(ing: SoundIngredients, sm: BoundResult) -> tuple[np.ndarray, np.ndarray]:
    """(budget, radius) per point: the parameter distance the prediction tolerates, and the ||delta|| solving
    ||delta|| c(B_0 + ||delta||) = budget, or ||delta|| c(B_0) = budget when the model enforces B_0 (0 where the
    point abstains)."""
    if ing.sigma <= 0:
        budget = np.zeros(len(sm.p_a_lower))
    elif ing.bound_form == "kl":
        budget = radius_mod.kl_distance_budget(ing.sigma, sm.p_a_lower, sm.p_b_upper, np.exp(sm.log1m_a()))
    else:
        budget = radius_mod.neyman_pearson_budget(ing.sigma, radius_mod.gaussian_margin(sm.log1m_a(), sm.log_b()))
    budget = np.where(sm.abstain, 0.0, budget)
    return budget, closeness.solve_radius(budget, ing.terms, ing.input_norm_bound, enforced=ing.input_norm_enforced)


def margin_result(setup: Setup, params: torch.Tensor, X: torch.Tensor) -> tuple[BoundResult, np.ndarray]:
    """The linear base model's prediction and its logit-margin budget (``method: margin``), at the model's inputs P(X)."""
    W, b = setup.model.split(params.double())
    Xd = setup.model.input_map(X.double())
    z = (Xd @ W.T + b).numpy()
    budget = radius_mod.logit_margin_budget(z, torch.linalg.vector_norm(Xd, dim=1).numpy())
    order = np.argsort(-z, axis=1, kind="stable")
    c_a, c_b = order[:, 0].astype(np.int64), order[:, 1].astype(np.int64)
    n = len(z)
    # no probabilities: p_a_lower = 1, p_b_upper = 0 stand for the deterministic base prediction
    res = BoundResult(c_a, c_b, None, None, np.ones(n), np.zeros(n), budget <= 0, np.full(n, -np.inf), np.full(n, -np.inf))
    return res, budget


def _input_norm_check(setup: Setup, ing: SoundIngredients) -> dict[str, Any]:
    """B_0 must bound every clean training input; a server-owned bound is checked against the data when it is here.

    A bound the model enforces holds by construction: the model projects every input, clean or triggered,
    onto the ball of radius B_0 (the data's norms only say how many inputs the projection shrinks)."""
    B = ing.input_norm_bound
    data_max = clean_input_norm_bound(setup) if len(setup.dataset.y_train) else 0.0
    if ing.input_norm_enforced:
        bound = setup.model.input_bound
        return {
            "holds": True,
            "detail": f"B_0 = {B:.6g} enforced by the model: {bound.describe()}, so every input the model sees, clean "
                      f"or triggered, has norm <= B_0; the training data's max ||x|| = {data_max:.6g}"
                      + (" (the projection shrinks the larger inputs)" if data_max > B else ""),
        }
    holds = B >= data_max * (1 - 1e-12)
    return {
        "holds": holds,
        "detail": f"B_0 = {B:.6g} ({ing.input_norm_source}); the training data's max ||x|| = {data_max:.6g}"
                  + ("" if holds else ": the bound is too small") + "; triggered inputs: B_0 + radius (the fixed point)",
    }


def _box_check(setup: Setup, attack_log: list[dict[str, Any]], ing: SoundIngredients) -> dict[str, Any]:
    """Clamping x + delta to the box only shrinks the trigger when the clean inputs lie in the box."""
    _, lo, hi = training_input_stats(setup)
    inside = lo >= 0.0 and hi <= 1.0
    # a model that clamps to the trigger's box itself sees clamp(x + delta) - clamp(x), of norm <= ||delta||, for any x
    bound = getattr(setup.model, "input_bound", None) if ing.input_norm_enforced else None
    model_clamps = bound is not None and (bound.low, bound.high) == (setup.plan.trigger.low, setup.plan.trigger.high)
    actual = [v for rec in attack_log for v in (rec.get("measured") or {}).get("actual_delta_norm_max", [])]
    within = all(v <= ing.delta_norm * (1 + 1e-4) for v in actual)  # float32 rounding of x + delta - x
    return {
        "holds": (inside or model_clamps) and within,
        "detail": f"clean training inputs in [{lo:.4g}, {hi:.4g}] (the trigger is clamped to [0, 1]"
                  + ("; so does the model's input map" if model_clamps else "") + "); largest applied "
                  f"||x' - x|| = {max(actual) if actual else 0.0:.4g} <= ||delta|| = {ing.delta_norm:.4g}",
    }


def scope_report(
    setup: Setup, ing: SoundIngredients, attack_log: list[dict[str, Any]], fixed_rounds: dict[int, bool], method: str,
    run_dir: Path | None = None,
) -> dict[str, Any]:
    """The assumptions of the coupled / mixture certificate, checked for this run."""
    cz = setup.cfg.certify
    B = ing.input_norm_bound
    beta = lipschitz.smoothness_bound(B)
    eta = max([e for k in ing.terms for e in k.eta] + [setup.cfg.clients.lr])
    first = ing.terms[0].round if ing.terms else min(fixed_rounds or {1: True})
    later = {t: ok for t, ok in fixed_rounds.items() if t >= first}
    fixed = all(later.values()) if later else setup.cfg.aggregation.name == "fedavg"
    p_tot = max([k.p_total for k in ing.terms] + [float(setup.weights.sum())])
    checks: dict[str, dict[str, Any]] = {
        "convex_model": {"holds": bool(setup.model.is_linear),
                         "detail": f"{setup.model.name}: multinomial logistic regression is convex (Assumption 1)"
                         if setup.model.is_linear else f"{setup.model.name} is not convex: no certificate"},
        "eta_le_2_over_beta": {
            "holds": eta <= 2.0 / beta,
            "detail": (f"eta = {eta:.4g} <= 2/beta = {2 / beta:.4g} (beta <= (B_0^2 + 1)/2, B_0 = {B:.4g}): every clean "
                       "gradient step is nonexpansive" if eta <= 2.0 / beta else
                       f"eta = {eta:.4g} > 2/beta = {2 / beta:.4g} (beta <= (B_0^2 + 1)/2, B_0 = {B:.4g}): fails, a clean "
                       "gradient step need not be nonexpansive; lower clients.lr or bound the inputs "
                       "(model.input_norm_bound)"),
        },
        "fixed_aggregation_weights": {
            "holds": bool(fixed),
            "detail": ("weights fixed before the updates are seen in every round from t_adv on"
                       if fixed else f"'{setup.cfg.aggregation.name}' weights depend on the updates in some round >= {first}: "
                       "the aggregation is not nonexpansive, no certificate"),
        },
        "weights_sum_le_1": {"holds": p_tot <= 1.0 + 1e-12, "detail": f"largest sum of weights in a round = {p_tot:.6g}"},
        "noise_for_neyman_pearson": {
            "holds": ing.sigma > 0 or method == "margin",
            "detail": f"sigma = {ing.sigma} ({'sigma_T' if ing.reading == 'coupled' else 'sigma at t_adv'})"
                      if method != "margin" else "margin method: no smoothing",
        },
        "input_norm_bound": _input_norm_check(setup, ing),
        "inputs_in_trigger_box": _box_check(setup, attack_log, ing),
    }
    if ing.reading == "mixture":
        checks["one_attack_round"] = {"holds": len(ing.terms) == 1,
                                      "detail": f"{len(ing.terms)} attack round(s); the mixture reading covers one"}

        replayable = rundir.open_run(run_dir).engine() == rundir.SIMULATOR if run_dir is not None else True
        checks["continuations_replay_the_run"] = {
            "holds": replayable,
            "detail": "the continuations train every client with the configured weights in every round after t_adv, as the "
                      "simulator did" if replayable else "a Flower run's later rounds had their own participation (sampling, "
                      "drops, rejected replies), which the continuations do not replay: use the coupled reading",
        }
    if setup.model.is_linear and method == "monte-carlo":
        valid = cz.coverage == "simultaneous" or cz.selection > 0
        checks["confidence"] = {
            "holds": valid,
            "detail": f"Monte Carlo bounds: the statement holds with probability >= 1 - {cz.alpha}" if valid else
                      "coverage 'paper' bounds p_A and p_B each at alpha for the data-selected top two: not a joint "
                      "statement for c_A (docs/theory.md (c)); use coverage 'simultaneous' or a selection sample",
        }
    certified = all(c["holds"] for c in checks.values())
    scope = [
        "The radius bounds the trigger's magnitude ||delta_x||; the label swap delta_y is part of both D and D' "
        "(the counterfactual keeps the target labels and the scaling), as in the paper's Lemma 1 (y_1 = y_2).",
        "Reference model: " + ("the twin run trained by --twin (same randomness, no trigger)" if ing.reading == "coupled"
                               else "the law of continuations without the trigger from the attack round's aggregate"),
    ]
    return {"radius_certified": certified, "checks": checks, "scope": scope}


def fixed_weight_rounds(run_dir: Path) -> dict[int, bool]:
    """rounds.csv's ``aggregation_fixed_weights`` per round (rounds that did not record it are left out)."""
    return {r.round: bool(r.aggregation_fixed_weights) for r in rundir.RunDir(run_dir).read_rounds()
            if r.aggregation_fixed_weights is not None}


# ---------------------------------------------------------------------------------------------
# Corollary 1 as printed (the paper reading)


@dataclass(frozen=True)
class Ingredients:
    """The symbols of Corollary 1 / Theorem 1 for this run (one entry per attacker in the lists)."""

    t_adv: int
    R: int
    p: list[float] | None  # None: the aggregation rule has no per-client weight
    gamma: list[float]
    tau: list[int]
    eta: list[float]
    poison_ratio: list[float]
    delta_norm: float  # the attack's ||delta|| (the trigger's norm before clamping)
    rho_t_adv: float
    sigma_t_adv: float
    rho: list[float]  # rho_t, t = t_adv+1..T
    sigma: list[float]  # sigma_t, t = t_adv+1..T (the last is sigma_T)
    log_contraction: float
    L_Z: float
    lipschitz: str
    rho_for_L_Z: float
    input_norm_bound: float
    source: str  # "attack.json" (the attack happened) or "config" (hypothetical attack)


def training_input_norm_bound(setup: Setup) -> float:
    """B = max ||x|| over the training inputs the model sees, clean and with every attacker's trigger (Lemma 1's
    ||x||; after the model's input map, if it has one)."""
    triggers = {id(t): t for t in [setup.plan.trigger, *setup.plan.local_triggers.values()]}.values()
    best = 0.0
    P = setup.model.input_map
    for X in _training_inputs(setup):
        for trig in triggers:
            best = max(best, lipschitz.input_norm_bound(P(X), P(trig.apply(X))))
    return best


def certificate_ingredients(setup: Setup, attack_log: list[dict[str, Any]], B: float) -> Ingredients:
    """Corollary 1's ingredients: the attack log if the attack ran, else the config (paper reading)."""
    cfg, cz, plan = setup.cfg, setup.cfg.certify, setup.plan
    T = setup.rounds
    if attack_log:
        rec = attack_log[0]
        t_adv = int(rec["round"])
        p = rec["p"]  # None where the rule has no per-client weight (median, trimmed mean)
        tau, gamma, eta, q = rec["tau"], rec["gamma"], rec["eta"], rec["poison_ratio"]
        source = "attack.json"
    else:
        rounds = cfg.attack.rounds or []
        if cfg.attack.every is not None or not rounds:
            raise ConfigError("The certificate needs one attack round t_adv: set 'attack.rounds' to [t_adv].")
        t_adv = int(rounds[0])
        attackers = cfg.attack.attackers or list(range(max(1, cfg.attack.num_attackers)))
        p = [float(setup.weights[a]) for a in attackers]
        tau = [int(setup.tau[a]) for a in attackers]
        gamma = [cfg.attack.gamma] * len(attackers)
        eta = [cfg.clients.lr] * len(attackers)
        sizes = setup.data.sizes
        q = [nominal_poison_ratio(int(sizes[a]), cfg.clients.batch_size, cfg.attack.poison_per_batch, int(setup.tau[a]))
             for a in attackers]
        source = "config"
    rho_t_adv = setup.rho(t_adv)
    sigma_t_adv = noise_after_round(setup.sigma, t_adv, T, cz.sigma_T)
    rhos, sigmas = contraction_schedule(setup.rho, setup.sigma, t_adv, T, cz.sigma_T)
    if cz.lipschitz == "paper":
        rho_lz = rho_t_adv
        L_Z = lipschitz.lz_paper(rho_lz)
    else:
        rho_lz = start_norm_bound(setup, t_adv) + max(tau) * max(eta) * math.sqrt(2.0) * math.sqrt(B * B + 1.0)
        L_Z = lipschitz.lz_sound(rho_lz, B)
    return Ingredients(
        t_adv=t_adv, R=len(tau), p=None if p is None else [float(v) for v in p], gamma=[float(v) for v in gamma], tau=[int(v) for v in tau],
        eta=[float(v) for v in eta], poison_ratio=[float(v) for v in q], delta_norm=plan.trigger.norm
        if plan.attackers else float(cfg.attack.magnitude),
        rho_t_adv=rho_t_adv, sigma_t_adv=float(sigma_t_adv), rho=rhos, sigma=sigmas,
        log_contraction=radius_mod.log_contraction(rhos, sigmas), L_Z=float(L_Z), lipschitz=cz.lipschitz,
        rho_for_L_Z=float(rho_lz), input_norm_bound=B, source=source,
    )


def start_norm_bound(setup: Setup, t_adv: int) -> float:
    """A bound m with E||w~_{t_adv-1}||^2 <= m^2, for the paper reading's L_Z of round t_adv (docs/theory.md (b))."""
    if t_adv <= 1:
        return float(torch.linalg.vector_norm(setup.w0.double()))
    rho, sigma = setup.rho(t_adv - 1), setup.sigma(t_adv - 1)
    return math.sqrt(rho * rho + sigma * sigma * setup.model.num_params)


def paper_radii(ing: Ingredients, p_a_lower: np.ndarray, p_b_upper: np.ndarray) -> np.ndarray:
    """Corollary 1 (Eq. 2) for every point; 0 where the point abstains."""
    if ing.sigma_t_adv <= 0 or ing.p is None:
        return np.zeros(len(p_a_lower))
    return radius_mod.certified_radius(
        p_a_lower, p_b_upper, sigma_t_adv=ing.sigma_t_adv, L_Z=ing.L_Z, p=ing.p, gamma=ing.gamma, tau=ing.tau,
        eta=ing.eta, poison_ratio=ing.poison_ratio, log_contraction=ing.log_contraction,
    )


INVERSE_COLUMNS = ["index", "prediction", "delta_norm", "max_attackers", "max_gamma", "max_poison_ratio"]


def inverse_rows(ing: Ingredients, sm: BoundResult) -> list[list[Any]]:
    """Section 5.1's inverse questions at the attack's ||delta||, per point (paper reading)."""
    common = dict(sigma_t_adv=ing.sigma_t_adv, L_Z=ing.L_Z, log_contraction=ing.log_contraction)
    a = dict(p=ing.p[0], tau=ing.tau[0], eta=ing.eta[0])
    if ing.sigma_t_adv <= 0:
        n = len(sm.p_a_lower)
        r_max = g_max = q_max = np.zeros(n)
    else:
        r_max = radius_mod.max_attackers(sm.p_a_lower, sm.p_b_upper, ing.delta_norm, gamma=ing.gamma[0],
                                         poison_ratio=ing.poison_ratio[0], **a, **common)
        g_max = radius_mod.max_scale(sm.p_a_lower, sm.p_b_upper, ing.delta_norm, R=ing.R,
                                     poison_ratio=ing.poison_ratio[0], **a, **common)
        q_max = radius_mod.max_poison_ratio(sm.p_a_lower, sm.p_b_upper, ing.delta_norm, R=ing.R, gamma=ing.gamma[0],
                                            **a, **common)
    pred = sm.prediction()
    return [[i, int(pred[i]), ing.delta_norm, float(r_max[i]), float(g_max[i]), float(q_max[i])] for i in range(len(pred))]


def paper_block(ing: Ingredients) -> dict[str, Any]:
    return {
        "R": ing.R, "p": ing.p, "gamma": ing.gamma, "tau": ing.tau, "eta": ing.eta, "poison_ratio": ing.poison_ratio,
        "t_adv": ing.t_adv, "rho_t_adv": ing.rho_t_adv, "L_Z": ing.L_Z, "sigma_t_adv": ing.sigma_t_adv,
        "rho": ing.rho, "sigma": ing.sigma, "log_contraction": ing.log_contraction,
        "lipschitz": ing.lipschitz, "rho_for_L_Z": ing.rho_for_L_Z, "input_norm_bound": ing.input_norm_bound,
        "delta_norm": ing.delta_norm, "source": ing.source,
    }


# ---------------------------------------------------------------------------------------------
# smoothing


def smoothing_method(setup: Setup) -> str:
    cz = setup.cfg.certify
    m = cz.method
    if m == "auto":
        return "exact" if setup.model.is_linear else "monte-carlo"
    if m in ("exact", "margin") and not setup.model.is_linear:
        raise ConfigError(
            f"The 'certify.method' parameter must be 'monte-carlo' for the non-linear model {setup.model.name!r}. Got {m!r} instead."
        )
    if m == "margin" and cz.reading != "coupled":
        raise ConfigError(f"The 'certify.method' parameter 'margin' certifies the base model under the coupled reading only. "
                          f"Got 'certify.reading' = {cz.reading!r} instead.")
    if cz.reading == "mixture" and m == "monte-carlo":
        raise ConfigError("The 'certify.method' parameter must be 'exact' or 'auto' for the mixture reading (per-run exact "
                          "probabilities of the linear model). Got 'monte-carlo' instead.")
    return m


def smooth(setup: Setup, params: torch.Tensor, X: torch.Tensor) -> BoundResult:
    """p_A_lower, p_B_upper (and votes) for inputs X under N(params, sigma_T^2 I)."""
    cz = setup.cfg.certify
    method = smoothing_method(setup)
    X = setup.model.input_map(X)  # the inputs the model sees (a no-op without an input bound)
    if method == "exact":
        W, b = setup.model.split(params.double())
        tt = smoothing.exact_top_two(W, b, X.double(), cz.sigma_T)
        p_a_lo, p_b_up = np.asarray(tt.p_a_lower, dtype=float), np.asarray(tt.p_b_upper, dtype=float)
        return BoundResult(np.asarray(tt.c_a), np.asarray(tt.c_b), None, None, p_a_lo, p_b_up, p_a_lo <= p_b_up,
                           np.asarray(tt.log1m_p_a_lower, dtype=float), np.asarray(tt.log_p_b_upper, dtype=float))
    gen = torch_generator(setup.cfg.seed, "smoothing", 0)
    counts = _counts(setup, params, X, cz.M, gen)
    sel = None
    if cz.selection > 0:
        sel = _counts(setup, params, X, cz.selection, torch_generator(setup.cfg.seed, "selection", 0)).numpy()
    return bounds.select_and_bound(counts.numpy(), cz.alpha, cz.bound, cz.coverage, selection_counts=sel)


def _counts(setup: Setup, params: torch.Tensor, X: torch.Tensor, M: int, gen: torch.Generator) -> torch.Tensor:
    sigma = setup.cfg.certify.sigma_T
    if setup.model.is_linear:
        W, b = setup.model.split(params.float())
        return smoothing.monte_carlo_counts_linear(W, b, X.float(), sigma, M, gen)
    return smoothing.monte_carlo_counts_module(setup.model.module, params.float(), X.float(), sigma, M, gen)


# ---------------------------------------------------------------------------------------------
# the run


def _test_inputs(setup: Setup, n: int | None) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    ds: Dataset = setup.dataset
    m = len(ds.y_test) if n is None else min(n, len(ds.y_test))
    X = model_inputs(ds, ds.x_test[:m], torch.float32)
    Xb = setup.plan.trigger.apply(X)
    return X, Xb, ds.y_test[:m].astype(np.int64)


def _rows(sm: BoundResult, budget: np.ndarray | None, rad: np.ndarray, labels: np.ndarray, radius_ok: bool) -> list[list[Any]]:
    pred = sm.prediction()
    log1m, logb = sm.log1m_a(), sm.log_b()
    rows = []
    for i in range(len(labels)):
        rows.append([
            i, int(labels[i]), int(pred[i]),
            None if sm.n_a is None else int(sm.n_a[i]),
            None if sm.n_b is None else int(sm.n_b[i]),
            float(sm.p_a_lower[i]), float(sm.p_b_upper[i]), float(log1m[i]), float(logb[i]),
            None if budget is None else float(budget[i]),
            float(rad[i]) if radius_ok else None,
            int(pred[i] == labels[i]),
        ])
    return rows


def load_run(run_dir: str | Path, overrides: dict[str, Any] | None = None) -> tuple[Config, dict[str, Any], list[dict[str, Any]]]:
    """(config with overrides, model_final.pt, attack records) of a finished run: :func:`crfl.rundir.load_run`."""
    return rundir.load_run(run_dir, overrides)


class Certifier:
    """One run's certificate under ``certify.reading``, for any inputs (the run's test set or a user's).

    Built from a prepared setup and the run's files; :meth:`certify` gives, for inputs X (n, d) in
    model units, the bounds (prediction c_A or ABSTAIN, p_A_lower, p_B_upper), the parameter-distance
    budget and the radius; ``twin=True`` evaluates the counterfactual twin the same way (its
    prediction is what the guarantee speaks about). The mixture reading trains its K continuations
    (and the twin's) once, on first use.
    """

    def __init__(self, setup: Setup, final: dict[str, Any], attack_log: list[dict[str, Any]], run_dir: Path) -> None:
        self.setup, self.final, self.attack_log, self.run_dir = setup, final, attack_log, Path(run_dir)
        cz = setup.cfg.certify
        self.reading, self.method = cz.reading, smoothing_method(setup)
        self.params = final["params"]
        self.twin_params = final.get("twin_params")
        self.state = final.get("attack_state") or {}
        self.linear = bool(setup.model.is_linear)
        self._finals: dict[bool, torch.Tensor] = {}
        if self.reading == "paper":
            self.paper = certificate_ingredients(setup, attack_log, training_input_norm_bound(setup))
            self.report = paper_report(setup, self.paper, attack_log)
            self.delta_norm = self.paper.delta_norm
            blockers = radius_blockers(setup, attack_log)
            self.radius_ok = self.linear and self.paper.p is not None and not blockers
            if blockers:
                self.report["note"] = " ".join(blockers)
        else:
            blockers = radius_blockers(setup, attack_log)
            self.ing = sound_ingredients(setup, attack_log, self.reading)
            self.report = scope_report(setup, self.ing, attack_log, fixed_weight_rounds(self.run_dir), self.method,
                                       self.run_dir)
            self.delta_norm = self.ing.delta_norm
            self.radius_ok = not blockers
            if blockers:
                self.report["note"] = " ".join(blockers)
            self.report["radius_certified"] = bool(self.report["radius_certified"] and self.radius_ok)

    @property
    def has_twin(self) -> bool:
        if self.reading == "mixture":
            return self.twin_params is not None and "twin_pre_noise" in self.state
        return self.twin_params is not None

    def _continuations(self, twin: bool) -> torch.Tensor:
        if twin not in self._finals:
            # no terms when a radius blocker holds: the first attack round is then the kept aggregate's
            t_adv = self.ing.terms[0].round if self.ing.terms else int(self.state.get("round", -1))
            key = "twin_pre_noise" if twin else "pre_noise"
            if key not in self.state or int(self.state.get("round", -1)) != t_adv:
                raise ConfigError(
                    f"The run directory {str(self.run_dir)!r} keeps no pre-noise aggregate of attack round {t_adv} "
                    "(model_final.pt 'attack_state'): retrain it with this version of crfl for the mixture reading."
                )
            self._finals[twin] = mixture.continuations(self.setup, self.state[key], t_adv, self.setup.cfg.certify.training_samples)
        return self._finals[twin]

    def bounds(self, X: torch.Tensor, *, twin: bool = False) -> BoundResult:
        """c_A and (p_A_lower, p_B_upper) at inputs X, for the run's model (or its twin)."""
        cz = self.setup.cfg.certify
        params = self.twin_params if twin else self.params
        if twin and not self.has_twin:
            raise ConfigError(f"The run directory {str(self.run_dir)!r} has no twin: train it with --twin.")
        if self.reading == "mixture":
            return mixture.mixture_certificate(self.setup, self._continuations(twin), X, cz.sigma_T, cz.alpha)
        if self.method == "margin":
            return margin_result(self.setup, params, X)[0]
        return smooth(self.setup, params, X)

    def certify(self, X: torch.Tensor) -> tuple[BoundResult, np.ndarray | None, np.ndarray]:
        """(bounds, budget, radius) per point at X (budget None for the paper reading)."""
        if self.method == "margin":
            sm, budget = margin_result(self.setup, self.params, X)
        else:
            sm, budget = self.bounds(X), None
        if not self.radius_ok:
            return sm, None, np.zeros(len(sm.p_a_lower))
        if self.reading == "paper":
            return sm, None, paper_radii(self.paper, sm.p_a_lower, sm.p_b_upper)
        if budget is None:
            return (sm, *sound_radii(self.ing, sm))
        return sm, budget, closeness.solve_radius(budget, self.ing.terms, self.ing.input_norm_bound,
                                                  enforced=self.ing.input_norm_enforced)

    def block(self) -> dict[str, Any]:
        """summary.json's ``certificate`` block."""
        cz = self.setup.cfg.certify
        margin = self.reading == "coupled" and self.method == "margin"
        out: dict[str, Any] = {
            "reading": self.reading,
            "guarantee": GUARANTEES["coupled-margin" if margin else self.reading],
            "bound_form": None if (self.reading == "paper" or margin) else cz.bound_form,
            "training_samples": cz.training_samples if self.reading == "mixture" else None,
            "method": self.method,
            "delta_norm": self.delta_norm,
        }
        out.update(paper_block(self.paper) if self.reading == "paper" else self.ing.to_dict())
        out["radius_certified"] = bool(self.report["radius_certified"])
        return out


def certify_run(
    run_dir: str | Path,
    *,
    overrides: dict[str, Any] | None = None,
    dataset: Dataset | None = None,
    module: torch.nn.Module | None = None,
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Certify the final model of a finished run under ``certify.reading``; write certificates and summary blocks.

    Results go into the run directory, or into ``out_dir`` (a sweep keeps one directory per
    certification setting of the same training run); ``summary.json`` there starts from the run's.
    """
    src = Path(run_dir)
    cfg, final, attack_log = load_run(src, overrides)
    if ensemble.is_ensemble(cfg):  # G group models: the client-level certificate (crfl.ensemble)
        return ensemble.certify_ensemble(src, cfg, final, dataset=dataset, module=module, out_dir=out_dir)
    t0 = time.perf_counter()
    setup = prepare(cfg, dataset, module)
    cz = setup.cfg.certify
    cert = Certifier(setup, final, attack_log, src)
    X, Xb, y = _test_inputs(setup, cz.num_test)
    m = len(y)
    XX = torch.cat([X, Xb])
    t_s = time.perf_counter()
    both, budget_all, rad_all = cert.certify(XX)
    smooth_seconds = time.perf_counter() - t_s
    twin_block = None
    if cert.has_twin:
        what = {"mixture": "mixture prediction of the twin's continuations"}.get(
            cert.reading, "base prediction of the twin's final model" if cert.method == "margin"
            else "smoothed prediction of the twin's final model")
        exact = cert.reading == "coupled" and cert.method in ("exact", "margin")
        twin_block = twin_check(both, cert.bounds(XX, twin=True), rad_all, m, cert.delta_norm, what, exact)
    radius_ok, delta_norm = cert.radius_ok, cert.delta_norm
    sets = {"clean": both.slice(0, m), "backdoor": both.slice(m, 2 * m)}
    rad = {"clean": rad_all[:m], "backdoor": rad_all[m:]}
    budget = {"clean": None if budget_all is None else budget_all[:m], "backdoor": None if budget_all is None else budget_all[m:]}
    base_pred = setup.model.predict(final["params"].to(setup.dtype), XX.to(setup.dtype)).numpy()
    grid = radius_grid([rad["clean"], rad["backdoor"]], fixed=cz.radii)
    results: dict[str, Any] = {}
    for i, (k, s) in enumerate(sets.items()):
        pred = s.prediction()
        r = rad[k]
        hit = covered(r, delta_norm) & ~s.abstain
        results[k] = {
            "points": m,
            "base_accuracy": float((base_pred[i * m : (i + 1) * m] == y).mean()) if m else None,
            "smoothed_accuracy": float((pred == y).mean()) if m else None,
            "abstain_rate": float(s.abstain.mean()) if m else None,
            "max_radius": finite_max(r) if radius_ok else None,
            "median_radius_certified": (float(np.median(r[~s.abstain])) if (~s.abstain).any() else 0.0) if radius_ok else None,
            "certified_at_attack": float(hit.mean()) if radius_ok and m else None,
            "certified_correct_at_attack": float((hit & (pred == y)).mean()) if radius_ok and m else None,
            "curve": curve_table(r, pred, y, grid) if radius_ok else [],
        }
    blocks: dict[str, Any] = {"certificate": cert.block()}
    method, reading = cert.method, cert.reading
    blocks["smoothing"] = {
        "method": method, "M": cz.M if method == "monte-carlo" else None,
        "alpha": cz.alpha if (method == "monte-carlo" or reading == "mixture") else None,
        "bound": cz.bound if method == "monte-carlo" else ("kl-chernoff" if reading == "mixture" else None),
        "coverage": cz.coverage if method == "monte-carlo" else ("simultaneous" if reading == "mixture" else None),
        "selection": cz.selection if method == "monte-carlo" else None,
        "sigma_T": cz.sigma_T if method != "margin" else None, "seconds": smooth_seconds,
    }
    blocks["results"] = results
    blocks["assumptions"] = cert.report
    if twin_block is not None:
        blocks["twin"] = twin_block
    # the whole result set or nothing: staged, then switched in at once (crfl.rundir.results_for)
    with rundir.results_for(out_dir if out_dir is not None else src, base=src) as rs:
        for k, s in sets.items():
            rs.write_csv(f"certificates_{k}.csv", CERT_COLUMNS, _rows(s, budget[k], rad[k], y, radius_ok))
            if cert.reading == "paper" and radius_ok:
                rs.write_csv(f"inverse_{k}.csv", INVERSE_COLUMNS, inverse_rows(cert.paper, s))
        blocks["certify_seconds"] = time.perf_counter() - t0
        if twin_block is None:
            blocks["twin"] = None
        summary = rs.update_summary(blocks)
    return summary


def paper_report(setup: Setup, ing: Ingredients, attack_log: list[dict[str, Any]]) -> dict[str, Any]:
    """Corollary 1's premises for this run (paper reading; reported, never certified)."""
    B = ing.input_norm_bound
    beta = lipschitz.smoothness_bound(B)
    checks = {
        "linear_model": {"holds": bool(setup.model.is_linear), "detail": "multinomial logistic regression (Assumption 1)"},
        "eta_le_1_over_beta": {"holds": all(e <= 1.0 / beta for e in ing.eta),
                               "detail": f"eta = {max(ing.eta):.4g}, 1/beta = {1 / beta:.4g}"},
        "lipschitz": {"holds": ing.lipschitz == "sound" or B <= 1.0,
                      "detail": f"L_Z = {ing.L_Z:.4f} ({ing.lipschitz}); Lemma 1 assumes ||x|| <= 1, here B = {B:.3f}"},
        "single_attack_round": {"holds": len(attack_log) <= 1, "detail": f"{len(attack_log)} attack round(s)"},
        "training_noise_at_t_adv": {"holds": ing.sigma_t_adv > 0, "detail": f"sigma_t_adv = {ing.sigma_t_adv}"},
        "fixed_aggregation_weights": {"holds": setup.cfg.aggregation.name == "fedavg",
                                      "detail": f"aggregation '{setup.cfg.aggregation.name}'"},
    }
    return {
        "radius_certified": False,
        "checks": checks,
        "scope": [GUARANTEES["paper"]],
    }


def twin_check(
    sm: BoundResult, tw: BoundResult, rad: np.ndarray, m: int, delta_norm: float, what: str, exact: bool = True
) -> dict[str, Any]:
    """Where the certificate covers the attack (RAD > ||delta||), does the counterfactual twin agree?

    For the coupled reading the twin *is* the counterfactual (same randomness, no trigger), so every
    covered point must agree: a disagreement is a violated certificate. For the mixture reading the
    twin's continuations estimate the counterfactual law (a statistical check).
    """
    out: dict[str, Any] = {"delta_norm": delta_norm, "compared_with": what, "exact": exact}
    # exact bounds (coupled reading, exact or margin): a disagreement at a covered point is a violated certificate;
    # Monte Carlo or mixture bounds hold with probability 1 - alpha, so a disagreement there is statistical
    key = "violations" if exact else "disagreements"
    pred, twp = sm.prediction(), tw.c_a
    for k, (a, b) in {"clean": (0, m), "backdoor": (m, 2 * m)}.items():
        hit = covered(rad[a:b], delta_norm) & ~sm.abstain[a:b]
        agree = (twp[a:b] == pred[a:b]) & hit
        out[k] = {
            "covered_points": int(hit.sum()),
            "agreement": float(agree.sum() / hit.sum()) if hit.any() else None,
            key: int((hit & ~agree).sum()),
            "twin_agreement_all": float((twp[a:b] == sm.c_a[a:b]).mean()) if b > a else None,
        }
    return out
