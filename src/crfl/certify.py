"""Certification of a training run (Algorithm 2, Corollary 1, Theorem 1).

For every test point, clean and backdoored (trigger added, true label kept,
Appendix A.3): the prediction of the parameter-smoothed final model
Clip_{rho_T}(w_T) + N(0, sigma_T^2 I), or ABSTAIN, and the certified radius on
the backdoor magnitude ||delta|| (Corollary 1).

The steps, each a separate function:
1. smoothing — exact class probabilities for linear models (:func:`smoothing.exact_top_two`)
   or Monte Carlo vote counts over M noisy models (:mod:`crfl.smoothing`);
2. bounds — p_A_lower, p_B_upper (:mod:`crfl.bounds`), abstain when p_A_lower <= p_B_upper;
3. radius — Corollary 1 with ingredients read from the run, never re-typed
   (:func:`certificate_ingredients`): p_i is the attacker's actual aggregation
   weight at t_adv (RFA's Weiszfeld weight), tau_i its actual number of local
   iterations, rho_t and sigma_t from the one schedule training used.

Outputs in the run directory: ``certificates_clean.csv``,
``certificates_backdoor.csv``, blocks ``certificate``, ``smoothing``,
``results``, ``assumptions`` (and ``twin``) of ``summary.json``, and plots.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from crfl import bounds, lipschitz, radius as radius_mod, smoothing
from crfl.bounds import BoundResult
from crfl.config import Config, from_dict, set_dotted
from crfl.data import Dataset
from crfl.io import write_csv, write_json
from crfl.metrics import ABSTAIN, curve_table, finite_max, radius_grid
from crfl.rng import torch_generator
from crfl.schedule import contraction_schedule
from crfl.clients import nominal_poison_ratio
from crfl.setup import Setup, model_inputs, prepare
from crfl.validation import ConfigError

CERT_COLUMNS = ["index", "label", "prediction", "n_a", "n_b", "p_a_lower", "p_b_upper", "radius", "correct"]


# ---------------------------------------------------------------------------------------------
# ingredients of Corollary 1


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
    """B = max ||x|| over the training inputs, clean and with every attacker's trigger (Lemma 1's ||x||)."""
    ds = setup.dataset
    triggers = {id(t): t for t in [setup.plan.trigger, *setup.plan.local_triggers.values()]}.values()
    best = 0.0
    xs = torch.from_numpy(ds.x_train)
    for i in range(0, len(xs), 16384):
        X = model_inputs(ds, xs[i : i + 16384], torch.float64)
        for trig in triggers:
            best = max(best, lipschitz.input_norm_bound(X, trig.apply(X)))
    return best


def certificate_ingredients(setup: Setup, attack_log: list[dict[str, Any]], B: float) -> Ingredients:
    """Read Corollary 1's ingredients from the run: the attack log if the attack ran, else the config."""
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
    sigma_t_adv = setup.sigma(t_adv) if t_adv < T else cz.sigma_T
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
    """A bound m with E||w~_{t_adv-1}||^2 <= m^2, for the L_Z of round t_adv (docs/theory.md (b)).

    Every local iterate of round t_adv, in the backdoored and the clean process, starts at
    w~_{t_adv-1} = Clip_{rho}(w) + eps and moves at most eta sqrt(2) sqrt(B^2 + 1) per step. The KL
    bound of round t_adv is an average over w~_{t_adv-1} (joint convexity of KL), and L_Z enters it
    squared, so a bound on sqrt(E||w~||^2) = sqrt(E||Clip(w)||^2 + sigma^2 D) <= sqrt(rho^2 + sigma^2 D)
    is what is needed — not one realised norm. Round 1 starts from the fixed initial model w_0.
    """
    if t_adv <= 1:
        w0 = setup.w0
        return float(torch.linalg.vector_norm(w0.double()))
    rho, sigma = setup.rho(t_adv - 1), setup.sigma(t_adv - 1)
    return math.sqrt(rho * rho + sigma * sigma * setup.model.num_params)


def radii(ing: Ingredients, p_a_lower: np.ndarray, p_b_upper: np.ndarray) -> np.ndarray:
    """Corollary 1 (Eq. 2) for every point; 0 where the point abstains."""
    if ing.sigma_t_adv <= 0 or ing.p is None:
        return np.zeros(len(p_a_lower))
    return radius_mod.certified_radius(
        p_a_lower, p_b_upper, sigma_t_adv=ing.sigma_t_adv, L_Z=ing.L_Z, p=ing.p, gamma=ing.gamma, tau=ing.tau,
        eta=ing.eta, poison_ratio=ing.poison_ratio, log_contraction=ing.log_contraction,
    )


