"""The coupled reading (the default): this run against its trigger-free twin, on the same randomness.

Fix this run's training randomness omega (initial model, batches, server noise). The
counterfactual is the run on the same omega whose attackers' poisoned samples carry no trigger
(same labels, same gamma scaling): the paper's D against D'. The two final models are two fixed
centres at distance

    ||w - w'|| <= ||delta|| c(B_0 + ||delta||)     (<= ||delta|| c(B_0) when the model enforces B_0)

(:mod:`crfl.closeness`, docs/theory.md (g)). Parameter smoothing with sigma_T keeps c_A while that
distance is below the Neyman-Pearson budget sigma_T (Phi^-1(p_A_lower) - Phi^-1(p_B_upper)) / 2
(:func:`neyman_pearson_budget`; Theorem 3's KL form with ``certify.bound_form: kl``). p_A, p_B are
the smoothed probabilities around this run's final model (exact for linear models). With
``method: margin`` the deployed linear base model itself is certified, from its logit margin
(:func:`logit_margin_budget`, no smoothing).

This module also holds what the mixture reading (:mod:`crfl.readings.mixture`) shares with it:
the sound budgets, the ingredients (:class:`SoundIngredients`), budget -> radius
(:func:`sound_radii`) and the assumption checks (:func:`scope_checks`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from scipy import special

from crfl import closeness, lipschitz, rundir
from crfl.bounds import BoundResult
from crfl.closeness import AttackTerm
from crfl.config import parse_trigger_support
from crfl.radius import kl_budget
from crfl.readings.base import Reading, radius_blockers, training_input_stats
from crfl.rng import torch_generator
from crfl.server import gaussian_noise
from crfl.setup import Setup
from crfl.validation import ConfigError, check_real

# ---------------------------------------------------------------------------------------------
# the sound budgets: how far the parameters may move before the prediction changes


def _sigma(sigma: object) -> float:
    if isinstance(sigma, (np.floating, np.integer)):
        sigma = sigma.item()
    return check_real("sigma", sigma, low=0.0, low_open=True, high=math.inf, high_open=True)


def gaussian_margin(log1m_p_a_lower: np.ndarray | float, log_p_b_upper: np.ndarray | float) -> np.ndarray:
    """Phi^-1(p_A_lower) - Phi^-1(p_B_upper) from log(1 - p_A_lower) and log(p_B_upper).

    Phi^-1(p) = -Phi^-1(1 - p) is evaluated as -ndtri_exp(log(1 - p)), so a p_A_lower that
    rounds to 1.0 in float64 keeps its margin. <= 0 where the point abstains; +inf where
    p_A_lower = 1 exactly (log(1 - p_A_lower) = -inf) or p_B_upper = 0.
    """
    a = np.asarray(log1m_p_a_lower, dtype=np.float64)
    b = np.asarray(log_p_b_upper, dtype=np.float64)
    if np.any(a > 0) or np.any(b > 0) or np.any(np.isnan(a)) or np.any(np.isnan(b)):
        raise ConfigError("The 'log1m_p_a_lower' and 'log_p_b_upper' parameters must be logs of probabilities (<= 0).")
    with np.errstate(invalid="ignore"):
        return -special.ndtri_exp(a) - special.ndtri_exp(b)


def neyman_pearson_budget(sigma: float, margin: np.ndarray) -> np.ndarray:
    """The parameter distance Delta under which the smoothed prediction c_A is kept (Cohen et al. 2019, Thm 1).

    For N(w', sigma^2 I) and N(w, sigma^2 I) with ||w - w'|| <= Delta and any classifier f:
    P_w[f = c_A] >= Phi(Phi^-1(p_A_lower) - Delta/sigma), P_w[f = c] <= Phi(Phi^-1(p_B_upper) + Delta/sigma)
    (Neyman-Pearson), so c_A stays on top while Delta < sigma (Phi^-1(p_A_lower) - Phi^-1(p_B_upper)) / 2.
    Also the Gaussian-DP form of one Gaussian mechanism with sensitivity Delta. 0 where margin <= 0.
    """
    s = _sigma(sigma)
    m = np.asarray(margin, dtype=np.float64)
    return np.where(m > 0, s * m / 2.0, 0.0)


def kl_distance_budget(
    sigma: float, p_a_lower: np.ndarray, p_b_upper: np.ndarray, one_minus_p_a: np.ndarray | None = None
) -> np.ndarray:
    """The KL form: D_KL(N(w, s^2 I) || N(w', s^2 I)) = ||w - w'||^2 / (2 s^2) <= eps (Theorem 3).

    Delta <= sigma sqrt(2 eps), eps = -log(1 - (sqrt p_A - sqrt p_B)^2) (:func:`crfl.radius.kl_budget`,
    Eq. 39). Weaker than :func:`neyman_pearson_budget` (by up to sqrt(2) for small margins); kept as
    the paper's form.
    """
    s = _sigma(sigma)
    return s * np.sqrt(2.0 * np.asarray(kl_budget(p_a_lower, p_b_upper, one_minus_p_a), dtype=np.float64))


def logit_margin_budget(logits: np.ndarray, input_norms: np.ndarray) -> np.ndarray:
    """The base linear model's own certificate: its prediction is kept while
    ||w - w'|| < min_{j != A} (z_A - z_j) / (sqrt(2) sqrt(||x||^2 + 1)).

    A logit gap (w_A - w_j) . [x; 1] changes by at most ||(w_A - w_j) - (w'_A - w'_j)|| ||x~||
    <= sqrt(2) ||w - w'|| ||x~|| between two parameter vectors (docs/theory.md (g)).
    """
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] < 2:
        raise ConfigError(f"The 'logits' parameter must be an (n, C) array with C >= 2. Got shape {z.shape} instead.")
    top = np.sort(z, axis=1)
    gap = top[:, -1] - top[:, -2]
    return gap / (math.sqrt(2.0) * np.sqrt(np.asarray(input_norms, dtype=np.float64) ** 2 + 1.0))


def _np_budget(sigma: float, sm: BoundResult) -> np.ndarray:
    return neyman_pearson_budget(sigma, gaussian_margin(sm.log1m_a(), sm.log_b()))


def _kl_form_budget(sigma: float, sm: BoundResult) -> np.ndarray:
    return kl_distance_budget(sigma, sm.p_a_lower, sm.p_b_upper, np.exp(sm.log1m_a()))


#: ``certify.bound_form`` -> the budget from the bounds at smoothing noise sigma; the names are
#: ``crfl.config.CHOICES["certify.bound_form"]`` (tests/test_cli.py checks they agree).
BUDGETS: dict[str, Callable[[float, BoundResult], np.ndarray]] = {
    "neyman-pearson": _np_budget,
    "kl": _kl_form_budget,
}


# ---------------------------------------------------------------------------------------------
# the ingredients of the sound readings (coupled and mixture)


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
    rounding: closeness.RoundingBound | None = None  # the realised trajectories' rounding (None: exact arithmetic)

    def to_dict(self) -> dict[str, Any]:
        terms = []
        for k in self.terms:
            terms.append({
                "round": k.round, "p": list(k.p), "gamma": list(k.gamma), "eta": list(k.eta), "tau": list(k.tau),
                "poison_ratio": list(k.poison_ratio), "Q": list(k.Q), "p_total": k.p_total,
                "start_centred_opnorm": k.start_opnorm, "round_lipschitz": closeness.round_lipschitz(k),
                **({} if k.support is None else {"support_centred_opnorm": k.support.start_opnorm}),
                "L_Z_at_B0": [float(k.lz(t, e, self.input_norm_bound)) for t, e in zip(k.tau, k.eta)],
            })
        return {
            "attack_rounds": terms,
            "input_norm_bound": self.input_norm_bound,
            "input_norm_source": self.input_norm_source,
            "input_norm_enforced": self.input_norm_enforced,
            "deviation_coefficient_at_B0": closeness.deviation_coefficient(self.terms, self.input_norm_bound),
            "sigma": self.sigma,
            "delta_norm": self.delta_norm,
            **({"rounding": self.rounding.to_dict(), "rounding_error": self.rounding.total} if self.rounding else {}),
        }


def clean_input_norm_bound(setup: Setup) -> float:
    """B_0 = max ||x|| over the clean training inputs (what only a simulator knows; a federation sets it)."""
    return training_input_stats(setup)[0]


ENFORCED_SOURCE = "model.input_norm_bound (enforced by the model)"


def input_norm_bound(setup: Setup) -> tuple[float, str, bool]:
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


def attack_terms(attack_log: list[dict[str, Any]]) -> tuple[AttackTerm, ...]:
    """The attack rounds of attack.json, in order; a ConfigError when none was recorded."""
    if not attack_log:
        raise ConfigError(
            "The run's attack.json records no attack round: the coupled and mixture certificates bound what an attack "
            "that happened did. Train with 'attack.num_attackers' >= 1 and 'attack.rounds' set, or use --reading paper."
        )
    return tuple(AttackTerm.from_record(rec) for rec in attack_log)


def sound_radii(ing: SoundIngredients, sm: BoundResult) -> tuple[np.ndarray, np.ndarray]:
    """(budget, radius) per point: the parameter distance the prediction tolerates, and the ||delta|| solving
    ||delta|| c(B_0 + ||delta||) = budget, or ||delta|| c(B_0) = budget when the model enforces B_0 (0 where the
    point abstains)."""
    if ing.sigma <= 0:
        budget = np.zeros(len(sm.p_a_lower))
    else:
        budget = BUDGETS["kl" if ing.bound_form == "kl" else "neyman-pearson"](ing.sigma, sm)
    budget = np.where(sm.abstain, 0.0, budget)
    bad = ~np.isfinite(budget)
    if bad.any():
        # p_A < 1 and p_B > 0 for Gaussian smoothing, so the budget is finite in exact arithmetic: an infinite (or
        # NaN) one is float64 saturating (p_A rounds to 1 when sigma ||x|| is tiny against the margin), not a radius
        raise ConfigError(
            f"The 'certify.sigma_T' parameter is too small for the arithmetic: with sigma = {ing.sigma:.3g} the smoothed "
            f"probabilities of {int(bad.sum())} point(s) saturate in float64 and their distance budget is not finite. "
            "Use a larger certify.sigma_T (e.g. >= 1e-6), or --method margin for the base model without smoothing."
        )
    return budget, solve(ing, budget)


def solve(ing: SoundIngredients, budget: np.ndarray) -> np.ndarray:
    """budget -> radius: with the rounding terms when the ingredients carry them (docs/theory.md (g), step 7)."""
    if ing.rounding is not None:
        return closeness.solve_radius_rounded(budget, ing.terms, ing.rounding, enforced=ing.input_norm_enforced)
    return closeness.solve_radius(budget, ing.terms, ing.input_norm_bound, enforced=ing.input_norm_enforced)


# ---------------------------------------------------------------------------------------------
# the arithmetic: the rounding of the realised run and twin (docs/theory.md (g), step 7)


def server_noise_norms(setup: Setup) -> tuple[float, ...]:
    """||eps~_t|| of the server noise the run and its twin share, t = 1..T (regenerated from the config's seed,
    as :func:`crfl.server.server_step` draws it: float64, cast to the training dtype)."""
    D = int(setup.w0.numel())
    out = []
    for t in range(1, setup.rounds + 1):
        sigma = setup.sigma(t) if t < setup.rounds else 0.0
        if sigma > 0:
            eps = gaussian_noise((D,), sigma, torch_generator(setup.cfg.seed, "server-noise", t), torch.float64)
            out.append(float(torch.linalg.vector_norm(eps.to(setup.dtype).double())))
        else:
            out.append(0.0)
    return tuple(out)


def rounding_spec(setup: Setup, terms: tuple[AttackTerm, ...], B0: float, enforced: bool) -> closeness.RoundingSpec:
    """The server-known quantities the rounding bound of this run's (and its twin's) realised trajectory rests on."""
    u = closeness.unit_roundoff(setup.dtype)
    d, C = int(setup.model.num_features), int(setup.model.num_classes)
    T = setup.rounds
    w = setup.weights.double().abs()
    by_round = {k.round: k for k in terms}
    clean, attack, lip = [], [], []
    for t in range(1, T + 1):
        k = by_round.get(t)
        if k is None:
            clean.append(float(w.sum()))
            attack.append(0.0)
            lip.append(1.0)
        else:
            clean.append(max(float(k.p_total) - sum(k.p), 0.0))
            attack.append(sum(p * abs(g) for p, g in zip(k.p, k.gamma)))
            lip.append(closeness.round_lipschitz(k))
    B_hat = B0 * (1.0 + closeness.gamma_n(d + 4, u))
    box = math.sqrt(d)
    return closeness.RoundingSpec(
        unit_roundoff=u, num_features=d, num_classes=C, num_params=int(setup.w0.numel()),
        num_clients=int(setup.data.num_clients), batch_size=int(setup.cfg.clients.batch_size),
        lr=max([setup.cfg.clients.lr] + [e for k in terms for e in k.eta]),
        tau=int(max([int(np.max(setup.tau))] + [t for k in terms for t in k.tau])),
        w0_norm=float(torch.linalg.vector_norm(setup.w0.double())),
        rho=tuple(float(setup.rho(t)) for t in range(1, T + 1)), noise_norm=server_noise_norms(setup),
        clean_weight=tuple(clean), attack_weight=tuple(attack), lip=tuple(lip), input_bound=B_hat,
        attack_input_bound=B_hat if enforced else max(B_hat, box * (1.0 + u)), box_norm=box,
        map_radius=B0 if enforced else None,
    )


def noise_seed_unknown(run_dir: Path | None) -> bool:
    """Whether config.yaml's provenance says the server noise came from a seed other than the config's."""
    if run_dir is None:
        return False
    try:
        prov = rundir.RunDir(run_dir).read_config().get("provenance") or {}
    except (rundir.RunDirError, OSError):  # no readable config.yaml (a Certifier built in memory): the config's seed
        return False
    return "separate" in str((prov.get("flower") or {}).get("noise_seed", ""))


def rounding_bound(
    setup: Setup, terms: tuple[AttackTerm, ...], B0: float, enforced: bool, reading: str, run_dir: Path | None = None,
    model_norm: float = 0.0,
) -> tuple[closeness.RoundingBound | None, str | None]:
    """(the rounding bound, None) or (None, why it cannot be bounded). The mixture reading compares the attack
    round's pre-noise aggregates from equal starts: only that round's rounding (run and twin) enters. Both add the
    certification's own rounding of the smoothed model (norm ``model_norm``) as a parameter perturbation."""
    if not terms:
        return None, None
    if noise_seed_unknown(run_dir):
        return None, ("the server noise was drawn from a separate seed that is not recorded (Flower's noise-seed), so "
                      "its norm, which the rounding bound needs, is unknown")
    try:
        spec = rounding_spec(setup, terms, B0, enforced)
        rb = closeness.rounding_error(spec)
    except ConfigError as e:
        return None, str(e)
    if reading == "mixture":
        t_adv = terms[0].round
        rb = replace(rb, per_round=(rb.per_round[t_adv - 1],), total=2.0 * rb.per_round[t_adv - 1])
        # the continuations are Clip_{rho_T} outputs: their norms are bounded by rho_T, not by this run's model
        model_norm = setup.rho(setup.rounds) * (1.0 + 3.0 * closeness.unit_roundoff(setup.dtype))
        if not math.isfinite(model_norm):
            return None, "rho_T is infinite: the mixture's continuations have no norm bound for the certification's rounding"
    cert = closeness.certification_rounding(model_norm, int(setup.model.num_features))
    return replace(rb, total=rb.total + cert, certification=cert), None


def proven_deviation(terms: tuple[AttackTerm, ...], rb: closeness.RoundingBound, ing: SoundIngredients, delta: float) -> float:
    """r^ c'(B^ + r^) + E (+ the support leak): what the certificate assumes of the realised run and twin at ||delta||."""
    r_hat = (1.0 + rb.trigger_scale) * delta + rb.trigger_offset
    inflated = closeness.inflate_opnorms(terms, rb)
    B = rb.input_bound + (0.0 if ing.input_norm_enforced else r_hat)
    return float(r_hat * closeness.deviation_coefficient(inflated, B) + rb.total
                 + closeness.support_leak(inflated, rb, ing.input_norm_enforced))


def arithmetic_check(setup: Setup, ing: SoundIngredients, why: str | None) -> dict[str, Any]:
    """The rounding term is proven for this run (the assumptions of docs/theory.md (g), step 7), or the reason it is not."""
    dtype = str(setup.dtype).replace("torch.", "")
    rb = ing.rounding
    if rb is None:
        return {"holds": False, "detail": f"{dtype} training: the rounding of the realised trajectories cannot be bounded"
                + (f": {why}" if why else "") + "; no radius is certified"}
    beta = lipschitz.smoothness_bound(rb.input_bound)
    eta = max([e for k in ing.terms for e in k.eta] + [setup.cfg.clients.lr])
    holds = eta <= 2.0 / beta
    return {
        "holds": holds,
        "detail": (f"{dtype} training: the realised run and twin differ from the exact-arithmetic maps by at most "
                   f"E = {rb.total:.3g} in parameter norm (unit roundoff {closeness.unit_roundoff(setup.dtype):.3g}, "
                   f"largest per-step bound {rb.step_error:.3g}); every radius solves RAD^ c(B_0 + RAD^) + E <= budget "
                   f"with the realised trigger RAD^ = (1 + {rb.trigger_scale:.2g}) RAD + {rb.trigger_offset:.3g}, so a point "
                   f"whose budget is <= E + {rb.trigger_offset:.3g} c gets radius 0 (the arithmetic cannot resolve it"
                   + ("; train with run.dtype: float64)" if dtype == "float32" else ")")
                   + (f"; realised inputs ||x^|| <= {rb.input_bound:.6g}, eta <= 2/beta there" if holds else
                      f"; fails: eta = {eta:.4g} > 2/beta = {2 / beta:.4g} at the realised input bound {rb.input_bound:.6g}")),
    }


def margin_result(setup: Setup, params: torch.Tensor, X: torch.Tensor) -> tuple[BoundResult, np.ndarray]:
    """The linear base model's prediction and its logit-margin budget (``method: margin``), at the model's inputs P(X)."""
    W, b = setup.model.split(params.double())
    Xd = setup.model.input_map(X.double())
    z = (Xd @ W.T + b).numpy()
    budget = logit_margin_budget(z, torch.linalg.vector_norm(Xd, dim=1).numpy())
    order = np.argsort(-z, axis=1, kind="stable")
    c_a, c_b = order[:, 0].astype(np.int64), order[:, 1].astype(np.int64)
    n = len(z)
    # no probabilities: p_a_lower = 1, p_b_upper = 0 stand for the deterministic base prediction
    res = BoundResult(c_a, c_b, None, None, np.ones(n), np.zeros(n), budget <= 0, np.full(n, -np.inf), np.full(n, -np.inf))
    return res, budget


# ---------------------------------------------------------------------------------------------
# which triggers the certificate covers (certify.trigger_support; docs/theory.md (g), step 3b)


@dataclass(frozen=True)
class TriggerSupport:
    """The set S of input coordinates a covered trigger may touch (None: anywhere), and where it came from."""

    kind: str  # anywhere | attack | given
    indices: tuple[int, ...] | None
    source: str

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "size": None if self.indices is None else len(self.indices),
                "indices": None if self.indices is None else list(self.indices), "source": self.source}

    def covers(self) -> str:
        """The guarantee's sentence on which triggers it speaks about."""
        if self.indices is None:
            return ("It covers triggers in any direction (certify.trigger_support: anywhere): every delta with "
                    "||delta|| below the radius.")
        return (f"It covers only triggers supported on S, {len(self.indices)} input coordinate(s) ({self.source}): "
                "x' = clamp(x + delta) with delta_j = 0 for j outside S and ||delta|| below the radius; a trigger "
                "touching any other input coordinate is not covered.")


def trigger_coordinates(setup: Setup) -> tuple[int, ...]:
    """The input coordinates the run's own trigger touches: the nonzero entries of the full trigger and of every
    attacker's local trigger (DBA parts)."""
    plan = setup.plan
    touched: set[int] = set()
    for trig in [plan.trigger, *plan.local_triggers.values()]:
        touched.update(int(i) for i in torch.nonzero(trig.delta).flatten().tolist())
    return tuple(sorted(touched))


def resolve_support(setup: Setup, spec: Any = None) -> TriggerSupport:
    """``certify.trigger_support`` (or ``spec``) resolved against the run: anywhere, the attack's trigger, or given indices."""
    d = int(setup.dataset.num_features)
    value = parse_trigger_support(setup.cfg.certify.trigger_support if spec is None else spec, d)
    if value == "anywhere":
        return TriggerSupport("anywhere", None, "any direction")
    if value == "attack":
        idx = trigger_coordinates(setup)
        if not idx:
            raise ConfigError("The 'certify.trigger_support' parameter 'attack' needs a trigger with a nonzero entry. "
                              "Got a zero trigger (attack.magnitude = 0) instead: use 'anywhere' or list input indices.")
        return TriggerSupport("attack", idx, f"the attack's {setup.plan.kind} trigger, from the attack plan")
    return TriggerSupport("given", tuple(value), "given by certify.trigger_support")


def support_terms(
    setup: Setup, terms: tuple[AttackTerm, ...], attack_log: list[dict[str, Any]], support: TriggerSupport, enforced: bool
) -> tuple[AttackTerm, ...]:
    """The attack terms with the support's geometry (:class:`crfl.lipschitz.SupportGeometry`), so that their L_Z is
    :func:`crfl.lipschitz.lz_support`; unchanged for triggers anywhere.

    omega_S is the Frobenius norm of the broadcast model's centred columns on S (attack.json's
    ``start_centred_column_norms``); a record without them (an older run) falls back to the whole
    ||(I - 11^T/C) W~||_2, also an upper bound."""
    if support.indices is None:
        return terms
    idx = list(support.indices)
    # the box every input the model sees lies in: the model's own clamp when it enforces B_0, else the trigger's
    # (clean inputs inside it: the inputs_in_trigger_box check)
    box = setup.model.input_bound if enforced else setup.plan.trigger
    BS = lipschitz.support_norm_bound(len(idx), box.low, box.high)
    out = []
    for term, rec in zip(terms, attack_log):
        cols = rec.get("start_centred_column_norms")
        omega_s = term.start_opnorm
        if cols is not None and len(cols) == setup.dataset.num_features:
            omega_s = min(omega_s, lipschitz.support_opnorm_bound(cols, idx))
        geom = lipschitz.SupportGeometry(len(idx), omega_s, BS, enforced)
        out.append(dataclasses.replace(term, support=geom))
    return tuple(out)


def support_check(setup: Setup, support: TriggerSupport) -> dict[str, Any]:
    """The run's own trigger must lie inside S, else the certificate does not speak about the attack that happened."""
    touched = trigger_coordinates(setup)
    if support.indices is None:
        return {"holds": True, "detail": "triggers in any direction are covered"}
    outside = sorted(set(touched) - set(support.indices))
    return {
        "holds": not outside,
        "detail": (f"the attack's trigger touches {len(touched)} input coordinate(s), all inside S (|S| = "
                   f"{len(support.indices)}, {support.source})" if not outside else
                   f"the attack's trigger touches {len(outside)} input coordinate(s) outside S (e.g. {outside[:5]}; |S| = "
                   f"{len(support.indices)}, {support.source}): this run's attack is not among the covered triggers; "
                   "use certify.trigger_support 'attack' or 'anywhere'"),
    }


# ---------------------------------------------------------------------------------------------
# the assumptions of the sound readings, checked for this run


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
    # float32 rounding of x + delta - x: |fl(x + delta) - x| <= |delta| + u |x + delta| (docs/theory.md (g) step 7a)
    slack = ing.delta_norm * 1e-4
    if ing.rounding is not None:
        slack = max(slack, ing.rounding.trigger_scale * ing.delta_norm + ing.rounding.trigger_offset)
    within = all(v <= ing.delta_norm + slack for v in actual)
    return {
        "holds": (inside or model_clamps) and within,
        "detail": f"clean training inputs in [{lo:.4g}, {hi:.4g}] (the trigger is clamped to [0, 1]"
                  + ("; so does the model's input map" if model_clamps else "") + "); largest applied "
                  f"||x' - x|| = {max(actual) if actual else 0.0:.4g} <= ||delta|| = {ing.delta_norm:.4g}",
    }


def scope_checks(
    setup: Setup, ing: SoundIngredients, attack_log: list[dict[str, Any]], fixed_rounds: dict[int, bool], method: str
) -> dict[str, dict[str, Any]]:
    """The assumptions both sound readings rest on (docs/theory.md (g)), checked for this run."""
    B = ing.input_norm_bound
    beta = lipschitz.smoothness_bound(B)
    eta = max([e for k in ing.terms for e in k.eta] + [setup.cfg.clients.lr])
    first = ing.terms[0].round if ing.terms else min(fixed_rounds or {1: True})
    later = {t: ok for t, ok in fixed_rounds.items() if t >= first}
    fixed = all(later.values()) if later else setup.cfg.aggregation.name == "fedavg"
    p_tot = max([k.p_total for k in ing.terms] + [float(setup.weights.sum())])
    return {
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


def confidence_check(setup: Setup, method: str) -> dict[str, Any] | None:
    """Monte Carlo bounds make the statement hold with probability 1 - alpha, for a jointly covered (p_A, p_B)."""
    cz = setup.cfg.certify
    if not (setup.model.is_linear and method == "monte-carlo"):
        return None
    valid = cz.coverage == "simultaneous" or cz.selection > 0
    return {
        "holds": valid,
        "detail": f"Monte Carlo bounds: the statement holds with probability >= 1 - {cz.alpha}" if valid else
                  "coverage 'paper' bounds p_A and p_B each at alpha for the data-selected top two: not a joint "
                  "statement for c_A (docs/theory.md (c)); use coverage 'simultaneous' or a selection sample",
    }


def fixed_weight_rounds(run_dir: Path) -> dict[int, bool]:
    """rounds.csv's ``aggregation_fixed_weights`` per round (rounds that did not record it are left out)."""
    return {r.round: bool(r.aggregation_fixed_weights) for r in rundir.RunDir(run_dir).read_rounds()
            if r.aggregation_fixed_weights is not None}


LABEL_SWAP_SCOPE = (
    "The radius bounds the trigger's magnitude ||delta_x||; the label swap delta_y is part of both D and D' "
    "(the counterfactual keeps the target labels and the scaling), as in the paper's Lemma 1 (y_1 = y_2)."
)


# ---------------------------------------------------------------------------------------------
# the reading


class CoupledReading(Reading):
    """This run against its trigger-free twin on the same randomness: smoothing with sigma_T around this
    run's final model (or, ``method: margin``, the base model's logit margin), budget -> radius by
    model closeness (:mod:`crfl.closeness`)."""

    name: ClassVar[str] = "coupled"
    CERTIFIES_BASE_MODEL: ClassVar[bool] = True
    GUARANTEE: ClassVar[str] = (
        "With this run's training randomness fixed (initial model, batches, server noise), the counterfactual run on "
        "the same randomness whose attackers' poisoned samples carry no trigger (same labels, same scaling: data D "
        "instead of D') gives the same parameter-smoothed prediction (sigma_T) at this input whenever the trigger's "
        "norm ||delta|| is below the radius."
    )
    MARGIN_GUARANTEE: ClassVar[str] = (
        "With this run's training randomness fixed (initial model, batches, server noise), the counterfactual run on "
        "the same randomness whose attackers' poisoned samples carry no trigger (same labels, same scaling: data D "
        "instead of D') deploys a linear model with the same prediction at this input whenever the trigger's norm "
        "||delta|| is below the radius (no smoothing)."
    )
    #: The model the guarantee compares with (the ``scope`` of the assumptions block).
    REFERENCE: ClassVar[str] = "the twin run trained by --twin (same randomness, no trigger)"

    def __init__(self, setup: Setup, final: dict[str, Any], attack_log: list[dict[str, Any]], run_dir: Path) -> None:
        super().__init__(setup, final, attack_log, run_dir)
        blockers = radius_blockers(setup, attack_log)
        B0, source, enforced = input_norm_bound(setup)
        self.support = resolve_support(setup)
        self.anywhere_terms = attack_terms(attack_log) if not blockers else ()
        terms = support_terms(setup, self.anywhere_terms, attack_log, self.support, enforced)
        cz = setup.cfg.certify
        rounding, why = (rounding_bound(setup, terms, B0, enforced, self.name, run_dir,
                                       float(torch.linalg.vector_norm(self.params.double())) if self.params is not None else math.inf)
                         if not blockers else (None, None))
        self.ing = SoundIngredients(self.name, terms, B0, source, enforced, self.noise(terms), cz.bound_form,
                                    float(setup.plan.trigger.norm), rounding)
        self.report = self._report(fixed_weight_rounds(self.run_dir))
        if not blockers:
            self.report["checks"]["arithmetic"] = arithmetic_check(setup, self.ing, why)
            self.report["radius_certified"] = bool(self.report["radius_certified"] and self.report["checks"]["arithmetic"]["holds"])
        self.delta_norm = self.ing.delta_norm
        self.radius_ok = not blockers
        if blockers:
            self.report["note"] = " ".join(blockers)
        self.report["radius_certified"] = bool(self.report["radius_certified"] and self.radius_ok)

    def noise(self, terms: tuple[AttackTerm, ...]) -> float:
        """The Gaussian noise of the Neyman-Pearson step: the smoothing noise sigma_T."""
        return float(self.setup.cfg.certify.sigma_T)

    def _report(self, fixed_rounds: dict[int, bool]) -> dict[str, Any]:
        checks = scope_checks(self.setup, self.ing, self.attack_log, fixed_rounds, self.method)
        checks["trigger_in_support"] = support_check(self.setup, self.support)
        checks.update(self.own_checks())
        conf = confidence_check(self.setup, self.method)
        if conf is not None:
            checks["confidence"] = conf
        certified = all(c["holds"] for c in checks.values())
        return {"radius_certified": certified, "checks": checks, "scope": [LABEL_SWAP_SCOPE, "Reference model: " + self.REFERENCE]}

    def own_checks(self) -> dict[str, dict[str, Any]]:
        """The checks only this reading needs (none for the coupled one)."""
        return {}

    @property
    def margin(self) -> bool:
        return self.method == "margin"

    @property
    def guarantee(self) -> str:
        return (self.MARGIN_GUARANTEE if self.margin else self.GUARANTEE) + " " + self.support.covers()

    @property
    def bound_form(self) -> str | None:
        return None if self.margin else self.setup.cfg.certify.bound_form

    def bounds(self, X: torch.Tensor, *, twin: bool = False, seed: Any = None) -> BoundResult:
        if self.margin:
            if twin and not self.has_twin:
                raise ConfigError(f"The run directory {str(self.run_dir)!r} has no twin: train it with --twin.")
            return margin_result(self.setup, self.twin_params if twin else self.params, X)[0]
        return super().bounds(X, twin=twin, seed=seed)

    def certify(self, X: torch.Tensor, *, seed: Any = None) -> tuple[BoundResult, np.ndarray | None, np.ndarray]:
        if not self.margin:
            return super().certify(X, seed=seed)
        sm, budget = margin_result(self.setup, self.params, X)
        if not self.radius_ok:
            return sm, None, np.zeros(len(sm.p_a_lower))
        return sm, budget, self._solve(budget)

    def radii(self, sm: BoundResult) -> tuple[np.ndarray, np.ndarray]:
        return sound_radii(self.ing, sm)

    def _solve(self, budget: np.ndarray) -> np.ndarray:
        return solve(self.ing, budget)

    def ingredients_block(self) -> dict[str, Any]:
        out = self.ing.to_dict()
        sup = self.support.to_dict()
        geom = self.ing.terms[0].support if self.ing.terms else None
        if geom is not None:
            sup["norm_bound"] = geom.norm_bound  # B_S
            sup["off_support_share"] = float(lipschitz.off_support_share(min(geom.norm_bound, self.ing.input_norm_bound),
                                                                         self.ing.input_norm_bound, geom.enforced))
        out["trigger_support"] = sup
        return out

    # -- the same budgets under the other trigger supports, and the twin's distance against the bound ----------------

    def _terms_for(self, name: str) -> tuple[AttackTerm, ...] | None:
        """The attack terms for the support ``name`` (anywhere | attack); None where it cannot be formed."""
        if name == self.support.kind:
            return self.ing.terms
        if name == "anywhere":
            return self.anywhere_terms
        try:
            sup = resolve_support(self.setup, name)
        except ConfigError:
            return None
        return support_terms(self.setup, self.anywhere_terms, self.attack_log, sup, self.ing.input_norm_enforced)

    def radii_by_support(self, budget: np.ndarray) -> dict[str, np.ndarray]:
        """The radius of the same budgets (the smoothing does not depend on S) for triggers anywhere and on the
        attack's support, next to this certificate's own (``crfl run`` prints the certified fraction for each)."""
        out = {}
        for name in dict.fromkeys(("anywhere", "attack", self.support.kind)):
            terms = self._terms_for(name)
            if terms is not None:
                # the same solve as this certificate's own radius: rounding term E, the support's leak and the realised trigger
                out[name] = solve(replace(self.ing, terms=terms), budget)
        return out

    def deviation_bound(self, terms: tuple[AttackTerm, ...] | None = None) -> float:
        """The proven ||w_T - w'_T|| <= ||delta|| c(B), B = B_0 (enforced) or B_0 + ||delta|| (docs/theory.md (g), step 5)."""
        B = self.ing.input_norm_bound + (0.0 if self.ing.input_norm_enforced else self.delta_norm)
        return float(self.delta_norm * closeness.deviation_coefficient(self.ing.terms if terms is None else terms, B))

    def twin_tightness(self) -> dict[str, Any]:
        """summary.json's ``twin`` additions: the realised ||w_T - w'_T|| over the proven deviation bound (the coupled
        reading with a twin only; the mixture's twin is a law, not one model)."""
        if self.name != "coupled" or not self.has_twin or not self.radius_ok or not self.ing.terms:
            return {}
        dist = float(torch.linalg.vector_norm(self.params.double() - self.twin_params.double()))
        out: dict[str, Any] = {"distance": dist}
        by = {}
        for name in dict.fromkeys((self.support.kind, "anywhere", "attack")):
            terms = self._terms_for(name)
            if terms is not None:
                bound = self.deviation_bound(terms)
                by[name] = {"deviation_bound": bound, "tightness": dist / bound if bound > 0 else None}
                rb = self.ing.rounding
                if rb is not None:  # the bound of the realised (rounded) runs, docs/theory.md (g) step 7
                    by[name]["deviation_bound_with_rounding"] = proven_deviation(terms, rb, self.ing, self.delta_norm)
        out["deviation_bound"] = by[self.support.kind]["deviation_bound"]
        if "deviation_bound_with_rounding" in by[self.support.kind]:
            out["deviation_bound_with_rounding"] = by[self.support.kind]["deviation_bound_with_rounding"]
        out["tightness"] = by[self.support.kind]["tightness"]
        out["tightness_by_support"] = by
        return out

    @property
    def twin_compared_with(self) -> str:
        return "base prediction of the twin's final model" if self.margin else super().twin_compared_with

    @property
    def twin_exact(self) -> bool:
        # exact bounds (exact smoothing or the margin): a disagreement at a covered point is a violated certificate
        return self.method in ("exact", "margin")
