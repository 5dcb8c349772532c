"""Plugins (crfl.plugins): the user's rule, dataset and attack, registered by a module the test writes,
trained and certified from the command line and in a sweep; the run remembers its plugins, and a
command that reads the run back imports them again or names the --plugin to pass."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from crfl import aggregation, attacks, plugins
from crfl.cli import main
from crfl.data import base as data_base
from crfl.io import read_csv

ROOT = Path(__file__).resolve().parents[1]

#: A plugin registering an aggregation rule, a dataset and an attack; each counts its calls in a file
#: (COUNTS) so that the test sees them used, in this process or in a sweep worker.
PLUGIN = '''
"""A user's crfl parts: a rule, a dataset and an attack."""
import os

import numpy as np
import torch

from crfl.aggregation import AggregateResult, register_aggregator
from crfl.attacks import register_attack
from crfl.data import Dataset, register_dataset

COUNTS = os.environ.get("PLUGIN_COUNTS")


def _count(what):
    if COUNTS:
        with open(COUNTS, "a") as f:
            f.write(what + "\\n")


@register_aggregator("{rule}", "a weighted mean scaled by 'factor' (the test's rule)")
def scaled_mean(updates, client_weights, *, factor=0.5):
    _count("rule")
    w = client_weights.to(updates.dtype) / client_weights.sum()
    return AggregateResult(update=factor * (w[:, None] * updates).sum(0), weights=None, info={{}})


@register_dataset("{dataset}", "learnable 8x8 blocks, 400/100 images in 4 classes (the test's dataset)")
def blocks(data_dir, seed, **options):
    _count("dataset")
    rng = np.random.default_rng(seed)

    def make(n):
        y = rng.integers(0, 4, n)
        x = rng.integers(0, 60, (n, 64))
        for c in range(4):
            x[np.ix_(np.nonzero(y == c)[0], np.arange(16 * c, 16 * (c + 1)))] += 150
        return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)

    (xtr, ytr), (xte, yte) = make(400), make(100)
    return Dataset(name="{dataset}", x_train=xtr, y_train=ytr, x_test=xte, y_test=yte, num_classes=4,
                   input_scale=255.0, image_shape=(8, 8), class_names=("0", "1", "2", "3"))


@register_attack("{attack}", description="send the honest update scaled by 'scale' (the test's attack)")
def scaled_honest(ctx, *, scale=-1.0):
    _count("attack")
    return scale * ctx.honest
