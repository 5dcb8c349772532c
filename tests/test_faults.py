"""Faults: bad inputs, corrupt or foreign files, OS errors, kills and concurrent writers.

Every expected failure is one message naming the parameter or file, exit status 2, and the run
directory is left unchanged (or, after a kill and a rerun, complete and byte-identical to an
uninterrupted run). Kill and race trials are seeded; ``CRFL_FAULT_TRIALS`` raises their number.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from crfl import rundir
from crfl.cli import main
from crfl.data import DataError, Dataset
from crfl.rundir import config_hash, load_run

from tests.conftest import synthetic_images
from tests.support.integrity import reseal

TINY = ["--preset", "demo", "--set", "server.rounds=3", "--set", "data.num_clients=4", "--set", "attack.rounds=[2]",
        "--set", "run.threads=1", "--set", "run.dtype=float32"]  # the demo trains in float64; these tests edit float32
TRIALS = int(os.environ.get("CRFL_FAULT_TRIALS", "3"))
CRFL = [sys.executable, "-m", "crfl.cli"]
TIMING = ("seconds", "seconds_per_round", "certify_seconds")


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()} if d.exists() else {}


def cli(argv, capsys) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return rc, err


def assert_clear(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    assert err.startswith("crfl: error:") and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, (n, err)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "trained"
    assert main(["train", *TINY, "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def certified(trained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "certified"
    shutil.copytree(trained, out)
    assert main(["certify", str(out), "--num-test", "40", "--quiet"]) == 0
    return out


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


@pytest.fixture
def cert_copy(certified, tmp_path) -> Path:
    shutil.copytree(certified, tmp_path / "run")
    return tmp_path / "run"


# ---------------------------------------------------------------------------------------------
# 1. bad parameters: nothing is created


BAD_PARAMS = [
    (["--preset", "nope"], "The 'preset' parameter must be one of"),
    (["--dataset", "cifar"], "The 'data.name' parameter must be one of"),
    (["--set", "server.sigma=-1"], "The 'server.sigma' parameter must be a float in [0, inf). Got -1"),
    (["--set", "server.sigma=.inf"], "The 'server.sigma' parameter must be a float in [0, inf). Got inf"),
    (["--set", "clients.lr=.inf"], "The 'clients.lr' parameter must be a float in (0, inf). Got inf"),
    (["--set", "attack.gamma=.inf"], "'attack.gamma' parameter must be a float in [0, inf). Got inf"),
    (["--set", "attack.magnitude=.nan"], "'attack.magnitude' parameter"),
    (["--set", "data.dirichlet_alpha=.inf"], "'data.dirichlet_alpha' parameter"),
    (["--set", "certify.sigma_T=.inf"], "'certify.sigma_T' parameter"),
    (["--set", "clients.lr=0"], "'clients.lr' parameter must be a float in (0, inf). Got 0"),
    (["--set", "clients.lr=fast"], "'clients.lr' parameter must be of type float. Got 'fast'"),
    (["--set", "clients.batch_size=0"], "'clients.batch_size' parameter must be an integer in [1, inf]"),
    (["--set", "attack.poison_per_batch=500"], "'attack.poison_per_batch' parameter must be an integer in [0, 50]"),  # the demo's n_B (train defaults to the demo)
    (["--set", "gamma"], "The '--set' parameter must look like key=value. Got 'gamma'"),
    (["--set", "attack.num_attackers=9", "--set", "data.num_clients=4"], "The 'attack.num_attackers' parameter must be an integer in [0, 4]"),
    (["--set", "data.num_clients=0"], "'data.num_clients' parameter must be an integer in [1, inf]"),
    (["--set", "server.rounds=0"], "'server.rounds' parameter must be an integer in [1, inf]"),
    (["--set", "attack.rounds=[101]"], "'attack.rounds' parameter must be an integer in [1, 100]"),
    (["--set", "certify.alpha=1.5"], "'certify.alpha' parameter must be a float in (0, 1)"),
    (["--set", "certify.M=0"], "'certify.M' parameter must be an integer in [1, inf]"),
    (["--set", "run.dtype=float16"], "'run.dtype' parameter must be one of 'float32', 'float64'"),
    (["--set", "model.init=ones"], "'model.init' parameter must be one of"),
    (["--set", "server.foo=1"], "Unknown parameter(s) ['foo'] in section 'server'"),
    (["--set", "data.partition=random"], "'data.partition' parameter must be one of"),
    (["--set", "aggregation.name=nope"], "'aggregation.name' parameter must be one of"),
    (["--set", "seed=-1"], "'seed' parameter must be an integer in [0, inf]"),
    (["--set", "server.rho={kind: cubic}"], "'server.rho.kind' parameter must be one of"),
    (["--set", "server.sigma=[0.1]"], "'server.sigma' parameter must be a number or a list of T-1"),
    (["--set", "attack.attackers=[0, 1]"], "'attack.attackers' parameter must be a list of attack.num_attackers = 1"),
    (["--set", "data.options={colour: red}"], "'data.options' parameter must hold options of the 'mnist-5k' loader"),
    (["--dataset", "mnist", "--data-dir", "/nonexistent"], "/nonexistent"),
]


@pytest.mark.parametrize("argv, message", BAD_PARAMS, ids=[str(i) for i in range(len(BAD_PARAMS))])
def test_bad_parameter_one_clear_error_and_nothing_written(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    rc, err = cli(["train", *argv, "--out", out], capsys)
    assert_clear(rc, err, message)
    assert not out.exists()


def test_numbers_are_read_as_users_write_them(tmp_path, capsys):
    cfgfile = tmp_path / "c.yaml"
    cfgfile.write_text("clients:\n  lr: 1e-3\nserver:\n  sigma: 5E-3\n")
    out = tmp_path / "out"
    assert main(["train", *TINY, "--config", str(cfgfile), "--set", "attack.gamma=1e1", "--out", str(out), "--quiet"]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["clients"]["lr"] == 0.001 and saved["server"]["sigma"] == 0.005 and saved["attack"]["gamma"] == 10.0


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\xff\xfe not utf-8", "is not UTF-8 text"),
        (b"server: [unclosed", "is not valid YAML"),
        (b"- a\n- b\n", "must hold a mapping of sections. Got list"),
        (b"bogus: 1\n", "Unknown parameter(s) ['bogus'] in the configuration"),
        (b"server:\n  rounds: many\n", "'server.rounds' parameter must be of type int. Got 'many'"),
    ],
)
def test_bad_config_file(content, message, tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_bytes(content)
    rc, err = cli(["train", "--config", f, "--out", tmp_path / "out"], capsys)
    assert_clear(rc, err, message)
    assert not (tmp_path / "out").exists()


def test_missing_config_file(tmp_path, capsys):
    rc, err = cli(["train", "--config", tmp_path / "none.yaml", "--out", tmp_path / "out"], capsys)
    assert_clear(rc, err, "The 'config' parameter must name a YAML file", "none.yaml")


# ---------------------------------------------------------------------------------------------
# 2. the run directory is one unit


def test_train_without_out(capsys):
    assert_clear(*cli(["train", "--preset", "demo"], capsys), "The '--out' parameter must name the run directory")


def test_out_on_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("mine")
    assert_clear(*cli(["train", *TINY, "--out", f], capsys), "The '--out' parameter must name a directory", "(a file)")
    assert f.read_text() == "mine"


def test_out_unwritable(capsys):
    assert_clear(*cli(["train", *TINY, "--out", "/dev/null/run"], capsys), "/dev/null/run")


def test_users_directory_is_never_written_into(tmp_path, capsys):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "rounds.csv").write_text("my own data\n")
    before = snapshot(d)
    rc, err = cli(["train", *TINY, "--out", d], capsys)
    assert_clear(rc, err, "must name a new or empty directory", "rounds.csv")
    assert snapshot(d) == before


def test_second_train_into_a_run_is_refused(run_copy, capsys):
    before = snapshot(run_copy)
    assert_clear(*cli(["train", *TINY, "--set", "seed=7", "--out", run_copy], capsys), "already holds a run")
    assert snapshot(run_copy) == before


def test_held_claim_refuses_a_second_writer(run_copy, capsys):
    claim = rundir.Claim.acquire(run_copy)
    try:
        before = snapshot(run_copy)
        assert_clear(*cli(["train", "--resume", run_copy], capsys), "is in use by another crfl process", f"pid {os.getpid()}")
        assert_clear(*cli(["certify", run_copy, "--num-test", "5"], capsys), "is in use by another crfl process") \
            if _certify_claims() else None
        assert snapshot(run_copy) == before
    finally:
        claim.release()


def _certify_claims() -> bool:
    """Whether certify_run writes through rundir's staged writer (the lead's switch)."""
    import inspect

    from crfl import certify

    return "results_for" in inspect.getsource(certify.certify_run)


@pytest.mark.parametrize("flag", [["--set", "server.rounds=5"], ["--out", "elsewhere"], ["--preset", "demo"], ["--twin"]])
def test_resume_refuses_training_flags(flag, run_copy, capsys):
    before = snapshot(run_copy)
    assert_clear(*cli(["train", "--resume", run_copy, *flag], capsys), "The '--resume' parameter continues a run", flag[0])
    assert snapshot(run_copy) == before


def test_resume_of_nothing(tmp_path, capsys):
    assert_clear(*cli(["train", "--resume", tmp_path / "none"], capsys), "no such directory")
    assert_clear(*cli(["train", "--resume", tmp_path], capsys), "holds no config.yaml: nothing to resume")


def test_edited_config_is_refused_naming_both_hashes(run_copy, capsys):
    cfg = run_copy / "config.yaml"
    stored = torch.load(run_copy / "model_final.pt", weights_only=True)["config_hash"]
    cfg.write_text(cfg.read_text().replace("sigma: 0.01", "sigma: 0.08"))
    before = snapshot(run_copy)
    rc, err = cli(["certify", run_copy, "--num-test", "5"], capsys)
    assert_clear(rc, err, "model_final.pt was written by the configuration with hash", stored,
                 config_hash(yaml.safe_load(cfg.read_text())))
    assert snapshot(run_copy) == before
    assert_clear(*cli(["train", "--resume", run_copy], capsys), "checkpoint.pt was written by the configuration")
    assert snapshot(run_copy) == before


def test_edited_dtype_is_refused(run_copy, capsys):
    """run.dtype decides the trained model: a float32 run relabelled float64 is not certified."""
    cfg = run_copy / "config.yaml"
    assert "dtype: float32" in cfg.read_text()
    cfg.write_text(cfg.read_text().replace("dtype: float32", "dtype: float64"))
    before = snapshot(run_copy)
    assert_clear(*cli(["certify", run_copy, "--num-test", "5"], capsys),
                 f"{run_copy / 'model_final.pt'} was written by the configuration with hash")
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("edit", ["run.threads", "run.eval_every", "run.checkpoint_every", "run.device", "preset", "certify.M"])
def test_operational_edits_keep_the_hash(edit, run_copy, capsys):
    """Keys outside crfl.config.training_part (how a run is executed, observed or certified) may change."""
    cfg = run_copy / "config.yaml"
    d = yaml.safe_load(cfg.read_text())
    new = {"run.threads": 2, "run.eval_every": 3, "run.checkpoint_every": 2, "run.device": "cuda",
           "preset": "mnist", "certify.M": 7}[edit]
    section, _, key = edit.rpartition(".")
    (d[section] if section else d)[key] = new
    cfg.write_text(yaml.safe_dump(d, sort_keys=False))
    assert config_hash(d) == torch.load(run_copy / "model_final.pt", weights_only=True)["config_hash"]
    assert load_run(run_copy)[0] is not None


def _legacy_files(run: Path) -> None:
    """Rewrite a run's stored hashes as crfl 0.1.0 wrote them (no run section, preset kept)."""
    d = yaml.safe_load((run / "config.yaml").read_text())
    for name in ("model_final.pt", "checkpoint.pt"):
        obj = torch.load(run / name, weights_only=True)
        obj["config_hash"] = rundir.legacy_config_hash(d)
        obj.pop("state_digest", None)
        torch.save(obj, run / name)
    reseal(run, "model_final.pt")