INVERSE_COLUMNS = ["index", "prediction", "delta_norm", "max_attackers", "max_gamma", "max_poison_ratio"]


def inverse_rows(ing: Ingredients, sm: BoundResult) -> list[list[Any]]:
    """Section 5.1's inverse questions at the attack's ||delta||, per point (identical attackers like the first).

    Client level: the largest number of attackers R; sample level: the largest poison ratio q_B/n_B;
    and the largest scale factor gamma, for which the point's prediction is still certified.
    """
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


def assumption_report(setup: Setup, ing: Ingredients, attack_log: list[dict[str, Any]]) -> dict[str, Any]:
    """Every assumption of Theorem 1 and whether it holds for this run."""
    B = ing.input_norm_bound
    beta = (B * B + 1.0) / 2.0  # the CE Hessian of logistic regression: ||(diag P - PP^T) (x) x~x~^T|| <= ||x~||^2 / 2
    linear = bool(setup.model.is_linear)
    eta_ok = all(e <= 1.0 / beta for e in ing.eta)
    single = len(attack_log) <= 1
    paper_premise = B <= 1.0
    checks = {
        "linear_model": {"holds": linear, "detail": "multinomial logistic regression (convex, Assumption 1)"},
        "eta_le_1_over_beta": {
            "holds": eta_ok,
            "detail": f"eta = {max(ing.eta):.4g}, beta <= (B^2 + 1) / 2 = {beta:.4g}, 1/beta = {1 / beta:.4g}",
        },
        "input_norm_bound": {"holds": True, "detail": f"B = max ||x|| over training inputs incl. triggers = {B:.4f}"},
        "lipschitz": {
            "holds": ing.lipschitz == "sound" or paper_premise,
            "detail": (
                f"L_Z = {ing.L_Z:.4f} ({ing.lipschitz}); Lemma 1's proof assumes ||x|| <= 1, "
                f"here B = {B:.3f}" + ("" if ing.lipschitz == "sound" else " — the paper's L_Z is not a bound here")
            ),
        },
        "single_attack_round": {"holds": single, "detail": f"{len(attack_log)} attack round(s) (Corollary 1 covers one)"},
        "training_noise_at_t_adv": {"holds": ing.sigma_t_adv > 0, "detail": f"sigma_t_adv = {ing.sigma_t_adv}"},
        "fixed_aggregation_weights": {
            "holds": setup.cfg.aggregation.name == "fedavg",
            "detail": (
                "FedAvg: fixed p_i, so the benign updates cancel in Lemma 8"
                if setup.cfg.aggregation.name == "fedavg"
                else f"{setup.cfg.aggregation.name}: the weights depend on the updates themselves, so Lemma 8 does not "
                "apply as proved; the radius uses the attacker's realised weight p_i "
                + (f"= {ing.p}" if ing.p is not None else "(none: this rule has no per-client weight)")
                + ", as the paper does for RFA"
            ),
        },
    }
    certified = all(c["holds"] for c in checks.values())
    scope = [
        "The radius bounds the trigger's magnitude ||delta_x|| (the paper's feature level, Appendix A.1). "
        "The label swap delta_y is outside L_Z's scope: Lemma 1 takes y_1 = y_2, as the paper does.",
    ]
    return {"radius_certified": certified, "checks": checks, "scope": scope}


# ---------------------------------------------------------------------------------------------
# smoothing


def smoothing_method(setup: Setup) -> str:
    m = setup.cfg.certify.method
    if m == "auto":
        return "exact" if setup.model.is_linear else "monte-carlo"
    if m == "exact" and not setup.model.is_linear:
        raise ConfigError(
            f"The 'certify.method' parameter must be 'monte-carlo' for the non-linear model {setup.model.name!r}. Got 'exact' instead."
        )
    return m


def smooth(setup: Setup, params: torch.Tensor, X: torch.Tensor) -> BoundResult:
    """p_A_lower, p_B_upper (and votes) for inputs X under N(params, sigma_T^2 I)."""
    cz = setup.cfg.certify
    method = smoothing_method(setup)
    if method == "exact":
        W, b = setup.model.split(params.double())
        c_a, c_b, p_a_lo, p_b_up = smoothing.exact_top_two(W, b, X.double(), cz.sigma_T)
        c_a, c_b = np.asarray(c_a), np.asarray(c_b)
        p_a_lo, p_b_up = np.asarray(p_a_lo, dtype=float), np.asarray(p_b_up, dtype=float)
        return BoundResult(c_a, c_b, None, None, p_a_lo, p_b_up, p_a_lo <= p_b_up)
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


