"""Plots that read only result files (certificates_*.csv, rounds.csv): PNG and PDF.

- ``certified.{png,pdf}``: certified accuracy (solid) and certified rate (dashed) against the
  radius, for the clean and the backdoored test set (Section 6.1, Appendix A.3);
- ``rounds.{png,pdf}``: clean accuracy and attack success over rounds, and the l2 distance to
  the clean twin when it was trained (Fig. 9a).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from crfl.io import read_csv  # noqa: E402
from crfl.metrics import certified_accuracy, certified_rate, radius_grid  # noqa: E402


def _save(fig, base: Path) -> list[Path]:
    out = []
    for ext in ("png", "pdf"):
        p = base.with_suffix(f".{ext}")
        tmp = p.with_name(f".{p.name}.tmp.{ext}")
        fig.savefig(tmp, dpi=130, bbox_inches="tight")
        tmp.replace(p)
        out.append(p)
    plt.close(fig)
    return out


def read_certificates(path: Path) -> dict[str, np.ndarray]:
    rows = read_csv(path)
    rad = np.array([float(r["radius"]) if r["radius"] not in ("", None) else 0.0 for r in rows])
    return {
        "radius": rad,
        "prediction": np.array([int(r["prediction"]) for r in rows]),
        "label": np.array([int(r["label"]) for r in rows]),
    }


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
    rows = read_csv(run / "rounds.csv")
    t = [int(r["round"]) for r in rows]
    f = lambda k: [float(r[k]) if r.get(k) not in ("", None) else np.nan for r in rows]  # noqa: E731
    twin = f("twin_distance")
    n = 2 if not all(np.isnan(twin)) else 1
    fig, axes = plt.subplots(1, n, figsize=(6 * n, 4), squeeze=False)
    ax = axes[0, 0]
    ax.plot(t, f("clean_acc"), label="clean accuracy")
    ax.plot(t, f("backdoor_acc"), label="backdoor accuracy (attack success)")
    for r in rows:
        if r.get("attack") == "1":
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


def plot_run(run_dir: str | Path, rounds_dir: str | Path | None = None) -> list[Path]:
    run = Path(run_dir)
    rdir = Path(rounds_dir) if rounds_dir is not None else run
    out: list[Path] = []
    curves = {k: read_certificates(run / f"certificates_{k}.csv") for k in ("clean", "backdoor") if (run / f"certificates_{k}.csv").is_file()}
    if curves:
        out += plot_certified(curves, run / "certified", title=run.name)
    if (rdir / "rounds.csv").is_file() and rdir == run:
        out += plot_rounds(run)
    return out