def test_run_of_the_previous_version_certifies_with_a_note(run_copy, capsys):
    _legacy_files(run_copy)
    rc = main(["certify", str(run_copy), "--num-test", "5", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "crfl: note:" in err and "configuration hash of crfl 0.1.0" in err and "float32" in err, err
    assert (run_copy / "certificates_clean.csv").is_file()


def test_run_of_the_previous_version_with_an_edited_dtype_is_refused(run_copy, capsys):
    _legacy_files(run_copy)
    cfg = run_copy / "config.yaml"
    cfg.write_text(cfg.read_text().replace("dtype: float32", "dtype: float64"))
    before = snapshot(run_copy)
    assert_clear(*cli(["certify", run_copy, "--num-test", "5"], capsys), "model_final.pt was written by the configuration")
    assert snapshot(run_copy) == before
    assert_clear(*cli(["train", "--resume", run_copy], capsys), "checkpoint.pt was written by the configuration")


def test_model_from_another_run_is_refused(run_copy, tmp_path, capsys):
    other = tmp_path / "other"
    assert main(["train", *TINY, "--set", "seed=5", "--out", str(other), "--quiet"]) == 0
    shutil.copy(other / "model_final.pt", run_copy / "model_final.pt")
    before = snapshot(run_copy)
    assert_clear(*cli(["certify", run_copy], capsys), "model_final.pt was written by the configuration with hash")
    assert snapshot(run_copy) == before


def _garbage(p: Path) -> None:
    p.write_bytes(b"\x00garbage" * 10)


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])


