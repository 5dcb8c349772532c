"""The Flower server owns what the certificate reads; numerics; sampling, drops, resume (in-process Grid).

Each client-side lie (its weight, its partition, its attack metrics, extra metric keys, extra
nodes) must leave the weights and the certificate's inputs as an honest run has them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict  # noqa: E402

from crfl.flower.client_app import make_client_app  # noqa: E402
from crfl import rundir  # noqa: E402
from crfl.flower.records import record_to_params  # noqa: E402
from crfl.flower.server_app import parse_node_partitions, run_federation  # noqa: E402
from crfl.flower.strategy import Sampling  # noqa: E402
from crfl.server import server_step  # noqa: E402
from crfl.setup import prepare  # noqa: E402
from crfl.train import run_round, train  # noqa: E402
from crfl.validation import ConfigError  # noqa: E402
from tests.conftest import synthetic_images  # noqa: E402
from tests.support.grid import LocalGrid, server_identity  # noqa: E402
from tests.test_flower import TOL, recording_strategy, small_config  # noqa: E402

CERT_KEYS = ("round", "attackers", "p", "configured_p", "tau", "gamma", "eta", "poison_ratio",
             "nominal_poison_ratio", "delta_norm", "start_norm", "start_centred_opnorm")


def run(tmp_path, name, cfg, ds, *, overrides=None, grid_kwargs=None, **strategy_kwargs):
    setup = prepare(cfg, ds)
    strategy = recording_strategy(setup, **strategy_kwargs)
    grid = LocalGrid(make_client_app(ds), (grid_kwargs or {}).pop("num_nodes", setup.data.num_clients),
                     overrides=overrides, **(grid_kwargs or {}))
    with server_identity():
        res = run_federation(grid, setup, tmp_path / name, strategy=strategy, dataset=ds)
    return setup, strategy, res


def liar(ds, **changes):
    """The honest client, whose reply's metrics are then changed (set, or deleted with None)."""
    app = make_client_app(ds)

    def client(msg, context):
        reply = app(msg, context)
        m = reply.content["metrics"]
        for k, v in changes.items():
            if v is None:
                del m[k]
            else:
                m[k] = v
        return reply

    return client


def attack_json(res):
    return json.loads((res.out_dir / "attack.json").read_text())["rounds"]


def assert_same_run(a, b):
    for t in a[1].models:
        assert torch.equal(a[1].models[t], b[1].models[t]), t
    for x, y in zip(attack_json(a[2]), attack_json(b[2])):
        for k in CERT_KEYS:
            assert x[k] == y[k], k
    for t in a[1].history:
        assert a[1].history[t].weights == b[1].history[t].weights


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    ds = synthetic_images()
    return ds, run(tmp_path_factory.mktemp("honest"), "run", small_config(), ds)


@pytest.mark.parametrize("lie", [
    {"weight": 1e12, "num-examples": 10**9},                                   # inflate its weight
    {"gamma": 1.0, "attacker": 0, "poison-ratio": 0.0, "tau": 1, "lr": 1e-6},  # hide the attack
    {"weight": None, "gamma": None, "tau": None},                             # report nothing
])
def test_client_lies_change_nothing(tmp_path, honest, lie):
    ds, ref = honest
    got = run(tmp_path, "run", small_config(), ds, overrides={0: liar(ds, **lie), 1: liar(ds, **lie)})
    assert got[1].history[2].accepted == [0, 1, 2, 3]
    assert_same_run(got, ref)
    assert attack_json(got[2])[0]["gamma"] == [10.0] and attack_json(got[2])[0]["p"] == pytest.approx([0.25])


def test_nan_attack_metric_rejects_only_the_liar(tmp_path, caplog):
    ds = synthetic_images()
    caplog.set_level(logging.WARNING, logger="crfl.flower")
    setup, strategy, res = run(tmp_path, "run", small_config(), ds, overrides={0: liar(ds, gamma=float("nan"))})
    assert strategy.history[2].accepted == [1, 2, 3]
    assert any("its metric 'gamma' must be a finite number; got nan" in r.getMessage() for r in caplog.records)
    entry = attack_json(res)[0]
    # the certificate still reads the server's threat model; the attacker's reply carried no weight
    assert entry["gamma"] == [10.0] and entry["p"] == [0.0] and entry["attackers"] == [0]


