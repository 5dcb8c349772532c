"""Certification of a training run (Algorithm 2) under one of three readings of the guarantee.

``certify.reading`` names the promise (:mod:`crfl.readings`): ``coupled`` (default: this run
against its trigger-free twin on the same randomness; ``method: margin`` certifies the linear base
model itself), ``mixture`` (the law over the server noise from the attack round on, Theorems 2-3
read as written) or ``paper`` (Corollary 1, Eq. 2, as printed, for reproduction only; written with
``radius_certified: false``). Each reading is one object owning its guarantee, ingredients,
bounds, radius, assumption checks and summary blocks; this module only runs it:

- :func:`certify_run` loads a finished run, takes its test points (clean, and backdoored = trigger
  added, true label kept, Appendix A.3), asks the reading for their prediction or ABSTAIN and the
  radius on ||delta||, and writes the result set: ``certificates_clean.csv``,
  ``certificates_backdoor.csv`` (and the reading's own tables, ``inverse_*.csv`` for the paper
  reading), and the blocks ``certificate``, ``smoothing``, ``results``, ``assumptions`` (and
  ``twin``) of ``summary.json``;
- :class:`Certifier` is the same certificate for any inputs (a facade over the reading);
- :func:`twin_check` compares the covered points with the counterfactual twin.

Printing and plotting belong to the CLI.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crfl import ensemble, rundir
from crfl.bounds import BoundResult
from crfl.config import Config
from crfl.data import Dataset
from crfl.metrics import covered, curve_table, finite_max, radius_grid
from crfl.readings import Reading, reading_class
from crfl.rng import CertificationSeed, certification_seed, draw_certification_seed, replay_certification_seed
from crfl.setup import Setup, model_inputs, prepare

CERT_COLUMNS = [
    "index", "label", "prediction", "n_a", "n_b", "p_a_lower", "p_b_upper", "log1m_p_a_lower", "log_p_b_upper",
    "budget", "radius", "correct",
]

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


#: Where a reading other than the run's own (config.yaml's ``certify.reading``) writes its result set inside the run
#: directory: ``readings/<reading>/`` (certificates, summary.json, figures), so that readings live side by side.
READINGS_DIR = "readings"


def reading_dir(run_dir: str | Path, reading: str) -> Path:
    """The default place of a reading's result set: the run directory itself for the run's own reading
    (``certify.reading`` of its config.yaml; old runs certified there under any reading keep their files), else
    ``RUN/readings/<reading>/``, whose summary.json starts from the run's ``training`` block."""
    run = Path(run_dir)
    own = (rundir.open_run(run).read_config().get("certify") or {}).get("reading", "coupled")
    return run if reading == own else run / READINGS_DIR / reading


def reading_dirs(run_dir: str | Path) -> list[Path]:
    """The result sets of a run directory: the run's own reading (the directory itself) first, then each
    ``readings/<reading>/`` that holds a summary.json, in name order."""
    run = Path(run_dir)
    sub = run / READINGS_DIR
    others = sorted(p for p in sub.iterdir() if (p / rundir.SUMMARY).is_file()) if sub.is_dir() else []
    return [run, *others]


def load_run(run_dir: str | Path, overrides: dict[str, Any] | None = None) -> tuple[Config, dict[str, Any], list[dict[str, Any]]]:
    """(config with overrides, model_final.pt, attack records) of a finished run: :func:`crfl.rundir.load_run`."""
    return rundir.load_run(run_dir, overrides)