def _foreign_torch(p: Path) -> None:
    torch.save([1, 2, 3], p)


def _no_hash(p: Path) -> None:
    d = torch.load(p, weights_only=True)
    d.pop("config_hash")
    torch.save(d, p)


def _nan_params(p: Path) -> None:
    d = torch.load(p, weights_only=True)
    d["params"][0] = float("nan")
    torch.save(d, p)


def _not_utf8(p: Path) -> None:
    p.write_bytes(b"\xff\xfe\x00bad")


def _bad_yaml(p: Path) -> None:
    p.write_text("server: [unclosed\n")


def _empty(p: Path) -> None:
    p.write_text("")


def _cfg_bad_value(p: Path) -> None:
    p.write_text(p.read_text().replace("seed: 1", "seed: -1"))


def _bad_json(p: Path) -> None:
    p.write_text("{not json")


def _attack_missing_key(p: Path) -> None:
    d = json.loads(p.read_text())
    del d["rounds"][0]["tau"]
    p.write_text(json.dumps(d))


def _attack_bad_type(p: Path) -> None:
    d = json.loads(p.read_text())
    d["rounds"][0]["p"] = "x"
    p.write_text(json.dumps(d))


def _attack_not_mapping(p: Path) -> None:
    p.write_text("[1, 2]")


def _summary_list(p: Path) -> None:
    p.write_text("[]")


def _summary_bad_training(p: Path) -> None:
    p.write_text(json.dumps({"training": {"rounds": 3}}))


def _delete(p: Path) -> None:
    p.unlink()


CORRUPT = [
    ("model_final.pt", _garbage, "model_final.pt is not a crfl file (corrupt or truncated"),
    ("model_final.pt", _truncate, "model_final.pt is not a crfl file (corrupt or truncated"),
    ("model_final.pt", _foreign_torch, "model_final.pt is not a crfl model_final.pt"),
    ("model_final.pt", _no_hash, "lacks ['params', 'config_hash']"),
    ("model_final.pt", _nan_params, "holds no finite parameter vector"),
    ("model_final.pt", _delete, "has no model_final.pt: train it to the end first"),
    ("config.yaml", _not_utf8, "config.yaml is not UTF-8 text"),
    ("config.yaml", _bad_yaml, "config.yaml is not valid YAML"),
    ("config.yaml", _empty, "config.yaml is not a crfl config.yaml"),
    ("config.yaml", _cfg_bad_value, "hashes to"),
    ("attack.json", _bad_json, "attack.json is not valid JSON"),
    ("attack.json", _not_utf8, "attack.json is not UTF-8 text"),
    ("attack.json", _attack_missing_key, "attack.json entry 0 lacks ['tau']"),
    ("attack.json", _attack_bad_type, "'p' must be a list of 1 numbers"),
    ("attack.json", _attack_not_mapping, "attack.json is not a crfl attack log"),
    ("attack.json", _delete, "has no attack.json"),
    ("summary.json", _bad_json, "summary.json is not valid JSON"),
    ("summary.json", _summary_list, "summary.json is not a crfl summary"),
    ("summary.json", _summary_bad_training, "summary.json block 'training' must hold"),
]


@pytest.mark.parametrize("name, corrupt, message", CORRUPT, ids=[f"{n}-{c.__name__}" for n, c, _ in CORRUPT])
def test_certify_refuses_corrupt_or_foreign_files(name, corrupt, message, run_copy, capsys):
    corrupt(run_copy / name)
    before = snapshot(run_copy)
    rc, err = cli(["certify", run_copy, "--num-test", "5"], capsys)
    assert_clear(rc, err, message)
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("corrupt, message", [(_garbage, "checkpoint.pt is not a crfl file"),
                                              (_foreign_torch, "checkpoint.pt is not a crfl checkpoint.pt"),
                                              (_no_hash, "checkpoint.pt is not a crfl checkpoint.pt")])
def test_resume_refuses_corrupt_checkpoint(corrupt, message, run_copy, capsys):
    corrupt(run_copy / "checkpoint.pt")
    before = snapshot(run_copy)
    assert_clear(*cli(["train", "--resume", run_copy], capsys), message, "delete it to restart")
    assert snapshot(run_copy) == before


def test_resume_sweeps_stale_temporaries_and_stage(run_copy, capsys):
    (run_copy / ".rounds.csv.abc123xy.tmp").write_text("half")
    (run_copy / rundir.STAGE).mkdir()
    (run_copy / rundir.STAGE / "summary.json").write_text("{}")  # uncommitted: dropped
    before = {k: v for k, v in snapshot(run_copy).items() if not k.startswith(".")}
    assert main(["train", "--resume", str(run_copy), "--quiet"]) == 0
    after = snapshot(run_copy)
    assert not [k for k in after if k.startswith(".")]
    assert {k: after[k] for k in ("model_final.pt", "rounds.csv", "attack.json")} == {
        k: before[k] for k in ("model_final.pt", "rounds.csv", "attack.json")}


def test_committed_stage_rolls_forward(run_copy):
    stage = run_copy / rundir.STAGE
    stage.mkdir()
    (stage / "rounds.csv").write_text((run_copy / "rounds.csv").read_text())
    (stage / "extra.txt").write_text("new")
    (stage / rundir.COMMIT).write_text("rounds.csv\nextra.txt\n")
    rundir.open_run(run_copy)
    assert (run_copy / "extra.txt").read_text() == "new" and not stage.exists()


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_files_follow_the_umask(umask, tmp_path, capsys):
    old = os.umask(umask)
    try:
        assert main(["train", *TINY, "--out", str(tmp_path / "r"), "--quiet"]) == 0
    finally:
        os.umask(old)
    for p in (tmp_path / "r").iterdir():
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p


