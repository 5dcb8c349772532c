"""One driver for the simulator and the Flower server (crfl.driver): same run directory, same resume.

The simulator (``crfl.train``) and the Flower server (``crfl.flower.server_app``, driven
in-process through a LocalGrid) are two ``Round``s of one loop: on the same seed they write
the same files; a SIGKILLed run of either resumes to the bytes of an uninterrupted one; a
checkpoint of the Flower server written before the driver still resumes; no engine resumes
another's run; the core never imports the Flower package.
"""

from __future__ import annotations

import ast
import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from crfl import rundir
from crfl.certify import certify_run
from crfl.driver import RunState
from crfl.setup import prepare
from crfl.train import train
from crfl.validation import ConfigError
from tests.conftest import synthetic_images

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "crfl"
CERT_KEYS = ("round", "attackers", "p", "configured_p", "tau", "gamma", "eta", "poison_ratio",
             "nominal_poison_ratio", "delta_norm", "start_norm", "start_centred_opnorm", "p_total")
TIMING = ("seconds", "seconds_per_round", "certify_seconds")


def _flower():
    pytest.importorskip("flwr")
    from crfl.flower.client_app import make_client_app
    from crfl.flower.server_app import run_federation
    from tests.support.grid import LocalGrid, server_identity

    return make_client_app, run_federation, LocalGrid, server_identity


def small_config(**over):
    from crfl.config import resolve

    base = {
        "data.name": "synthetic", "data.num_clients": 4, "server.rounds": 4, "attack.rounds": [2],
        "attack.pixels": [[6, 6], [7, 7]], "attack.target": 0, "clients.batch_size": 20, "clients.lr": 0.1,
        "server.rho": {"kind": "linear", "a": 0.1, "b": 1.0}, "server.sigma": 0.01,
        # a server-owned input bound, so that both engines certify with the same B_0
        "certify.input_norm_bound": 8.0,
    }
    base.update(over)
    return resolve(None, None, base)


def flower_train(cfg, ds, out, **kw):
    make_client_app, run_federation, LocalGrid, server_identity = _flower()
    setup = prepare(cfg, ds)
    with server_identity():
        return run_federation(LocalGrid(make_client_app(ds), setup.data.num_clients), setup, out, dataset=ds, **kw)


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _close(a: str, b: str, rel: float) -> bool:
    if a == b:
        return True
    try:
        fa = [float(x) for x in a.split(";")]
        fb = [float(x) for x in b.split(";")]
    except ValueError:
        return False
    return len(fa) == len(fb) and all(abs(x - y) <= rel * max(1.0, abs(x), abs(y)) for x, y in zip(fa, fb))