def test_extra_metric_key_rejects_only_its_sender_even_on_a_tie(tmp_path):
    ds = synthetic_images()
    cfg = small_config(**{"data.num_clients": 2, "server.rounds": 2, "attack.rounds": [1]})
    _, strategy, _ = run(tmp_path, "run", cfg, ds, overrides={1: liar(ds, extra=1.0)})
    for t in (1, 2):
        rec = strategy.history[t]
        assert rec.accepted == [0] and rec.weights == [1.0]
        assert "unknown keys ['extra']" in rec.rejected[0]["reason"] and rec.rejected[0]["partition"] == 1


def test_extra_nodes_get_no_message_and_cannot_displace(tmp_path, honest):
    ds, ref = honest
    K = 4
    ids = [10, 20, 30, 40, 5, 6]  # two extra nodes with the smallest ids
    table = {10: 0, 20: 1, 30: 2, 40: 3}
    got = run(tmp_path, "run", small_config(), ds, node_partitions=table,
              grid_kwargs={"num_nodes": K + 2, "node_ids": ids})
    for rec in got[1].history.values():
        assert rec.sent == [10, 20, 30, 40] and rec.unbound_nodes == [5, 6]
    assert_same_run(got, ref)
    # automatic binding: the first N node ids; the others are never messaged
    auto = run(tmp_path, "auto", small_config(), ds, grid_kwargs={"num_nodes": K + 2})
    assert all(len(r.sent) == K and len(r.unbound_nodes) == 2 for r in auto[1].history.values())
    assert parse_node_partitions("10=0, 20=1") == {10: 0, 20: 1} and parse_node_partitions("") is None
    with pytest.raises(ConfigError, match="The 'node-partitions' parameter must be 'NODE_ID=PARTITION' pairs"):
        parse_node_partitions("10:0")


def test_unsolicited_reply_is_rejected(tmp_path):
    ds = synthetic_images()
    cfg = small_config(**{"server.rounds": 1, "attack.rounds": [1]})
    setup = prepare(cfg, ds)
    strategy = recording_strategy(setup)
    grid = LocalGrid(make_client_app(ds), 4)
    with server_identity():
        msgs = list(strategy.configure_train(1, __import__("crfl.flower.records", fromlist=["x"]).params_to_record(setup.w0),
                                             __import__("flwr.app", fromlist=["x"]).ConfigRecord(
                                                 {"crfl-config": json.dumps(setup.cfg.to_dict())}), grid))
        replies = list(grid.send_and_receive(msgs))
        stranger = replies[0]
        stranger.metadata.__dict__["_src_node_id"] = 999
        strategy.aggregate_train(1, replies)
    rec = strategy.history[1]
    assert {"node": 999, "partition": None, "reason": "the server did not ask this node to train in this round"} in rec.rejected


# ---------------------------------------------------------------------------------------------
# numerics over Flower


def raw_client(kind):
    def client(msg, context):
        params = record_to_params(next(iter(msg.content.array_records.values()))).numpy()
        model = {"huge": np.full(params.size, 3e38, dtype=np.float32), "float16": params.astype(np.float16),
                 "nan": np.full(params.size, np.nan, dtype=np.float32)}[kind]
        content = RecordDict({"arrays": ArrayRecord({"params": Array(model)}), "metrics": MetricRecord({"num-examples": 1})})
        return Message(content=content, reply_to=msg)

    return client


def test_huge_finite_reply_is_clipped_not_zeroed(tmp_path):
    ds = synthetic_images()
    cfg = small_config(**{"server.rounds": 2, "attack.rounds": [1]})
    setup, strategy, _ = run(tmp_path, "run", cfg, ds, overrides={3: raw_client("huge")})
    w2 = strategy.models[2]
    assert strategy.history[1].accepted == [0, 1, 2, 3] and strategy.history[1].clipped
    assert bool(torch.isfinite(w2).all()) and w2.dtype == torch.float32
    # round T has no noise: the output is exactly rho_T-sized
    assert float(torch.linalg.vector_norm(w2.double())) == pytest.approx(setup.rho(2), rel=1e-5)


