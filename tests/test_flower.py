"""CRFL over Flower: the same global models as the simulator, bad replies dropped, real engines.

Fast tests drive the real ServerApp / strategy / ClientApp objects through an in-process
Grid (tests.support.grid.LocalGrid). Two tests marked ``slow`` start Flower's engines:
the Ray simulation (in a child process, ~15 s) and a deployment on loopback over TLS with
SuperNode authentication (one SuperLink, two registered SuperNodes and one unregistered,
``flwr run``; ~45 s). Every process they start is stopped by PID.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict  # noqa: E402

import crfl.flower  # noqa: E402,F401
from crfl.aggregation import aggregate  # noqa: E402
from crfl.config import resolve  # noqa: E402
from crfl.flower.client_app import client_round, make_client_app  # noqa: E402
from crfl.flower.records import record_to_params  # noqa: E402
from crfl.flower.run_config import toml_table  # noqa: E402
from crfl.flower.server_app import (  # noqa: E402
    FederationFailed,
    build_strategy,
    config_from_run_config,
    default_inner_strategy,
    run_federation,
)
from crfl.flower.strategy import CRFL, PackageAggregation, Sampling  # noqa: E402
from crfl.rng import torch_generator  # noqa: E402
from crfl.server import server_step  # noqa: E402
from crfl.setup import prepare  # noqa: E402
from crfl.train import run_round, train  # noqa: E402
from crfl.validation import ConfigError  # noqa: E402
from tests.conftest import synthetic_images  # noqa: E402
from tests.support.grid import LocalGrid, server_identity  # noqa: E402
from tests.support.processes import descendants, free_port, wait_for_superlink  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOL = dict(rtol=1e-5, atol=1e-6)


def small_config(**over):
    """4 clients, 4 rounds, attacker 0 poisons and scales in round 2; 8x8 synthetic images."""
    base = {
        "data.name": "synthetic", "data.num_clients": 4, "server.rounds": 4, "attack.rounds": [2],
        "attack.pixels": [[6, 6], [7, 7]], "attack.target": 0, "clients.batch_size": 20, "clients.lr": 0.1,
        "server.rho": {"kind": "linear", "a": 0.1, "b": 1.0}, "server.sigma": 0.01, "certify.M": 50,
    }
    base.update(over)
    return resolve(None, None, base)


class Recording(CRFL):
    """CRFL that keeps every round's output w~_t."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.models: dict[int, torch.Tensor] = {}

    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        self.models[server_round] = record_to_params(arrays).clone()
        return arrays, metrics


def recording_strategy(setup, **kwargs):
    return Recording(
        default_inner_strategy(setup), rho=setup.rho, sigma=setup.sigma, rounds=setup.rounds,
        seed=setup.cfg.seed, num_clients=setup.data.num_clients, weights=setup.weights, **kwargs,
    )


def simulator_models(setup):
    params = setup.model.init(torch_generator(setup.cfg.seed, "init"), setup.dtype, setup.cfg.model.init)
    out = {}
    for t in range(1, setup.rounds + 1):
        params = run_round(setup, params, t).params
        out[t] = params
    return out


def flower_run(cfg, ds, out, *, overrides=None, shuffle_seed=0, certify=False):
    setup = prepare(cfg, ds)
    strategy = recording_strategy(setup)
    grid = LocalGrid(make_client_app(ds), setup.data.num_clients, overrides=overrides, shuffle_seed=shuffle_seed)
    with server_identity():
        run = run_federation(grid, setup, out, strategy=strategy, certify=certify, dataset=ds)
    return setup, strategy, run


# ---------------------------------------------------------------------------------------------
# in-process federation: equality with the simulator


