"""The ensemble of G group models and the client-level certificate (crfl.ensemble).

The partition certificate is checked against a brute-force search over every way m groups can
change their votes; the sampled one against exact binomial coefficients and by its coverage
over many simulated ensembles; the batched round against a per-group loop; and the certificate
is attacked by replacing the affected groups' models with models that vote for the runner-up.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from crfl import aggregation, ensemble, rundir
from crfl.certify import certify_run
from crfl.config import resolve
from crfl.ensemble import ABSTAIN, Groups, certify_votes, delta_m, partition_certified, sampled_certified, vote_counts
from crfl.local import local_round
from crfl.setup import prepare
from crfl.train import SimulatorRound, run_round, simulator_round, train
from crfl.validation import ConfigError
from tests.conftest import synthetic_images
from tests.support.integrity import reseal


def ens_config(**over):
    base = {
        "data.name": "synthetic", "data.num_clients": 20, "server.rounds": 4, "attack.num_attackers": 0,
        "attack.pixels": [[6, 6], [7, 7]], "attack.target": 0, "clients.batch_size": 10, "clients.lr": 0.1,
        "ensemble.kind": "partition", "ensemble.groups": 5,
    }
    base.update(over)
    return resolve(None, None, base)


# ---------------------------------------------------------------------------------------------
# the partition certificate: exact, against brute force


def _brute_m_star(votes: tuple[int, ...], C: int) -> int:
    """The largest m such that no change of at most m groups' votes changes the plurality (ties: smallest)."""
    G = len(votes)
    pred = int(np.argmax(np.bincount(votes, minlength=C)))
    best = -1
    for m in range(G + 1):
        for S in itertools.combinations(range(G), m):
            for new in itertools.product(range(C), repeat=m):
                v = list(votes)
                for g, c in zip(S, new):
                    v[g] = c
                if int(np.argmax(np.bincount(v, minlength=C))) != pred:
                    return best
        best = m
    return best


@pytest.mark.parametrize("G, C", [(1, 2), (3, 2), (4, 3), (5, 3), (6, 2), (6, 4)])
def test_partition_m_star_equals_brute_force(G, C):
    rng = np.random.default_rng(G * 10 + C)
    cases = {tuple(sorted(rng.integers(0, C, size=G))) for _ in range(60)} | {tuple([C - 1] * G), tuple(range(C))[:G]}
    for votes in cases:
        counts = np.bincount(votes, minlength=C)[None, :]
        pred, m = partition_certified(counts)
        assert int(pred[0]) == int(np.argmax(counts[0]))
        assert int(m[0]) == _brute_m_star(votes, C), (votes, int(m[0]))


def test_partition_hand_cases():
    # 7 votes A=class 1, 3 votes class 0: class 0 wins ties, so 7 - m > 3 + m: m <= 1
    pred, m = partition_certified(np.array([[3, 7, 0]]))
    assert (int(pred[0]), int(m[0])) == (1, 1)
    # 7 votes class 0 and 3 votes class 1: 7 - m >= 3 + m: m <= 2
    pred, m = partition_certified(np.array([[7, 3, 0]]))
    assert (int(pred[0]), int(m[0])) == (0, 2)
    # a tie between classes 0 and 2 goes to 0, and any one changed vote breaks it
    pred, m = partition_certified(np.array([[2, 0, 2]]))
    assert (int(pred[0]), int(m[0])) == (0, 0)


def test_vote_counts():
    P = np.array([[0, 1, 2], [0, 1, 1], [2, 1, 1]])
    assert vote_counts(P, 3).tolist() == [[2, 0, 1], [0, 3, 0], [0, 2, 1]]


# ---------------------------------------------------------------------------------------------
# the sampled certificate


def test_delta_m_is_one_minus_the_binomial_ratio():
    for N, k in [(10, 1), (10, 3), (100, 10), (1000, 20)]:
        for m in [0, 1, 2, 5, N - k, N - k + 1, N]:
            want = 1.0 - math.comb(N - m, k) / math.comb(N, k) if N - m >= k else 1.0
            assert float(delta_m(N, k, m)) == pytest.approx(want, rel=1e-12, abs=1e-15), (N, k, m)


