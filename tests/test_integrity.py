"""The integrity record (issue 18): every file a certificate reads is bound to the model and to each other.

Each certificate input edited, swapped with another run's, truncated or deleted is refused with one
line naming the file (exit status 2), and nothing is written or changed. The checkpoint carries its
own state digest and its round must match its rows. No torch file is unpickled beyond tensors and
containers: a pickle payload in any ``.pt`` file crfl reads is refused, never run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from crfl import rundir
from crfl.certify import certify_run
from crfl.cli import main
from tests.support.integrity import reseal
from tests.test_faults import TINY, assert_clear, cli, snapshot

SRC = Path(__file__).resolve().parents[1] / "src" / "crfl"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A trained and certified run, and a second run of another seed (the 'foreign' files)."""
    base = tmp_path_factory.mktemp("integrity")
    ours, other = base / "ours", base / "other"
    assert main(["train", *TINY, "--out", str(ours), "--quiet"]) == 0
    assert main(["certify", str(ours), "--num-test", "20", "--quiet"]) == 0
    assert main(["train", *TINY, "--set", "seed=5", "--out", str(other), "--quiet"]) == 0
    return {"ours": ours, "other": other}


@pytest.fixture
def run(runs, tmp_path) -> Path:
    shutil.copytree(runs["ours"], tmp_path / "run")
    return tmp_path / "run"


def _record(d: Path) -> dict:
    return json.loads((d / rundir.RECORD).read_text())


def test_the_record_lists_every_result_file_with_its_digest(run):
    rec = _record(run)
    assert rec["format"] == rundir.RECORD_FORMAT
    assert rec["config_hash"] == rundir.config_hash(rundir.RunDir(run).read_config())
    files = rec["files"]
    want = {"model_final.pt", "rounds.csv", "attack.json", "summary.json", "certificates_clean.csv", "certificates_backdoor.csv"}
    assert want <= set(files)
    assert not {"config.yaml", "checkpoint.pt", rundir.RECORD} & set(files)
    for name, e in files.items():
        data = (run / name).read_bytes()
        assert e["sha256"] == rundir.sha256(data) and e["bytes"] == len(data), name
    assert {files[n]["role"] for n in ("model_final.pt", "rounds.csv", "attack.json")} == {"training"}
    assert files["certificates_clean.csv"]["role"] == "results"
    assert json.loads((run / "summary.json").read_text())["integrity"]["record"] == rundir.RECORD


# ---------------------------------------------------------------------------------------------
# each certificate input: edited, swapped with another run's, truncated, deleted


def _edit_gamma(p: Path) -> None:  # the catalogue's case: gamma 10 -> 1 gave a ~9x larger radius, certified
    d = json.loads(p.read_text())
    d["rounds"][0]["gamma"] = [v / 10 for v in d["rounds"][0]["gamma"]]
    p.write_text(json.dumps(d))


def _edit_fixed_weights(p: Path) -> None:  # the catalogue's case: aggregation_fixed_weights flipped
    lines = p.read_text().splitlines(keepends=True)
    head = lines[0].rstrip("\n").split(",")
    i = head.index("aggregation_fixed_weights")
    cells = lines[1].rstrip("\n").split(",")
    cells[i] = "0" if cells[i] == "1" else "1"
    lines[1] = ",".join(cells) + "\n"
    p.write_text("".join(lines))


def _edit_params(p: Path) -> None:
    d = torch.load(p, weights_only=True)
    d["params"] = d["params"] * 1.001
    torch.save(d, p)


def _edit_summary(p: Path) -> None:
    d = json.loads(p.read_text())
    d["results"]["clean"]["max_radius"] = 99.0
    p.write_text(json.dumps(d))


def _edit_certificate(p: Path) -> None:
    p.write_text(p.read_text().replace(",1\n", ",0\n", 1))


def _truncate_lines(p: Path) -> None:  # whole lines dropped: still a parseable file
    lines = p.read_text().splitlines(keepends=True)
    p.write_text("".join(lines[: max(2, len(lines) - 1)]))


EDITS = [("attack.json", _edit_gamma), ("rounds.csv", _edit_fixed_weights), ("model_final.pt", _edit_params),
         ("summary.json", _edit_summary), ("rounds.csv", _truncate_lines)]


@pytest.mark.parametrize("name, edit", EDITS, ids=[f"{n}-{e.__name__}" for n, e in EDITS])
def test_an_edited_certificate_input_is_refused_naming_it(name, edit, run, capsys):
    edit(run / name)
    before = snapshot(run)
    assert_clear(*cli(["certify", run, "--num-test", "5"], capsys), f"{run / name} does not match the run's integrity record")
    assert snapshot(run) == before


