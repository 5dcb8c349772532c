"""The `crfl run` path outside training and counting (issue 20): what start-up imports, the shortcuts
that must give the same numbers as the code they replace, and the sweeps' shared dataset."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from crfl import bounds
from crfl.config import resolve
from crfl.data import Dataset, load_dataset
from crfl.readings import base
from crfl.setup import prepare

SRC = Path(__file__).resolve().parents[1] / "src"
HEAVY = ("scipy.stats", "pandas", "matplotlib", "flwr")


@pytest.mark.slow
def test_import_crfl_cli_leaves_heavy_modules_out():
    """`import crfl.cli` (every command's start-up) imports none of scipy.stats, pandas, matplotlib, flwr:
    each is imported where it is used (0.3-0.8 s each)."""
    code = "import sys, json, crfl.cli; print(json.dumps([m for m in %r if m in sys.modules]))" % (HEAVY,)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"})
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_clopper_pearson_is_scipy_stats_beta_bit_for_bit():
    """The bounds go through scipy.special (no scipy.stats import); they are the beta quantiles exactly."""
    rng = np.random.default_rng(0)
    for M in (1, 2, 10, 1000, 5000, 100_000):
        k = np.arange(M + 1) if M <= 5000 else rng.integers(0, M + 1, 5000)
        for alpha in (0.5, 0.05, 1e-3, 1e-3 / 20_000, 1e-12):
            lo, up = bounds.clopper_pearson_lower(k, M, alpha), bounds.clopper_pearson_upper(k, M, alpha)
            safe_lo, safe_up = np.maximum(k, 1), np.minimum(k, M - 1)
            want_lo = np.where(k == 0, 0.0, stats.beta.ppf(alpha, safe_lo, M - safe_lo + 1))
            want_up = np.where(k == M, 1.0, stats.beta.isf(alpha, safe_up + 1, M - safe_up))
            assert np.array_equal(lo, want_lo) and np.array_equal(up, want_up), (M, alpha)


def _slow_stats(setup) -> tuple[float, float, float]:
    """The conversion of every training row, as before the integer shortcut."""
    best, lo, hi = 0.0, math.inf, -math.inf
    for X in base.training_inputs(setup, chunk=4096):
        best = max(best, base.lipschitz.input_norm_bound(X))
        lo, hi = min(lo, float(X.min())), max(hi, float(X.max()))
    return best, lo, hi


def _images(x: np.ndarray) -> Dataset:
    n = len(x)
    return Dataset(name="synthetic", x_train=x, y_train=np.arange(n) % 10, x_test=x[:50], y_test=np.arange(50) % 10,
                   num_classes=10, input_scale=255.0, image_shape=(28, 28), class_names=tuple("0123456789"))


@pytest.mark.parametrize("case", ["mnist-5k", "random", "ties", "dark"])
def test_uint8_input_stats_equal_the_full_conversion(case):
    """B_0, min and max x_j from exact integer row norms are the same floats as converting every row:
    on real digits, random rows, many rows of the same integer norm in different orders (ties), and rows
    whose longest one is short (no pixel at 255)."""
    rng = np.random.default_rng(1)
    if case == "mnist-5k":
        ds = load_dataset("mnist-5k")
    else:
        x = rng.integers(0, 256, (3000, 784), dtype=np.uint8)
        if case == "ties":  # permutations of one row: equal integer norms, float sums in different orders
            row = rng.integers(0, 256, 784, dtype=np.uint8)
            x[:500] = np.stack([rng.permutation(row) for _ in range(500)])
            x[500:] //= 2
        if case == "dark":
            x = (x // 7 + 3).astype(np.uint8)
        ds = _images(x)
    setup = prepare(resolve("mnist", None, {"data.name": "mnist-5k", "data.num_clients": 5}), ds)
    fast = base.training_input_stats(setup)
    assert fast == _slow_stats(setup)
    assert setup.train_input_stats == fast  # cached on the setup


def test_sweep_jobs_share_one_dataset_load(tmp_path, monkeypatch):
    """A sweep's runs (training and every certification) load their dataset once, not once per step."""
    from crfl import setup as setup_mod
    from crfl import sweep

    calls = []
    real = setup_mod.load_data
    monkeypatch.setattr(setup_mod, "load_data", lambda cfg: calls.append(cfg.data.name) or real(cfg))
    spec = tmp_path / "tiny.yaml"
    spec.write_text(
        "name: tiny\ntitle: t\nfinding: f\nbase:\n  preset: demo\n  set: {server.rounds: 3, attack.rounds: [2], data.num_clients: 4, "
        "run.dtype: float32, certify.num_test: 50}\ngrid:\n  attack.gamma: [1, 2]\ncertify:\n  grid:\n"
        "    certify.sigma_T: [0.01, 0.02]\nradii: [0.0, 0.1]\n")
    rows = sweep.sweep(spec, tmp_path / "out", jobs=1, progress=False)
    assert [r["status"] for r in rows] == ["ok"] * 4
    assert calls == ["mnist-5k"]  # 2 trainings + 4 certifications, one load (by the data check before them)


@pytest.mark.parametrize("seconds, want", [(0.0, [2, 4, 6]), (3600.0, [6])])
def test_checkpoints_wait_for_run_checkpoint_seconds(tmp_path, monkeypatch, seconds, want):
    """run.checkpoint_seconds: a checkpoint every checkpoint_every rounds, but only once that much training time
    has passed since the last one (the last round always); 0 writes every checkpoint_every-th round."""
    from crfl import rundir
    from crfl.train import train

    written = []
    real = rundir.RunDir.write_checkpoint
    monkeypatch.setattr(rundir.RunDir, "write_checkpoint", lambda self, st, h: written.append(st["round"]) or real(self, st, h))
    cfg = resolve("demo", overrides={"server.rounds": 6, "attack.rounds": [2], "data.num_clients": 4, "run.dtype": "float32",
                                     "run.checkpoint_every": 2, "run.checkpoint_seconds": seconds})
    res = train(cfg, tmp_path / "run")
    assert written == want and len(res.records) == 6


def _tiny_spec(path: Path, name: str, grid: str, cert: str = "") -> Path:
    path.write_text(
        f"name: {name}\ntitle: t\nfinding: f\nbase:\n  preset: demo\n  set: {{server.rounds: 3, attack.rounds: [2], "
        f"data.num_clients: 4, run.dtype: float32, certify.num_test: 50}}\ngrid:\n  {grid}\n{cert}radii: [0.0, 0.1]\n")
    return path


def test_several_specs_run_as_one_and_compute_what_they_share_once(tmp_path, monkeypatch):
    """`crfl sweep A B`: one store, one pool; a training configuration or (run, certification setting) that both
    specs ask for is computed once, and each spec's results.csv is the one its own sweep writes."""
    from crfl import certify, sweep, train
    from crfl.io import read_csv

    a = _tiny_spec(tmp_path / "a.yaml", "a", "attack.gamma: [1, 2]")
    b = _tiny_spec(tmp_path / "b.yaml", "b", "attack.gamma: [2, 3]", "certify:\n  grid:\n    certify.sigma_T: [0.01, 0.02]\n")
    # alone, each in its own store: the reference
    for spec in (a, b):
        sweep.sweep(spec, tmp_path / "alone" / spec.stem, jobs=1, progress=False)
    trained, certified = [], []
    real_train, real_cert = train.train, certify.certify_run
    monkeypatch.setattr(train, "train", lambda cfg, out, **k: trained.append(Path(out).name) or real_train(cfg, out, **k))
    monkeypatch.setattr(certify, "certify_run", lambda run, **k: certified.append((Path(run).name, Path(k["out_dir"]).name))
                        or real_cert(run, **k))
    rows = sweep.sweep_many([a, b], tmp_path / "both", jobs=1, progress=False)
    assert sorted(rows) == ["a", "b"] and all(r["status"] == "ok" for rs in rows.values() for r in rs)
    assert len(trained) == len(set(trained)) == 3  # gamma 1, 2, 3: gamma = 2 once
    assert len(certified) == len(set(certified)) == 5  # (1, 0.01), (2, 0.01), (2, 0.02), (3, 0.01), (3, 0.02)
    timing = {"train_seconds", "wall_seconds"}
    for spec in ("a", "b"):
        want, got = read_csv(tmp_path / "alone" / spec / "results.csv"), read_csv(tmp_path / "both" / spec / "results.csv")
        assert [{k: v for k, v in r.items() if k not in timing} for r in got] == \
               [{k: v for k, v in r.items() if k not in timing} for r in want]
        assert (tmp_path / "both" / spec / "runs").resolve() == (tmp_path / "both" / "runs").resolve()


def test_several_specs_name_each_once(tmp_path):
    from crfl import sweep
    from crfl.validation import ConfigError

    a = _tiny_spec(tmp_path / "a.yaml", "a", "attack.gamma: [1]")
    with pytest.raises(ConfigError, match="name each sweep once"):
        sweep.sweep_many([a, a], tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()  # refused before anything is written


def test_a_failing_certification_setting_fails_its_own_row_only(tmp_path, monkeypatch):
    """One certification setting that is refused (sigma_T too small for Monte Carlo counts) does not take the
    run's other settings with it, whichever order they come in (several specs merge their settings on one run)."""
    from crfl import smoothing, sweep
    from crfl.validation import ConfigError

    counts = smoothing.monte_carlo_counts_linear

    def refusing(W, b, X, sigma, *a, **k):  # exact votes count any sigma_T; refuse this one as the float64 path would
        if sigma < 1e-6:
            raise ConfigError(f"The 'certify.sigma_T' parameter is too small for Monte Carlo counts: {sigma}")
        return counts(W, b, X, sigma, *a, **k)

    monkeypatch.setattr(smoothing, "monte_carlo_counts_linear", refusing)

    spec = _tiny_spec(tmp_path / "s.yaml", "s", "attack.gamma: [1]",
                      "certify:\n  set: {certify.method: monte-carlo, certify.M: 100}\n  grid:\n    certify.sigma_T: [1.0e-12, 0.01]\n")
    rows = sweep.sweep(spec, tmp_path / "o", jobs=1, progress=False)
    assert [r["status"] for r in rows] == ["failed", "ok"]
    assert "sigma_T" in rows[0]["error"] and (tmp_path / "o" / rows[0]["run"].split("/cert-")[0] / "error.txt").is_file()