def test_sampled_m_star_is_the_largest_m():
    N, k = 200, 10
    rng = np.random.default_rng(0)
    pa = rng.uniform(0, 1, 500)
    pb = rng.uniform(0, 1, 500) * (1 - pa)
    m = sampled_certified(pa, pb, N, k)
    for i in range(len(pa)):
        ok = [mm for mm in range(N + 1) if pa[i] - pb[i] > 2 * (1 - math.comb(N - mm, k) / math.comb(N, k) if N - mm >= k else 2)]
        assert int(m[i]) == (max(ok) if ok else ABSTAIN)


def test_sampled_certificate_covers_the_true_ensemble():
    """Over many simulated ensembles of G models with known vote probabilities, the stated m* is wrong
    (the true p_A - p_B <= 2 delta_{m*}, or c_A is not the true top class) at most alpha of the time."""
    N, k, G, alpha = 100, 5, 50, 0.1
    groups = Groups("sampled", N, tuple((0,) * 1 for _ in range(G)), clients_per_model=k)
    rng = np.random.default_rng(7)
    p = np.array([0.62, 0.3, 0.08])
    trials, bad = 2000, 0
    for _ in range(trials):
        preds = rng.choice(3, size=(G, 1), p=p)
        cert = certify_votes(groups, vote_counts(preds, 3), alpha)
        m = int(cert.m_star[0])
        if m >= 0 and (int(cert.prediction[0]) != 0 or p[0] - p[1] <= 2 * float(delta_m(N, k, m))):
            bad += 1
    # binomial tolerance: alpha * trials + 3 standard deviations
    assert bad <= alpha * trials + 3 * math.sqrt(alpha * (1 - alpha) * trials)


# ---------------------------------------------------------------------------------------------
# groups


def test_groups_are_the_servers_and_reproducible():
    g1 = ensemble.partition_groups(23, 5, seed=3)
    assert g1 == ensemble.partition_groups(23, 5, seed=3) and g1 != ensemble.partition_groups(23, 5, seed=4)
    flat = sorted(c for m in g1.members for c in m)
    assert flat == list(range(23)) and {len(m) for m in g1.members} == {4, 5}
    s = ensemble.sampled_groups(50, 8, 6, sample_seed=11)
    assert all(len(set(m)) == 6 for m in s.members) and s == ensemble.sampled_groups(50, 8, 6, sample_seed=11)
    a = ensemble.fix_sample_seed(ens_config(**{"ensemble.kind": "sampled", "ensemble.clients_per_model": 4}))
    b = ensemble.fix_sample_seed(ens_config(**{"ensemble.kind": "sampled", "ensemble.clients_per_model": 4}))
    assert a.ensemble.sample_seed is not None and a.ensemble.sample_seed != b.ensemble.sample_seed
    with pytest.raises(ConfigError, match="'ensemble.groups' parameter must be an integer in \\[1, 20\\]"):
        ensemble.partition_groups(20, 21, seed=1)
    with pytest.raises(ConfigError, match="'ensemble.clients_per_model'"):
        ens_config(**{"ensemble.kind": "sampled"})


# ---------------------------------------------------------------------------------------------
# training: one batched round for the G models


@pytest.mark.parametrize("kind, rule", [("partition", "fedavg"), ("sampled", "fedavg"), ("partition", "median")])
def test_batched_round_equals_a_loop_over_groups(kind, rule):
    ds = synthetic_images()
    over = {"ensemble.kind": kind, "ensemble.groups": 4, "aggregation.name": rule, "clients.weighting": "samples"}
    if kind == "sampled":
        over.update({"ensemble.clients_per_model": 6, "ensemble.sample_seed": 5})
    setup = prepare(ens_config(**over), ds)
    step = simulator_round(setup)
    params = step.init_params() + 0.01 * torch.randn(4, setup.model.num_params, generator=torch.Generator().manual_seed(0))
    out = step(params, 2)
    for g, members in enumerate(step.groups.members):
        loc = local_round(setup, params[g], 2, list(members))
        agg = aggregation.aggregate(rule, loc.updates.double(), setup.weights[list(members)])
        torch.testing.assert_close(out.params[g], params[g] + agg.update.float(), rtol=1e-5, atol=1e-6)


