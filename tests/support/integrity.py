"""Test helper: rewrite a run's integrity record after a test edited a file on purpose.

This is the case the record does not protect against (someone who rewrites the directory
consistently); tests use it to reach the validation behind the record (hashes, groups, rows).
"""

from __future__ import annotations

import json
from pathlib import Path

from crfl import rundir


def reseal(run: Path, *names: str) -> None:
    """Record the current bytes of ``names`` in ``run``'s integrity.json (as if the run had written them)."""
    path = Path(run) / rundir.RECORD
    rec = json.loads(path.read_text())
    for n in names:
        data = (Path(run) / n).read_bytes()
        entry = rec["files"].setdefault(n, {"role": "training"})
        entry.update(sha256=rundir.sha256(data), bytes=len(data))
    path.write_text(json.dumps(rec, indent=2) + "\n")