class Certifier:
    """One run's certificate under ``certify.reading``, for any inputs (the run's test set or a user's).

    A thin facade over the reading object (:data:`crfl.readings.READINGS`), built from a prepared setup
    and the run's files; :meth:`certify` gives, for inputs X (n, d) in model units, the bounds
    (prediction c_A or ABSTAIN, p_A_lower, p_B_upper), the parameter-distance budget and the radius;
    ``twin=True`` evaluates the counterfactual twin the same way (its prediction is what the guarantee
    speaks about).

    Randomness (Monte Carlo, and the mixture reading's continuations): every :meth:`certify` and
    :meth:`bounds` call draws a fresh certification seed from the operating system's entropy, after
    its X is given, so its confidence statement holds for any X chosen before the call, even one chosen
    after seeing earlier calls' results; the result's ``seed`` (:class:`crfl.rng.CertificationSeed`)
    says which seed was used. The mixture reading therefore trains K fresh continuations per call
    (the cost of a whole certification each time: certify many inputs in one call). ``replay_seed``
    reproduces a recorded call bit for bit; its statement then holds only for inputs fixed before that
    seed was first drawn (never pass a seed whose votes an input could have been chosen against).
    Exact smoothing and the margin draw nothing (``seed`` None).
    """

    def __init__(self, setup: Setup, final: dict[str, Any], attack_log: list[dict[str, Any]], run_dir: Path) -> None:
        self.setup, self.final, self.attack_log, self.run_dir = setup, final, attack_log, Path(run_dir)
        self.reading = setup.cfg.certify.reading
        #: the reading object: its ingredients, bounds, radius, checks and blocks
        self.impl: Reading = reading_class(self.reading)(setup, final, attack_log, self.run_dir)

    @property
    def method(self) -> str:
        return self.impl.method

    @property
    def report(self) -> dict[str, Any]:
        """summary.json's ``assumptions`` block."""
        return self.impl.report

    @property
    def delta_norm(self) -> float:
        return self.impl.delta_norm

    @property
    def radius_ok(self) -> bool:
        return self.impl.radius_ok

    @property
    def has_twin(self) -> bool:
        return self.impl.has_twin

    @property
    def ing(self) -> Any:
        """The reading's ingredients (:class:`crfl.readings.coupled.SoundIngredients` or
        :class:`crfl.readings.paper.Ingredients`)."""
        return self.impl.ing

    @property
    def paper(self) -> Any:
        """Corollary 1's ingredients (the paper reading only)."""
        if self.reading != "paper":
            raise AttributeError(f"'Certifier' under the {self.reading!r} reading has no attribute 'paper'")
        return self.impl.ing

    @property
    def statistical(self) -> bool:
        """Whether the bounds draw randomness (Monte Carlo, mixture continuations): fresh per call."""
        return self.impl.statistical

    def bounds(self, X: torch.Tensor, *, twin: bool = False, replay_seed: int | None = None) -> BoundResult:
        """c_A and (p_A_lower, p_B_upper) at inputs X, for the run's model (or its twin); a fresh seed per call
        (or ``replay_seed``), in the result's ``seed``."""
        return self.impl.bounds(X, twin=twin, seed=self._seed(replay_seed))

    def certify(self, X: torch.Tensor, *, replay_seed: int | None = None) -> tuple[BoundResult, np.ndarray | None, np.ndarray]:
        """(bounds, budget, radius) per point at X (budget None for the paper reading); a fresh seed per call
        (or ``replay_seed``), in the bounds' ``seed``."""
        return self.impl.certify(X, seed=self._seed(replay_seed))

    def _seed(self, replay_seed: int | None) -> CertificationSeed | None:
        """The call's certification seed, drawn now (after X is given), or the replayed one; None if nothing is drawn
        (a replay seed is checked even then)."""
        replay = None if replay_seed is None else replay_certification_seed(replay_seed)
        if not self.statistical:
            return None
        return draw_certification_seed() if replay is None else replay

    def block(self) -> dict[str, Any]:
        """summary.json's ``certificate`` block."""
        return self.impl.block()


