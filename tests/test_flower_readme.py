"""The README's Flower commands, run exactly as written on a fresh clone (slow: Ray, 10 SuperNodes)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("flwr")

from tests.test_flower import _alive, _stop  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def readme_flower_commands() -> str:
    """The first ```bash block of the README's "## Flower" section."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Flower\n"):]
    section = section[: section.index("\n## ", 1)]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def _ours(home: Path) -> list[int]:
    """PIDs of processes started with FLWR_HOME=home (the local SuperLink that `flwr run` leaves running)."""
    want = f"FLWR_HOME={home}".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if want in (d / "environ").read_bytes().split(b"\0"):
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


@pytest.mark.slow
def test_readme_flower_commands_work_on_a_fresh_clone(tmp_path):
    commands = readme_flower_commands()
    assert "flwr run ." in commands and "num-supernodes=10" in commands
    clone = tmp_path / "crfl"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(ROOT), str(clone)], check=True)
    (clone / ".venv").symlink_to(Path(sys.executable).parents[1])
    home = tmp_path / "flwr-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_")}
    env.update(FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    proc = subprocess.Popen(["bash", "-ec", commands], cwd=clone, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=420)
    finally:
        _stop([proc.pid] + _ours(home))
        for _ in range(5):  # a process the federation spawned while it was being stopped
            left = [p for p in _ours(home) if _alive(p)]
            if not left:
                break
            _stop(left)
    assert not [p for p in _ours(home) if _alive(p)]
    assert proc.returncode == 0, log[-4000:]
    runs = sorted((clone / "runs").glob("flower-demo-*"))
    assert len(runs) == 1, log[-3000:]
    summary = json.loads((runs[0] / "summary.json").read_text())
    T = yaml.safe_load((runs[0] / "config.yaml").read_text())["server"]["rounds"]
    assert summary["training"]["engine"] == "flower" and summary["training"]["rounds"] == T
    assert summary["training"]["rounds_with_every_client"] == T and summary["training"]["certifiable"] is True
    assert "certificate" in summary and summary["results"]["clean"]["points"] == 1000
    # the demo's model enforces B_0 (model.input_norm_bound), so the server certifies without seeing data
    cert = summary["certificate"]
    assert cert["reading"] == "coupled" and cert["input_norm_enforced"] is True
    assert summary["assumptions"]["radius_certified"] is True and cert["radius_certified"] is True
    assert all(c["holds"] for c in summary["assumptions"]["checks"].values())
    delta = cert["delta_norm"]
    for k in ("clean", "backdoor"):
        r = summary["results"][k]
        assert r["certified_at_attack"] > 0.5
        line = (f"{k:<8} certified at the attack's ||delta|| = {delta:.4g}: {r['certified_at_attack']:.4f} of the points "
                f"({r['certified_correct_at_attack']:.4f} certified and correct)")
        assert line in log, log[-3000:]
