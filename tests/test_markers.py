"""The fast edit-test loop: a plain pytest skips the tests marked slow; scripts/dev test (and so CI) runs them all."""

from __future__ import annotations

import ast
import shlex
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_plain_pytest_skips_slow_and_scripts_dev_test_runs_everything():
    opts = shlex.split(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["addopts"])
    assert opts[opts.index("-m") + 1] == "not slow"
    test_line = next(ln for ln in (ROOT / "scripts" / "dev").read_text().splitlines() if ln.strip().startswith("test)"))
    words = shlex.split(test_line.split("exec", 1)[1])
    assert words[words.index("pytest") + 1:words.index("pytest") + 3] == ["-m", ""]  # before the user's "$@"
    assert "exec scripts/dev test" in (ROOT / ".ci" / "run").read_text()


def _starts_processes(fn: ast.FunctionDef) -> bool:
    """Calls subprocess.Popen or test_faults' _spawn/_run (the CLI in a child), or a sweep with --jobs/jobs > 1."""
    for node in ast.walk(fn):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in ("Popen", "_spawn", "_run"):
                return True
            if any(k.arg == "jobs" and isinstance(k.value, ast.Constant) and k.value.value > 1 for k in node.keywords):
                return True
        if isinstance(node, ast.List):  # [..., "--jobs", "2", ...]
            vals = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
            if any(v == "--jobs" and str(w).isdigit() and int(w) > 1 for v, w in zip(vals, vals[1:])):
                return True
    return False


def _marked_slow(fn: ast.FunctionDef) -> bool:
    return any("slow" in ast.unparse(d) for d in fn.decorator_list)


def test_every_test_that_starts_processes_is_marked_slow():
    unmarked = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for fn in ast.parse(path.read_text()).body:
            if isinstance(fn, ast.FunctionDef) and fn.name.startswith("test_") and _starts_processes(fn) and not _marked_slow(fn):
                unmarked.append(f"{path.name}::{fn.name}")
    assert unmarked == []