@pytest.mark.parametrize("agg", ["fedavg", "rfa", "krum"])
def test_flower_rounds_equal_simulator(tmp_path, agg):
    ds = synthetic_images()
    opts = {"krum": {"f": 0, "m": 2}}.get(agg, {})
    cfg = small_config(**{"aggregation.name": agg, "aggregation.options": opts})
    setup, strategy, run = flower_run(cfg, ds, tmp_path / "flower")
    inner = strategy.strategy
    assert type(inner).__name__ == ("FedAvg" if agg == "fedavg" else "PackageAggregation")
    ref = simulator_models(prepare(cfg, ds))
    for t in range(1, cfg.server.rounds + 1):
        torch.testing.assert_close(strategy.models[t], ref[t], **TOL, msg=f"round {t}")
    torch.testing.assert_close(run.final_params, ref[cfg.server.rounds], **TOL)
    # the attack round was seen and logged like the simulator does
    sim = train(cfg, tmp_path / "sim", dataset=ds)
    assert [e["round"] for e in run.attack_log] == [e["round"] for e in sim.attack_log] == [2]
    a, b = run.attack_log[0], sim.attack_log[0]
    for key in ("round", "attackers", "configured_p", "tau", "gamma", "eta", "poison_ratio", "nominal_poison_ratio", "delta_norm"):
        assert a[key] == b[key], key
    for key in ("p", "start_norm", "start_centred_opnorm"):
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=key)
    for r, s in zip(run.records, sim.records):
        assert r["attack"] == s["attack"] and r["clipped"] == s["clipped"]
        assert r["aggregation_fixed_weights"] == s["aggregation_fixed_weights"] == int(agg == "fedavg")
        assert math.isclose(r["norm_before_clip"], s["norm_before_clip"], rel_tol=1e-5)
        assert r["clean_acc"] == pytest.approx(s["clean_acc"], abs=0.02)


def test_reply_order_does_not_matter(tmp_path):
    ds = synthetic_images()
    cfg = small_config(**{"server.rounds": 2, "attack.rounds": [1]})
    _, s1, _ = flower_run(cfg, ds, tmp_path / "a", shuffle_seed=1)
    _, s2, _ = flower_run(cfg, ds, tmp_path / "b", shuffle_seed=2)
    _, s3, _ = flower_run(cfg, ds, tmp_path / "c", shuffle_seed=None)
    for t in (1, 2):
        assert torch.equal(s1.models[t], s2.models[t]) and torch.equal(s1.models[t], s3.models[t])


def test_run_directory_is_certified(tmp_path):
    ds = synthetic_images()
    cfg = small_config()
    _, _, run = flower_run(cfg, ds, tmp_path / "run", certify=True)
    out = run.out_dir
    for f in ("config.yaml", "rounds.csv", "attack.json", "model_final.pt", "summary.json", "flower.json",
              "certificates_clean.csv", "certificates_backdoor.csv"):
        assert (out / f).is_file(), f
    summary = json.loads((out / "summary.json").read_text())
    assert summary["training"]["engine"] == "flower"
    assert summary["training"]["replies_rejected"] == 0
    assert summary["training"]["certifiable"] is True and summary["training"]["rounds_without_valid_replies"] == []
    cert = summary["certificate"]
    assert [r["round"] for r in cert["attack_rounds"]] == [2] and cert["attack_rounds"][0]["p"] == pytest.approx([0.25])
    # the server declares the input domain [0, 1]^64 of the 8x8 images: B = sqrt(64), not max ||x|| of client data
    assert cert["input_norm_bound"] == pytest.approx(8.0)
    assert summary["results"]["clean"]["points"] == len(ds.y_test)
    flower = json.loads((out / "flower.json").read_text())
    assert [r["accepted"] for r in flower["rounds"]] == [[0, 1, 2, 3]] * cfg.server.rounds


def test_wraps_flower_strategies(tmp_path):
    """Flower's own FedMedian inside the CRFL wrapper gives the simulator's coordinate-median run."""
    from flwr.serverapp.strategy import FedMedian

    ds = synthetic_images()
    cfg = small_config(**{"aggregation.name": "median", "attack.num_attackers": 0, "attack.rounds": None})
    setup = prepare(cfg, ds)
    K = setup.data.num_clients
    inner = FedMedian(fraction_evaluate=0.0, min_train_nodes=K, min_available_nodes=K)
    strategy = Recording(inner, rho=setup.rho, sigma=setup.sigma, rounds=setup.rounds, seed=cfg.seed, num_clients=K)
    assert strategy.summary() is None
    with server_identity():
        run_federation(LocalGrid(make_client_app(ds), K), setup, tmp_path / "run", strategy=strategy)
    ref = simulator_models(prepare(cfg, ds))
    for t in ref:
        torch.testing.assert_close(strategy.models[t], ref[t], **TOL)
    assert strategy.history[1].weights is None  # a median has no per-client weights


