"""Docs that run: every ```bash block of README.md and docs/*.md, run as written in a fresh copy of the repository.

A block that takes long or needs a network or a Flower deployment is marked in the markdown, right before
it, with ``<!-- docs-test: skip (reason) -->``; the test lists the skipped blocks and their reasons. The
copy gets a ``.venv`` that runs this interpreter on the copy's own sources (``scripts/dev setup`` would
install from the package index), on PATH as after setup, and its own HOME (the Flower snippets write
``~/.flwr``). The blocks of a file run in order, each in a new shell, in the copy's root.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\s*\((?P<reason>[^)]+(?:\([^)]*\)[^)]*)*)\)\s*-->")
FENCE = re.compile(r"^```(?P<lang>\S*)\s*$")


@dataclass(frozen=True)
class Block:
    path: str
    line: int
    code: str
    skip: str | None  # the reason, where the block is marked


def doc_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def bash_blocks(path: Path, root: Path = ROOT) -> list[Block]:
    """The ```bash blocks of a markdown file, in order, with the skip mark right before each (if any)."""
    lines = path.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        if m.group("lang") == "bash":
            k = i - 1
            while k >= 0 and not lines[k].strip():
                k -= 1
            mark = SKIP.search(lines[k]) if k >= 0 else None
            out.append(Block(str(path.relative_to(root)), i + 1, "\n".join(lines[i + 1 : j]) + "\n",
                             mark.group("reason").strip() if mark else None))
        i = j + 1
    return out


def test_skip_marks_are_well_formed():
    """Every skip mark names a reason and stands right before a bash block (a typo would run a long block)."""
    for path in doc_files():
        text = path.read_text()
        marks = len(re.findall(r"docs-test", text))
        assert marks == len(SKIP.findall(text)), f"{path}: a docs-test mark without '(reason)'"
        assert marks == sum(b.skip is not None for b in bash_blocks(path)), f"{path}: a skip mark not right before ```bash"


def fresh_copy(dest: Path) -> Path:
    """The repository's files (tracked, and untracked but not ignored) copied to ``dest``, with a .venv whose
    python and crfl run this interpreter on the copy's sources, and which scripts/dev takes as set up."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    bin_ = dest / ".venv" / "bin"
    bin_.mkdir(parents=True)
    for name, args in (("python", '"$@"'), ("crfl", '-m crfl.cli "$@"')):
        (bin_ / name).write_text(f'#!/bin/sh\nexec "{sys.executable}" {args}\n')
        (bin_ / name).chmod(0o755)
    (dest / ".venv" / ".crfl-installed").touch()  # newer than requirements.lock and pyproject.toml: no install
    return dest


@pytest.mark.slow
def test_every_command_block_of_the_docs_runs(tmp_path, capsys):
    repo = fresh_copy(tmp_path / "crfl")
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLWR_", "PYTHON"))}
    # as after `scripts/dev setup` in the user's shell: `crfl` is .venv/bin/crfl (README), on PATH for every block
    env.update(HOME=str(home), PYTHONPATH=str(repo / "src"), MPLBACKEND="Agg",
               PATH=f"{repo / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    ran, skipped = [], []
    for path in doc_files(repo):
        for b in bash_blocks(path, repo):
            if b.skip:
                skipped.append(b)
                continue
            # a block that edits a config file must be safe to run twice (the Flower snippets)
            for _ in range(2 if "config.toml" in b.code else 1):
                p = subprocess.run(["bash", "-euo", "pipefail", "-c", b.code], cwd=repo, env=env, capture_output=True,
                                   text=True, timeout=900)
                assert p.returncode == 0, f"{b.path}:{b.line} failed ({p.returncode}):\n{b.code}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
            ran.append(b)
    with capsys.disabled():
        print(f"\ndocs: ran {len(ran)} command block(s), skipped {len(skipped)}:")
        for b in skipped:
            print(f"  {b.path}:{b.line}: {b.skip}")
    assert len(ran) >= 4 and all(b.skip for b in skipped)
    # what the README's blocks promise is there
    demo = repo / "runs" / "demo"
    assert (demo / "certified.png").is_file() and (demo / "readings" / "paper" / "certified.png").is_file()
    assert len(list((repo / "runs" / "fig5" / "figures").glob("*.png"))) >= 5
    # the Flower connection snippet, run twice, leaves one valid table
    conf = tomllib.loads((home / ".flwr" / "config.toml").read_text())
    assert conf["superlink"]["deploy"] == {"address": "127.0.0.1:9300", "insecure": True}
