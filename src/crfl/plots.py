"""Plots that read only result files (certificates_*.csv, rounds.csv, summary.json): PNG and PDF.

Every figure that shows a radius says whether it is certified (:func:`crfl.metrics.certification_status`):
uncertified curves are dotted and labelled "NOT certified" with the reason; legends name swept parameters
as a paper does (``R = 2``, not ``num_attackers=2``), titles the dataset actually used.

- ``certified.{png,pdf}``: certified accuracy (solid) and certified rate (dotted) against the
  radius, for the clean and the backdoored test set (Section 6.1, Appendix A.3), per reading;
- ``rounds.{png,pdf}``: clean accuracy and attack success over rounds, and the l2 distance to
  the clean twin when it was trained (Fig. 9a).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from io import BytesIO  # noqa: E402

from crfl.io import atomic_write_bytes, read_csv  # noqa: E402
from crfl.rundir import RunDir, RunDirError  # noqa: E402
from crfl.validation import ConfigError  # noqa: E402
from crfl.metrics import certified_accuracy, certified_rate, radius_grid  # noqa: E402


def _save(fig, base: Path) -> list[Path]:
    """PNG and PDF, each written atomically (unique temporary name, so concurrent plots never collide)."""
    out = []
    try:
        for ext in ("png", "pdf"):
            p = base.with_suffix(f".{ext}")
            buf = BytesIO()
            fig.savefig(buf, format=ext, dpi=130, bbox_inches="tight")
            atomic_write_bytes(p, buf.getvalue())
            out.append(p)
    finally:
        plt.close(fig)
    return out


def read_certificates(path: Path) -> dict[str, np.ndarray]:
    """radius, prediction, label of a certificates_<kind>.csv, validated (complete, not truncated)."""
    path = Path(path)
    c = RunDir(path.parent).read_certificates(path.stem.removeprefix("certificates_"))
    return {"radius": c.radius, "prediction": c.prediction, "label": c.label}


# ---------------------------------------------------------------------------------------------
# labels: what a reader of a paper sees (no config keys), the dataset actually used, certified or not

#: Swept parameters: (symbol, words) for legends; any other key is shown by its last part, underscores as spaces.
PARAMS: dict[str, tuple[str, str]] = {
    "attack.num_attackers": ("R", "number of attackers"),
    "attack.poison_per_batch": ("q_B", "poisoned samples per batch"),
    "attack.gamma": ("γ", "attacker's scale factor"),
    "attack.rounds": ("t_adv", "attack round"),
    "attack.magnitude": ("‖δ‖", "trigger norm"),
    "server.sigma": ("σ", "training noise"),
    "server.rounds": ("T", "training rounds"),
    "data.num_clients": ("N", "number of clients"),
    "data.name": ("data", "dataset"),
    "clients.lr": ("η", "learning rate"),
    "aggregation.name": ("rule", "aggregation rule"),
    "model.name": ("model", "model"),
    "certify.M": ("M", "noisy models (Monte Carlo)"),
    "certify.alpha": ("α", "failure probability"),
    "certify.sigma_T": ("σ_T", "smoothing noise"),
    "certify.reading": ("reading", "reading of the certificate"),
    "certify.training_samples": ("K", "continuations"),
    "ensemble.groups": ("G", "models in the ensemble"),
    "ensemble.clients_per_model": ("k", "clients per model"),
}
#: Datasets as a paper names them.
DATASETS = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST", "emnist": "EMNIST", "loan": "LOAN"}
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")


def _value(v: object) -> str:
    if isinstance(v, (list, tuple)):
        return ", ".join(_value(x) for x in v)
    return f"{v:g}" if isinstance(v, float) else str(v)


def param_words(key: str) -> str:
    """The words for a swept parameter, with its symbol: ``number of attackers R``."""
    sym, words = PARAMS.get(key, (key.split(".")[-1].replace("_", " "), ""))
    return sym if not words else words if sym in words.split() else f"{words} {sym}"


def point_label(point: dict, keys: list[str]) -> str:
    """A grid point as a legend entry: ``R = 2``, ``σ = 0.01, M = 1000``, ``t_adv = 20`` (not ``rounds=[20]``)."""
    parts = []
    for k in keys:
        sym = PARAMS.get(k, (k.split(".")[-1].replace("_", " "), ""))[0]
        parts.append(f"{sym} = {_value(point[k])}")
    return ", ".join(parts) or "base configuration"


def dataset_title(title: str, datasets: list[str]) -> str:
    """The spec's title naming the data actually used: ``(MNIST)`` run on Fashion-MNIST becomes
    ``(MNIST setting, on Fashion-MNIST)``; a title that already names the data is kept."""
    import re

    shown = [DATASETS.get(d, d) for d in datasets]
    if not shown or all(re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", title, re.I) for n in shown):
        return title
    names = ", ".join(shown)
    new, n = re.subn(r"\((MNIST|EMNIST|LOAN)\b", lambda m: f"({m.group(1)} setting, on {names}", title, count=1)
    return new if n else f"{title} (data: {names})"


def _status_line(certified: list[bool], why: list[str], labels: list[str]) -> str:
    """'' when every curve is certified; else which are not, and why (one line)."""
    bad = [(lab, w) for lab, c, w in zip(labels, certified, why) if not c]
    if not bad:
        return ""
    reasons = sorted({w for _, w in bad})
    who = "all runs" if len(bad) == len(labels) else ", ".join(lab for lab, _ in bad)
    return f"NOT certified ({who}): {'; '.join(reasons)}"


def _mark_delta(ax, deltas: list[float]) -> None:
    for d in sorted({float(x) for x in deltas if x is not None}):
        ax.axvline(d, color="black", ls="-.", lw=1, label=f"the attack's ‖δ‖ = {d:g}")


def _identical(names: list[str], ys: list[np.ndarray]) -> list[list[str]]:
    """Groups (of two or more) of curves that are identical point for point."""
    groups: list[list[int]] = []
    for i, y in enumerate(ys):
        for g in groups:
            if np.array_equal(ys[g[0]], y, equal_nan=True):
                g.append(i)
                break
        else:
            groups.append([i])
    return [[names[i] for i in g] for g in groups if len(g) > 1]


def _notes(fig, notes: list[str]) -> None:
    """Notes under the axes (what a caption would say): identical curves, uncertified runs."""
    if notes:
        fig.text(0.01, -0.03, "\n".join(notes), ha="left", va="top", fontsize=7, wrap=True)


def plot_certified(curves: dict[str, dict[str, np.ndarray]], base: Path, title: str = "", *,
                   certified: bool = True, why: str = "", delta: float | None = None,
                   base_accuracy: dict[str, float | None] | None = None) -> list[Path]:
    """One run's certified accuracy (solid) and certified rate (thin dotted) against the radius, for the clean
    (blue, circles) and the backdoored (red, squares) test set; the base model's accuracy (dashed) and the
    attack's ||delta|| (dash-dot) marked. An uncertified run says so in the title and the axis label."""
    grid = radius_grid([c["radius"] for c in curves.values()], points=200, fixed=[delta] if delta else None)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = {"clean": ("C0", "o", "-"), "backdoor": ("C3", "s", "--")}
    word = "certified" if certified else "NOT certified:"
    accs = {}
    for i, (name, c) in enumerate(curves.items()):
        color, marker, ls = styles.get(name, (f"C{i}", MARKERS[i % len(MARKERS)], "-"))
        what = "backdoored test set (trigger added, true label)" if name == "backdoor" else f"{name} test set"
        accs[name] = certified_accuracy(c["radius"], c["prediction"], c["label"], grid)
        ax.plot(grid, accs[name], color=color, ls=ls, lw=1.8, marker=marker, markevery=(12 * i, 25), ms=4,
                label=f"{what}: {word} accuracy")
        ax.plot(grid, certified_rate(c["radius"], c["prediction"], grid), color=color, ls=":", lw=1.2,
                label=f"{what}: {word} rate")
    b = {k: v for k, v in (base_accuracy or {}).items() if v is not None and k in curves}
    if b and max(b.values()) - min(b.values()) <= 0.01:  # one line where they agree (they would overlap)
        ax.axhline(sum(b.values()) / len(b), color="grey", ls="--", lw=1,
                   label="base model accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in b.items()))
    else:
        for name, v in b.items():
            ax.axhline(v, color=styles.get(name, ("grey",))[0], ls="--", lw=0.8, alpha=0.6,
                       label=f"base model accuracy, {name} test set: {v:.3f}")
    if delta:
        _mark_delta(ax, [delta])
    ax.set_xlabel("radius r = trigger norm ‖δ‖")
    ax.set_ylabel("fraction of test points" + ("" if certified else " (NOT certified)"))
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    notes = []
    if len(accs) == 2:
        gap = float(np.max(np.abs(accs["clean"] - accs["backdoor"]))) if set(accs) == {"clean", "backdoor"} else 1.0
        if gap <= 0.01:
            notes.append(f"The clean and backdoored curves differ by at most {gap:.3f}: they are drawn on top of each other.")
    if not certified:
        notes.append(f"NOT certified: {why}. The curves evaluate the reading's formula anyway (a vote-margin statistic).")
    ax.set_title(f"{title} — {'certified' if certified else 'NOT CERTIFIED'}", fontsize=9)
    _notes(fig, notes)
    return _save(fig, base)


def plot_rounds(run: Path) -> list[Path]:
    """Clean accuracy (blue, solid) and attack success (red, dashed) over rounds, the attack rounds marked; and the
    l2 distance to the clean twin where it was trained (Fig. 9a)."""
    rows = [dataclasses.asdict(r) for r in RunDir(run).read_rounds()]
    t = [int(r["round"]) for r in rows]
    f = lambda k: [float(r[k]) if r.get(k) is not None else np.nan for r in rows]  # noqa: E731
    twin = f("twin_distance")
    n = 2 if not all(np.isnan(twin)) else 1
    fig, axes = plt.subplots(1, n, figsize=(6 * n, 4), squeeze=False)
    ax = axes[0, 0]
    ax.plot(t, f("clean_acc"), color="C0", lw=1.8, label="clean accuracy")
    ax.plot(t, f("backdoor_acc"), color="C3", ls="--", lw=1.8, label="backdoor accuracy (attack success)")
    attack = [int(r["round"]) for r in rows if r.get("attack") == 1]
    for j, a in enumerate(attack):
        ax.axvline(a, color="black", alpha=0.6, lw=1, ls="-.",
                   label=f"attack round{'s' if len(attack) > 1 else ''} t_adv = {', '.join(map(str, attack))}" if j == 0 else None)
    ax.set_xlabel("round t")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ds = _dataset_of(run)
    ax.set_title(run.name + (f": {DATASETS.get(ds, ds)}" if ds else ""), fontsize=9)
    if n == 2:
        axes[0, 1].plot(t, twin, color="C2", label="‖w_t (backdoored) − w_t (clean twin)‖")
        axes[0, 1].set_xlabel("round t")
        axes[0, 1].set_ylabel("l2 distance to the clean twin")
        axes[0, 1].grid(alpha=0.3)
        axes[0, 1].legend(fontsize=8)
    return _save(fig, run / "rounds")


def plot_client_level(run: Path) -> list[Path]:
    """``client_level.{png,pdf}``: an ensemble's certified accuracy against the number m of malicious clients."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, kind in enumerate(("clean", "backdoor")):
        path = run / f"client_level_{kind}.csv"
        if not path.is_file():
            continue
        rows = RunDir(run).read_rows(path.name, ["m_star", "correct"])  # checked against the integrity record
        try:
            m = np.array([int(r["m_star"]) for r in rows])
            ok = np.array([r["correct"] == "1" for r in rows])
        except (KeyError, ValueError) as e:
            raise RunDirError(f"{path} is not a crfl client-level certificate ({e}); rerun crfl certify.") from None
        ms = np.arange(0, max(int(m.max(initial=0)) + 2, 2))
        acc = [(ok & (m >= x)).mean() if len(m) else 0.0 for x in ms]
        ax.step(ms, acc, where="post", color=f"C{i}", ls="-" if kind == "clean" else "--",
                label=f"{kind} test set" if kind == "clean" else "backdoored test set (trigger added, true label)")
    ax.set_xlabel("number of malicious clients m")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{run.name}: client-level certificate")
    return _save(fig, run / "client_level")


def _dataset_of(run: Path) -> str | None:
    """The dataset a run trained on (its config.yaml), None where it cannot be read."""
    try:
        return (RunDir(run).read_config().get("data") or {}).get("name")
    except (RunDirError, ConfigError, OSError):
        return None


def plot_result_set(cdir: Path, run: Path) -> list[Path]:
    """The certificate figure(s) of one result set (``cdir``: the run directory or a ``readings/<reading>/``)."""
    from crfl.metrics import certification_status

    out: list[Path] = []
    if (cdir / "client_level_clean.csv").is_file():
        out += plot_client_level(cdir)
    curves = {k: read_certificates(cdir / f"certificates_{k}.csv") for k in ("clean", "backdoor")
              if (cdir / f"certificates_{k}.csv").is_file()}
    if curves:
        s = RunDir(cdir).read_summary()
        certified, why = certification_status(s)
        cert = s.get("certificate") or {}
        ds = _dataset_of(run)
        title = f"{run.name}: {cert.get('reading', '?')} reading" + (f", {DATASETS.get(ds, ds)}" if ds else "")
        base_acc = {k: ((s.get("results") or {}).get(k) or {}).get("base_accuracy") for k in curves}
        out += plot_certified(curves, cdir / "certified", title=title, certified=certified, why=why,
                              delta=cert.get("delta_norm"), base_accuracy=base_acc)
    return out


def plot_run(run_dir: str | Path, rounds_dir: str | Path | None = None) -> list[Path]:
    """A run directory's figures: ``rounds``, and ``certified`` of every reading certified (the run's own in the
    directory, the others in ``readings/<reading>/``: :func:`crfl.certify.reading_dirs`)."""
    from crfl.certify import reading_dirs

    run = Path(run_dir)
    rdir = Path(rounds_dir) if rounds_dir is not None else run
    RunDir(run).verify_files(contents=False)  # every file the integrity record lists is there (each read checks its bytes)
    out: list[Path] = []
    for cdir in reading_dirs(run):
        out += plot_result_set(cdir, run)
    if (rdir / "rounds.csv").is_file() and rdir == run:
        out += plot_rounds(run)
    return out


# ---------------------------------------------------------------------------------------------
# sweeps (crfl plot DIR)


def _label(point: dict, keys: list[str]) -> str:
    return point_label(point, keys)


def _sweep_client_level(items: list[tuple[str, dict, Path]], base: Path, title: str) -> list[Path]:
    """Ensemble runs of a sweep: certified accuracy against the number m of malicious clients, one line per run
    (clean test set solid, backdoored dashed)."""
    lines = []
    for label, _, cdir in items:
        f = cdir / "client_level_clean.csv"
        if not f.is_file():
            continue
        data = {}
        for which in ("clean", "backdoor"):
            g = cdir / f"client_level_{which}.csv"
            if g.is_file():
                rows = RunDir(cdir).read_rows(g.name, ["m_star", "correct"])
                data[which] = (np.array([int(r["m_star"]) for r in rows]), np.array([r["correct"] == "1" for r in rows]))
        lines.append((label, data))
    if not lines:
        return []
    top = max(int(m.max(initial=0)) for _, d in lines for m, _ in d.values()) + 2
    ms = np.arange(0, max(top, 2))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (label, d) in enumerate(lines):
        for which, ls in (("clean", "-"), ("backdoor", "--")):
            if which in d:
                m, ok = d[which]
                ax.step(ms, [(ok & (m >= x)).mean() for x in ms], where="post", color=f"C{i % 10}", ls=ls,
                        label=f"{label} ({'clean' if which == 'clean' else 'backdoored'} test set)")
    ax.set_xlabel("number of malicious clients m")
    ax.set_ylabel("certified accuracy (client-level)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    return _save(fig, base)


@dataclasses.dataclass
class SweepCurve:
    """One grid point's certificate set in a sweep figure: its legend label, whether its radii are certified
    (and why not), the base model's accuracy and the attack's ||delta||."""

    label: str
    certificates: dict[str, np.ndarray]
    certified: bool
    why: str
    base_accuracy: float | None
    delta: float | None


def sweep_curves(sweep_dir: str | Path) -> dict[str, dict[str, list[SweepCurve]]]:
    """The data of a sweep's certificate figures: certification group -> test set -> one curve per grid point."""
    from crfl.metrics import certification_status

    d = Path(sweep_dir)
    meta = _sweep_meta(d)
    spec = meta["spec"]
    keys = list(spec.get("grid") or {})
    cert_keys = list((spec.get("certify") or {}).get("grid") or {})
    out: dict[str, dict[str, list[SweepCurve]]] = {}
    for j in meta["jobs"]:
        for h, cp in j["certs"]:
            group = _label(cp, cert_keys) if cert_keys and keys else "all"
            cdir = d / "runs" / j["train_hash"] / f"cert-{h}"
            for which in ("clean", "backdoor"):
                f = cdir / f"certificates_{which}.csv"
                if not f.is_file():
                    continue
                s = RunDir(cdir).read_summary()
                certified, why = certification_status(s)
                out.setdefault(group, {}).setdefault(which, []).append(SweepCurve(
                    _label(cp, keys + cert_keys), read_certificates(f), certified, why,
                    ((s.get("results") or {}).get(which) or {}).get("base_accuracy"),
                    (s.get("certificate") or {}).get("delta_norm"),
                ))
    return out