def certify_run(
    run_dir: str | Path,
    *,
    overrides: dict[str, Any] | None = None,
    dataset: Dataset | None = None,
    module: torch.nn.Module | None = None,
    out_dir: str | Path | None = None,
    replay_seed: int | None = None,
) -> dict[str, Any]:
    """Certify the final model of a finished run under ``certify.reading``; write certificates and summary blocks.

    Results go into ``out_dir`` (a sweep keeps one directory per certification setting of the same
    training run), or by default into :func:`reading_dir`: the run directory for the run's own reading,
    ``RUN/readings/<reading>/`` for another one, so certifying under a second reading never overwrites
    the first; ``summary.json`` there starts from the run's.

    Statistical bounds (Monte Carlo, mixture continuations) draw from a certification seed taken
    from the OS's entropy once the test inputs are fixed, recorded in the ``smoothing`` block
    (``seed``, ``seed_source``, ``seed_drawn_at``); ``replay_seed`` (``--replay-seed``) gives back a
    recorded one and reproduces that certification's result files bit for bit. The twin check draws
    from the seed's own stream "check" (independent of the certificate's draws; recorded in the
    ``twin`` block). Exact and margin methods draw nothing; a replay seed is then unused.
    """
    src = Path(run_dir)
    if replay_seed is not None:  # a bad seed is refused before any work
        certification_seed(replay_seed)
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
    # the inputs are fixed: now (and only now) the certification's randomness is drawn
    seed = certification_seed(replay_seed) if cert.statistical else None
    t_s = time.perf_counter()
    both, budget_all, rad_all = cert.impl.certify(XX, seed=seed)
    smooth_seconds = time.perf_counter() - t_s
    twin_block = None
    if cert.has_twin:
        check_seed = None if seed is None else seed.child("check")
        twin_block = twin_check(both, cert.impl.bounds(XX, twin=True, seed=check_seed), rad_all, m, cert.delta_norm,
                                cert.impl.twin_compared_with, cert.impl.twin_exact)
        twin_block.update(check_seed.to_dict() if check_seed is not None else {"seed": None})
        # the realised twin distance over the proven deviation bound (twin.tightness; the coupled reading)
        twin_block.update(getattr(cert.impl, "twin_tightness", dict)())
    radius_ok, delta_norm = cert.radius_ok, cert.delta_norm
    # the same budgets under the other trigger supports (anywhere, the attack's): the sound readings only
    by_support = getattr(cert.impl, "radii_by_support", None)
    rad_by = by_support(budget_all) if by_support is not None and budget_all is not None and radius_ok else {}
    sets = {"clean": both.slice(0, m), "backdoor": both.slice(m, 2 * m)}
    rad = {"clean": rad_all[:m], "backdoor": rad_all[m:]}
    budget = {"clean": None if budget_all is None else budget_all[:m], "backdoor": None if budget_all is None else budget_all[m:]}
    base_pred = setup.model.predict(final["params"].to(setup.dtype), XX.to(setup.dtype)).numpy()
    grid = radius_grid([rad["clean"], rad["backdoor"]], fixed=cz.radii)
    # certified means certified: the certified_* fields hold numbers only where the reading's assumptions hold for
    # this run (radius_certified); a radius computed without that is reported as uncertified_* (a vote-margin statistic)
    cert_block = cert.block()
    certified = bool(cert_block.get("radius_certified")) and radius_ok
    results: dict[str, Any] = {}
    for i, (k, s) in enumerate(sets.items()):
        pred = s.prediction()
        r = rad[k]
        hit = covered(r, delta_norm) & ~s.abstain
        at_attack = float(hit.mean()) if radius_ok and m else None
        correct_at_attack = float((hit & (pred == y)).mean()) if radius_ok and m else None
        results[k] = {
            "points": m,
            "base_accuracy": float((base_pred[i * m : (i + 1) * m] == y).mean()) if m else None,
            "smoothed_accuracy": float((pred == y).mean()) if m else None,
            "abstain_rate": float(s.abstain.mean()) if m else None,
            "radius_certified": certified,
            "max_radius": finite_max(r) if radius_ok else None,
            "median_radius_certified": (float(np.median(r[~s.abstain])) if (~s.abstain).any() else 0.0) if certified else None,
            "certified_at_attack": at_attack if certified else None,
            "certified_correct_at_attack": correct_at_attack if certified else None,
            "uncertified_at_attack": None if certified else at_attack,
            "uncertified_correct_at_attack": None if certified else correct_at_attack,
            "curve": curve_table(r, pred, y, grid) if radius_ok else [],
        }
        if rad_by and m:  # certified means certified: the fractions by support are named as the one above
            results[k][f"{'' if certified else 'un'}certified_at_attack_by_support"] = {
                name: float((covered(rs_[i * m : (i + 1) * m], delta_norm) & ~s.abstain).mean()) for name, rs_ in rad_by.items()}
    blocks: dict[str, Any] = {"certificate": cert_block}
    blocks["certificate"]["guarantee"] += cert.impl.randomness_note(seed)
    blocks["smoothing"] = cert.impl.smoothing_block(smooth_seconds, seed, votes=both.votes)
    blocks["results"] = results
    blocks["assumptions"] = cert.report
    if twin_block is not None:
        blocks["twin"] = twin_block
    # the whole result set or nothing: staged, then switched in at once (crfl.rundir.results_for)
    with rundir.results_for(out_dir if out_dir is not None else reading_dir(src, cert.reading), base=src) as rs:
        for k, s in sets.items():
            rs.write_csv(f"certificates_{k}.csv", CERT_COLUMNS, _rows(s, budget[k], rad[k], y, radius_ok))
            for stem, columns, rows in cert.impl.tables(s):  # the paper reading's inverse_*.csv
                rs.write_csv(f"{stem}_{k}.csv", columns, rows)
        blocks["certify_seconds"] = time.perf_counter() - t0
        if twin_block is None:
            blocks["twin"] = None
        summary = rs.update_summary(blocks)
    return summary


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