def test_float16_reply_is_rejected_and_the_model_stays_float32(tmp_path):
    ds = synthetic_images()
    cfg = small_config(**{"server.rounds": 1, "attack.rounds": [1]})
    _, strategy, _ = run(tmp_path, "run", cfg, ds, overrides={2: raw_client("float16")})
    assert strategy.history[1].accepted == [0, 1, 3]
    assert "has dtype float16; the global model's is float32" in strategy.history[1].rejected[0]["reason"]
    assert strategy.models[1].dtype == torch.float32


def test_weights_summing_to_zero_skip_the_round_not_the_run(tmp_path, caplog):
    ds = synthetic_images()
    cfg = small_config(**{"server.rounds": 2, "attack.num_attackers": 0, "attack.rounds": None})
    caplog.set_level(logging.WARNING, logger="crfl.flower")
    setup = prepare(cfg, ds)
    strategy = recording_strategy(setup)
    strategy.weights = np.array([0.0, 0.0, 0.5, 0.5])
    app, bad = make_client_app(ds), raw_client("nan")

    def nan_in_round_1(msg, context):
        return (bad if next(iter(msg.content.config_records.values()))["server-round"] == 1 else app)(msg, context)

    grid = LocalGrid(app, 4, overrides={2: nan_in_round_1, 3: nan_in_round_1})
    with server_identity():
        res = run_federation(grid, setup, tmp_path / "run", strategy=strategy, certify=True, dataset=ds)
    assert [r for r in caplog.records if "sum to 0; the round is skipped" in r.getMessage()]
    expect, _ = server_step(setup.w0, torch.zeros_like(setup.w0), t=1, rounds=2, rho_t=setup.rho(1),
                            sigma_t=setup.sigma(1), seed=cfg.seed)
    torch.testing.assert_close(strategy.models[1], expect)
    training = json.loads((res.out_dir / "summary.json").read_text())["training"]
    assert strategy.history[1].skipped == "the accepted replies' weights sum to 0"
    assert strategy.history[2].skipped is None and strategy.history[2].weights == [0.0, 0.0, 0.5, 0.5]
    assert training["rounds_without_valid_replies"] == [1] and training["rounds_with_contributions"] == 1
    assert training["certifiable"] is False and res.summary is None


# ---------------------------------------------------------------------------------------------
# sampling, drops, resume


def test_sampling_equals_the_simulator_on_the_same_seed(tmp_path):
    ds = synthetic_images(n_train=600)
    cfg = small_config(**{"data.num_clients": 6, "server.rounds": 4, "attack.rounds": [2]})
    sampling = Sampling(count=3)
    setup, strategy, res = run(tmp_path, "run", cfg, ds, sampling=sampling)
    params = setup.w0.clone()
    for t in range(1, 5):
        S = sampling.sample(cfg.seed, t, 6)
        assert strategy.history[t].sampled == S == strategy.history[t].accepted and len(S) == 3
        mask = torch.zeros(6, dtype=torch.float64)
        mask[S] = 1.0
        sim = dataclasses.replace(setup, weights=setup.weights * mask)  # the simulator's round, unsampled weights 0
        params = run_round(sim, params, t).params
        torch.testing.assert_close(strategy.models[t], params, **TOL)
        p_attacker = (1 / 3) if 0 in S else 0.0
        if t == 2:
            assert attack_json(res)[0]["p"] == pytest.approx([p_attacker])
    assert sampling.sample(cfg.seed, 3, 6) == sampling.sample(cfg.seed, 3, 6)
    assert len({tuple(sampling.sample(cfg.seed, t, 6)) for t in range(1, 20)}) > 1
    flower = json.loads((res.out_dir / "flower.json").read_text())
    assert [r["sampled"] for r in flower["rounds"]] == [sampling.sample(cfg.seed, t, 6) for t in range(1, 5)]