@pytest.mark.parametrize("name", ["attack.json", "rounds.csv", "summary.json"])
def test_a_file_of_another_run_is_refused(name, run, runs, capsys):
    shutil.copy(runs["other"] / name, run / name)
    before = snapshot(run)
    assert_clear(*cli(["certify", run, "--num-test", "5"], capsys), f"{run / name} does not match the run's integrity record")
    assert snapshot(run) == before


def test_another_runs_files_with_its_record_are_refused_by_the_config_hash(run, runs, capsys):
    """Swapping the record along with the files: the model (bound to config.yaml by its hash) stays ours."""
    for name in ("attack.json", "rounds.csv", rundir.RECORD):
        shutil.copy(runs["other"] / name, run / name)
    before = snapshot(run)
    rc, err = cli(["certify", run, "--num-test", "5"], capsys)
    assert_clear(rc, err)
    assert re.search(r"(model_final\.pt|summary\.json) does not match|not in the run's integrity record", err), err
    assert snapshot(run) == before


@pytest.mark.parametrize("name", ["rounds.csv", "summary.json", "attack.json"])
def test_a_deleted_certificate_input_is_refused(name, run, capsys):
    (run / name).unlink()
    before = snapshot(run)
    assert_clear(*cli(["certify", run, "--num-test", "5"], capsys), name)
    assert snapshot(run) == before


