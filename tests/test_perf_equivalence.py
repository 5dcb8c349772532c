"""The fast paths of issue 20 compute what the reference implementations compute.

- the fused local SGD of the logistic model (crfl.local.linear_local_updates) against the generic
  batched step (crfl.clients.local_updates_generic) and whole training runs against runs on the generic path;
- the Monte Carlo inner loop against a plain per-chunk reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crfl import local
from crfl.clients import local_updates_generic, round_batches
from crfl.config import resolve
from crfl.setup import prepare
from tests.conftest import synthetic_images


def _setup(**over):
    base = {"data.num_clients": 5, "clients.batch_size": 16, "clients.local_epochs": 2, "clients.lr": 0.05,
            "server.rounds": 6, "attack.rounds": [3], "attack.poison_per_batch": 3, "data.partition": "dirichlet"}
    return prepare(resolve("mnist", None, {**base, **over}), synthetic_images(n_train=431, n_test=60, side=28))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bound", [None, 2.5])
@pytest.mark.parametrize("poisoned", [False, True])
def test_fused_linear_step_equals_the_generic_step(dtype, bound, poisoned):
    from crfl.clients import Poison, poison_slots

    s = _setup(**({"model.input_norm_bound": bound} if bound else {}))
    idx = round_batches(s.data, 16, s.tau, 1, 4)
    assert (idx < 0).any() and len(set(s.tau.tolist())) > 1  # padded slots, short batches, unequal tau_i
    g = torch.Generator().manual_seed(0)
    poison = None
    if poisoned:  # clients 0 and 2 poison 3 slots of every batch with their own trigger (clamped to the box)
        deltas = torch.zeros(s.data.num_clients, s.model.num_features, dtype=dtype)
        deltas[[0, 2]] = torch.rand(2, s.model.num_features, generator=g, dtype=dtype) * 0.8
        poison = Poison(mask=poison_slots(idx, [0, 2], 3), deltas=deltas, target=1)
    for params in (s.w0 * 3, torch.randn(s.data.num_clients, s.model.num_params, generator=g)):
        ref, ref_stats = local_updates_generic(s.model, params, s.data, idx, 0.05, poison, dtype)
        new, stats = local.linear_local_updates(s.model, params, s.data, idx, 0.05, dtype, poison)
        for k in ("count", "max_norm", "sum_norm"):
            np.testing.assert_allclose(getattr(stats, k), getattr(ref_stats, k), rtol=1e-12)
        assert (stats.count[[0, 2]] > 0).all() == poisoned
        # rounding only: each of the tau steps may round w (|w| <= max|params| + max|update|) differently
        eps, steps = torch.finfo(dtype).eps, idx.shape[1]
        atol = 10 * steps * eps * (float(params.abs().max()) + float(ref.abs().max()))
        assert new.dtype == dtype and new.shape == ref.shape
        torch.testing.assert_close(new, ref, rtol=0, atol=atol)
        assert float((new - ref).abs().max()) < 1e-3 * float(ref.abs().max())  # not both zero or tiny


def test_fused_training_equals_the_generic_training(tmp_path, monkeypatch):
    """Six rounds with an attack round: the final model and every logged number as on the generic path."""
    from crfl.train import train

    cfg = resolve("mnist", None, {"data.num_clients": 5, "clients.batch_size": 16, "clients.local_epochs": 2,
                                  "clients.lr": 0.05, "server.rounds": 6, "attack.rounds": [3], "attack.poison_per_batch": 3})
    ds = synthetic_images(n_train=400, n_test=60, side=28)
    calls = []
    real = local.linear_local_updates
    monkeypatch.setattr(local, "linear_local_updates", lambda *a, **k: calls.append(1) or real(*a, **k))
    fast = train(cfg, tmp_path / "fast", dataset=ds)
    assert len(calls) == 6  # every round, the attack round's poisoned slots too
    monkeypatch.setattr(local, "fused_linear_applies", lambda model: False)
    slow = train(cfg, tmp_path / "slow", dataset=ds)
    torch.testing.assert_close(fast.final_params, slow.final_params, rtol=1e-5, atol=1e-6)
    assert float((fast.final_params - slow.final_params).abs().max()) < 1e-4
    for a, b in zip(fast.records, slow.records):
        assert a["clean_acc"] == b["clean_acc"] and a["backdoor_acc"] == b["backdoor_acc"]
        assert np.isclose(a["norm_before_clip"], b["norm_before_clip"], rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# sweeps sharing a store of runs train a shared configuration once


def test_sweeps_sharing_a_run_store_train_and_certify_once(tmp_path, monkeypatch):
    import crfl.certify
    import crfl.train
    from crfl.sweep import sweep
    from tests.test_sweep import SPEC, strip, write_spec

    base = {**SPEC, "base": {**SPEC["base"], "set": {**SPEC["base"]["set"], "server.rounds": 3}}}
    a = write_spec(tmp_path / "a.yaml", {**base, "name": "a", "grid": {"attack.num_attackers": [1, 2]}})
    b = write_spec(tmp_path / "b.yaml", {**base, "name": "b", "grid": {"attack.num_attackers": [2, 3]},
                                          "certify": {"grid": {"certify.alpha": [0.001, 0.01]}}})
    trained, certified = [], []
    real_train, real_cert = crfl.train.train, crfl.certify.certify_run
    monkeypatch.setattr(crfl.train, "train", lambda cfg, out, **k: trained.append(out) or real_train(cfg, out, **k))
    monkeypatch.setattr(crfl.certify, "certify_run", lambda run, **k: certified.append(run) or real_cert(run, **k))
    store = tmp_path / "store"
    rows_a = sweep(a, tmp_path / "A", runs_dir=store, progress=False)
    rows_b = sweep(b, tmp_path / "B", runs_dir=store, progress=False)
    assert len(trained) == 3  # R = 1, 2, 3: the R = 2 run of sweep b is sweep a's
    assert len(certified) == 2 + 3  # b's (R = 2, alpha = 0.001) is a's certification
    assert len(list(store.iterdir())) == 3 and (tmp_path / "B" / "runs").resolve() == store.resolve()
    # the shared points' rows are the numbers an unshared sweep computes
    alone = sweep(b, tmp_path / "C", progress=False)
    assert strip(rows_b) == strip(alone) and len(rows_a) == 2
    # a sweep that already keeps its own runs is not silently switched to the store
    from crfl.validation import ConfigError

    with pytest.raises(ConfigError, match="'--runs' parameter must be the run store this sweep already uses"):
        sweep(b, tmp_path / "C", runs_dir=store, progress=False)


# ---------------------------------------------------------------------------------------------
# the per-round evaluation on a fixed subset of the test set


def test_subsampled_evaluation_is_the_accuracy_on_that_subset():
    from crfl.attacks import backdoor_test_mask
    from crfl.setup import eval_subset, evaluate, model_inputs

    s = _setup()
    ds = s.dataset
    params = s.w0 + 0.3 * torch.randn(s.model.num_params, generator=torch.Generator().manual_seed(3))
    n = len(ds.y_test)
    assert eval_subset(n, None) is None and eval_subset(n, n) is None
    sub = eval_subset(n, 17)
    assert len(sub) == 17 and sub[0] == 0 and sub[-1] == n - 1 and (np.diff(sub) > 0).all()
    for rows, points in ((np.arange(n), None), (sub, 17)):
        X = model_inputs(ds, ds.x_test[rows], s.dtype)
        y = torch.from_numpy(ds.y_test[rows])
        mask = backdoor_test_mask(y, s.plan.target)
        clean = float((s.model.predict(params, X) == y).double().mean())
        bd = float((s.model.predict(params, s.plan.trigger.apply(X[mask])) == s.plan.target).double().mean())
        assert evaluate(s, params, points) == (clean, bd)


def test_eval_points_changes_rounds_csv_only(tmp_path):
    from crfl.rundir import config_hash
    from crfl.setup import evaluate
    from crfl.train import train

    over = {"data.num_clients": 4, "clients.batch_size": 16, "server.rounds": 4, "attack.rounds": [2]}
    ds = synthetic_images(n_train=300, n_test=120, side=28)
    full = train(resolve("mnist", None, {**over, "run.eval_points": None}), tmp_path / "full", dataset=ds)
    sub = train(resolve("mnist", None, {**over, "run.eval_points": 30}), tmp_path / "sub", dataset=ds)
    assert config_hash(full.setup.cfg.to_dict()) == config_hash(sub.setup.cfg.to_dict())
    assert torch.equal(full.final_params, sub.final_params)
    assert full.records[-1]["clean_acc"] == sub.records[-1]["clean_acc"] == evaluate(full.setup, full.final_params)[0]
    assert [r["clean_acc"] for r in sub.records[:-1]] != [r["clean_acc"] for r in full.records[:-1]]


# ---------------------------------------------------------------------------------------------
# Monte Carlo votes: the blocked product, argmax and scatter-add count against a model-by-model reference


def _votes_reference(W, b, X, sigma, M, gen, models_per_chunk, dtype):
    """GetCounts written plainly: the same noise draws (one (m, D) block per chunk), one model at a time."""
    C, d = W.shape
    counts = torch.zeros(X.shape[0], C, dtype=torch.int64)
    Xd = X.to(dtype)
    for m0 in range(0, M, models_per_chunk):
        E = torch.randn((min(models_per_chunk, M - m0), C * d + C), generator=gen, dtype=dtype)
        for e in E:
            Wj = W.to(dtype) + sigma * e[: C * d].view(C, d)
            bj = b.to(dtype) + sigma * e[C * d :]
            pred = (Xd @ Wj.T + bj).argmax(dim=1)
            counts[torch.arange(len(pred)), pred] += 1
    return counts


def test_monte_carlo_votes_equal_a_model_by_model_reference():
    from crfl.smoothing import LINEAR_POINT_BLOCK, monte_carlo_counts_linear

    g = torch.Generator().manual_seed(5)
    C, d, n = 4, 30, 2 * LINEAR_POINT_BLOCK + 37  # several blocks of points, a short last one
    W, b = torch.randn(C, d, generator=g) * 0.3, torch.randn(C, generator=g) * 0.1
    X = torch.rand(n, d, generator=g)
    sigma, M, per = 0.2, 130, 50  # a short last chunk of models
    new = monte_carlo_counts_linear(W, b, X, sigma, M, torch.Generator().manual_seed(9), models_per_chunk=per,
                                    dtype=torch.float64)
    ref = _votes_reference(W, b, X, sigma, M, torch.Generator().manual_seed(9), per, torch.float64)
    assert torch.equal(new, ref)
    assert (new.sum(dim=1) == M).all() and (new > 0).sum(dim=1).float().mean() > 1.5  # noisy votes, not one class


# ---------------------------------------------------------------------------------------------
# one dataset load per `crfl run`


def test_crfl_run_loads_the_dataset_once(tmp_path, monkeypatch, capsys):
    import json

    import crfl.setup
    from crfl.cli import main

    loads = []
    real = crfl.setup.load_data
    monkeypatch.setattr(crfl.setup, "load_data", lambda cfg: loads.append(cfg.data.name) or real(cfg))
    out = tmp_path / "run"
    assert main(["run", "--preset", "demo", "--set", "server.rounds=3", "--set", "attack.rounds=[2]",
                 "--num-test", "50", "--out", str(out), "--quiet"]) == 0
    assert loads == ["mnist-5k"]
    s = json.loads((out / "summary.json").read_text())
    assert s["results"]["clean"]["points"] == 50
    # the certificate is the one `crfl certify` computes from the files (which loads the data itself)
    first = (out / "certificates_clean.csv").read_text()
    assert main(["certify", str(out), "--num-test", "50", "--quiet"]) == 0
    assert loads == ["mnist-5k", "mnist-5k"] and (out / "certificates_clean.csv").read_text() == first