def test_dropped_node_is_counted_once(tmp_path):
    ds = synthetic_images()
    cfg = small_config(**{"server.rounds": 2, "attack.rounds": [1]})
    _, strategy, res = run(tmp_path, "run", cfg, ds, grid_kwargs={"unavailable": [3]})
    for rec in strategy.history.values():
        assert rec.missing == [3] and rec.rejected == [] and rec.accepted == [0, 1, 2]
    assert json.loads((res.out_dir / "summary.json").read_text())["training"]["replies_missing"] == 2


def test_node_timeout_goes_on_with_the_connected_nodes(tmp_path, caplog):
    ds = synthetic_images()
    cfg = small_config(**{"server.rounds": 1, "attack.rounds": [1]})
    caplog.set_level(logging.WARNING, logger="crfl.flower")
    _, strategy, _ = run(tmp_path, "run", cfg, ds, node_timeout=0.3, grid_kwargs={"connected": [0, 1]})
    rec = strategy.history[1]
    assert rec.accepted == [0, 1] and rec.missing == [2, 3]
    assert any("2 of the 4 nodes it needs are connected" in r.getMessage() for r in caplog.records)


def test_resume_equals_uninterrupted_and_the_simulator_refuses(tmp_path, honest):
    ds, ref = honest
    cfg = small_config()
    setup = prepare(cfg, ds)
    out = tmp_path / "run"
    with server_identity():
        first = run_federation(LocalGrid(make_client_app(ds), 4), setup, out, strategy=recording_strategy(setup),
                               dataset=ds, stop_after=2)
        assert not first.finished and not (out / "model_final.pt").exists()
        with pytest.raises(ConfigError, match="already holds a run"):
            run_federation(LocalGrid(make_client_app(ds), 4), setup, out, strategy=recording_strategy(setup), dataset=ds)
        other = recording_strategy(setup, noise_seed=7)
        with pytest.raises(ConfigError, match="different configuration, sampling or noise seed"):
            run_federation(LocalGrid(make_client_app(ds), 4), setup, out, strategy=other, dataset=ds, resume=True)
        second = run_federation(LocalGrid(make_client_app(ds), 4, node_ids=[7, 8, 9, 11]), setup, out,
                                strategy=recording_strategy(setup), dataset=ds, resume=True)
    assert torch.equal(second.final_params, ref[2].final_params)
    assert [r["round"] for r in json.loads((out / "flower.json").read_text())["rounds"]] == [1, 2, 3, 4]
    assert [{k: e[k] for k in CERT_KEYS} for e in attack_json(second)] == [{k: e[k] for k in CERT_KEYS} for e in attack_json(ref[2])]
    a = torch.load(out / "model_final.pt", weights_only=True)["attack_state"]
    b = torch.load(ref[2].out_dir / "model_final.pt", weights_only=True)["attack_state"]
    assert a["round"] == b["round"] == 2 and torch.equal(a["pre_noise"], b["pre_noise"])
    assert rundir.open_run(out).engine() == rundir.FLOWER
    with pytest.raises(ConfigError, match="holds a run of the flower engine"):
        train(None, out, resume=True, dataset=ds)


def test_attack_round_pre_noise_model_is_kept(honest):
    _, (setup, strategy, res) = honest
    state = torch.load(res.out_dir / "model_final.pt", weights_only=False)["attack_state"]
    w1 = strategy.models[1]
    expect, info = server_step(w1, strategy.models[2] * 0, t=2, rounds=4, rho_t=setup.rho(2), sigma_t=0.0, seed=1)
    assert state["round"] == 2 and state["pre_noise"].shape == w1.shape
    # Clip_{rho_2}(w_2) + eps_2 is the round's output
    noise = strategy.models[2] - state["pre_noise"]
    assert 0 < float(noise.std()) == pytest.approx(setup.sigma(2), rel=0.2) and not math.isnan(float(noise.sum()))
    assert float(torch.linalg.vector_norm(state["pre_noise"].double())) <= setup.rho(2) * (1 + 1e-6)