def _sweep_meta(d: Path) -> dict:
    meta = RunDir(d).read_json("sweep.json")
    if not isinstance(meta, dict) or not isinstance(meta.get("spec"), dict) or (
        meta.get("kind") != "numeric" and not isinstance(meta.get("jobs"), list)
    ):
        raise RunDirError(f"{d / 'sweep.json'} is not a crfl sweep file (needs 'spec' and 'jobs'); rerun crfl sweep.")
    return meta


def sweep_datasets(sweep_dir: str | Path) -> list[str]:
    """The datasets the sweep's runs trained on (their config.yaml), in order of first use."""
    d = Path(sweep_dir)
    meta = _sweep_meta(d)
    out: list[str] = []
    for j in meta.get("jobs") or []:
        ds = _dataset_of(d / "runs" / j["train_hash"]) if (d / "runs" / j["train_hash"] / "config.yaml").is_file() else None
        if ds and ds not in out:
            out.append(ds)
    return out


def _plot_curves(curves: list[SweepCurve], kind: str, legend_title: str, title: str, base: Path) -> list[Path]:
    """certified accuracy (``kind`` certified) or certified rate against the radius, one line per grid point:
    colour and marker per point, dotted where the radii are NOT certified, the base model's accuracy (dashed; one
    grey line where all runs agree within 0.01), the attack's ||delta|| (dash-dot), notes on identical curves."""
    deltas = [c.delta for c in curves if c.delta]
    grid = radius_grid([c.certificates["radius"] for c in curves], points=300, fixed=deltas or None)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ys = []
    for c in curves:
        r, p, y = c.certificates["radius"], c.certificates["prediction"], c.certificates["label"]
        ys.append(certified_accuracy(r, p, y, grid) if kind == "certified" else certified_rate(r, p, grid))
    for i, (c, y) in enumerate(zip(curves, ys)):
        label = c.label if c.certified else f"{c.label} (NOT certified)"
        ax.plot(grid, y, color=f"C{i % 10}", ls="-" if c.certified else ":", lw=1.8, marker=MARKERS[i % len(MARKERS)],
                markevery=(7 * i % 30, 30), ms=4, label=label)
    notes = []
    if kind == "certified":
        b = [(i, c.base_accuracy) for i, c in enumerate(curves) if c.base_accuracy is not None]
        if b and max(v for _, v in b) - min(v for _, v in b) <= 0.01:
            lo, hi = min(v for _, v in b), max(v for _, v in b)
            span = f"{lo:.3f}" if f"{lo:.3f}" == f"{hi:.3f}" else f"{lo:.3f}–{hi:.3f}"
            ax.axhline((lo + hi) / 2, color="grey", ls="--", lw=1, label=f"base model accuracy, all runs ({span})")
        else:
            for j, (i, v) in enumerate(b):
                ax.axhline(v, color=f"C{i % 10}", ls="--", lw=0.9, alpha=0.7,
                           label="base model accuracy (dashed, the run's colour)" if j == 0 else None)
    if deltas:
        _mark_delta(ax, deltas)
    for g in _identical([c.label for c in curves], ys):
        notes.append(f"Identical curves (drawn on top of each other): {', '.join(g)}.")
    status = _status_line([c.certified for c in curves], [c.why for c in curves], [c.label for c in curves])
    if status:
        notes.append(status + ". Dotted curves evaluate the reading's formula anyway: a vote-margin statistic, "
                     "not a certified accuracy.")
    all_bad = all(not c.certified for c in curves)
    what = "certified accuracy" if kind == "certified" else "certified rate"
    if all_bad:  # no curve is a certificate: the axis says what is drawn instead
        what = ("fraction correct with radius > r" if kind == "certified" else "fraction with radius > r") + " (NOT certified)"
    ax.set_xlabel("radius r = trigger norm ‖δ‖")
    ax.set_ylabel(what)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, title=legend_title, title_fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title + ("\nNOT CERTIFIED: no curve in this figure is a certificate" if all_bad else ""), fontsize=9)
    _notes(fig, notes)
    return _save(fig, base)