def test_one_group_of_everyone_is_the_global_model():
    ds = synthetic_images()
    over = {"ensemble.groups": 1, "ensemble.server_step": True, "server.sigma": 0.0,
            "server.rho": {"kind": "linear", "a": 0.0, "b": 1e6}}
    setup = prepare(ens_config(**over), ds)
    ens, single = simulator_round(setup), SimulatorRound(setup)
    a, b = ens.init_params(), single.init_params()
    for t in range(1, 4):
        a, b = ens(a, t).params, single(b, t).params
        torch.testing.assert_close(a[0], b, rtol=1e-5, atol=1e-6)


def test_ensemble_run_resumes_and_certifies(tmp_path):
    ds = synthetic_images()
    cfg = ens_config(**{"server.rounds": 5})
    ref = train(cfg, tmp_path / "ref", dataset=ds)
    part = train(cfg, tmp_path / "r", dataset=ds, stop_after=2)
    assert not part.finished
    again = train(None, tmp_path / "r", resume=True, dataset=ds)
    assert torch.equal(again.final_params, ref.final_params) and ref.final_params.shape == (5, setup_params(cfg, ds))
    assert (tmp_path / "r" / "rounds.csv").read_bytes() == (tmp_path / "ref" / "rounds.csv").read_bytes()
    s = certify_run(tmp_path / "r", dataset=ds)
    c = s["certificate"]
    assert c["reading"] == "client-level" and c["kind"] == "partition" and c["client_level_certified"] is True
    assert c["radius_certified"] is False and s["client_level"]["clean"]["points"] == len(ds.y_test)
    curve = s["client_level"]["clean"]["curve"]
    assert curve[0]["m"] == 0 and all(a["certified_accuracy"] >= b["certified_accuracy"] for a, b in zip(curve, curve[1:]))
    # the groups in model_final.pt are bound to the configuration's rule
    final = torch.load(tmp_path / "r" / rundir.MODEL, weights_only=True)
    final["ensemble"]["members"][0], final["ensemble"]["members"][1] = final["ensemble"]["members"][1], final["ensemble"]["members"][0]
    torch.save(final, tmp_path / "r" / rundir.MODEL)
    reseal(tmp_path / "r", rundir.MODEL)  # past the integrity record (tests/test_integrity.py), to the groups' check
    with pytest.raises(ConfigError, match="records groups that the configuration's rule does not give"):
        certify_run(tmp_path / "r", dataset=ds)


def setup_params(cfg, ds):
    return prepare(cfg, ds).model.num_params


# ---------------------------------------------------------------------------------------------
# trying to break it: the affected groups' models replaced by models that vote for the runner-up


def _voter(setup, cls: int) -> torch.Tensor:
    """A linear model that predicts ``cls`` at every input (W = 0, a large bias on cls)."""
    p = torch.zeros(setup.model.num_params, dtype=setup.dtype)
    _, b = setup.model.split(p)
    b[cls] = 1e3
    return p