def _rows(sm: BoundResult, rad: np.ndarray, labels: np.ndarray, radius_certified: bool) -> list[list[Any]]:
    pred = sm.prediction()
    rows = []
    for i in range(len(labels)):
        rows.append([
            i, int(labels[i]), int(pred[i]),
            None if sm.n_a is None else int(sm.n_a[i]),
            None if sm.n_b is None else int(sm.n_b[i]),
            float(sm.p_a_lower[i]), float(sm.p_b_upper[i]),
            float(rad[i]) if radius_certified else None,
            int(pred[i] == labels[i]),
        ])
    return rows


def load_run(run_dir: str | Path, overrides: dict[str, Any] | None = None) -> tuple[Config, dict[str, Any], list[dict[str, Any]]]:
    """(config with overrides, model_final.pt, attack records) of a finished run: :func:`crfl.rundir.load_run`."""
    from crfl import rundir

    return rundir.load_run(run_dir, overrides)


def certify_run(
    run_dir: str | Path,
    *,
    overrides: dict[str, Any] | None = None,
    dataset: Dataset | None = None,
    module: torch.nn.Module | None = None,
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Certify the final model of a finished run; write certificates, summary blocks and plots.

    Results go into the run directory, or into ``out_dir`` (a sweep keeps one directory per
    certification setting of the same training run); ``summary.json`` there starts from the run's.
    """
    src = Path(run_dir)
    cfg, final, attack_log = load_run(src, overrides)
    run = Path(out_dir) if out_dir is not None else src
    run.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    setup = prepare(cfg, dataset, module)
    params = final["params"]
    X, Xb, y = _test_inputs(setup, cfg.certify.num_test)
    B = training_input_norm_bound(setup)
    ing = certificate_ingredients(setup, attack_log, B)
    report = assumption_report(setup, ing, attack_log)
    method = smoothing_method(setup)
    t_s = time.perf_counter()
    both = smooth(setup, params, torch.cat([X, Xb]))
    smooth_seconds = time.perf_counter() - t_s
    m = len(y)
    sets = {"clean": both.slice(0, m), "backdoor": both.slice(m, 2 * m)}
    radius_ok = bool(setup.model.is_linear) and ing.p is not None
    rad = {k: radii(ing, s.p_a_lower, s.p_b_upper) for k, s in sets.items()}
    for k, s in sets.items():
        write_csv(run / f"certificates_{k}.csv", CERT_COLUMNS, _rows(s, rad[k], y, radius_ok))
        if radius_ok:
            write_csv(run / f"inverse_{k}.csv", INVERSE_COLUMNS, inverse_rows(ing, s))

    base_pred = setup.model.predict(params.to(setup.dtype), X.to(setup.dtype)).numpy()
    base_pred_b = setup.model.predict(params.to(setup.dtype), Xb.to(setup.dtype)).numpy()
    grid = radius_grid([rad["clean"], rad["backdoor"]], fixed=cfg.certify.radii)
    results: dict[str, Any] = {}
    for k, s in sets.items():
        pred = s.prediction()
        results[k] = {
            "points": m,
            "base_accuracy": float(((base_pred if k == "clean" else base_pred_b) == y).mean()),
            "smoothed_accuracy": float((pred == y).mean()),
            "abstain_rate": float(s.abstain.mean()),
            "max_radius": finite_max(rad[k]) if radius_ok else None,
            "median_radius_certified": float(np.median(rad[k][~s.abstain])) if (~s.abstain).any() and radius_ok else 0.0,
            "curve": curve_table(rad[k], pred, y, grid) if radius_ok else [],
        }
    summary_path = run / "summary.json"
    base_summary = summary_path if summary_path.is_file() else src / "summary.json"
    summary = json.loads(base_summary.read_text()) if base_summary.is_file() else {}
    summary["certificate"] = {
        "R": ing.R, "p": ing.p, "gamma": ing.gamma, "tau": ing.tau, "eta": ing.eta, "poison_ratio": ing.poison_ratio,
        "t_adv": ing.t_adv, "rho_t_adv": ing.rho_t_adv, "L_Z": ing.L_Z, "sigma_t_adv": ing.sigma_t_adv,
        "rho": ing.rho, "sigma": ing.sigma, "log_contraction": ing.log_contraction,
        "lipschitz": ing.lipschitz, "rho_for_L_Z": ing.rho_for_L_Z, "input_norm_bound": ing.input_norm_bound,
        "delta_norm": ing.delta_norm, "source": ing.source,
        "radius_certified": report["radius_certified"] and radius_ok,
    }
    summary["smoothing"] = {
        "method": method, "M": cfg.certify.M if method == "monte-carlo" else None,
        "alpha": cfg.certify.alpha if method == "monte-carlo" else None,
        "bound": cfg.certify.bound if method == "monte-carlo" else None,
        "coverage": cfg.certify.coverage if method == "monte-carlo" else None,
        "selection": cfg.certify.selection if method == "monte-carlo" else None,
        "sigma_T": cfg.certify.sigma_T, "seconds": smooth_seconds,
    }
    summary["results"] = results
    summary["assumptions"] = report
    if not setup.model.is_linear:
        summary["assumptions"]["note"] = (
            f"The model {setup.model.name!r} is not linear: Theorem 1 needs a convex, smooth loss with a known L_Z, "
            "so no radius is certified; the vote margins (p_a_lower, p_b_upper) are reported."
        )
    elif ing.p is None:
        summary["assumptions"]["note"] = (
            f"The aggregation rule {setup.cfg.aggregation.name!r} gives no per-client weight p_i, which Corollary 1 "
            "needs, so no radius is certified; the vote margins (p_a_lower, p_b_upper) are reported."
        )
    twin = final.get("twin_params")
    if twin is not None:
        summary["twin"] = twin_check(setup, params, twin, sets, rad, X, Xb, ing.delta_norm, attack_log)
    summary["certify_seconds"] = time.perf_counter() - t0
    write_json(summary_path, summary)
    try:
        from crfl.plots import plot_run

        plot_run(run, rounds_dir=src)
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        pass
    return summary


def twin_check(
    setup: Setup, params: torch.Tensor, twin_params: torch.Tensor, sets: dict[str, BoundResult], rad: dict[str, np.ndarray],
    X: torch.Tensor, Xb: torch.Tensor, delta_norm: float, attack_log: list[dict[str, Any]],
) -> dict[str, Any]:
    """Empirical check: where the certificate covers the attack (RAD >= ||delta||), does the clean twin agree?

    The guarantee is about the smoothed classifiers of the two training *distributions*; one twin run
    is one sample of the clean process, so this is a check, not a proof.
    """
    m = len(X)
    tw = smooth(setup, twin_params, torch.cat([X, Xb]))
    out: dict[str, Any] = {
        "delta_norm": delta_norm,
        "final_model_distance": float(torch.linalg.vector_norm(twin_params.double() - params.double())),
    }
    for k, (a, b) in {"clean": (0, m), "backdoor": (m, 2 * m)}.items():
        s, t = sets[k], tw.slice(a, b)
        covered = (rad[k] >= delta_norm) & ~s.abstain
        agree = (t.prediction() == s.prediction()) & covered
        out[k] = {
            "covered_points": int(covered.sum()),
            "agreement": float(agree.sum() / covered.sum()) if covered.any() else None,
            "twin_smoothed_agreement_all": float((t.prediction() == s.prediction()).mean()),
        }
    return out


def _fmt_radius(r: float | str | None) -> str:
    if r is None:
        return "not certified"
    return "inf" if r in (math.inf, "inf") else f"{r:.4g}"


def print_summary(summary: dict[str, Any], radii_to_show: int = 5) -> None:
    res = summary.get("results", {})
    cert = summary.get("certificate", {})
    sm = summary.get("smoothing", {})
    print(f"certification ({sm.get('method')}, sigma_T = {sm.get('sigma_T')}, L_Z = {cert.get('L_Z', float('nan')):.3f} "
          f"[{cert.get('lipschitz')}], radius certified: {cert.get('radius_certified')})")
    for k in ("clean", "backdoor"):
        r = res.get(k)
        if not r:
            continue
        print(f"  {k:8s} base acc {r['base_accuracy']:.4f}  smoothed acc {r['smoothed_accuracy']:.4f}  "
              f"abstain {r['abstain_rate']:.4f}  max radius {_fmt_radius(r['max_radius'])}")
        curve = r.get("curve") or []
        if curve:
            step = max(1, len(curve) // radii_to_show)
            shown = curve[::step][:radii_to_show]
            print("    radius   " + "  ".join(f"{c['radius']:9.4g}" for c in shown))
            print("    cert acc " + "  ".join(f"{c['certified_accuracy']:9.4f}" for c in shown))
            print("    cert rate" + "  ".join(f"{c['certified_rate']:9.4f}" for c in shown))
    tw = summary.get("twin")
    if tw:
        for k in ("clean", "backdoor"):
            print(f"  twin check ({k}): {tw[k]['covered_points']} points certified at RAD >= ||delta|| = "
                  f"{tw['delta_norm']:.3g}; clean twin agrees on {tw[k]['agreement']}")