def plot_sweep(sweep_dir: str | Path) -> list[Path]:
    """Figures for a sweep directory written by ``crfl sweep``: one set per certification setting.

    - ``<name>-certified-{clean,backdoor}``: certified accuracy per value of the varied factor (legend:
      the parameter's name and symbol), with the base model's accuracy (dashed) and the attack's ||delta||
      (dash-dot), as in the paper's Fig. 2; runs whose radii are not certified are dotted and labelled so;
    - ``<name>-rate-{clean,backdoor}``: certified rate against radius;
    - ``<name>-rounds``: clean accuracy and attack success over rounds, the attack rounds marked;
    - ``<name>-closeness``: ||w_t - w_t(twin)|| over rounds, where the twin was trained (Fig. 9a).
    Titles name the dataset the runs actually used. Numeric sweeps (Fig. 9b) plot RAD against T for each rho/sigma.
    """
    d = Path(sweep_dir)
    meta = _sweep_meta(d)
    spec = meta["spec"]
    name = spec.get("name", d.name)
    figs = d / "figures"
    figs.mkdir(exist_ok=True)
    out: list[Path] = []
    if meta.get("kind") == "numeric":
        title = spec.get("title", name)
        rows = read_csv(d / "results.csv")
        fig, ax = plt.subplots(figsize=(6, 4))
        for ratio in sorted({float(r["rho_over_sigma"]) for r in rows}):
            sel = [r for r in rows if float(r["rho_over_sigma"]) == ratio]
            ax.plot([int(r["T"]) for r in sel], [float(r["radius"]) for r in sel], marker="o", label=f"ρ/σ = {ratio:g}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("rounds T")
        ax.set_ylabel("radius RAD of Corollary 1 (paper reading: not certified)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        return _save(fig, figs / name)
    title = dataset_title(spec.get("title", name), sweep_datasets(d))
    extra = {k: v for k, v in (meta.get("extra") or {}).items() if k not in ("data.name", "data.data_dir")}
    if extra:  # --set overrides change the paper's setting: the title says so
        title += "; with " + point_label(extra, list(extra))
    jobs = meta["jobs"]
    keys = list(spec.get("grid") or {})
    cert_keys = list((spec.get("certify") or {}).get("grid") or {})
    legend_title = ", ".join(param_words(k) for k in keys + cert_keys) or None
    runs = d / "runs"
    by_cert: dict[str, list[tuple[str, dict, Path]]] = {}
    for j in jobs:
        for h, cp in j["certs"]:
            group = _label(cp, cert_keys) if cert_keys and keys else "all"
            by_cert.setdefault(group, []).append((_label(cp, keys + cert_keys), j, runs / j["train_hash"] / f"cert-{h}"))
    curves = sweep_curves(d)
    for group, items in by_cert.items():
        suffix = "" if group == "all" else "-" + "".join(ch for ch in group.replace(", ", "-") if ch.isalnum() or ch in "-._")
        out += _sweep_client_level(items, figs / f"{name}-client-level{suffix}", title)
        for which, cs in (curves.get(group) or {}).items():
            test_set = "clean test set" if which == "clean" else "backdoored test set (trigger added, true label)"
            for kind in ("certified", "rate"):
                t = f"{title}\n{test_set}" + ("" if group == "all" else f" ({group})")
                out += _plot_curves(cs, kind, legend_title, t, figs / f"{name}-{kind}-{which}{suffix}")
    out += _sweep_rounds(d, jobs, keys, title, legend_title, figs / name)
    return out


def _sweep_rounds(d: Path, jobs: list[dict], keys: list[str], title: str, legend_title: str | None, base: Path) -> list[Path]:
    """Clean accuracy and attack success over rounds (one panel each, attack rounds marked) and, where the twin
    was trained, the model closeness (Fig. 9a), once per training run."""
    runs = d / "runs"
    out: list[Path] = []
    seen: list[str] = []
    lines = []
    for j in jobs:
        rdir = runs / j["train_hash"]
        if j["train_hash"] in seen or not (rdir / "rounds.csv").is_file():
            continue
        seen.append(j["train_hash"])
        rows = [dataclasses.asdict(r) for r in RunDir(rdir).read_rounds()]
        val = lambda k: np.array([float(r[k]) if r.get(k) is not None else np.nan for r in rows])  # noqa: E731
        lines.append((_label(j["point"], keys), np.array([int(r["round"]) for r in rows]), val("clean_acc"),
                      val("backdoor_acc"), val("twin_distance"), [int(r["round"]) for r in rows if r.get("attack") == 1]))
    if not lines:
        return out
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, (label, t, clean, bd, _, _) in enumerate(lines):
        kw = dict(color=f"C{i % 10}", marker=MARKERS[i % len(MARKERS)], markevery=(i, max(1, len(t) // 10)), ms=4, label=label)
        axes[0].plot(t, clean, lw=1.6, **kw)
        axes[1].plot(t, bd, lw=1.6, ls="--", **kw)
    attack_rounds = sorted({a for *_, att in lines for a in att})
    for ax in axes:
        for k, a in enumerate(attack_rounds):
            ax.axvline(a, color="black", ls="-.", lw=1, alpha=0.6,
                       label=f"attack round t_adv = {', '.join(map(str, attack_rounds))}" if k == 0 else None)
    axes[0].set_ylabel("clean accuracy (solid)")
    axes[1].set_ylabel("backdoor accuracy = attack success (dashed)")
    notes = []
    for which, idx in (("clean accuracy", 2), ("attack success", 3)):
        groups = _identical([ln[0] for ln in lines], [ln[idx] for ln in lines])
        for g in groups:
            notes.append(f"Identical {which} curves (drawn on top of each other): {', '.join(g)}.")
        same_t = [ln[1] for ln in lines]
        if not groups and len(lines) > 1 and all(np.array_equal(t, same_t[0]) for t in same_t):
            ys = np.stack([ln[idx] for ln in lines])
            equal = np.all(ys == ys[:1], axis=0)
            k = int(np.argmin(equal)) if not equal.all() else len(equal)
            if k > 0:  # the runs share their randomness: they coincide until they differ (the attack, say)
                notes.append(f"All {which} curves coincide up to round {int(same_t[0][k - 1])} (drawn on top of each other).")
    for ax in axes:
        ax.set_xlabel("round t")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title=legend_title, title_fontsize=7)
    fig.suptitle(title, fontsize=9)
    _notes(fig, notes)
    out += _save(fig, base.parent / f"{base.name}-rounds")
    twins = [ln for ln in lines if not np.all(np.isnan(ln[4]))]
    if twins:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for i, (label, t, _, _, tw, _) in enumerate(twins):
            ax.plot(t, tw, color=f"C{i % 10}", marker=MARKERS[i % len(MARKERS)], markevery=(i, max(1, len(t) // 10)),
                    ms=4, label=label)
        for k, a in enumerate(attack_rounds):
            ax.axvline(a, color="black", ls="-.", lw=1, alpha=0.6,
                       label=f"attack round t_adv = {', '.join(map(str, attack_rounds))}" if k == 0 else None)
        ax.set_xlabel("round t")
        ax.set_ylabel("‖w_t − w_t (clean twin)‖")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title=legend_title, title_fontsize=7)
        ax.set_title(title, fontsize=9)
        out += _save(fig, base.parent / f"{base.name}-closeness")
    return out