def test_disk_full_is_one_message_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    rc, err = cli(["train", *TINY, "--out", tmp_path / "r"], capsys)
    assert_clear(rc, err, "No space left on the device", "disk full")
    assert not (tmp_path / "r").exists()


def test_disk_full_during_resume_keeps_the_run(run_copy, capsys, monkeypatch):
    (run_copy / "model_final.pt").unlink()
    ck = torch.load(run_copy / "checkpoint.pt", weights_only=True)
    assert ck["round"] == 3
    before = snapshot(run_copy)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    assert_clear(*cli(["train", "--resume", run_copy], capsys), "No space left on the device")
    assert snapshot(run_copy) == before


def test_divergence_names_round_and_setting(tmp_path, capsys):
    rc, err = cli(["train", *TINY, "--set", "clients.lr=1e38", "--set", "server.rho=1e30", "--out", tmp_path / "r"], capsys)
    assert_clear(rc, err, "Training diverged in round 1 of 3", "'clients.lr' = 1e+38")
    assert not (tmp_path / "r").exists()


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="server.sigma"):
        main(["train", "--debug", "--set", "server.sigma=-1", "--out", str(tmp_path / "r")])


def test_interrupted_certify_says_rerun_not_resume(run_copy, capsys, monkeypatch):
    import crfl.certify

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(crfl.certify, "certify_run", interrupt)
    assert main(["certify", str(run_copy)]) == 130
    err = capsys.readouterr().err
    assert "crfl certify" in err and "--resume" not in err


# ---------------------------------------------------------------------------------------------
# plots read only complete result files


def test_plot_refuses_truncated_certificates(cert_copy, capsys):
    f = cert_copy / "certificates_clean.csv"
    lines = f.read_text().splitlines(keepends=True)
    f.write_text("".join(lines[: len(lines) // 2]))
    assert_clear(*cli(["plot", cert_copy], capsys), "certificates_clean.csv holds", "the result set is incomplete")
    f.write_text("".join(lines)[:-7])
    assert_clear(*cli(["plot", cert_copy], capsys), "certificates_clean.csv")


@pytest.mark.parametrize("content, message", [("round,clean_acc\n1,0.5\n", "is not a crfl rounds.csv"),
                                               (None, "rounds.csv line 2 is corrupt")])
def test_plot_refuses_corrupt_rounds(content, message, run_copy, capsys):
    f = run_copy / "rounds.csv"
    f.write_text(content if content is not None else f.read_text().replace("\n1,", "\nfirst,", 1))
    assert_clear(*cli(["plot", run_copy], capsys), message)


def test_plot_of_nothing(tmp_path, capsys):
    assert_clear(*cli(["plot", tmp_path / "none"], capsys), "The 'DIR' parameter", "no such directory")
    assert_clear(*cli(["plot", tmp_path], capsys), "The 'DIR' parameter must be a run or sweep directory")
    (tmp_path / "sweep.json").write_text("{}")
    assert_clear(*cli(["plot", tmp_path], capsys), "sweep.json is not a crfl sweep file")


# ---------------------------------------------------------------------------------------------
# sweeps: specs validated like configs


SPEC = {"name": "tiny", "base": {"preset": "demo", "set": {"server.rounds": 3, "attack.rounds": [2], "data.num_clients": 4,
                                                          "certify.num_test": 20, "run.threads": 1}},
        "grid": {"attack.num_attackers": [1, 2]}, "radii": [0.0]}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"kind": "nope"}, "The 'kind' parameter of the sweep spec"),
        ({"colour": 1}, "Unknown key(s) ['colour'] in the sweep spec"),
        ({"grid": {"attack.num_attackers": 3}}, "The 'grid.attack.num_attackers' parameter of the sweep spec"),
        ({"grid": {"attack.num_attackers": []}}, "must be a non-empty list of values"),
        ({"grid": [1, 2]}, "The 'grid' parameter of the sweep spec"),
        ({"radii": [0.0, float("inf")]}, "The 'radii[1]' parameter of the sweep spec"),
        ({"radii": "big"}, "The 'radii' parameter of the sweep spec"),
        ({"base": {"preset": "demo", "sett": {}}}, "The 'base' parameter of the sweep spec"),
        ({"certify": {"grids": {}}}, "The 'certify' parameter of the sweep spec"),
        ({"base": {"preset": "demo", "set": {"server.sigma": -1}}}, "The 'server.sigma' parameter must be a float"),
        ({"numeric": {"p_a": "high"}}, "The 'numeric.p_a' parameter of the sweep spec"),
    ],
)
def test_bad_sweep_spec(change, message, tmp_path, capsys):
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({**SPEC, **change}))
    rc, err = cli(["sweep", f, "--out", tmp_path / "o"], capsys)
    assert_clear(rc, err, message)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("content, message", [(b"\xff\xfe", "is not UTF-8 text"), (b"grid: [", "is not valid YAML"),
                                               (b"- 1\n", "must hold a mapping of spec keys")])
def test_unreadable_sweep_spec(content, message, tmp_path, capsys):
    f = tmp_path / "s.yaml"
    f.write_bytes(content)
    assert_clear(*cli(["sweep", f, "--out", tmp_path / "o"], capsys), message, "s.yaml")


def test_sweep_flags_and_directories(tmp_path, capsys):
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(SPEC))
    assert_clear(*cli(["sweep", f, "--out", tmp_path / "o", "--jobs", "0"], capsys), "The '--jobs' parameter must be an integer in [1, inf]. Got 0")
    assert_clear(*cli(["sweep", tmp_path / "none.yaml", "--out", tmp_path / "o"], capsys), "The 'SPEC' parameter")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert_clear(*cli(["sweep", f, "--out", mine], capsys), "must name a new, empty or sweep directory", "notes.txt")
    assert snapshot(mine) == {"notes.txt": b"mine"}
    assert_clear(*cli(["sweep", f, "--out", mine / "notes.txt"], capsys), "(a file)")
    claim = rundir.Claim.acquire(mine)
    try:
        assert_clear(*cli(["sweep", f, "--out", mine], capsys), "in use by another crfl process")
    finally:
        claim.release()


