"""The marker of a run directory written by the Flower server (importable without flwr).

A Flower run records ``provenance.engine: flower`` in its ``config.yaml`` and
``engine: flower`` in ``summary.json``'s ``training`` block, and keeps its state in
``flower_checkpoint.pt``. The simulator must not resume such a directory (it would
retrain it with its own engine and overwrite it): :func:`refuse_simulator_resume`
is the check ``crfl train --resume`` runs.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from crfl.validation import ConfigError

ENGINE = "flower"
CHECKPOINT = "flower_checkpoint.pt"


def is_flower_run(out_dir: str | Path) -> bool:
    """True if ``out_dir`` holds a run written by the Flower server."""
    out = Path(out_dir)
    if (out / CHECKPOINT).is_file():
        return True
    cfg = out / "config.yaml"
    if not cfg.is_file():
        return False
    saved = yaml.safe_load(cfg.read_text()) or {}
    prov = saved.get("provenance") or {}
    return prov.get("engine") == ENGINE or "flower" in prov


def refuse_simulator_resume(out_dir: str | Path) -> None:
    """Raise ConfigError if ``out_dir`` is a Flower run (the simulator must not resume it)."""
    if is_flower_run(out_dir):
        raise ConfigError(
            f"The '--resume' directory {str(out_dir)!r} holds a run of the Flower server (provenance.engine: flower); "
            "the simulator cannot resume it. Resume it over Flower instead: `flwr run . --run-config "
            f"\"out-dir='{out_dir}' resume=true\"` (docs/flower.md)."
        )
