"""Attack kinds beyond the paper's backdoor (crfl.attacks): label flip, sign flip, Gaussian, arbitrary, adaptive.

Each kind acts on exactly the attackers' rows in the attack rounds (benign rows bit-identical to a
run without attackers), is reproducible from the seed, is validated at the config boundary, and
the paper's certificate refuses to certify a radius under it.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch

from crfl import attacks
from crfl.attacks import GroupInfo, attack_names, lookup_attack, register_attack, target_margin
from crfl.clients import Poison, local_updates, poison_slots, round_batches
from crfl.config import resolve
from crfl.local import local_round
from crfl.rng import torch_generator
from crfl.setup import model_inputs, prepare
from crfl.train import train
from crfl.validation import ConfigError
from tests.conftest import synthetic_images

ATTACKERS = [0, 3]
T_ADV = 2


@pytest.fixture(scope="module")
def ds():
    return synthetic_images()


def config(kind="backdoor", options=None, **over):
    """6 clients (p_i = 1/6), attackers 0 and 3 in round 2 of 4; 8x8 synthetic images, 4 classes."""
    base = {
        "data.name": "synthetic", "data.num_clients": 6, "server.rounds": 4, "attack.num_attackers": 2,
        "attack.attackers": ATTACKERS, "attack.rounds": [T_ADV], "attack.pixels": [[6, 6], [7, 7]],
        "attack.target": 0, "clients.batch_size": 20, "clients.lr": 0.1, "attack.kind": kind,
        "attack.options": options or {}, "server.rho": {"kind": "linear", "a": 0.1, "b": 1.0}, "server.sigma": 0.01,
    }
    base.update(over)
    return resolve(None, None, base)


def clean_of(cfg):
    return cfg.replace(**{"attack.num_attackers": 0, "attack.attackers": None, "attack.rounds": None})


KINDS = {
    "backdoor": {},
    "label-flip": {},
    "sign-flip": {"scale": 3.0},
    "gaussian": {"scale": 0.5},
    "adaptive": {"points": [0, 1, 2], "target_class": 1, "scale": 2.0},
}


# --- every kind: only the attackers' rows in attack rounds ----------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_attack_changes_only_attackers_rows_in_attack_rounds(ds, kind):
    cfg = config(kind, KINDS[kind])
    setup, clean = prepare(cfg, ds), prepare(clean_of(cfg), ds)
    w = setup.w0
    for t in (1, T_ADV, 3):
        loc, ref = local_round(setup, w, t), local_round(clean, w, t)
        active = t == T_ADV
        assert loc.attacking == [active and c in ATTACKERS for c in range(6)]
        for c in range(6):
            same = torch.equal(loc.updates[c], ref.updates[c])
            assert same is not (active and c in ATTACKERS), (t, c)  # benign rows bit-identical, attackers' rows changed
        again = local_round(prepare(cfg, ds), w, t)  # same seed, same attack
        assert torch.equal(loc.updates, again.updates)
    # attacking=False: the attackers train honestly
    assert torch.equal(local_round(setup, w, T_ADV, attacking=False, scaling=False).updates,
                       local_round(clean, w, T_ADV).updates)


def test_every_round_is_expressible(ds):
    setup = prepare(config("sign-flip", **{"attack.every": 1, "attack.rounds": None}), ds)
    assert setup.plan.rounds == (1, 2, 3, 4)
    assert all(setup.plan.active(t) for t in range(1, 5))


# --- sign flip, Gaussian ---------------------------------------------------------------------------


def test_sign_flip_sends_minus_s_times_the_honest_update(ds):
    cfg = config("sign-flip", {"scale": 3.0})
    setup, clean = prepare(cfg, ds), prepare(clean_of(cfg), ds)
    loc, ref = local_round(setup, setup.w0, T_ADV), local_round(clean, setup.w0, T_ADV)
    for a in ATTACKERS:
        assert torch.equal(loc.updates[a], ref.updates[a] * -3.0)
    # the backdoor's trigger, q_B and gamma are off for this kind: attack.json records what was done
    assert setup.plan.poison_per_batch == 0 and setup.plan.gamma == 1.0 and loc.poison is None
    default = prepare(config("sign-flip"), ds)
    assert default.plan.attack_options == {"scale": 1.0}
    assert torch.equal(local_round(default, setup.w0, T_ADV).updates[0], -ref.updates[0])


def test_gaussian_rows_statistics_and_stream(ds):
    s = 0.5
    cfg = config("gaussian", {"scale": s}, **{"model.name": "mlp", "model.hidden": 32})
    setup = prepare(cfg, ds)
    loc = local_round(setup, setup.w0, T_ADV)
    u = loc.updates[ATTACKERS].double().flatten()
    n = u.numel()
    assert n > 4000
    # the mean of n iid N(0, s^2) has sd s/sqrt(n), their sample std about s/sqrt(2n): 5 sd either side
    assert abs(float(u.mean())) < 5 * s / math.sqrt(n)
    assert abs(float(u.std()) - s) < 5 * s / math.sqrt(2 * n)
    for a in ATTACKERS:
        # drawn from the attacker's own stream (seed, "attack", t, client), never the global RNG
        z = torch.randn(setup.model.num_params, generator=torch_generator(cfg.seed, "attack", T_ADV, a), dtype=torch.float64)
        assert torch.equal(loc.updates[a], (z * s).to(setup.dtype))
    assert not torch.equal(loc.updates[0], loc.updates[3])  # one stream per client
    torch.manual_seed(0)
    first = local_round(setup, setup.w0, T_ADV).updates
    torch.manual_seed(1)  # the global RNG plays no part
    assert torch.equal(first, local_round(setup, setup.w0, T_ADV).updates)
    other = prepare(cfg.replace(seed=2), ds)
    assert not torch.equal(local_round(other, other.w0, T_ADV).updates[0], loc.updates[0])


# --- label flip ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["reverse", "target"])
def test_label_flip_trains_on_flipped_labels(ds, mode):
    cfg = config("label-flip", {"mode": mode})
    setup = prepare(cfg, ds)
    C = ds.num_classes
    # direct computation: the attackers' shards relabelled, every client's local SGD on the same batches
    y = setup.data.y.clone()
    for a in ATTACKERS:
        shard = torch.from_numpy(setup.data.indices[a])
        y[shard] = C - 1 - y[shard] if mode == "reverse" else torch.full_like(y[shard], setup.plan.target)
    from dataclasses import replace

    flipped = replace(setup.data, y=y)
    idx = round_batches(setup.data, cfg.clients.batch_size, setup.tau, cfg.seed, T_ADV)
    direct, _ = local_updates(setup.model, setup.w0, flipped, idx, cfg.clients.lr, None, setup.dtype)
    loc = local_round(setup, setup.w0, T_ADV)
    for a in ATTACKERS:
        assert torch.equal(loc.updates[a], direct[a])
    # and the labels the attacker trains on are the flipped ones, only on its own shard
    data = attacks.relabel_shards(setup, T_ADV, list(range(6)), [c in ATTACKERS for c in range(6)], idx)
    assert torch.equal(data.y, y)
    changed = torch.nonzero(data.y != setup.data.y).flatten().numpy()
    assert set(changed) <= set(np.concatenate([setup.data.indices[a] for a in ATTACKERS]))
    assert len(changed) > 0


# --- arbitrary updates (a registered callable) ------------------------------------------------------


@pytest.fixture
def own_registry(monkeypatch):
    monkeypatch.setattr(attacks, "_REGISTRY", dict(attacks._REGISTRY))


def test_registered_callable_gets_the_context_and_sends_its_update(ds, own_registry):
    seen = []

    def constant(ctx, *, value=0.5):
        seen.append(ctx)
        return torch.full_like(ctx.honest, value)

    register_attack("constant", constant, description="send a constant vector")
    assert "constant" in attack_names() and attacks.describe_attacks()["constant"] == "send a constant vector"
    cfg = config("constant", {"value": 2.0})
    setup, clean = prepare(cfg, ds), prepare(clean_of(cfg), ds)
    loc, ref = local_round(setup, setup.w0, T_ADV), local_round(clean, setup.w0, T_ADV)
    for a in ATTACKERS:
        assert torch.equal(loc.updates[a], torch.full_like(ref.updates[a], 2.0))
    ctx = seen[0]
    assert (ctx.t, ctx.client) == (T_ADV, 0)
    assert torch.equal(ctx.start, setup.w0) and torch.equal(ctx.honest, ref.updates[0])
    assert torch.equal(ctx.group_start, setup.w0) and ctx.group_members == tuple(range(6))
    assert ctx.weight == pytest.approx(1 / 6)

    @register_attack("broken")
    def broken(ctx):
        return torch.zeros(3)

    with pytest.raises(ConfigError, match=r"'broken' must return a float update of shape \(260,\)"):
        local_round(prepare(config("broken"), ds), setup.w0, T_ADV)


# --- adaptive -----------------------------------------------------------------------------------


def _aggregate(start, updates, weights):
    return start + (weights.to(updates.dtype) @ updates) / float(weights.sum())


@pytest.mark.parametrize("model", ["logistic", "mlp"])
def test_adaptive_raises_target_margin_of_the_aggregate(ds, model):
    points, tc = [0, 1, 2, 3, 4], 2
    cfg = config("adaptive", {"points": points, "target_class": tc, "scale": 3.0},
                 **{"model.name": model, "model.hidden": 16})
    setup, clean = prepare(cfg, ds), prepare(clean_of(cfg), ds)
    X = model_inputs(ds, ds.x_test[points], setup.dtype)
    w = setup.w0
    loc, ref = local_round(setup, w, T_ADV), local_round(clean, w, T_ADV)
    attacked = _aggregate(w, loc.updates, setup.weights)
    honest = _aggregate(w, ref.updates, setup.weights)
    before = target_margin(setup.model, honest, X, tc)
    after = target_margin(setup.model, attacked, X, tc)
    assert bool((after > before).all()), (before, after)
    assert bool((after > 0).all())  # the chosen points now predict the target class
    # each attacker's contribution p_a u_a to the weighted mean moves the aggregate by exactly `scale`
    for a in ATTACKERS:
        contrib = torch.linalg.vector_norm(loc.updates[a].double()) * float(setup.weights[a])
        assert float(contrib) == pytest.approx(3.0, rel=1e-4)


def test_adaptive_uses_its_group(ds):
    """With group context (an ensemble), the attacker moves its group's aggregate from its group's model."""
    tc, points = 3, [5, 6]
    cfg = config("adaptive", {"points": points, "target_class": tc, "scale": 2.0})
    setup, clean = prepare(cfg, ds), prepare(clean_of(cfg), ds)
    X = model_inputs(ds, ds.x_test[points], setup.dtype)
    g0 = setup.w0
    members, pw = (0, 1, 2), torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    group = GroupInfo(start=g0, members=members, weights=pw, group=0)
    other = GroupInfo(start=g0, members=(3, 4, 5), weights=torch.ones(3, dtype=torch.float64), group=1)
    groups = [group if c in members else other for c in range(6)]
    loc = local_round(setup, g0, T_ADV, groups=groups)
    ref = local_round(clean, g0, T_ADV)
    rows = list(members)
    attacked = _aggregate(g0, loc.updates[rows], pw)
    honest = _aggregate(g0, ref.updates[rows], pw)
    assert bool((target_margin(setup.model, attacked, X, tc) > target_margin(setup.model, honest, X, tc)).all())
    # its weight in the group is 0.5: the update is the move / 0.5
    assert float(torch.linalg.vector_norm(loc.updates[0].double())) * 0.5 == pytest.approx(2.0, rel=1e-4)
    # attacker 3 weighs 1/3 in its group
    assert float(torch.linalg.vector_norm(loc.updates[3].double())) / 3 == pytest.approx(2.0, rel=1e-4)
    with pytest.raises(ConfigError, match="one entry per row"):
        local_round(setup, g0, T_ADV, groups=groups[:2])


# --- registry and options validation ------------------------------------------------------------


def test_registry_lists_kinds_and_rejects_unknown_names(ds):
    assert {"backdoor", "label-flip", "sign-flip", "gaussian", "adaptive"} <= set(attack_names())
    assert lookup_attack("backdoor").level == "backdoor" and lookup_attack("label-flip").level == "data"
    with pytest.raises(ConfigError, match=r"The 'attack.kind' parameter must be one of .*'sign-flip'.* Got 'nope' instead"):
        lookup_attack("nope")
    with pytest.raises(ConfigError, match=r"'attack.kind' parameter must be one of .*'adaptive'"):
        prepare(config("nope"), ds)
    with pytest.raises(ConfigError, match="attack level"):
        register_attack("x", lambda ctx: ctx.honest, level="backdoor")


@pytest.mark.parametrize("kind, options, match", [
    ("sign-flip", {"scal": 2}, r"'attack.options' parameter of attack 'sign-flip' must name its options \(scale\). Got 'scal'"),
    ("backdoor", {"scale": 2}, r"attack 'backdoor' must name its options \(none\). Got 'scale'"),
    ("sign-flip", {"scale": -1}, r"'attack.options.scale \(sign-flip\)' parameter must be a float in \[0, inf\). Got -1"),
    ("gaussian", {"scale": "big"}, r"'attack.options.scale \(gaussian\)' parameter must be a float"),
    ("label-flip", {"mode": "random"}, r"'attack.options.mode \(label-flip\)' parameter must be one of 'reverse', 'target'"),
    ("adaptive", {"points": [999]}, r"'attack.options.points\[0\] \(a test index\)' parameter must be an integer in \[0, 199\]"),
    ("adaptive", {"points": [[0.1, 0.2]]}, r"'attack.options.points\[0\]' parameter must have 64 features. Got 2"),
    ("adaptive", {"points": []}, r"must be a non-empty list"),
    ("adaptive", {"target_class": 4}, r"'attack.options.target_class \(adaptive\)' parameter must be an integer in \[0, 3\]"),
    ("adaptive", {"steps": 0}, r"'attack.options.steps \(adaptive\)' parameter must be an integer in \[1, inf\]"),
])
def test_options_are_validated_when_the_run_is_prepared(ds, kind, options, match):
    with pytest.raises(ConfigError, match=match):
        prepare(config(kind, options), ds)


def test_adaptive_options_resolve(ds):
    setup = prepare(config("adaptive", {"points": [7, [0.5] * 64]}), ds)
    o = setup.plan.attack_options
    assert o["target_class"] == setup.plan.target == 0 and o["scale"] == 1.0 and o["steps"] == 1
    torch.testing.assert_close(o["points"][0], model_inputs(ds, ds.x_test[[7]], torch.float64)[0])
    assert torch.equal(o["points"][1], torch.full((64,), 0.5, dtype=torch.float64))
    assert prepare(config("adaptive"), ds).plan.attack_options["points"].shape == (10, 64)  # default: first 10 test points


# --- the paper's backdoor is unchanged -----------------------------------------------------------


def _old_local_round(setup, params, t):
    """local_round as it was before attack kinds: poison the first q_B slots, swap the label, scale by gamma."""
    cfg, plan = setup.cfg, setup.plan
    idx = round_batches(setup.data, cfg.clients.batch_size, setup.tau, cfg.seed, t)
    bad = [plan.active(t) and plan.is_attacker(c) for c in range(setup.data.num_clients)]
    poison = None
    if plan.poison_per_batch > 0 and any(bad):
        deltas = torch.zeros(len(bad), setup.dataset.num_features, dtype=setup.dtype)
        for r in range(len(bad)):
            if bad[r]:
                deltas[r] = plan.local_triggers[r].delta.to(setup.dtype)
        poison = Poison(mask=poison_slots(idx, [r for r in range(len(bad)) if bad[r]], plan.poison_per_batch),
                        deltas=deltas, target=plan.target)
    updates, _ = local_updates(setup.model, params, setup.data, idx, cfg.clients.lr, poison, setup.dtype)
    for r in range(len(bad)):
        if bad[r]:
            updates[r] *= plan.gamma
    return updates


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("trigger", ["pixel", "dba"])
def test_backdoor_kind_is_the_paper_attack_bit_for_bit(tmp_path, ds, trigger):
    over = {"attack.trigger": trigger}
    default = resolve(None, None, {k: v for k, v in config(**over).to_dict().items() if k != "attack"} | {
        "attack": {k: v for k, v in config(**over).to_dict()["attack"].items() if k not in ("kind", "options")}})
    assert default.attack.kind == "backdoor" and default.attack.options == {}
    setup = prepare(default, ds)
    for t in (1, T_ADV):
        assert torch.equal(local_round(setup, setup.w0, t).updates, _old_local_round(setup, setup.w0, t))
    a = train(default, tmp_path / "default", dataset=ds)
    b = train(config(**over), tmp_path / "explicit", dataset=ds)
    assert torch.equal(a.final_params, b.final_params)
    for f in ("rounds.csv", "attack.json"):
        assert _digest(tmp_path / "default" / f) == _digest(tmp_path / "explicit" / f), f


# --- the paper's certificate does not apply to the other kinds ------------------------------------


@pytest.mark.parametrize("reading", ["coupled", "mixture", "paper"])
def test_certify_refuses_a_radius_under_other_kinds(tmp_path, ds, reading):
    from crfl.certify import certify_run

    cfg = config("sign-flip", {"scale": 2.0}, **{"certify.M": 50, "certify.num_test": 20, "certify.reading": reading,
                                                  "certify.training_samples": 4})
    res = train(cfg, tmp_path / "r", dataset=ds)
    assert [e["round"] for e in res.attack_log] == [T_ADV]
    summary = certify_run(tmp_path / "r", dataset=ds)
    a = summary["assumptions"]
    assert a["radius_certified"] is False and summary["certificate"]["radius_certified"] is False
    assert "attack kind 'sign-flip' is not the paper's backdoor" in a["note"]
    assert summary["results"]["clean"]["max_radius"] is None


# --- over Flower ---------------------------------------------------------------------------------


def test_flower_sign_flip_equals_simulator(tmp_path, ds):
    pytest.importorskip("flwr")
    from tests.test_flower import TOL, flower_run, simulator_models, small_config

    cfg = small_config(**{"attack.kind": "sign-flip", "attack.options": {"scale": 4.0}})
    setup, strategy, run = flower_run(cfg, ds, tmp_path / "flower")
    ref = simulator_models(prepare(cfg, ds))
    for t in range(1, cfg.server.rounds + 1):
        torch.testing.assert_close(strategy.models[t], ref[t], **TOL, msg=f"round {t}")
    # and the attack made a difference
    benign = simulator_models(prepare(cfg.replace(**{"attack.kind": "backdoor", "attack.poison_per_batch": 0,
                                                        "attack.gamma": 1.0, "attack.options": {}}), ds))
    assert not torch.allclose(ref[2], benign[2], **TOL)