# ---------------------------------------------------------------------------------------------
# malformed replies


def _bad_client(kind):
    def client(msg, context):
        params = record_to_params(next(iter(msg.content.array_records.values()))).numpy()
        if kind == "raises":
            raise RuntimeError("disk full")
        if kind == "shape":
            model = np.zeros(params.size + 3, dtype=np.float32)
        elif kind == "nan":
            model = params.copy()
            model[:2] = np.nan
        elif kind == "inf":
            model = params.copy()
            model[5] = np.inf
        elif kind == "overflow":  # finite float64 entries whose norm overflows float64
            model = np.full(params.size, 1e300, dtype=np.float64)
        elif kind == "float16":
            model = params.astype(np.float16)
        metrics = {"partition-id": int(context.node_config["partition-id"]), "num-examples": 10, "weight": 0.1,
                   "tau": 1, "lr": 0.1, "attacker": 0, "gamma": 1.0, "poison-ratio": 0.0, "delta-norm": 0.0,
                   "poisoned-samples": 0, "delta-norm-max": 0.0, "delta-norm-mean": 0.0, "seconds": 0.0}
        content = RecordDict({"arrays": ArrayRecord({"params": Array(model)}), "metrics": MetricRecord(metrics)})
        return Message(content=content, reply_to=msg)

    return client


@pytest.mark.parametrize("agg", ["fedavg", "rfa"])
def test_malformed_replies_are_dropped(tmp_path, caplog, agg):
    ds = synthetic_images(n_train=800)
    K = 8
    cfg = small_config(**{"data.num_clients": K, "server.rounds": 3, "aggregation.name": agg})
    bad = {3: "shape", 4: "nan", 5: "inf", 6: "overflow", 7: "raises"}
    caplog.set_level(logging.WARNING, logger="crfl.flower")
    setup, strategy, run = flower_run(cfg, ds, tmp_path / "run", overrides={k: _bad_client(v) for k, v in bad.items()})

    # a clear line per dropped reply, naming the node and the problem
    lines = [r.getMessage() for r in caplog.records if r.name == "crfl.flower" and "rejected" in r.getMessage()]
    assert len(lines) == len(bad) * cfg.server.rounds
    text = "\n".join(lines)
    for needle in ("wrong shape", "NaN value", "infinite value(s): infinite norm", "has dtype float64; the global model's is float32", "RuntimeError: disk full"):
        assert needle in text, needle
    for line in lines:
        assert line.startswith("Round ") and "node " in line and "The round goes on without it." in line

    # every round completed with the good clients only, weights renormalized over them
    good = [0, 1, 2]
    ref = setup.model.init(torch_generator(cfg.seed, "init"), setup.dtype, cfg.model.init)
    for t in range(1, cfg.server.rounds + 1):
        rec = strategy.history[t]
        assert rec.accepted == good and len(rec.rejected) == len(bad) and rec.missing == []
        assert sum(rec.weights) == pytest.approx(1.0)
        updates = torch.stack([client_round(setup, ref, k, t).model - ref for k in good])
        agg_res = aggregate(agg, updates, setup.weights[good].to(updates.dtype))
        ref, _ = server_step(ref, agg_res.update, t=t, rounds=cfg.server.rounds, rho_t=setup.rho(t),
                             sigma_t=setup.sigma(t), seed=cfg.seed)
        torch.testing.assert_close(strategy.models[t], ref, **TOL)
        if t == 2:  # the attacker's effective weight grows when others drop: recorded for the certificate
            assert run.attack_log[0]["p"] == pytest.approx([float(agg_res.weights[0])], rel=1e-5)
    summary = json.loads((run.out_dir / "summary.json").read_text())
    assert summary["training"]["replies_rejected"] == len(bad) * cfg.server.rounds
    flower = json.loads((run.out_dir / "flower.json").read_text())
    assert {r["partition"] for r in flower["rounds"][0]["rejected"]} == {3, 4, 5, 6, 7}


