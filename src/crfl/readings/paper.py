"""The paper reading: Corollary 1 (Eq. 2) as printed, for reproduction only (``radius_certified: false``).

It reads every symbol of Eq. 2 off the run (:class:`Ingredients`: the attack log if the attack ran,
else the config), smooths this run's final model with sigma_T for p_A_lower, p_B_upper, and evaluates

    RAD = sqrt( eps sigma_{t_adv}^2 / (2 R L_Z^2 sum_i (p_i gamma_i tau_i eta_i q_i)^2 kappa) )

with :func:`crfl.radius.certified_radius`, plus Section 5.1's inverse questions at the attack's
||delta|| (:func:`inverse_rows`, ``inverse_{clean,backdoor}.csv``). It combines one run's smoothing
probabilities with a bound on the laws of the final model over all training randomness, and
Lemma 1's L_Z assumes ||x|| <= 1: the number is reported, not certified (docs/theory.md (b), (f)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from crfl import lipschitz, radius
from crfl.bounds import BoundResult
from crfl.clients import nominal_poison_ratio
from crfl.readings.base import Reading, radius_blockers, training_inputs
from crfl.schedule import contraction_schedule, noise_after_round
from crfl.setup import Setup
from crfl.validation import ConfigError


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
    for X in training_inputs(setup):
        for trig in triggers:
            best = max(best, lipschitz.input_norm_bound(P(X), P(trig.apply(X))))
    return best


def certificate_ingredients(setup: Setup, attack_log: list[dict[str, Any]], B: float) -> Ingredients:
    """Corollary 1's ingredients: the attack log if the attack ran, else the config."""
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
        log_contraction=radius.log_contraction(rhos, sigmas), L_Z=float(L_Z), lipschitz=cz.lipschitz,
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
    return radius.certified_radius(
        p_a_lower, p_b_upper, sigma_t_adv=ing.sigma_t_adv, L_Z=ing.L_Z, p=ing.p, gamma=ing.gamma, tau=ing.tau,
        eta=ing.eta, poison_ratio=ing.poison_ratio, log_contraction=ing.log_contraction,
    )


INVERSE_COLUMNS = ["index", "prediction", "delta_norm", "max_attackers", "max_gamma", "max_poison_ratio"]


def inverse_rows(ing: Ingredients, sm: BoundResult) -> list[list[Any]]:
    """Section 5.1's inverse questions at the attack's ||delta||, per point."""
    common = dict(sigma_t_adv=ing.sigma_t_adv, L_Z=ing.L_Z, log_contraction=ing.log_contraction)
    a = dict(p=ing.p[0], tau=ing.tau[0], eta=ing.eta[0])
    if ing.sigma_t_adv <= 0:
        n = len(sm.p_a_lower)
        r_max = g_max = q_max = np.zeros(n)
    else:
        r_max = radius.max_attackers(sm.p_a_lower, sm.p_b_upper, ing.delta_norm, gamma=ing.gamma[0],
                                     poison_ratio=ing.poison_ratio[0], **a, **common)
        g_max = radius.max_scale(sm.p_a_lower, sm.p_b_upper, ing.delta_norm, R=ing.R,
                                 poison_ratio=ing.poison_ratio[0], **a, **common)
        q_max = radius.max_poison_ratio(sm.p_a_lower, sm.p_b_upper, ing.delta_norm, R=ing.R, gamma=ing.gamma[0],
                                        **a, **common)
    pred = sm.prediction()
    return [[i, int(pred[i]), ing.delta_norm, float(r_max[i]), float(g_max[i]), float(q_max[i])] for i in range(len(pred))]


def paper_block(ing: Ingredients) -> dict[str, Any]:
    """The symbols of Eq. 2 as written into the ``certificate`` block."""
    return {
        "R": ing.R, "p": ing.p, "gamma": ing.gamma, "tau": ing.tau, "eta": ing.eta, "poison_ratio": ing.poison_ratio,
        "t_adv": ing.t_adv, "rho_t_adv": ing.rho_t_adv, "L_Z": ing.L_Z, "sigma_t_adv": ing.sigma_t_adv,
        "rho": ing.rho, "sigma": ing.sigma, "log_contraction": ing.log_contraction,
        "lipschitz": ing.lipschitz, "rho_for_L_Z": ing.rho_for_L_Z, "input_norm_bound": ing.input_norm_bound,
        "delta_norm": ing.delta_norm, "source": ing.source,
    }


def paper_report(setup: Setup, ing: Ingredients, attack_log: list[dict[str, Any]]) -> dict[str, Any]:
    """Corollary 1's premises for this run (reported, never certified)."""
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
        "scope": [PaperReading.GUARANTEE],
    }


class PaperReading(Reading):
    """Corollary 1 as printed: smoothing with sigma_T around this run's final model, Eq. 2 for the radius."""

    name: ClassVar[str] = "paper"
    GUARANTEE: ClassVar[str] = (
        "Corollary 1 (Eq. 2) as printed, for reproduction only: it combines one run's smoothing probabilities with a "
        "bound on the laws of the final model over all training randomness, and its Lemma 1 L_Z assumes ||x|| <= 1, so "
        "this number is not a certified radius."
    )

    def __init__(self, setup: Setup, final: dict[str, Any], attack_log: list[dict[str, Any]], run_dir: Path) -> None:
        super().__init__(setup, final, attack_log, run_dir)
        self.ing = certificate_ingredients(setup, attack_log, training_input_norm_bound(setup))
        self.report = paper_report(setup, self.ing, attack_log)
        self.delta_norm = self.ing.delta_norm
        blockers = radius_blockers(setup, attack_log)
        self.radius_ok = self.linear and self.ing.p is not None and not blockers
        if blockers:
            self.report["note"] = " ".join(blockers)

    def radii(self, sm: BoundResult) -> tuple[None, np.ndarray]:
        return None, paper_radii(self.ing, sm.p_a_lower, sm.p_b_upper)

    def ingredients_block(self) -> dict[str, Any]:
        return paper_block(self.ing)

    def tables(self, sm: BoundResult) -> list[tuple[str, list[str], list[list[Any]]]]:
        """``inverse_*.csv``: Section 5.1's inverse questions per point (where a radius is computed)."""
        return [("inverse", INVERSE_COLUMNS, inverse_rows(self.ing, sm))] if self.radius_ok else []