def test_replaced_groups_never_flip_a_certified_point_and_m_star_is_tight(tmp_path):
    ds = synthetic_images(n_test=120)
    cfg = ens_config(**{"ensemble.groups": 10, "server.rounds": 3, "clients.lr": 0.02})
    res = train(cfg, tmp_path / "r", dataset=ds)
    setup = res.setup
    X = torch.from_numpy(ds.x_test).to(setup.dtype) / ds.input_scale
    preds = ensemble.ensemble_predictions(setup, res.final_params, X)
    cert = certify_votes(ensemble.build_groups(setup.cfg, 20), vote_counts(preds, ds.num_classes), 0.01)
    C = ds.num_classes
    checked = flipped = 0
    for i in range(len(X)):
        A, m = int(cert.prediction[i]), int(cert.m_star[i])
        voters_a = [g for g in range(10) if preds[g, i] == A]
        for B in range(C):
            if B == A:
                continue
            for mm in range(0, min(m, len(voters_a)) + 1):  # every m <= m*: the worst groups to control
                P = res.final_params.clone()
                for g in voters_a[:mm]:
                    P[g] = _voter(setup, B)
                got = ensemble.plurality(vote_counts(ensemble.ensemble_predictions(setup, P, X[i : i + 1]), C))[0]
                assert got == A, (i, mm, B)
                checked += 1
        # m* + 1 groups that voted c_A, now voting for the strongest competitor, flip the point
        counts = cert.counts[i].copy()
        counts[A] = -1
        B = int(np.argmax(counts))
        if m + 1 <= len(voters_a):
            P = res.final_params.clone()
            for g in voters_a[: m + 1]:
                P[g] = _voter(setup, B)
            got = ensemble.plurality(vote_counts(ensemble.ensemble_predictions(setup, P, X[i : i + 1]), C))[0]
            flipped += int(got != A)
            assert got != A, (i, m)
    assert checked > 100 and flipped > 0


# ---------------------------------------------------------------------------------------------
# sweeps of ensembles: certified accuracy against m in results.csv and a figure


def test_ensemble_sweep_writes_client_level_rows_and_a_figure(tmp_path):
    import yaml

    from crfl.io import read_csv
    from crfl.plots import plot_sweep
    from crfl.sweep import sweep

    spec = {
        "name": "ens", "title": "ensemble sweep",
        "base": {"preset": "demo", "set": {"server.rounds": 2, "data.num_clients": 12, "attack.num_attackers": 0,
                                           "ensemble.kind": "partition", "certify.num_test": 200}},
        "grid": {"ensemble.groups": [3, 6]},
        "malicious": [0, 1, 2],
    }
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    rows = sweep(tmp_path / "s.yaml", tmp_path / "out", jobs=1, progress=False)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    got = read_csv(tmp_path / "out" / "results.csv")
    for r in got:
        assert r["certificate"] == "client-level" and r["radius_certified"] == "False"
        accs = [float(r[f"clean_cert_acc@m={m}"]) for m in (0, 1, 2)]
        assert accs == sorted(accs, reverse=True) and accs[0] == pytest.approx(float(r["clean_ensemble_acc"]), abs=0.05)
    # G = 3 certifies at most m = 1 (3 - m > m), so nothing at m = 2
    g3 = next(r for r in got if r["ensemble.groups"] == "3")
    assert float(g3["clean_cert_acc@m=2"]) == 0.0
    figs = plot_sweep(tmp_path / "out")
    assert any(p.name == "ens-client-level.png" for p in figs)


def test_cnn_ensemble_votes_equal_each_models_own_prediction():
    ds = synthetic_images()
    setup = prepare(ens_config(**{"model.name": "cnn", "ensemble.groups": 3}), ds)
    P = torch.stack([setup.model.init(torch.Generator().manual_seed(g)) for g in range(3)])
    X = torch.from_numpy(ds.x_test[:50]).float() / ds.input_scale
    got = ensemble.ensemble_predictions(setup, P, X, chunk=7)
    for g in range(3):
        assert got[g].tolist() == setup.model.predict(P[g], X).tolist()


@pytest.mark.parametrize("which", ["mlp", "module"])
def test_ensemble_trains_and_certifies_any_model(tmp_path, which):
    ds = synthetic_images()
    over = {"server.rounds": 2, "ensemble.groups": 4}
    module = None
    if which == "mlp":
        over["model.name"] = "mlp"
    else:
        module = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, ds.num_classes))
    res = train(ens_config(**over), tmp_path / "r", dataset=ds, module=module)
    assert res.final_params.shape[0] == 4 and not res.setup.model.is_linear
    s = certify_run(tmp_path / "r", dataset=ds, module=module)
    assert s["certificate"]["reading"] == "client-level" and s["client_level"]["clean"]["ensemble_accuracy"] > 0.5