def test_no_valid_reply_still_clips_and_perturbs(tmp_path, caplog):
    ds = synthetic_images()
    cfg = small_config(**{"data.num_clients": 2, "server.rounds": 2, "attack.num_attackers": 0, "attack.rounds": None})
    caplog.set_level(logging.WARNING, logger="crfl.flower")
    setup = prepare(cfg, ds)
    strategy = recording_strategy(setup)
    grid = LocalGrid(make_client_app(ds), 2, overrides={0: _bad_client("nan"), 1: _bad_client("raises")})
    with server_identity(), pytest.raises(FederationFailed, match="No client contributed to any of the 2 rounds"):
        run_federation(grid, setup, tmp_path / "run", strategy=strategy, certify=True, dataset=ds)
    expect, _ = server_step(setup.w0, torch.zeros_like(setup.w0), t=1, rounds=2, rho_t=setup.rho(1), sigma_t=setup.sigma(1), seed=cfg.seed)
    torch.testing.assert_close(strategy.models[1], expect)
    assert any("no valid reply" in r.getMessage() for r in caplog.records)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["training"]["rounds_without_valid_replies"] == [1, 2]
    assert summary["training"]["certifiable"] is False and "certificate" not in summary
    assert not (tmp_path / "run" / "certificates_clean.csv").exists()


def test_impostor_partition_is_rejected(tmp_path, caplog):
    ds = synthetic_images()
    cfg = small_config(**{"data.num_clients": 3, "server.rounds": 1, "attack.rounds": [1]})
    app = make_client_app(ds)

    def impostor(msg, context):  # node 2 says it trained partition 1
        reply = app(msg, context)
        reply.content["metrics"]["partition-id"] = 1
        return reply

    caplog.set_level(logging.WARNING, logger="crfl.flower")
    _, strategy, _ = flower_run(cfg, ds, tmp_path / "run", overrides={2: impostor})
    assert strategy.history[1].accepted == [0, 1]
    lines = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert len(lines) == 1 and "it names partition 1; the server assigned partition 2 to this node" in lines[0]


# ---------------------------------------------------------------------------------------------
# the wrapper on its own


def test_crfl_validates_its_arguments():
    with pytest.raises(ConfigError, match="The 'rounds' parameter must be an integer in \\[1, inf\\]. Got 0 instead."):
        CRFL(rho=1.0, sigma=0.01, rounds=0, seed=1, num_clients=2)
    with pytest.raises(ConfigError, match="The 'rho' parameter"):
        CRFL(rho=-1.0, sigma=0.01, rounds=3, seed=1, num_clients=2)
    with pytest.raises(ConfigError, match="The 'aggregation.name' parameter must be one of"):
        PackageAggregation("mean")
    with pytest.raises(ConfigError, match="not another CRFL wrapper"):
        CRFL(CRFL(rho=1.0, sigma=0.0, rounds=2, seed=1, num_clients=2), rho=1.0, sigma=0.0, rounds=2, seed=1, num_clients=2)
    with pytest.raises(ConfigError, match="The 'weights' parameter must be 2 finite non-negative numbers"):
        CRFL(rho=1.0, sigma=0.0, rounds=2, seed=1, num_clients=2, weights=[0.5, float("nan")])
    with pytest.raises(ConfigError, match="The 'sample-count' parameter must be an integer in \\[1, 2\\]"):
        CRFL(rho=1.0, sigma=0.0, rounds=2, seed=1, num_clients=2, sampling=Sampling(count=3))


def test_separate_noise_seed_changes_only_the_noise(tmp_path):
    ds = synthetic_images()
    cfg = small_config(**{"server.rounds": 2, "attack.rounds": [1]})
    setup = prepare(cfg, ds)
    a = build_strategy(setup)
    b = build_strategy(setup, noise_seed=99)
    assert a.noise_seed == cfg.seed and b.noise_seed == 99


def test_run_config_resolves_like_the_cli():
    cfg = config_from_run_config({"preset": "demo", "overrides": "server.rounds=5; attack.rounds=[2]; data.num_clients=4; server.sigma=[0.1, 0.2, 0.3, 0.4]"})
    assert cfg.preset == "demo" and cfg.server.rounds == 5 and cfg.data.num_clients == 4
    assert cfg.server.sigma == [0.1, 0.2, 0.3, 0.4]


# ---------------------------------------------------------------------------------------------
# Flower's engines (slow)

