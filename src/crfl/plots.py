"""Plots that read only result files (certificates_*.csv, rounds.csv): PNG and PDF.

- ``certified.{png,pdf}``: certified accuracy (solid) and certified rate (dashed) against the
  radius, for the clean and the backdoored test set (Section 6.1, Appendix A.3);
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


def plot_certified(curves: dict[str, dict[str, np.ndarray]], base: Path, title: str = "") -> list[Path]:
    """Overlay certified accuracy (solid) and rate (dashed) for several labelled certificate sets."""
    grid = radius_grid([c["radius"] for c in curves.values()], points=200)
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, c) in enumerate(curves.items()):
        color = f"C{i}"
        ax.plot(grid, certified_accuracy(c["radius"], c["prediction"], c["label"], grid), color=color, label=f"{name} certified accuracy")
        ax.plot(grid, certified_rate(c["radius"], c["prediction"], grid), color=color, ls="--", label=f"{name} certified rate")
    ax.set_xlabel("radius (backdoor magnitude ||delta||)")
    ax.set_ylabel("fraction of test set")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return _save(fig, base)


def plot_rounds(run: Path) -> list[Path]:
    rows = [dataclasses.asdict(r) for r in RunDir(run).read_rounds()]
    t = [int(r["round"]) for r in rows]
    f = lambda k: [float(r[k]) if r.get(k) is not None else np.nan for r in rows]  # noqa: E731
    twin = f("twin_distance")
    n = 2 if not all(np.isnan(twin)) else 1
    fig, axes = plt.subplots(1, n, figsize=(6 * n, 4), squeeze=False)
    ax = axes[0, 0]
    ax.plot(t, f("clean_acc"), label="clean accuracy")
    ax.plot(t, f("backdoor_acc"), label="backdoor accuracy (attack success)")
    for r in rows:
        if r.get("attack") == 1:
            ax.axvline(int(r["round"]), color="red", alpha=0.3, lw=1)
    ax.set_xlabel("round t")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if n == 2:
        axes[0, 1].plot(t, twin)
        axes[0, 1].set_xlabel("round t")
        axes[0, 1].set_ylabel("||w_t (backdoored) - w_t (clean twin)||")
        axes[0, 1].grid(alpha=0.3)
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


def plot_run(run_dir: str | Path, rounds_dir: str | Path | None = None) -> list[Path]:
    run = Path(run_dir)
    rdir = Path(rounds_dir) if rounds_dir is not None else run
    RunDir(run).verify_files(contents=False)  # every file the integrity record lists is there (each read checks its bytes)
    out: list[Path] = []
    if (run / "client_level_clean.csv").is_file():
        out += plot_client_level(run)
    curves = {k: read_certificates(run / f"certificates_{k}.csv") for k in ("clean", "backdoor") if (run / f"certificates_{k}.csv").is_file()}
    if curves:
        out += plot_certified(curves, run / "certified", title=run.name)
    if (rdir / "rounds.csv").is_file() and rdir == run:
        out += plot_rounds(run)
    return out


# ---------------------------------------------------------------------------------------------
# sweeps (crfl plot DIR)


def _label(point: dict, keys: list[str]) -> str:
    def short(k: str) -> str:
        return k.split(".")[-1]

    return ", ".join(f"{short(k)}={point[k]}" for k in keys) or "base"


def _sweep_client_level(items: list[tuple[str, dict, Path]], base: Path, title: str) -> list[Path]:
    """Ensemble runs of a sweep: certified accuracy against the number m of malicious clients, one line per run."""
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
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (label, d) in enumerate(lines):
        for which, ls in (("clean", "-"), ("backdoor", "--")):
            if which in d:
                m, ok = d[which]
                ax.step(ms, [(ok & (m >= x)).mean() for x in ms], where="post", color=f"C{i % 10}", ls=ls,
                        label=f"{label} ({which})")
    ax.set_xlabel("number of malicious clients m")
    ax.set_ylabel("certified accuracy (client-level)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    return _save(fig, base)


def plot_sweep(sweep_dir: str | Path) -> list[Path]:
    """Figures for a sweep directory written by ``crfl sweep``: one set per certification setting.

    - ``<name>-certified-{clean,backdoor}``: certified accuracy (solid) per value of the varied
      factor, with the base model's accuracy (dashed, same colour), as in the paper's Fig. 2;
    - ``<name>-rate-{clean,backdoor}``: certified rate against radius;
    - ``<name>-rounds``: clean accuracy and attack success over rounds;
    - ``<name>-closeness``: ||w_t - w_t(twin)|| over rounds, where the twin was trained (Fig. 9a).
    Numeric sweeps (Fig. 9b) plot RAD against T for each rho/sigma.
    """
    d = Path(sweep_dir)
    meta = RunDir(d).read_json("sweep.json")
    if not isinstance(meta, dict) or not isinstance(meta.get("spec"), dict) or (
        meta.get("kind") != "numeric" and not isinstance(meta.get("jobs"), list)
    ):
        raise RunDirError(f"{d / 'sweep.json'} is not a crfl sweep file (needs 'spec' and 'jobs'); rerun crfl sweep.")
    spec = meta["spec"]
    name = spec.get("name", d.name)
    title = spec.get("title", name)
    figs = d / "figures"
    figs.mkdir(exist_ok=True)
    out: list[Path] = []
    if meta.get("kind") == "numeric":
        rows = read_csv(d / "results.csv")
        fig, ax = plt.subplots(figsize=(6, 4))
        for ratio in sorted({float(r["rho_over_sigma"]) for r in rows}):
            sel = [r for r in rows if float(r["rho_over_sigma"]) == ratio]
            ax.plot([int(r["T"]) for r in sel], [float(r["radius"]) for r in sel], marker="o", label=f"rho/sigma = {ratio:g}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("rounds T")
        ax.set_ylabel("certified radius RAD")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        return _save(fig, figs / name)
    jobs = meta["jobs"]
    keys = list(spec.get("grid") or {})
    cert_keys = list((spec.get("certify") or {}).get("grid") or {})
    runs = d / "runs"
    by_cert: dict[str, list[tuple[str, dict, Path]]] = {}
    for j in jobs:
        for h, cp in j["certs"]:
            label = _label(cp, keys + cert_keys)
            group = _label(cp, cert_keys) if cert_keys and keys else "all"
            by_cert.setdefault(group, []).append((label, j, runs / j["train_hash"] / f"cert-{h}"))
    for group, items in by_cert.items():
        suffix = "" if group == "all" else "-" + group.replace("=", "").replace(", ", "-")
        out += _sweep_client_level(items, figs / f"{name}-client-level{suffix}", title)
        for which in ("clean", "backdoor"):
            curves = {}
            base = {}
            for label, _, cdir in items:
                f = cdir / f"certificates_{which}.csv"
                if not f.is_file():
                    continue
                curves[label] = read_certificates(f)
                s = RunDir(cdir).read_summary()
                base[label] = s.get("results", {}).get(which, {}).get("base_accuracy")
            if not curves:
                continue
            grid = radius_grid([c["radius"] for c in curves.values()], points=300)
            for kind in ("certified", "rate"):
                fig, ax = plt.subplots(figsize=(6, 4))
                for i, (label, c) in enumerate(curves.items()):
                    color = f"C{i % 10}"
                    if kind == "certified":
                        ax.plot(grid, certified_accuracy(c["radius"], c["prediction"], c["label"], grid), color=color, label=label)
                        if base.get(label) is not None:
                            ax.axhline(base[label], color=color, ls="--", lw=1)
                    else:
                        ax.plot(grid, certified_rate(c["radius"], c["prediction"], grid), color=color, label=label)
                ax.set_xlabel("radius (backdoor magnitude ||delta||)")
                ax.set_ylabel("certified accuracy" if kind == "certified" else "certified rate")
                ax.set_ylim(0, 1.02)
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)
                ax.set_title(f"{title} — {which} test set" + ("" if group == "all" else f" ({group})"), fontsize=9)
                out += _save(fig, figs / f"{name}-{kind}-{which}{suffix}")
    # rounds and model closeness, once per training run
    seen = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    twin_fig, twin_ax = plt.subplots(figsize=(6, 4))
    any_twin = False
    for i, j in enumerate(jobs):
        rdir = runs / j["train_hash"]
        if j["train_hash"] in seen or not (rdir / "rounds.csv").is_file():
            continue
        seen.append(j["train_hash"])
        rows = [dataclasses.asdict(r) for r in RunDir(rdir).read_rounds()]
        t = [int(r["round"]) for r in rows]
        val = lambda k: [float(r[k]) if r.get(k) is not None else np.nan for r in rows]  # noqa: E731
        label = _label(j["point"], keys)
        axes[0].plot(t, val("clean_acc"), color=f"C{i % 10}", label=label)
        axes[1].plot(t, val("backdoor_acc"), color=f"C{i % 10}", label=label)
        tw = val("twin_distance")
        if not all(np.isnan(tw)):
            any_twin = True
            twin_ax.plot(t, tw, color=f"C{i % 10}", label=label)
    axes[0].set_ylabel("clean accuracy")
    axes[1].set_ylabel("backdoor accuracy (attack success)")
    for ax in axes:
        ax.set_xlabel("round t")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    out += _save(fig, figs / f"{name}-rounds")
    if any_twin:
        twin_ax.set_xlabel("round t")
        twin_ax.set_ylabel("l2 distance to the clean twin")
        twin_ax.set_yscale("log")
        twin_ax.grid(alpha=0.3)
        twin_ax.legend(fontsize=7)
        twin_ax.set_title(title, fontsize=9)
        out += _save(twin_fig, figs / f"{name}-closeness")
    else:
        plt.close(twin_fig)
    return out
