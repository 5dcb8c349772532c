"""The Flower run config is defined once (crfl.flower.run_config); pyproject.toml and docs/flower.md agree with it."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

from crfl.flower.run_config import RUN_CONFIG, defaults, toml_table, toml_value

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_lists_every_key_with_its_default():
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert list(table) == list(RUN_CONFIG)  # same keys, same order
    for key, value in defaults().items():
        assert table[key] == value and type(table[key]) is type(value), (key, table[key], value)


def test_docs_table_lists_every_key_with_its_default():
    rows = re.findall(r"^\| `([a-z-]+)` \| `([^`]*)` \|", (ROOT / "docs" / "flower.md").read_text(), re.M)
    documented = dict(rows)
    assert len(rows) == len(documented) == len(RUN_CONFIG), rows  # every key once
    assert {k: documented.get(k) for k in RUN_CONFIG} == {k: toml_value(v) for k, v in defaults().items()}


def test_toml_table_round_trips():
    assert tomllib.loads(toml_table())["tool"]["flwr"]["app"]["config"] == defaults()


def test_importable_without_flower_or_torch():
    """The module and its package's __init__ import only the standard library."""
    for path in (ROOT / "src/crfl/flower/run_config.py", ROOT / "src/crfl/flower/__init__.py"):
        tree = ast.parse(path.read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]  # not the lazy ones in functions
        names = {a.name.split(".")[0] for n in top if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module.split(".")[0] for n in top if isinstance(n, ast.ImportFrom) and n.module}
        assert names <= set(sys.stdlib_module_names) | {"__future__"}, (path, names)