# ---------------------------------------------------------------------------------------------
# data: empty or degenerate data rejected at load time


def _with(ds: Dataset, **kw) -> Dataset:
    import dataclasses

    return dataclasses.replace(ds, **kw)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: _with(d, x_test=d.x_test[:0], y_test=d.y_test[:0]), "has an empty test set"),
        (lambda d: _with(d, x_train=d.x_train[:0], y_train=d.y_train[:0]), "has an empty train set"),
        (lambda d: _with(d, y_train=np.zeros_like(d.y_train)), "has a single class in its training set"),
        (lambda d: _with(d, y_test=d.y_test + 10), "has test labels outside [0, 4)"),
        (lambda d: _with(d, x_train=np.where(np.arange(d.x_train.size).reshape(d.x_train.shape) == 0, np.nan,
                                             d.x_train.astype(np.float32)), input_scale=1.0), "NaN or infinite train features"),
        (lambda d: _with(d, num_classes=1), "has 1 class(es)"),
        (lambda d: _with(d, y_test=d.y_test[:-1]), "labels of shape"),
    ],
)
def test_degenerate_data_rejected_before_anything_is_written(change, message, tmp_path):
    from crfl.config import resolve
    from crfl.train import train

    cfg = resolve("demo", overrides={"server.rounds": 2, "attack.rounds": [1], "data.num_clients": 3})
    with pytest.raises(DataError, match="the dataset 'synthetic'") as e:
        train(cfg, tmp_path / "r", dataset=change(synthetic_images(n_train=120, n_test=40)))
    assert message in str(e.value)
    assert not (tmp_path / "r").exists()


def test_loan_numeric_column_with_one_non_number_is_named():
    import pandas as pd

    from crfl.data.loan import OPENINTRO_SCHEMA, preprocess_loans

    n = 20
    df = pd.DataFrame({
        OPENINTRO_SCHEMA.label: ["Current"] * n, OPENINTRO_SCHEMA.group: ["CA"] * n,
        "amount": [str(i) for i in range(n - 1)] + ["n/a!"],
        **{f: [0.0] * n for f in OPENINTRO_SCHEMA.trigger_features},
    })
    with pytest.raises(DataError, match=r"column 'amount' of loans.csv holds numbers except 1 value\(s\) such as 'n/a!'"):
        preprocess_loans(df, OPENINTRO_SCHEMA, source="loans.csv")


# ---------------------------------------------------------------------------------------------
# kills: SIGKILL at random moments, rerun, byte-identical, nothing stale, nothing left running


