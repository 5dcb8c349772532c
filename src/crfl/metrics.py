"""Certified accuracy and certified rate (Section 6.1).

For test points i with label y_i, prediction c_i (ABSTAIN = -1) and radius RAD_i:
    certified rate at r     = (1/m) sum_i 1{covered(RAD_i, r)}
    certified accuracy at r = (1/m) sum_i 1{c_i = y_i and covered(RAD_i, r)}
with covered(RAD, r) = RAD > r (:func:`covered`). An abstention has RAD_i = 0 and c_i = -1, so
it counts in neither.
"""

from __future__ import annotations

import math

import numpy as np

from crfl.bounds import ABSTAIN


def covered(radius: np.ndarray | float, r: np.ndarray | float) -> np.ndarray:
    """Whether a certificate of radius RAD covers a trigger of norm r: ``RAD > r``, strictly.

    The one rule for "certified at r": the curves and tables here, ``certified_at_attack`` and
    the twin check of :mod:`crfl.certify`, sweeps and plots all use it. Why strict: the
    certificate keeps c_A while the parameter distance Delta is *below* the budget,
    ``Delta < sigma (Phi^-1(p_A_lower) - Phi^-1(p_B_upper)) / 2`` (Neyman-Pearson, docs/theory.md
    (g) step 6: at equality the bound on the runner-up equals the bound on c_A and the tie is not
    excluded), and RAD is the *largest* r with ``r c(B_0 + r) <=`` the budget. So at ||delta|| =
    RAD the distance bound may equal the budget exactly and nothing is promised; for every
    ||delta|| < RAD it is strictly below (``r c(B_0 + r)`` is increasing). The same holds for
    the KL form and the margin budget, both stated for distances below their budget. A radius
    of 0 (abstention) covers nothing, not even r = 0; an infinite radius covers every finite r.
    Broadcasts like ``>``.
    """
    return np.asarray(radius, dtype=float) > np.asarray(r, dtype=float)


def certified_rate(radius: np.ndarray, predicted: np.ndarray, r: np.ndarray) -> np.ndarray:
    radius = np.asarray(radius, dtype=float)
    ok = (np.asarray(predicted) != ABSTAIN)[:, None] & covered(radius[:, None], np.asarray(r, dtype=float)[None, :])
    return ok.mean(axis=0) if len(radius) else np.zeros(len(r))


def certified_accuracy(radius: np.ndarray, predicted: np.ndarray, label: np.ndarray, r: np.ndarray) -> np.ndarray:
    radius = np.asarray(radius, dtype=float)
    correct = (np.asarray(predicted) == np.asarray(label)) & (np.asarray(predicted) != ABSTAIN)
    ok = correct[:, None] & covered(radius[:, None], np.asarray(r, dtype=float)[None, :])
    return ok.mean(axis=0) if len(radius) else np.zeros(len(r))


def radius_grid(radii: list[np.ndarray], points: int = 41, fixed: list[float] | None = None) -> np.ndarray:
    """0 .. the largest finite certified radius over the given sets (plus any fixed radii)."""
    finite = [r[np.isfinite(r) & (r > 0)] for r in radii]
    top = max((float(f.max()) for f in finite if len(f)), default=0.0)
    grid = np.linspace(0.0, top * 1.02 if top > 0 else 1.0, points)
    if fixed:
        grid = np.union1d(grid, np.asarray(fixed, dtype=float))
    return grid


def curve_table(radius: np.ndarray, predicted: np.ndarray, label: np.ndarray, grid: np.ndarray) -> list[dict[str, float]]:
    acc = certified_accuracy(radius, predicted, label, grid)
    rate = certified_rate(radius, predicted, grid)
    return [{"radius": float(r), "certified_accuracy": float(a), "certified_rate": float(c)} for r, a, c in zip(grid, acc, rate)]


def finite_max(radius: np.ndarray) -> float:
    r = np.asarray(radius, dtype=float)
    r = r[r > 0]
    if len(r) == 0:
        return 0.0
    return float(r.max()) if np.all(np.isfinite(r)) else math.inf


def certification_status(summary: dict) -> tuple[bool, str]:
    """(whether the radii of a summary.json are certified, why not) -- one place for every table, figure and printout.

    Certified means the reading's ``certificate.radius_certified``: its assumption checks hold for this run
    (summary.json's ``assumptions``). Otherwise the radii are the reading's formula evaluated anyway (a
    vote-margin statistic), and the reason names what fails: the failed checks, the reason no radius could
    be computed (``assumptions.note``), or the paper reading, which is never a certificate.
    """
    cert = summary.get("certificate") or {}
    if cert.get("radius_certified"):
        return True, ""
    a = summary.get("assumptions") or {}
    reasons = []
    if cert.get("reading") == "paper":
        reasons.append("the paper reading (Corollary 1 as printed) is not a certificate")
    failed = [k for k, c in (a.get("checks") or {}).items() if isinstance(c, dict) and not c.get("holds")]
    if failed:
        reasons.append("assumption(s) " + ", ".join(failed) + " fail")
    if a.get("note"):
        reasons.append(str(a["note"]).split(":")[0])
    if not reasons:
        reasons.append("no certificate for this run" if not cert else "the reading's assumptions are not shown to hold")
    return False, "; ".join(reasons)