def test_simulator_and_flower_write_the_same_run_directory(tmp_path):
    ds = synthetic_images()
    cfg = small_config()
    sim = train(cfg, tmp_path / "sim", dataset=ds)
    fl = flower_train(cfg, ds, tmp_path / "flower")
    a, b = tmp_path / "sim", tmp_path / "flower"
    # the model to 1e-6
    ma, mb = torch.load(a / "model_final.pt", weights_only=True), torch.load(b / "model_final.pt", weights_only=True)
    torch.testing.assert_close(ma["params"], mb["params"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ma["attack_state"]["pre_noise"], mb["attack_state"]["pre_noise"], rtol=1e-6, atol=1e-6)
    assert ma["config_hash"] == mb["config_hash"] and (ma["engine"], mb["engine"]) == ("simulator", "flower")
    # the same rows (column for column; accuracies equal, floats to 1e-5)
    ra, rb = read_rows(a / "rounds.csv"), read_rows(b / "rounds.csv")
    assert list(ra[0]) == list(rb[0]) == rundir.ROUND_COLUMNS and len(ra) == len(rb) == 4
    for x, y in zip(ra, rb):
        for k in rundir.ROUND_COLUMNS:
            assert _close(x[k], y[k], 1e-5), (x["round"], k, x[k], y[k])
    # the same attack records (every key the certificate reads)
    ja, jb = (json.loads((d / "attack.json").read_text()) for d in (a, b))
    assert ja["trigger_norm"] == jb["trigger_norm"] and len(ja["rounds"]) == len(jb["rounds"]) == 1
    for k in CERT_KEYS:
        va, vb = ja["rounds"][0][k], jb["rounds"][0][k]
        assert va == pytest.approx(vb, rel=1e-6), k
    # the same certificate
    sa, sb = certify_run(a, dataset=ds), certify_run(b, dataset=ds)
    assert sa["certificate"]["reading"] == sb["certificate"]["reading"] == "coupled"
    assert sa["certificate"]["radius_certified"] == sb["certificate"]["radius_certified"]
    assert sa["assumptions"]["checks"].keys() == sb["assumptions"]["checks"].keys()
    for k in sa["assumptions"]["checks"]:
        assert sa["assumptions"]["checks"][k]["holds"] == sb["assumptions"]["checks"][k]["holds"], k
    for kind in rundir.CERT_KINDS:
        ca, cb = read_rows(a / f"certificates_{kind}.csv"), read_rows(b / f"certificates_{kind}.csv")
        assert len(ca) == len(cb) == len(ds.y_test)
        assert [r["prediction"] for r in ca] == [r["prediction"] for r in cb]
        for x, y in zip(ca, cb):
            assert float(x["radius"]) == pytest.approx(float(y["radius"]), rel=1e-4, abs=1e-9)
    assert sim.finished and fl.finished and sim.state.engine == "simulator" and fl.state.engine == "flower"


# ---------------------------------------------------------------------------------------------
# resume after SIGKILL: the Flower server (the simulator's is tests/test_faults.py)


FLOWER_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from crfl.flower.client_app import make_client_app
from crfl.flower.server_app import run_federation
from tests.support.grid import LocalGrid, server_identity
from crfl.setup import prepare
from tests.conftest import synthetic_images
from tests.test_driver import small_config
out, resume = sys.argv[1], sys.argv[2] == "1"
ds = synthetic_images()
setup = prepare(small_config(**{{"server.rounds": 40, "attack.rounds": [3, 17], "run.threads": 1}}), ds)
with server_identity():
    run_federation(LocalGrid(make_client_app(ds), 4), setup, out, dataset=ds, resume=resume)
"""


def _drop_timing(o):
    if isinstance(o, dict):
        return {k: _drop_timing(v) for k, v in o.items() if k not in TIMING}
    if isinstance(o, list):
        return [_drop_timing(v) for v in o]
    return o


def _result_files(d: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    for p in sorted(d.iterdir()):
        if p.name.startswith(".") or p.name == "checkpoint.pt":
            continue
        out[p.name] = _drop_timing(json.loads(p.read_text())) if p.suffix == ".json" else p.read_bytes()
        if p.name == rundir.RECORD:  # the digests of the JSON files cover their timings: compared above without them
            out[p.name]["files"] = {k: v for k, v in out[p.name]["files"].items() if not k.endswith(".json")}
    return out


@pytest.mark.slow
def test_flower_sigkill_then_resume_is_byte_identical(tmp_path):
    _flower()
    script = tmp_path / "fl.py"
    script.write_text(FLOWER_SCRIPT.format(root=str(ROOT)))
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def go(out: Path, resume: bool) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(script), str(out), "1" if resume else "0"], cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    ref = tmp_path / "ref"
    p = go(ref, False)
    assert p.wait(timeout=240) == 0, p.stderr.read()
    want = _result_files(ref)
    assert {"config.yaml", "rounds.csv", "attack.json", "model_final.pt", "summary.json", "flower.json"} <= set(want)
    rng = random.Random(3)
    interrupted = 0
    for trial in range(3):
        d = tmp_path / f"k{trial}"
        p = go(d, False)
        deadline = time.monotonic() + 120
        while not (d / "checkpoint.pt").exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        p.send_signal(signal.SIGKILL)
        p.wait()
        interrupted += not (d / "model_final.pt").exists()
        q = go(d, (d / "config.yaml").is_file())
        assert q.wait(timeout=240) == 0, q.stderr.read()
        assert _result_files(d) == want, trial
        assert [n for n in os.listdir(d) if n.startswith(".") and n != rundir.LOCK] == []
    assert interrupted >= 2  # the kills landed inside the runs


def _legacy(ck_path: Path) -> None:
    """Turn a driver checkpoint of a Flower run into the format the Flower server wrote before the driver."""
    ck = torch.load(ck_path, weights_only=True)
    old = {k: ck[k] for k in ("round", "params", "records", "attack_log", "attack_state", "config_hash", "seconds")}
    old["flower_rounds"], old["state_tag"] = ck["engine_log"], ck["identity"]
    torch.save(old, ck_path.parent / rundir.LEGACY_FLOWER_CHECKPOINT)
    ck_path.unlink()


def test_old_flower_checkpoint_resumes_and_pickles_are_refused(tmp_path):
    ds = synthetic_images()
    cfg = small_config()
    ref = flower_train(cfg, ds, tmp_path / "ref")
    out = tmp_path / "old"
    first = flower_train(cfg, ds, out, stop_after=2)
    assert not first.finished
    _legacy(out / rundir.CHECKPOINT)
    assert rundir.RunDir(out).engine() == rundir.FLOWER
    again = flower_train(cfg, ds, out, resume=True)
    assert torch.equal(again.final_params, ref.final_params)
    assert not (out / rundir.LEGACY_FLOWER_CHECKPOINT).exists() and (out / rundir.CHECKPOINT).exists()
    assert _result_files(out) == _result_files(tmp_path / "ref")

    # a checkpoint carrying a pickle payload is refused, its code never run
    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    for name in (rundir.CHECKPOINT, rundir.LEGACY_FLOWER_CHECKPOINT):
        d = tmp_path / f"evil-{name}"
        flower_train(cfg, ds, d, stop_after=1)
        (d / rundir.CHECKPOINT).unlink()
        torch.save({"round": 1, "params": torch.zeros(3), "records": [], "attack_log": [], "config_hash": "x",
                    "flower_rounds": [], "state_tag": {}, "payload": Boom()}, d / name)
        with pytest.raises(rundir.RunDirError, match=f"{name} is not a crfl file"):
            flower_train(cfg, ds, d, resume=True)
        assert not (tmp_path / "pwned").exists()


def test_no_engine_resumes_another_engines_run(tmp_path):
    ds = synthetic_images()
    cfg = small_config()
    train(cfg, tmp_path / "sim", dataset=ds, stop_after=2)
    flower_train(cfg, ds, tmp_path / "fl", stop_after=2)
    with pytest.raises(ConfigError, match="holds a run of the flower engine.*resume it over Flower"):
        train(None, tmp_path / "fl", resume=True, dataset=ds)
    with pytest.raises(ConfigError, match="holds a run of the simulator engine.*crfl train --resume"):
        flower_train(cfg, ds, tmp_path / "sim", resume=True)
    # a config.yaml without the marker (written before it) is the simulator's unless a Flower block says otherwise
    saved = yaml.safe_load((tmp_path / "sim" / "config.yaml").read_text())
    assert saved["provenance"]["engine"] == "simulator"
    del saved["provenance"]["engine"]
    assert rundir.RunDir(tmp_path / "sim").engine(saved) == rundir.SIMULATOR
    saved["provenance"]["flower"] = {}
    assert rundir.RunDir(tmp_path / "sim").engine(saved) == rundir.FLOWER
    saved["provenance"]["engine"] = "ray"
    with pytest.raises(rundir.RunDirError, match="names the engine 'ray'"):
        rundir.RunDir(tmp_path / "sim").engine(saved)


def test_run_state_round_trips_through_a_checkpoint(tmp_path):
    ds = synthetic_images()
    res = train(small_config(**{"certify.twin": True}), tmp_path / "r", dataset=ds, stop_after=3)
    ck = rundir.RunDir(tmp_path / "r").read_checkpoint()
    back = RunState.from_checkpoint(ck, "checkpoint.pt")
    assert back.round == 3 and back.engine == "simulator" and torch.equal(back.params, res.final_params)
    assert back.rows == res.state.rows and back.attacks == res.state.attacks
    assert torch.equal(back.twin_params, res.twin_final) and back.attack_state["round"] == 2
    assert set(back.attack_state) == {"round", "pre_noise", "twin_pre_noise"}


# ---------------------------------------------------------------------------------------------
# the layout: the core never imports the Flower package; the engines hold no loop


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_no_core_module_imports_the_flower_package():
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if (SRC / "flower") in path.parents:
            continue
        bad = sorted(n for n in _imports(path) if n == "crfl.flower" or n.startswith("crfl.flower.") or n.startswith("flwr"))
        if bad:
            offenders.append(f"{path.relative_to(SRC)}: {bad}")
    assert offenders == []


def test_the_engines_hold_no_loop_of_their_own():
    """Evaluation, checkpoints and the result set are the driver's: neither engine's module touches them."""
    for rel in ("train.py", "flower/server_app.py"):
        calls = {n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", None)
                 for n in ast.walk(ast.parse((SRC / rel).read_text())) if isinstance(n, ast.Call)}
        assert not calls & {"evaluate", "write_checkpoint", "results", "write_final", "torch_save"}, rel
        loops = [n for n in ast.walk(ast.parse((SRC / rel).read_text())) if isinstance(n, ast.For)
                 and isinstance(n.iter, ast.Call) and getattr(n.iter.func, "id", None) == "range"
                 and "rounds" in ast.unparse(n.iter)]
        assert loops == [], rel