SIM_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    from tests.conftest import synthetic_images
    from tests.test_flower import small_config
    from crfl.flower.simulation import simulate
    simulate(small_config(**{over!r}), {out!r}, dataset=synthetic_images(), num_cpus=2)
    """
)


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", PYTHONUNBUFFERED="1",
    )
    return env


@pytest.mark.slow
def test_ray_simulation_equals_simulator(tmp_path):
    ds = synthetic_images()
    over = {"aggregation.name": "rfa", "server.rounds": 3}
    out = tmp_path / "ray"
    script = SIM_SCRIPT.format(root=str(ROOT), over=over, out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, env=_env(tmp_path / "home"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=240)
    finally:
        _stop([proc.pid])
    assert proc.returncode == 0, log[-4000:]
    final = torch.load(out / "model_final.pt", weights_only=False)["params"]
    sim = train(small_config(**over), tmp_path / "sim", dataset=ds)
    torch.testing.assert_close(final, sim.final_params, **TOL)
    assert json.loads((out / "attack.json").read_text())["rounds"][0]["p"] == pytest.approx(sim.attack_log[0]["p"], rel=1e-5)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _stop(pids: list[int]) -> None:
    """SIGTERM each started process and everything below it, then SIGKILL what is left; by PID only."""
    tree = []
    for pid in pids:
        tree += [pid] + descendants(pid) if _alive(pid) else []
    for pid in tree:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    reaped: set[int] = set()

    def reap() -> None:  # our direct children: a dead one stays a zombie (and 'alive') until reaped
        for pid in pids:
            try:
                if pid not in reaped and os.waitpid(pid, os.WNOHANG)[0] == pid:
                    reaped.add(pid)
            except ChildProcessError:
                reaped.add(pid)

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in tree if p not in reaped):
        reap()
        time.sleep(0.1)
    for pid in tree:
        if pid not in reaped and _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 10  # SIGKILL cannot be refused: wait until every process is gone (children reaped)
    while time.monotonic() < deadline and (len(reaped) < len(set(pids)) or any(_alive(p) for p in tree if p not in reaped)):
        reap()
        time.sleep(0.05)


APP_TOML = """\
[project]
name = "crflflower"
version = "0.1.0"
description = "CRFL over Flower (test app)"
license = "Apache-2.0"

[tool.flwr.app]
publisher = "crfl"

[tool.flwr.app.components]
serverapp = "crfl.flower.server_app:app"
clientapp = "crfl.flower.client_app:app"