def _spawn(argv: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([*CRFL, *map(str, argv)], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)


def _run(argv: list[str], cwd: Path) -> tuple[int, str]:
    p = _spawn(argv, cwd)
    _, err = p.communicate(timeout=300)
    return p.returncode, err.decode()


def _kill_at(p: subprocess.Popen, delay: float) -> None:
    try:
        p.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def _result_bytes(d: Path) -> dict[str, object]:
    """Every result file's bytes; summary.json without its timings; figures and checkpoints left out."""
    out: dict[str, object] = {}
    for k, v in snapshot(d).items():
        if k.endswith((".png", ".pdf", "checkpoint.pt")) or k.endswith("results.csv"):
            continue
        if k.endswith("summary.json"):
            out[k] = _drop_timing(json.loads(v))
        elif k.endswith(rundir.RECORD):  # every digest but the JSON files' (which cover their timings)
            out[k] = json.loads(v)
            out[k]["files"] = {n: e for n, e in out[k]["files"].items() if not n.endswith(".json")}
        else:
            out[k] = v
    return out


def _drop_timing(o):
    if isinstance(o, dict):
        return {k: _drop_timing(v) for k, v in o.items() if k not in TIMING and not k.endswith("seconds")}
    if isinstance(o, list):
        return [_drop_timing(v) for v in o]
    return o


def _stale(d: Path) -> list[str]:
    return [str(p.relative_to(d)) for p in d.rglob("*") if p.name.startswith(".")]


KILL_TRAIN = ["--preset", "demo", "--set", "server.rounds=20", "--set", "data.num_clients=4", "--set", "attack.rounds=[5]",
              "--set", "run.threads=1", "--quiet"]


@pytest.mark.slow
def test_sigkill_train_then_resume_is_byte_identical(tmp_path):
    ref = tmp_path / "ref"
    assert _run(["train", *KILL_TRAIN, "--out", ref], tmp_path)[0] == 0
    want = _result_bytes(ref)
    rng = random.Random(10)
    for trial in range(TRIALS):
        d = tmp_path / f"k{trial}"
        _kill_at(_spawn(["train", *KILL_TRAIN, "--out", d], tmp_path), rng.uniform(0.5, 3.0))
        if (d / "config.yaml").is_file():
            rc, err = _run(["train", "--resume", d, "--quiet"], tmp_path)
        else:
            rc, err = _run(["train", *KILL_TRAIN, "--out", d], tmp_path)
        assert rc == 0, err
        assert _result_bytes(d) == want, trial
        assert _stale(d) == []


@pytest.mark.slow
def test_sigkill_certify_then_rerun_is_byte_identical(certified, tmp_path):
    trained_only = tmp_path / "base"
    shutil.copytree(certified, trained_only)
    for f in trained_only.iterdir():
        if f.name.startswith(("certificates_", "inverse_", "certified.")):
            f.unlink()
    ref = tmp_path / "ref"
    shutil.copytree(trained_only, ref)
    args = ["--num-test", "300", "--quiet"]
    assert _run(["certify", ref, *args], tmp_path)[0] == 0
    want = _result_bytes(ref)
    rng = random.Random(11)
    for trial in range(max(2, TRIALS - 1)):
        d = tmp_path / f"k{trial}"
        shutil.copytree(trained_only if trial % 2 == 0 else ref, d)
        _kill_at(_spawn(["certify", d, *args], tmp_path), rng.uniform(1.0, 4.0))
        rc, err = _run(["certify", d, *args], tmp_path)
        assert rc == 0, err
        assert _result_bytes(d) == want, trial
        assert _stale(d) == []


@pytest.mark.slow
@pytest.mark.skipif(not _certify_claims(), reason="needs certify_run to write through rundir.results_for (lead's switch)")
def test_sigkill_certify_leaves_the_old_or_the_new_result_set(certified, tmp_path):
    rng = random.Random(12)
    for trial in range(TRIALS):
        d = tmp_path / f"k{trial}"
        shutil.copytree(certified, d)
        _kill_at(_spawn(["certify", d, "--num-test", "300", "--quiet"], tmp_path), rng.uniform(1.0, 4.0))
        run = rundir.open_run(d)
        points = {run.read_summary()["results"][k]["points"] for k in rundir.CERT_KINDS}
        assert {len(run.read_certificates(k)) for k in rundir.CERT_KINDS} == points


def _alive(pgid: int) -> bool:
    """Whether a live (not zombie) process of the process group remains."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


@pytest.mark.slow
def test_sigkill_parallel_sweep_then_rerun(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({**SPEC, "grid": {"attack.num_attackers": [1, 2]}}))
    ref = tmp_path / "ref"
    rc, err = _run(["sweep", spec, "--out", ref, "--jobs", "2", "--quiet"], tmp_path)
    assert rc == 0, err
    want = _result_bytes(ref / "runs")
    rng = random.Random(13)
    for trial in range(max(1, TRIALS - 2)):
        d = tmp_path / f"k{trial}"
        p = _spawn(["sweep", spec, "--out", d, "--jobs", "2", "--quiet"], tmp_path)
        _kill_at(p, rng.uniform(3.0, 7.0))
        deadline = time.time() + 10
        while _alive(p.pid) and time.time() < deadline:
            time.sleep(0.1)
        assert not _alive(p.pid), "a sweep worker outlived its parent"
        rc, err = _run(["sweep", spec, "--out", d, "--jobs", "2", "--quiet"], tmp_path)
        assert rc == 0, err
        assert _result_bytes(d / "runs") == want
        assert _stale(d) == []


@pytest.mark.slow
def test_ctrl_c_stops_a_parallel_sweep_and_writes_results(tmp_path):
    spec = tmp_path / "s.yaml"
    # long enough runs that the Ctrl-C lands inside the sweep (200 rounds: without a checkpoint per round since issue 20,
    # 40 rounds of SPEC finish within the 1 s wait after runs/ appears,
    # and a Ctrl-C during the interpreter's exit kills it with no message)
    base = {**SPEC["base"], "set": {**SPEC["base"]["set"], "server.rounds": 200}}
    spec.write_text(yaml.safe_dump({**SPEC, "base": base, "grid": {"attack.num_attackers": [1, 2, 3, 4]}}))
    d = tmp_path / "o"
    p = _spawn(["sweep", spec, "--out", d, "--jobs", "2"], tmp_path)
    deadline = time.time() + 120
    while not (d / "runs").is_dir() and time.time() < deadline:  # the workers have started
        time.sleep(0.1)
    time.sleep(1.0)
    t0 = time.time()
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=30)
    assert time.time() - t0 < 15
    assert p.returncode in (130, -signal.SIGINT, 0), err  # 130 or "killed by SIGINT": what a shell reports as 130
    assert (d / "results.csv").is_file()
    if p.returncode != 0:
        assert "results.csv lists the runs that finished" in err.decode(), (p.returncode, err)
    assert p.returncode != 0  # it was interrupted, not finished
    deadline = time.time() + 10
    while _alive(p.pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(p.pid)


# ---------------------------------------------------------------------------------------------
# concurrency: two writers started together never mix a run directory


def test_claim_race_has_one_winner(tmp_path):
    """Many threads race to create the same run directory: exactly one claim each time."""
    for trial in range(20):
        d = tmp_path / f"r{trial}"
        won, lost = [], []
        barrier = threading.Barrier(4)

        def go(i):
            barrier.wait()
            try:
                run = rundir.create_run(d)
            except (rundir.RunDirError, ValueError) as e:
                lost.append(str(e))
                return
            run.write_config({"server": {"who": i}})
            won.append(i)
            time.sleep(0.01)
            run.release()

        ts = [threading.Thread(target=go, args=(i,)) for i in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert len(won) == 1 and len(lost) == 3, (won, lost)
        assert all("in use by another crfl process" in m or "already holds a run" in m for m in lost)
        assert yaml.safe_load((d / "config.yaml").read_text()) == {"server": {"who": won[0]}}


@pytest.mark.slow
def test_two_trains_into_one_out_never_mix(tmp_path):
    for trial in range(max(2, TRIALS)):
        d = tmp_path / f"r{trial}"
        ps = [_spawn(["train", *TINY, "--set", f"seed={s}", "--out", d, "--quiet"], tmp_path) for s in (1, 2)]
        results = [(p.wait(timeout=120), p.stderr.read().decode()) for p in ps]
        codes = sorted(rc for rc, _ in results)
        assert codes == [0, 2], results
        loser = next(err for rc, err in results if rc == 2)
        assert "in use by another crfl process" in loser or "already holds a run" in loser
        cfg, final, _ = load_run(d)  # the model belongs to config.yaml
        assert final["config_hash"] == config_hash(yaml.safe_load((d / "config.yaml").read_text()))
        assert _stale(d) == []


@pytest.mark.slow
def test_two_sweeps_on_one_directory_never_mix(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({**SPEC, "grid": {"attack.num_attackers": [1]}}))
    for trial in range(2):
        d = tmp_path / f"o{trial}"
        ps = [_spawn(["sweep", spec, "--out", d, "--quiet"], tmp_path) for _ in range(2)]
        results = [(p.wait(timeout=120), p.stderr.read().decode()) for p in ps]
        codes = sorted(rc for rc, _ in results)
        assert codes in ([0, 2], [0, 0]), results  # the second may start after the first finished
        for rc, err in results:
            if rc == 2:
                assert "is in use by another crfl process" in err
        rows = (d / "results.csv").read_text().splitlines()
        assert len(rows) == 2 and ",ok," in rows[1]
        assert _stale(d) == []


def test_sigma_t_too_small_for_the_arithmetic_is_refused_not_an_infinite_radius(run_copy, capsys):
    """Issue 18: --sigma-T 1e-200 made every smoothed probability saturate and every radius infinite, certified."""
    before = snapshot(run_copy)
    rc, err = cli(["certify", run_copy, "--sigma-T", "1e-200"], capsys)
    assert_clear(rc, err, "'certify.sigma_T'", "1e-200", "too small for the arithmetic")
    assert snapshot(run_copy) == before
    # small but resolvable sigma_T: finite radii, converging to the base model's limit
    radii = []
    for s in ("1e-9", "1e-12"):
        rc, err = cli(["certify", run_copy, "--sigma-T", s], capsys)
        assert rc == 0, err
        summary = json.loads((run_copy / "summary.json").read_text())
        r = summary["results"]["clean"]["max_radius"]
        assert isinstance(r, float) and math.isfinite(r), r
        radii.append(r)
    assert radii[0] == pytest.approx(radii[1], rel=1e-3)


def test_continuations_beyond_memory_are_refused_before_work(run_copy, capsys):
    """Issue 18: --training-samples 100000000 tried to allocate 3.1 TB and died with an internal error."""
    before = snapshot(run_copy)
    rc, err = cli(["certify", run_copy, "--training-samples", "100000000", "--num-test", "10"], capsys)
    assert_clear(rc, err, "'certify.training_samples'", "100000000", "GiB", "use at most about")
    assert snapshot(run_copy) == before


# ---------------------------------------------------------------------------------------------
# issue 18: flags a reading or method does not use, corrupt compressed data, the node host's files


UNUSED_FLAGS = [
    (["--M", "50"], "'--M' parameter is not used by the coupled reading with the exact method", "--M 50"),
    (["--alpha", "0.01"], "'--alpha' parameter is not used by the coupled reading with the exact method", "--alpha 0.01"),
    (["--bound", "hoeffding"], "'--bound' parameter is not used", "--bound hoeffding"),
    (["--coverage", "paper"], "'--coverage' parameter is not used", "--coverage paper"),
    (["--selection", "10"], "'--selection' parameter is not used", "--selection 10"),
    (["--reading", "coupled", "--training-samples", "5"], "'--training-samples' parameter is not used by the coupled reading",
     "--training-samples 5"),
    (["--lipschitz", "paper"], "'--lipschitz' parameter is not used by the coupled reading", "--lipschitz paper"),
    (["--reading", "paper", "--bound-form", "kl"], "'--bound-form' parameter is not used by the paper reading", "--bound-form kl"),
    (["--method", "margin", "--sigma-T", "0.1"], "'--sigma-T' parameter is not used by the coupled reading with the margin method",
     "--sigma-T 0.1"),
    (["--reading", "mixture", "--M", "50"], "'--M' parameter is not used by the mixture reading", "--M 50"),
]


@pytest.mark.parametrize("flags, message, value", UNUSED_FLAGS, ids=[" ".join(f) for f, _, _ in UNUSED_FLAGS])
def test_a_flag_the_reading_or_method_does_not_use_is_an_error(flags, message, value, cert_copy, capsys):
    before = snapshot(cert_copy)
    assert_clear(*cli(["certify", cert_copy, "--num-test", "5", *flags], capsys), message, value)
    assert snapshot(cert_copy) == before


def test_flags_the_reading_and_method_use_are_accepted(run_copy, capsys):
    for flags in (["--method", "monte-carlo", "--M", "40", "--alpha", "0.01", "--bound", "hoeffding", "--selection", "20"],
                  ["--reading", "paper", "--lipschitz", "paper"], ["--bound-form", "kl", "--sigma-T", "0.05"]):
        rc, err = cli(["certify", run_copy, "--num-test", "5", "--quiet", *flags], capsys)
        assert rc == 0, (flags, err)


def test_crfl_run_refuses_unused_flags_and_inapplicable_readings_before_training(tmp_path, capsys):
    assert_clear(*cli(["run", *TINY, "--M", "7", "--out", tmp_path / "r"], capsys), "'--M' parameter is not used", "--M 7")
    assert_clear(*cli(["run", *TINY, "--set", "model.name=mlp", "--reading", "mixture", "--out", tmp_path / "r"], capsys),
                 "cannot certify the non-linear model 'mlp'", "reading 'mixture'")
    assert_clear(*cli(["run", *TINY, "--set", "model.name=mlp", "--method", "exact", "--out", tmp_path / "r"], capsys),
                 "cannot certify the non-linear model 'mlp'", "method 'exact'")
    ens = ["--set", "ensemble.kind=partition", "--set", "ensemble.groups=2"]
    assert_clear(*cli(["run", *TINY, *ens, "--reading", "mixture", "--out", tmp_path / "r"], capsys),
                 "'--reading' parameter is not used by the client-level certificate", "--reading mixture")
    assert not (tmp_path / "r").exists()


def _compressed(ext: str, data: bytes) -> bytes:
    import bz2
    import gzip
    import io as _io
    import lzma
    import zipfile

    if ext == "zip":
        b = _io.BytesIO()
        with zipfile.ZipFile(b, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("loan.csv", data)
        return b.getvalue()
    return {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}[ext](data)


@pytest.mark.parametrize("ext", ["gz", "bz2", "xz", "zip"])
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_truncated_or_corrupt_compressed_loan_file_is_a_data_error_naming_it(ext, damage, tmp_path, capsys):
    """Issue 18: a truncated loan.csv.gz gave `internal error: EOFError`."""
    data = _compressed(ext, ("loan_status,addr_state,x\n" + "Current,CA,1\n" * 3000).encode())
    data = data[: len(data) // 2] if damage == "truncated" else b"\x00not compressed" * 20
    d = tmp_path / "data"
    d.mkdir()
    (d / f"loan.csv.{ext}").write_bytes(data)
    rc, err = cli(["train", "--preset", "demo", "--dataset", "loan", "--data-dir", d, "--out", tmp_path / "r"], capsys)
    assert_clear(rc, err, f"cannot read {d / f'loan.csv.{ext}'} as a CSV table")
    assert not (tmp_path / "r").exists()


def _nodes_main(argv, capsys) -> tuple[int, str]:
    pytest.importorskip("flwr")
    from crfl.flower.deploy import nodes

    with pytest.raises(SystemExit) as exc:
        nodes.main([str(a) for a in argv])
    return exc.value.code, capsys.readouterr().err


#: A throwaway ECDSA key in OpenSSH format protected by the passphrase "secret" (ssh-keygen -t ecdsa -N secret),
#: stored here so that no test starts ssh-keygen.
PASSPHRASE_KEY = """-----BEGIN OPENSSH PRIVATE KEY-----
b3BlbnNzaC1rZXktdjEAAAAACmFlczI1Ni1jdHIAAAAGYmNyeXB0AAAAGAAAABD1fqu3Nq
oZEFmOr5HDKzUtAAAAEAAAAAEAAABoAAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlz
dHAyNTYAAABBBJqZPxAlxC9w+IRYmiToLEu+96dR5B+KATV/t927jXvZEXSCfoLw5qGBcU
DzDQyimQi1pGycsI99JA3MfoqvetgAAACwTd/Tlto/Y+szGtxJ4mKgM57Hxqvuw3yVEPov
ef2RplLu/C05SnkZZsYEKuHCBQBSNZW1/bd5UAgQU8a3Exf/7/42XRIbuWXY4B1KacIcVo
Fr7e+keQCQCEVUdpqWpiX4l2t4e5QOxvIKOK9WGsmqsVCeGWwdWJwV5TJudmFvZpJHQ/Cg
+zwzd6Spo8DBKeDltV5yuFg10Ck5csZSx0HbhOPm5PeQbbkNSxVa/VF30lM=
-----END OPENSSH PRIVATE KEY-----
"""


def test_node_host_key_with_a_passphrase_is_one_line(tmp_path, capsys):
    key = tmp_path / "node0"
    key.write_text(PASSPHRASE_KEY)
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    code, err = _nodes_main(["--superlink", "127.0.0.1:1", "--root-certificates", ca, "--auth-supernode-private-key", key], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"'auth-supernode-private-key' file {str(key)!r} is protected by a passphrase" in err


@pytest.mark.parametrize("content", [None, b"", b"not a certificate\n"], ids=["missing", "empty", "garbage"])
def test_node_host_root_certificates_that_cannot_be_used_are_one_line(content, tmp_path, capsys):
    ca = tmp_path / "ca.crt"
    if content is not None:
        ca.write_bytes(content)
    code, err = _nodes_main(["--superlink", "127.0.0.1:1", "--root-certificates", ca, "--count", "1"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"'root-certificates' file {str(ca)!r}" in err


def test_worker_root_certificates_missing_is_one_line(tmp_path, capsys):
    pytest.importorskip("flwr")
    from crfl.flower.deploy import worker

    with pytest.raises(SystemExit) as exc:
        worker.main(["--runtime-api-address", "127.0.0.1:1", "--root-certificates", str(tmp_path / "none.crt")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert "'root-certificates' file" in err and "none.crt" in err


def test_a_dropped_node_reported_by_the_superlink_is_counted_once(tmp_path):
    """In a deployment the SuperLink answers for a node that is gone with its own node id (Flower's
    create_message_error_unavailable_res_message): counted as missing only, not also as a rejected reply."""
    pytest.importorskip("flwr")
    from flwr.common.constant import SUPERLINK_NODE_ID

    from tests.support import grid as grid_mod
    from tests.test_flower import small_config
    from tests.test_flower_server_owned import run as flower_run

    class SuperLinkGrid(grid_mod.LocalGrid):
        def _deliver(self, msg):
            reply = super()._deliver(msg)
            if msg.metadata.dst_node_id in self.unavailable:
                reply.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
            return reply

    ds = synthetic_images()
    cfg = small_config(**{"server.rounds": 2, "attack.rounds": [1]})
    saved = grid_mod.LocalGrid
    grid_mod.LocalGrid = SuperLinkGrid
    import tests.test_flower_server_owned as owned

    owned.LocalGrid = SuperLinkGrid
    try:
        _, strategy, res = flower_run(tmp_path, "run", cfg, ds, grid_kwargs={"unavailable": [3]})
    finally:
        grid_mod.LocalGrid = saved
        owned.LocalGrid = saved
    for rec in strategy.history.values():
        assert rec.missing == [3] and rec.rejected == [] and rec.accepted == [0, 1, 2]
    assert json.loads((res.out_dir / "summary.json").read_text())["training"]["replies_missing"] == 2


@pytest.mark.parametrize("sets, name, value", [
    (["clients.batch_size=1000000000000000"], "clients.batch_size", "1000000000000000"),
    (["model.name=mlp", "model.hidden=1000000000000"], "model.hidden", "1000000000000"),
])
def test_sizes_beyond_memory_are_refused_before_allocating(sets, name, value, tmp_path, capsys):
    argv = ["train", "--preset", "demo", *[x for s in sets for x in ("--set", s)], "--out", tmp_path / "r"]
    assert_clear(*cli(argv, capsys), f"The '{name}' parameter must fit in memory", "GiB", f"Got {value} instead")
    assert not (tmp_path / "r").exists()


def test_out_of_memory_anywhere_is_one_line(tmp_path, capsys, monkeypatch):
    import crfl.train

    def oom(*a, **k):
        raise MemoryError("Unable to allocate 3.1 TiB")

    monkeypatch.setattr(crfl.train, "train", oom)
    assert_clear(*cli(["train", *TINY, "--out", tmp_path / "r"], capsys), "Out of memory (Unable to allocate 3.1 TiB)",
                 "model.hidden")


def test_certify_says_before_work_when_a_reading_or_method_does_not_apply_to_the_model(tmp_path, capsys):
    out = tmp_path / "mlp"
    assert main(["train", *TINY, "--set", "model.name=mlp", "--set", "model.hidden=8", "--out", str(out), "--quiet"]) == 0
    before = snapshot(out)
    for flags, needle in ((["--reading", "mixture"], "reading 'mixture'"), (["--method", "exact"], "method 'exact'"),
                          (["--method", "margin"], "method 'margin'")):
        assert_clear(*cli(["certify", out, *flags], capsys), "cannot certify the non-linear model 'mlp'", needle)
    # Monte Carlo smoothing is the method that applies (auto resolves to it): --M is used, --lipschitz is not
    assert_clear(*cli(["certify", out, "--lipschitz", "paper"], capsys), "'--lipschitz' parameter is not used by the coupled reading")
    assert snapshot(out) == before
    rc, err = cli(["certify", out, "--M", "20", "--num-test", "4", "--quiet"], capsys)
    assert rc == 0, err


def test_crfl_run_resume_checks_certify_flags_before_training(run_copy, capsys):
    (run_copy / "model_final.pt").unlink()
    before = snapshot(run_copy)
    assert_clear(*cli(["run", "--resume", run_copy, "--M", "7"], capsys), "'--M' parameter is not used", "--M 7")
    assert snapshot(run_copy) == before


def test_flower_simulation_entry_point_bad_input_is_one_line(tmp_path, capsys):
    pytest.importorskip("flwr")
    from crfl.flower.simulation import _main_line

    assert_clear(_main_line(["--preset", "nope", "--out", str(tmp_path / "o")]), capsys.readouterr().err,
                 "The 'preset' parameter must be one of", "'nope'")
    assert not (tmp_path / "o").exists()
