"""The ensemble over Flower (crfl.flower.ensemble): the simulator's G models, groups the server owns.

The Flower server is driven in-process (tests/support/grid.py LocalGrid): on the same seed it
trains the same G group models as the simulator's EnsembleRound and writes the same
client-level certificate; what a client says about itself (its weight, its partition, a group
of its choosing in its node config) changes neither the groups nor the certificate.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from crfl import rundir  # noqa: E402
from crfl.certify import certify_run  # noqa: E402
from crfl.flower.client_app import make_client_app  # noqa: E402
from crfl.flower.server_app import run_federation  # noqa: E402
from crfl.setup import prepare  # noqa: E402
from crfl.train import train  # noqa: E402
from crfl.validation import ConfigError  # noqa: E402
from tests.conftest import synthetic_images  # noqa: E402
from tests.support.grid import LocalGrid, server_identity  # noqa: E402
from tests.test_ensemble import ens_config  # noqa: E402


def flower_ensemble(cfg, ds, out, *, overrides=None, **kw):
    setup = prepare(cfg, ds)
    grid = LocalGrid(make_client_app(ds), setup.data.num_clients, overrides=overrides)
    with server_identity():
        return run_federation(grid, setup, out, dataset=ds, **kw), grid


CASES = {
    "partition": {"ensemble.kind": "partition", "ensemble.groups": 4},
    "partition-server-step": {"ensemble.kind": "partition", "ensemble.groups": 4, "ensemble.server_step": True,
                              "server.sigma": 0.01, "server.rho": {"kind": "linear", "a": 0.1, "b": 1.0}},
    "sampled": {"ensemble.kind": "sampled", "ensemble.groups": 6, "ensemble.clients_per_model": 5, "ensemble.sample_seed": 9},
}


@pytest.mark.parametrize("case", list(CASES))
def test_flower_ensemble_equals_the_simulator(tmp_path, case):
    ds = synthetic_images()
    cfg = ens_config(**{**CASES[case], "data.num_clients": 12, "server.rounds": 3})
    sim = train(cfg, tmp_path / "sim", dataset=ds)
    fl, _ = flower_ensemble(cfg, ds, tmp_path / "fl")
    torch.testing.assert_close(fl.final_params, sim.final_params, rtol=1e-5, atol=1e-6)
    a, b = (torch.load(d / rundir.MODEL, weights_only=True) for d in (tmp_path / "sim", tmp_path / "fl"))
    assert a["ensemble"] == b["ensemble"] and (a["engine"], b["engine"]) == ("simulator", "flower")
    flower = json.loads((tmp_path / "fl" / "flower.json").read_text())["rounds"]
    members = a["ensemble"]["members"]
    for r in flower:
        assert [sorted(g["accepted"]) for g in r["groups"]] == members
    sa, sb = certify_run(tmp_path / "sim", dataset=ds), certify_run(tmp_path / "fl", dataset=ds)
    assert sa["certificate"]["reading"] == sb["certificate"]["reading"] == "client-level"
    for k in ("clean", "backdoor"):
        assert sa["client_level"][k]["curve"] == sb["client_level"][k]["curve"]
        ra = (tmp_path / "sim" / f"client_level_{k}.csv").read_text()
        rb = (tmp_path / "fl" / f"client_level_{k}.csv").read_text()
        assert ra == rb


def _liar(ds, **changes):
    app = make_client_app(ds)

    def client(msg, context):
        context.node_config["partition-id"] = 0  # a node claiming another partition (and group) in its own config
        context.node_config["group-id"] = 3
        reply = app(msg, context)
        m = reply.content["metrics"]
        for k, v in changes.items():
            m[k] = v
        return reply

    return client


def test_client_claims_change_neither_the_groups_nor_the_certificate(tmp_path):
    ds = synthetic_images()
    cfg = ens_config(**{**CASES["partition"], "data.num_clients": 12, "server.rounds": 3, "clients.weighting": "samples"})
    honest, _ = flower_ensemble(cfg, ds, tmp_path / "honest", certify=True)
    lies = {k: _liar(ds, weight=1e9, **{"num-examples": 10**6}) for k in (1, 5, 7)}
    lied, _ = flower_ensemble(cfg, ds, tmp_path / "lied", overrides=lies, certify=True)
    assert torch.equal(honest.final_params, lied.final_params)
    a, b = (torch.load(d / rundir.MODEL, weights_only=True) for d in (tmp_path / "honest", tmp_path / "lied"))
    assert a["ensemble"] == b["ensemble"]
    for k in ("clean", "backdoor"):
        assert (tmp_path / "honest" / f"client_level_{k}.csv").read_text() == (tmp_path / "lied" / f"client_level_{k}.csv").read_text()
    # a reply naming another partition is rejected, and the group goes on without it
    bad = {2: _liar(ds, **{"partition-id": 7})}
    res, _ = flower_ensemble(cfg, ds, tmp_path / "impostor", overrides=bad)
    rounds = json.loads((tmp_path / "impostor" / "flower.json").read_text())["rounds"]
    rejected = [r for rd in rounds for g in rd["groups"] for r in g["rejected"]]
    assert rejected and all("names partition 7" in r["reason"] for r in rejected)
    assert torch.load(tmp_path / "impostor" / rundir.MODEL, weights_only=True)["ensemble"] == a["ensemble"]


def test_an_ensemble_takes_group_strategies_not_one(tmp_path):
    from crfl.flower.server_app import build_strategy

    ds = synthetic_images()
    cfg = ens_config(**{**CASES["partition"], "data.num_clients": 12, "server.rounds": 2})
    setup = prepare(cfg, ds)
    with pytest.raises(ConfigError, match="builds one CRFL strategy per group"):
        run_federation(LocalGrid(make_client_app(ds), 12), setup, tmp_path / "x", strategy=build_strategy(setup))


def test_server_app_draws_the_sampled_subsets_and_certifies(tmp_path):
    import yaml

    from crfl.flower.server_app import make_server_app
    from tests.support.grid import run_local

    ds = synthetic_images()
    cfg = ens_config(**{"ensemble.kind": "sampled", "ensemble.groups": 5, "ensemble.clients_per_model": 3,
                        "data.num_clients": 8, "server.rounds": 2})
    assert cfg.ensemble.sample_seed is None
    run_local(make_server_app(cfg, tmp_path / "run", dataset=ds), make_client_app(ds), 8)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert isinstance(saved["ensemble"]["sample_seed"], int)
    assert saved["provenance"]["ensemble"]["sample_seed_drawn"] is True and saved["provenance"]["engine"] == "flower"
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["certificate"]["reading"] == "client-level" and s["certificate"]["client_level_certified"] is True
    # the subsets are the ones the recorded seed gives
    from crfl.ensemble import sampled_groups

    members = torch.load(tmp_path / "run" / rundir.MODEL, weights_only=True)["ensemble"]["members"]
    assert [list(m) for m in sampled_groups(8, 5, 3, saved["ensemble"]["sample_seed"]).members] == members


def test_clients_never_see_the_subsets_seed_and_sampled_noise_is_shared(tmp_path):
    from crfl.ensemble import noise_stream, sampled_groups

    ds = synthetic_images()
    cfg = ens_config(**{**CASES["sampled"], "data.num_clients": 12, "server.rounds": 2, "ensemble.server_step": True,
                        "server.sigma": 0.01, "server.rho": {"kind": "linear", "a": 0.1, "b": 1.0}})
    seen = []
    app = make_client_app(ds)

    def spy(msg, context):
        seen.append(json.loads(str(next(iter(msg.content.config_records.values()))["crfl-config"])))
        return app(msg, context)

    fl, _ = flower_ensemble(cfg, ds, tmp_path / "fl", overrides={k: spy for k in range(12)})
    assert seen and all(d["ensemble"]["sample_seed"] is None for d in seen)
    sim = train(cfg, tmp_path / "sim", dataset=ds)
    torch.testing.assert_close(fl.final_params, sim.final_params, rtol=1e-5, atol=1e-6)
    g = sampled_groups(12, 6, 5, 9)
    assert noise_stream(g, 3) == () and noise_stream(prepare_groups_partition(), 3) == (3,)


def prepare_groups_partition():
    from crfl.ensemble import partition_groups

    return partition_groups(12, 4, seed=1)