'''

NAMES = {"rule": "scaled-mean", "dataset": "blocks", "attack": "scaled-honest"}
TRAIN = ["--dataset", "blocks", "--set", "aggregation.name=scaled-mean", "--set", "attack.kind=scaled-honest",
         "--set", "server.rounds=3", "--set", "attack.rounds=[2]", "--set", "data.num_clients=4",
         "--set", "attack.trigger=pixel", "--set", "attack.pixels=[[0,0],[0,1],[1,0]]"]


@pytest.fixture
def own_registries(monkeypatch):
    """Fresh copies of the registries and of the plugin record; the test's modules leave sys.modules after."""
    monkeypatch.setattr(aggregation, "_REGISTRY", dict(aggregation._REGISTRY))
    monkeypatch.setattr(data_base, "_REGISTRY", dict(data_base._REGISTRY))
    monkeypatch.setattr(attacks, "_REGISTRY", dict(attacks._REGISTRY))
    monkeypatch.setattr(plugins, "_LOADED", {})
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("user_parts"):
            del sys.modules[name]


def write_plugin(directory: Path, name: str = "user_parts") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.py"
    path.write_text(PLUGIN.format(**NAMES))
    return path


def counts(path: Path) -> dict[str, int]:
    lines = path.read_text().split() if path.is_file() else []
    return {k: lines.count(k) for k in ("rule", "dataset", "attack")}


def test_plugin_file_trains_and_certifies_from_the_cli(tmp_path, capsys, monkeypatch, own_registries):
    plugin = write_plugin(tmp_path / "mine")
    monkeypatch.setenv("PLUGIN_COUNTS", str(tmp_path / "counts"))
    run = tmp_path / "run"
    assert main(["train", "--plugin", str(plugin), *TRAIN, "--out", str(run), "-q"]) == 0
    used = counts(tmp_path / "counts")
    assert used["dataset"] >= 1 and used["rule"] >= 3 and used["attack"] >= 1, used  # each part ran
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["aggregation"]["name"] == "scaled-mean" and cfg["data"]["name"] == "blocks"
    assert cfg["provenance"]["plugins"] == [{"module": "user_parts", "source": "--plugin", "file": str(plugin.resolve())}]
    attack_rows = [r for r in read_csv(run / "rounds.csv") if r["attack"] == "1"]
    assert [r["round"] for r in attack_rows] == ["2"]

    # certify in the same process: the parts are registered, the plugin is imported already
    assert main(["certify", str(run), "-q", "--num-test", "40"]) == 0
    s = json.loads((run / "summary.json").read_text())
    assert s["results"]["clean"]["points"] == 40


def test_a_run_trained_with_a_plugin_file_names_it_when_it_is_missing(tmp_path, capsys, monkeypatch, own_registries):
    plugin = write_plugin(tmp_path / "mine")
    run = tmp_path / "run"
    assert main(["train", "--plugin", str(plugin), *TRAIN, "--out", str(run), "-q"]) == 0
    # a later process: the module and its parts are gone
    del sys.modules["user_parts"]
    monkeypatch.setattr(aggregation, "_REGISTRY", {k: v for k, v in aggregation._REGISTRY.items() if k != "scaled-mean"})
    monkeypatch.setattr(data_base, "_REGISTRY", {k: v for k, v in data_base._REGISTRY.items() if k != "blocks"})
    monkeypatch.setattr(plugins, "_LOADED", {})
    capsys.readouterr()
    for argv in (["certify", str(run)], ["train", "--resume", str(run)]):
        assert main([*argv, "-q"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("crfl: error:") and err.count("\n") == 1, err
        assert f"--plugin {plugin.resolve()}" in err and "'user_parts'" in err
    assert main(["certify", str(run), "-q", "--num-test", "20", "--plugin", str(plugin)]) == 0


def test_a_plugin_module_on_the_path_is_imported_again_by_certify(tmp_path, capsys, monkeypatch, own_registries):
    write_plugin(tmp_path / "site", "user_parts_mod")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    run = tmp_path / "run"
    assert main(["train", "--plugin", "user_parts_mod", *TRAIN, "--out", str(run), "-q"]) == 0
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["provenance"]["plugins"] == [{"module": "user_parts_mod", "source": "--plugin"}]
    del sys.modules["user_parts_mod"]
    monkeypatch.setattr(aggregation, "_REGISTRY", {k: v for k, v in aggregation._REGISTRY.items() if k != "scaled-mean"})
    monkeypatch.setattr(plugins, "_LOADED", {})
    # no --plugin: config.yaml names the module, and certify imports it from the path
    assert main(["certify", str(run), "-q", "--num-test", "20"]) == 0
    assert "user_parts_mod" in sys.modules and "scaled-mean" in aggregation.aggregator_names()
    # off the path, the error names the module and the flag
    del sys.modules["user_parts_mod"]
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path / "site")])
    capsys.readouterr()
    assert main(["certify", str(run), "-q"]) == 2
    err = capsys.readouterr().err
    assert "'user_parts_mod'" in err and "--plugin user_parts_mod" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("spec, expect", [
    ("no_such_module_xyz", "The '--plugin' parameter must name an importable module or a .py file. Got 'no_such_module_xyz'"),
    ("/nonexistent/parts.py", "Got '/nonexistent/parts.py' instead (no such file)"),
])
def test_a_plugin_that_cannot_be_imported_is_one_error(spec, expect, capsys, own_registries):
    assert main(["list", "--plugin", spec]) == 2
    err = capsys.readouterr().err
    assert err.startswith("crfl: error:") and expect in err and err.count("\n") == 1, err


def test_a_plugin_file_never_replaces_an_imported_module(tmp_path, capsys, own_registries):
    shadow = tmp_path / "json.py"
    shadow.write_text("raise RuntimeError('must not run')\n")
    import json as json_module

    assert main(["list", "--plugin", str(shadow)]) == 2
    err = capsys.readouterr().err
    assert "would replace the module 'json'" in err and err.count("\n") == 1, err
    assert sys.modules["json"] is json_module


def test_a_plugin_that_fails_while_importing_is_one_error(tmp_path, capsys, own_registries):
    bad = tmp_path / "user_parts_bad.py"
    bad.write_text("raise RuntimeError('boom')\n")
    assert main(["list", "--plugin", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "failed while importing: RuntimeError: boom" in err and err.count("\n") == 1, err
    assert "user_parts_bad" not in sys.modules


def test_entry_points_are_loaded_and_recorded(tmp_path, capsys, monkeypatch, own_registries):
    site = tmp_path / "site"
    write_plugin(site, "user_parts_ep")
    dist = site / "user_parts_dist-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: user-parts-dist\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{plugins.GROUP}]\nmy-parts = user_parts_ep\n")
    monkeypatch.syspath_prepend(str(site))
    assert main(["list", "aggregators"]) == 0
    out = capsys.readouterr().out
    assert "scaled-mean" in out and "the test's rule" in out
    assert plugins.loaded() == [{"module": "user_parts_ep", "source": "entry point", "entry_point": "my-parts",
                                 "distribution": "user-parts-dist"}]


def sweep_spec(tmp_path: Path) -> Path:
    spec = {"name": "plugin-sweep", "title": "the user's parts in a sweep",
            "base": {"preset": "demo", "dataset": "blocks",
                     "set": {"server.rounds": 3, "attack.rounds": [2], "data.num_clients": 4, "certify.num_test": 30,
                             "attack.trigger": "pixel", "attack.pixels": [[0, 0], [0, 1]], "attack.kind": "scaled-honest"}},
            "grid": {"aggregation.name": ["scaled-mean", "fedavg"]}, "radii": [0.0]}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_plugin_parts_in_a_sweep(tmp_path, capsys, monkeypatch, own_registries):
    plugin = write_plugin(tmp_path / "mine")
    monkeypatch.setenv("PLUGIN_COUNTS", str(tmp_path / "counts"))
    out = tmp_path / "sweep"
    assert main(["sweep", str(sweep_spec(tmp_path)), "--out", str(out), "--plugin", str(plugin), "-q"]) == 0
    rows = read_csv(out / "results.csv")
    assert [r["status"] for r in rows] == ["ok", "ok"] and [r["aggregation.name"] for r in rows] == ["scaled-mean", "fedavg"]
    assert counts(tmp_path / "counts")["rule"] >= 3


@pytest.mark.slow
def test_sweep_workers_and_a_fresh_process_import_the_plugin(tmp_path):
    """--jobs 2: spawned workers import the --plugin file; certify in a new process needs it and names it."""
    plugin = write_plugin(tmp_path / "mine")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PLUGIN_COUNTS": str(tmp_path / "counts")}
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "crfl", "sweep", str(sweep_spec(tmp_path)), "--out", str(out), "--jobs", "2",
           "--plugin", str(plugin), "-q"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    rows = read_csv(out / "results.csv")
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert counts(tmp_path / "counts")["rule"] >= 3
    run = next(out.glob("runs/*/config.yaml")).parent
    p = subprocess.run([sys.executable, "-m", "crfl", "certify", str(run), "-q"], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and f"--plugin {plugin.resolve()}" in p.stderr, p.stderr
    p = subprocess.run([sys.executable, "-m", "crfl", "certify", str(run), "-q", "--num-test", "20", "--plugin", str(plugin)],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr

