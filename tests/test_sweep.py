"""Sweeps: content-addressed runs, resume after a kill equals an uninterrupted sweep, failures isolated."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from crfl.io import read_csv
from crfl.sweep import expand, load_spec, numeric_study, spec_names, sweep

SPEC = {
    "name": "tiny",
    "title": "tiny sweep",
    "finding": "more attackers, smaller radius",
    "base": {"preset": "demo", "set": {"server.rounds": 4, "attack.rounds": [2], "data.num_clients": 4,
                                       "certify.num_test": 100}},
    "grid": {"attack.num_attackers": [1, 2, 3]},
    "radii": [0.0, 0.001],
}
TIMING = ("train_seconds", "wall_seconds")


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


def strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_content_addressing(tmp_path):
    spec = load_spec(write_spec(tmp_path / "s.yaml", {**SPEC, "certify": {"grid": {"certify.M": [10, 20]},
                                                                          "set": {"certify.method": "monte-carlo"}}}))
    jobs = expand(spec)
    assert len(jobs) == 3 and len({j.train_hash for j in jobs}) == 3
    assert [len(j.certs) for j in jobs] == [2, 2, 2]
    assert expand(spec)[0].train_hash == jobs[0].train_hash  # a pure function of the config
    assert jobs[0].certs[0][0] != jobs[0].certs[1][0]
    # certification settings do not change the training run's address
    other = load_spec(write_spec(tmp_path / "t.yaml", {**SPEC, "base": {**SPEC["base"], "set": {
        **SPEC["base"]["set"], "certify.alpha": 0.05}}}))
    assert [j.train_hash for j in expand(other)] == [j.train_hash for j in jobs]


def test_grid_points_sharing_a_training_run_become_one_job(tmp_path):
    spec = load_spec(write_spec(tmp_path / "s.yaml", {**SPEC, "grid": {"attack.num_attackers": [1, 2],
                                                                      "certify.alpha": [0.01, 0.001]}}))
    jobs = expand(spec)
    assert len(jobs) == 2 and [len(j.certs) for j in jobs] == [2, 2]
    assert [c[2] for c in jobs[0].certs] == [{"attack.num_attackers": 1, "certify.alpha": 0.01},
                                             {"attack.num_attackers": 1, "certify.alpha": 0.001}]


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(tmp_path):
    spec = write_spec(tmp_path / "s.yaml", SPEC)
    full = sweep(spec, tmp_path / "full", progress=False)
    assert [r["status"] for r in full] == ["ok"] * 3
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "crfl.cli", "sweep", str(spec), "--out", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not any((out / "runs").glob("*/DONE")):
            time.sleep(0.05)
        assert any((out / "runs").glob("*/DONE")), "no run finished in time"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "results.csv").exists()
    finished = {p.parent.name for p in (out / "runs").glob("*/DONE")}
    stamps = {h: (out / "runs" / h / "model_final.pt").stat().st_mtime_ns for h in finished}
    resumed = sweep(spec, out, progress=False)
    for h, ns in stamps.items():  # finished runs were not recomputed
        assert (out / "runs" / h / "model_final.pt").stat().st_mtime_ns == ns
    assert strip(resumed) == strip(full)
    assert strip(read_csv(out / "results.csv")) == strip(read_csv(tmp_path / "full" / "results.csv"))
    for h in (p.name for p in (tmp_path / "full" / "runs").iterdir()):
        a = (tmp_path / "full" / "runs" / h / "model_final.pt").read_bytes()
        assert a == (out / "runs" / h / "model_final.pt").read_bytes()


def test_failing_run_is_reported_and_others_finish(tmp_path, capsys):
    bad = {**SPEC, "grid": {"attack.num_attackers": [1, 9]}}  # 9 attackers among 4 clients
    rows = sweep(write_spec(tmp_path / "s.yaml", bad), tmp_path / "o", progress=True)
    assert [r["status"] for r in rows] == ["ok", "failed"]
    assert "attack.num_attackers" in rows[1]["error"]  # the parameter the user set
    err_files = list((tmp_path / "o" / "runs").glob("*/error.txt"))
    assert len(err_files) == 1 and "ConfigError" in err_files[0].read_text()
    assert "1 run(s) failed" in capsys.readouterr().out


@pytest.mark.slow
def test_parallel_jobs_give_same_results(tmp_path):
    spec = write_spec(tmp_path / "s.yaml", {**SPEC, "grid": {"attack.num_attackers": [1, 2]}})
    one = sweep(spec, tmp_path / "a", progress=False)
    two = sweep(spec, tmp_path / "b", jobs=2, progress=False)
    cols = ("final_clean_acc", "clean_cert_acc@0.001", "clean_max_radius")
    flat = lambda rows: [r[c] for r in rows for c in cols]  # noqa: E731
    assert flat(one) == pytest.approx(flat(two), rel=1e-5)


def test_builtin_specs_expand_and_numeric_study():
    names = spec_names()
    for fig in ("fig2-sigma-mnist", "fig5-attackers-mnist", "fig6-rfa-mnist", "fig9a-closeness-mnist",
                "fig11-M-mnist", "fig8-rounds-loan", "fig4-gamma-emnist"):
        assert fig in names
    for n in names:
        spec = load_spec(n)
        if spec.kind == "numeric":
            rows = numeric_study(spec)
            assert all(r["radius_certified"] is False for r in rows)  # Corollary 1 as printed: never certified
            # below the threshold larger T certifies larger radii; far above it T does not matter
            small = [r["radius"] for r in rows if r["rho_over_sigma"] == 0.5]
            large = [r["radius"] for r in rows if r["rho_over_sigma"] == 8]
            assert small == sorted(small) and small[-1] > 10 * small[0]
            assert max(large) == pytest.approx(min(large), rel=1e-6)
        else:
            assert spec.finding and expand(spec, {"data.name": "mnist-5k"} if "mnist" in n else None)


def test_sweep_without_its_data_fails_up_front(tmp_path, capsys):
    """A spec whose dataset cannot be loaded fails with one line before any run starts (no error.txt per run)."""
    from crfl.cli import main
    from crfl.data import DataError

    spec = write_spec(tmp_path / "s.yaml", {**SPEC, "base": {**SPEC["base"], "set": {**SPEC["base"]["set"], "data.name": "mnist"}}})
    with pytest.raises(DataError, match=r"The sweep 'tiny' cannot start: 3 of its 3 run\(s\) use the dataset 'mnist'"):
        sweep(spec, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    missing = tmp_path / "nowhere"
    assert main(["sweep", str(spec), "--out", str(tmp_path / "out"), "--data-dir", str(missing), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("crfl: error: The sweep 'tiny' cannot start") and err.count("\n") == 1
    assert str(missing) in err and "--dataset NAME" in err and "No run was started" in err
    assert not (tmp_path / "out").exists()
    # the same spec on data that loads runs
    rows = sweep(spec, tmp_path / "ok", extra={"data.name": "mnist-5k"}, progress=False)
    assert [r["status"] for r in rows] == ["ok"] * 3