""" + toml_table()


#: The certificate and key commands of docs/flower.md ("Deployment with TLS and authenticated SuperNodes").
CERT_COMMANDS = """\
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes -days 30 -subj "/CN=crfl-ca" -keyout ca.key -out ca.crt
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes -subj "/CN=127.0.0.1" -keyout server.key -out server.csr
printf "subjectAltName=IP:127.0.0.1,DNS:localhost\\n" > san.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 -extfile san.ext -out server.pem
for i in 0 1 2; do ssh-keygen -q -t ecdsa -b 384 -N "" -f node$i; done
"""


@pytest.mark.slow
@pytest.mark.parametrize("nodes_as", ["hosted", "supernodes"])
def test_deployment_tls_authenticated_supernodes(tmp_path, nodes_as):
    """SuperLink over TLS with SuperNode authentication; two registered nodes train two rounds, an unregistered one is refused.

    ``hosted``: both nodes in one crfl.flower.deploy.nodes process, each with its own key. ``supernodes``: Flower's
    SuperNodes through crfl.flower.deploy.supernode (--isolation process), one crfl.flower.deploy.worker for both.
    """
    app = tmp_path / "crflflower"
    app.mkdir()
    (app / "pyproject.toml").write_text(APP_TOML)
    home = tmp_path / "home"
    home.mkdir()
    subprocess.run(["bash", "-ec", CERT_COMMANDS], cwd=tmp_path, check=True, capture_output=True)
    link = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "secure"\n\n[superlink.secure]\naddress = "127.0.0.1:{link}"\n'
        f'root-certificates = "{tmp_path / "ca.crt"}"\n'
    )
    env = _env(home)
    bindir = Path(sys.executable).parent
    overrides = "data.num_clients=2; server.rounds=2; attack.rounds=[1]"
    out = tmp_path / "run"
    started: list[subprocess.Popen] = []

    def start(args: list[str], name: str) -> subprocess.Popen:
        f = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
        p = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        started.append(p)
        return p

    runtime = {i: f"127.0.0.1:{free_port()}" for i in (0, 1, 2)}

    def hosted(*keys: int) -> subprocess.Popen:  # docs/flower.md: several nodes in one process
        return start([sys.executable, "-m", "crfl.flower.deploy.nodes", "--root-certificates", "ca.crt", "--superlink", f"127.0.0.1:{link}",
                      "--auth-supernode-private-key", *[f"node{i}" for i in keys], "--max-retries", "2", "--max-wait-time", "10"],
                     "host" + "".join(map(str, keys)))

    def supernode(i: int) -> subprocess.Popen:  # crfl's launcher of flower-supernode, --isolation process
        host, port = runtime[i].split(":")
        return start([sys.executable, "-m", "crfl.flower.deploy.supernode", "--poll-interval", "0.1", "--",
                      "--root-certificates", "ca.crt", "--superlink", f"127.0.0.1:{link}",
                      "--auth-supernode-private-key", f"node{i}", "--isolation", "process", "--host", host, "--port", port,
                      "--max-retries", "2", "--max-wait-time", "10"], f"supernode{i}")

    try:
        sl = start([str(bindir / "flower-superlink"), "--ssl-ca-certfile", "ca.crt", "--ssl-certfile", "server.pem",
                    "--ssl-keyfile", "server.key", "--enable-supernode-auth", "--host", "127.0.0.1", "--port", str(link)],
                   "superlink")
        wait_for_superlink(link, sl, ca=str(tmp_path / "ca.crt"))
        ids = []
        for i in (0, 1):
            reg = subprocess.run([str(bindir / "flwr"), "supernode", "register", f"node{i}.pub", "secure", "--format", "json"],
                                 cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
            assert reg.returncode == 0, reg.stdout + reg.stderr
            ids.append(int(json.loads(reg.stdout[reg.stdout.index("{"):])["node-id"]))
        if nodes_as == "hosted":
            nodes, served = [hosted(0, 1)], "host01.log"
            intruder, intruder_log = hosted(2), "host2.log"  # its key was never registered
        else:
            nodes = [supernode(i) for i in (0, 1)]
            # one long-lived ClientApp worker serves both nodes' Runtime APIs (loopback, plain HTTP)
            nodes.append(start([sys.executable, "-m", "crfl.flower.deploy.worker", "--insecure", "--runtime-api-address",
                                runtime[0], runtime[1]], "worker"))
            served, intruder, intruder_log = "worker.log", supernode(2), "supernode2.log"
        assert intruder.wait(timeout=60) == 1
        refused = (tmp_path / intruder_log).read_text()
        assert "Exit Code: 305" in refused and "Failed to activate SuperNode" in refused, refused[-2000:]  # SUPERNODE_CONNECTION_ERROR
        assert all(n.poll() is None for n in nodes)
        table = f"{ids[0]}=0 {ids[1]}=1"
        run = subprocess.run(
            [str(bindir / "flwr"), "run", str(app), "secure", "--stream", "--run-config",
             f"overrides='{overrides}' out-dir='{out}' certify=false node-partitions='{table}'"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
        )
        log = run.stdout + run.stderr
        assert run.returncode == 0, log[-4000:]
        assert "Finished: 2 rounds" in log, log[-4000:]
        served_log = (tmp_path / served).read_text()
        assert served_log.count(": completed in") == 4, served_log[-4000:]  # 2 nodes x 2 rounds, in one process
    finally:
        _stop([p.pid for p in started])
    assert all(p.poll() is not None for p in started)
    assert not [c for p in started for c in descendants(p.pid) if _alive(c)]
    final = torch.load(out / "model_final.pt", weights_only=False)["params"]
    cfg = config_from_run_config({"preset": "demo", "overrides": overrides})
    sim = train(cfg, tmp_path / "sim")
    torch.testing.assert_close(final, sim.final_params, **TOL)
    flower = json.loads((out / "flower.json").read_text())["rounds"]
    assert [r["nodes"] for r in flower] == [{"0": ids[0], "1": ids[1]}] * 2  # the operator's binding
    attack = json.loads((out / "attack.json").read_text())["rounds"]
    assert attack[0]["round"] == 1 and attack[0]["attackers"] == [0] and attack[0]["p"] == pytest.approx([0.5])