def test_a_deleted_or_damaged_record_is_refused(run, capsys):
    rec = (run / rundir.RECORD).read_bytes()
    (run / rundir.RECORD).unlink()
    before = snapshot(run)
    assert_clear(*cli(["certify", run, "--num-test", "5"], capsys), "has no integrity.json", "was deleted")
    assert_clear(*cli(["plot", run], capsys), "has no integrity.json")
    assert snapshot(run) == before
    (run / rundir.RECORD).write_bytes(rec[: len(rec) // 2])
    assert_clear(*cli(["certify", run, "--num-test", "5"], capsys), "integrity.json is not valid JSON")
    (run / rundir.RECORD).write_text(json.dumps({"format": "other", "files": {}}))
    assert_clear(*cli(["certify", run, "--num-test", "5"], capsys), "integrity.json is not a crfl integrity record")


def test_a_directory_written_before_the_record_is_read_with_a_note(run, capsys):
    (run / rundir.RECORD).unlink()
    s = json.loads((run / "summary.json").read_text())
    del s["integrity"]
    (run / "summary.json").write_text(json.dumps(s))
    rc = main(["certify", str(run), "--num-test", "5", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert err.count("has no integrity record") == 1, err
    assert _record(run)["files"].keys() >= {"certificates_clean.csv", "summary.json"}  # certification wrote one


def test_certification_results_are_checked_by_plot_and_readers(run, capsys):
    _edit_certificate(run / "certificates_clean.csv")
    before = snapshot(run)
    assert_clear(*cli(["plot", run], capsys), "certificates_clean.csv does not match the run's integrity record")
    assert snapshot(run) == before
    # a result file that the record does not list (copied in) is refused too
    shutil.copy(run / "certificates_backdoor.csv", run / "certificates_extra.csv")
    with pytest.raises(rundir.RunDirError, match="certificates_extra.csv is not in the run's integrity record"):
        rundir.RunDir(run).read_certificates("extra")
    # a fresh certification rewrites the results and their digests; the training entries stay
    (run / "certificates_extra.csv").unlink()
    train_entries = {k: v for k, v in _record(run)["files"].items() if v["role"] == "training"}
    assert main(["certify", str(run), "--num-test", "5", "--quiet"]) == 0
    assert {k: v for k, v in _record(run)["files"].items() if v["role"] == "training"} == train_entries
    rundir.RunDir(run).verify_files()


def test_results_written_elsewhere_are_bound_to_the_model_they_certify(run, tmp_path):
    """A sweep's cert-* folder: the record holds the digest of the run's model; a retrained model is noticed."""
    cdir = run / "cert-x"
    certify_run(run, overrides={"certify.num_test": 5}, out_dir=cdir)
    rec = _record(cdir)
    assert rec["source"] == {"dir": "..", "model_sha256": rundir.sha256((run / "model_final.pt").read_bytes())}
    assert len(rundir.RunDir(cdir).read_certificates("clean")) == 5
    _edit_params(run / "model_final.pt")
    reseal(run, "model_final.pt")  # even with the run's own record rewritten
    with pytest.raises(rundir.RunDirError, match="computed from another model"):
        rundir.RunDir(cdir).read_certificates("clean")


def test_a_committed_stage_rolls_forward_with_its_record(run):
    """A kill between the COMMIT list and the renames: the next reader finishes the switch, record included."""
    stage = run / rundir.STAGE
    stage.mkdir()
    rs = rundir.ResultSet.__new__(rundir.ResultSet)
    rs.directory, rs.base, rs.stage, rs.names, rs._summary = run, None, stage, [], None
    rs.write_text("rounds.csv", (run / "rounds.csv").read_text())
    rs.write_json(rundir.RECORD, rs._record())
    (stage / rundir.COMMIT).write_text("rounds.csv\n" + rundir.RECORD + "\n")
    rundir.open_run(run).verify_files()
    assert not stage.exists()


# ---------------------------------------------------------------------------------------------
# the checkpoint's own binding


def _ck(run: Path) -> dict:
    return torch.load(run / "checkpoint.pt", weights_only=True)


def test_a_checkpoint_whose_round_was_edited_is_refused(run, capsys):
    """The catalogue's case: round 3 of 6 set to 99, and --resume 'finished' and certified."""
    (run / "model_final.pt").unlink()
    ck = _ck(run)
    assert ck["round"] == 3 and ck["state_digest"] == rundir.state_digest(ck)
    ck["round"] = 99
    torch.save(ck, run / "checkpoint.pt")
    before = snapshot(run)
    assert_clear(*cli(["train", "--resume", run], capsys), "checkpoint.pt does not match its own state digest")
    assert snapshot(run) == before
    # with the digest recomputed too (a consistent rewrite of the file), the rows still give it away
    ck["state_digest"] = rundir.state_digest(ck)
    torch.save(ck, run / "checkpoint.pt")
    assert_clear(*cli(["train", "--resume", run], capsys), "checkpoint.pt says round 99 but holds the rows of rounds [1, 2, 3]")
    ck["round"], ck["records"] = 2, ck["records"][:2]
    ck["state_digest"] = rundir.state_digest(ck)
    torch.save(ck, run / "checkpoint.pt")
    rc = main(["train", "--resume", str(run), "--quiet"])  # consistent: it resumes from round 2
    assert rc == 0, capsys.readouterr().err


def test_a_checkpoint_with_edited_parameters_is_refused(run, capsys):
    ck = _ck(run)
    ck["params"] = ck["params"] + 0.01
    torch.save(ck, run / "checkpoint.pt")
    before = snapshot(run)
    assert_clear(*cli(["train", "--resume", run], capsys), "checkpoint.pt does not match its own state digest")
    assert snapshot(run) == before


def test_state_digest_sees_every_part_of_the_state():
    base = {"round": 2, "params": torch.arange(4.0), "records": [{"round": 1}, {"round": 2}], "seconds": 1.5,
            "config_hash": "abc", "flag": None}
    d = rundir.state_digest(base)
    assert rundir.state_digest({**base, "state_digest": "x"}) == d  # the digest itself is not part of it
    for change in ({"round": 3}, {"params": torch.arange(4.0).double()}, {"params": torch.arange(4.0).reshape(2, 2)},
                   {"records": [{"round": 1}]}, {"seconds": 1.5000001}, {"config_hash": "abd"}, {"flag": False}):
        assert rundir.state_digest({**base, **change}) != d, change


# ---------------------------------------------------------------------------------------------
# no pickle from disk


class _Boom:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("name", [rundir.MODEL, rundir.CHECKPOINT, rundir.LEGACY_FLOWER_CHECKPOINT])
def test_a_pickle_payload_in_any_torch_file_is_refused_never_run(name, run, tmp_path, capsys):
    marker = tmp_path / "pwned"
    src = run / (rundir.CHECKPOINT if name == rundir.LEGACY_FLOWER_CHECKPOINT else name)
    obj = torch.load(src, weights_only=True)
    obj.update(flower_rounds=[], state_tag={}, payload=_Boom(marker))
    if name == rundir.LEGACY_FLOWER_CHECKPOINT:
        (run / rundir.CHECKPOINT).unlink()
    torch.save(obj, run / name)
    argv = ["certify", run, "--num-test", "5"] if name == rundir.MODEL else ["train", "--resume", run]
    assert_clear(*cli(argv, capsys), f"{name} is not a crfl file")
    with pytest.raises(rundir.RunDirError, match="is not a crfl file"):
        rundir.load_torch(run / name, (run / name).read_bytes(), "x")
    assert not marker.exists()


def test_no_torch_load_pickle_or_allow_pickle_outside_the_validated_reader():
    """Every torch file crfl reads goes through crfl.rundir.load_torch (weights_only=True, from checked bytes)."""
    pattern = re.compile(r"torch\.load\(|\bpickle\.loads?\(|import pickle|allow_pickle\s*=\s*True|weights_only\s*=\s*False|"
                         r"np\.load\(|numpy\.load\(")
    found = []
    for p in SRC.rglob("*.py"):
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if pattern.search(line) and not line.lstrip().startswith("#"):
                found.append(f"{p.relative_to(SRC)}:{i}: {line.strip()}")
    assert found == ["rundir.py:%d: return torch.load(_io.BytesIO(data), weights_only=True)" % _line_of_load()], found


def _line_of_load() -> int:
    lines = (SRC / "rundir.py").read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if "torch.load(_io.BytesIO(data), weights_only=True)" in line)


# ---------------------------------------------------------------------------------------------
# found by the catalogue: directories where files belong, results the record lists but plot skipped


def test_a_directory_in_place_of_a_checkpoint_or_a_result_file_is_one_line(run, capsys):
    (run / "certificates_clean.csv").unlink()
    (run / "certificates_clean.csv").mkdir()
    before = snapshot(run)
    assert_clear(*cli(["certify", run, "--num-test", "5"], capsys), "certificates_clean.csv is a directory, not a file")
    assert snapshot(run) == before and not (run / rundir.STAGE).exists()
    (run / "model_final.pt").unlink()
    (run / "checkpoint.pt").unlink()
    (run / "checkpoint.pt").mkdir()
    before = snapshot(run)
    assert_clear(*cli(["train", "--resume", run], capsys), "checkpoint.pt is a directory, not a file")
    assert snapshot(run) == before


def test_plot_refuses_a_listed_result_that_is_missing(run, capsys):
    (run / "certificates_backdoor.csv").unlink()
    before = snapshot(run)
    assert_clear(*cli(["plot", run], capsys), "certificates_backdoor.csv is missing", "integrity record", "lists it")
    assert snapshot(run) == before


def test_a_sweep_reusing_an_edited_run_fails_that_run_naming_the_file(tmp_path, capsys):
    """A sweep rerun reuses finished runs and certifications (DONE): it checks them against their records first."""
    import yaml

    from tests.test_faults import SPEC

    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({**SPEC, "grid": {"attack.num_attackers": [1]}}))
    out = tmp_path / "S"
    assert main(["sweep", str(spec), "--out", str(out), "--quiet"]) == 0
    (run,) = (out / "runs").iterdir()
    (cdir,) = run.glob("cert-*")
    _edit_certificate(cdir / "certificates_clean.csv")
    assert_clear(*cli(["plot", out], capsys), "certificates_clean.csv does not match")
    _edit_gamma(run / "attack.json")
    capsys.readouterr()
    assert main(["sweep", str(spec), "--out", str(out), "--quiet"]) == 1
    assert "attack.json does not match the run's integrity record" in (run / "error.txt").read_text()


def test_a_flower_runs_files_are_recorded_and_checked(tmp_path):
    """flower.json joins the training set's record; the Flower server's resume checks its checkpoint's binding."""
    pytest.importorskip("flwr")
    from tests.conftest import synthetic_images
    from tests.test_driver import flower_train, small_config

    ds, cfg = synthetic_images(), small_config()
    out = tmp_path / "fl"
    flower_train(cfg, ds, out)
    assert _record(out)["files"]["flower.json"]["role"] == "training"
    d = json.loads((out / "flower.json").read_text())
    d["rounds"][0]["missing"] = [1]
    (out / "flower.json").write_text(json.dumps(d))
    with pytest.raises(rundir.RunDirError, match="flower.json does not match the run's integrity record"):
        certify_run(out, dataset=ds, overrides={"certify.num_test": 5})
    part = tmp_path / "part"
    flower_train(cfg, ds, part, stop_after=2)
    ck = _ck(part)
    ck["round"] = 4
    torch.save(ck, part / "checkpoint.pt")
    with pytest.raises(rundir.RunDirError, match="checkpoint.pt does not match its own state digest"):
        flower_train(cfg, ds, part, resume=True)
