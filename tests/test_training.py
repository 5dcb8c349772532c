"""Training (Algorithm 1): clients, attack, server, the run directory, resume and determinism."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from crfl.attacks import build_plan, pixel_delta
from crfl.clients import (
    ClientData, Poison, client_batches, local_iterations, local_updates, poison_slots, round_batches,
)
from crfl.config import Config, resolve
from crfl.model import LinearModel, ModuleModel
from crfl.schedule import RhoSchedule, SigmaSchedule, contraction_schedule
from crfl.server import clip_to_norm, server_step
from crfl.train import train
from crfl.validation import ConfigError
from tests.conftest import synthetic_images


# --- an independent reference: a plain loop over clients and steps with autograd ----------------


def local_updates_loop(
    model,
    params: torch.Tensor,
    data,
    idx: np.ndarray,
    lr: float,
    poison=None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reference implementation: a plain loop over clients and steps with autograd (for tests)."""
    K, tau_max, _ = idx.shape
    out = []
    for k in range(K):
        w = params.to(dtype).clone()
        for s in range(tau_max):
            rows = idx[k, s][idx[k, s] >= 0]
            if len(rows) == 0:
                continue
            X = data.inputs(torch.from_numpy(rows), dtype)
            Y = data.y[torch.from_numpy(rows)].clone()
            if poison is not None:
                pm = poison.mask[k, s][: len(rows)]
                X[pm] = torch.clamp(X[pm] + poison.deltas[k].to(dtype), poison.low, poison.high)
                Y[pm] = poison.target
            w_req = w.clone().requires_grad_(True)
            loss = F.cross_entropy(model.logits(w_req.unsqueeze(0), X.unsqueeze(0))[0], Y)
            (g,) = torch.autograd.grad(loss, w_req)
            w = w - lr * g
        out.append(w - params.to(dtype))
    return torch.stack(out)


def _client_data(ds, sizes):
    starts = np.cumsum([0] + list(sizes))
    idx = tuple(np.arange(starts[i], starts[i + 1]) for i in range(len(sizes)))
    return ClientData(torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train), 255.0, idx)


def small_config(**over) -> Config:
    base = {
        "data.num_clients": 6, "clients.batch_size": 20, "clients.lr": 0.05, "server.rounds": 6,
        "attack.rounds": [3], "attack.poison_per_batch": 4, "attack.gamma": 5.0,
        "server.rho": {"kind": "linear", "a": 0.5, "b": 3.0, "cap": 6.0}, "server.sigma": 0.01,
        "certify.M": 50, "attack.pixels": [[7, 7], [6, 6], [7, 5], [5, 7]],
    }
    base.update(over)
    return resolve(None, None, base)


# --- clients -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_batched_clients_equal_per_client_loop(kind):
    """All clients at once == a plain loop over clients with autograd (unequal tau_i, short batches, poison)."""
    ds = synthetic_images(n_train=300, side=6, classes=3)
    sizes = [57, 40, 23, 80]  # short last batches and different tau_i
    data = _client_data(ds, sizes)
    tau = local_iterations(sizes, batch_size=16, local_iters=None, local_epochs=2)
    assert tau.tolist() == [8, 6, 4, 10]
    idx = round_batches(data, 16, tau, seed=3, t=2)
    if kind == "linear":
        model = LinearModel(36, 3)
    else:
        torch.manual_seed(0)
        model = ModuleModel(nn.Sequential(nn.Linear(36, 8), nn.Tanh(), nn.Linear(8, 3)), 36, 3)
    params = model.init(torch.Generator().manual_seed(1))
    delta = pixel_delta((6, 6), [(5, 5), (4, 4)], 0.3)
    deltas = torch.zeros(4, 36)
    deltas[1] = delta.float()
    poison = Poison(mask=poison_slots(idx, [1], 5), deltas=deltas, target=2)
    fast, stats = local_updates(model, params, data, idx, lr=0.1, poison=poison)
    slow = local_updates_loop(model, params, data, idx, lr=0.1, poison=poison)
    assert fast.shape == (4, model.num_params)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)
    assert stats.count[1] > 0 and stats.count[0] == 0


def test_batches_cover_each_epoch_once_and_short_last_batch():
    rng = np.random.default_rng(0)
    b = client_batches(num_samples=23, batch_size=10, tau=6, rng=rng)  # 2 epochs of 3 batches
    assert b.shape == (6, 10)
    for epoch in (b[:3], b[3:]):
        vals = epoch[epoch >= 0]
        assert sorted(vals.tolist()) == list(range(23))
    assert (b[2] >= 0).sum() == 3 and (b[5] >= 0).sum() == 3


def test_exactly_qB_poisoned_per_batch():
    """q_B triggered samples in every full batch; all samples of a short batch with fewer than q_B."""
    ds = synthetic_images(n_train=200)
    data = _client_data(ds, [53, 53, 53])
    tau = local_iterations(data.sizes, 10, None, 1)  # 6 batches: 5 full + one of 3
    idx = round_batches(data, 10, tau, seed=0, t=1)
    mask = poison_slots(idx, [2], q_B=4).numpy()
    per_batch = mask[2].sum(axis=1)
    assert per_batch.tolist() == [4, 4, 4, 4, 4, 3]
    assert mask[0].sum() == 0 and mask[1].sum() == 0
    assert mask[idx < 0].sum() == 0


# --- server -------------------------------------------------------------------------------


def test_clip_bounds_norm_and_keeps_small_models():
    w = torch.tensor([3.0, 4.0])
    c, n = clip_to_norm(w, 2.5)
    assert n == pytest.approx(5.0)
    assert float(c.norm()) == pytest.approx(2.5)
    torch.testing.assert_close(c, w / 2)
    c2, _ = clip_to_norm(w, 10.0)
    torch.testing.assert_close(c2, w)


def test_server_noise_statistics_and_last_round_clean():
    """eps_t ~ N(0, sigma^2 I): mean and variance of D = 200k coordinates within 5 standard errors."""
    D, sigma = 200_000, 0.03
    w = torch.zeros(D, dtype=torch.float64)
    up = torch.full((D,), 1e-3, dtype=torch.float64)
    out, info = server_step(w, up, t=1, rounds=5, rho_t=1e9, sigma_t=sigma, seed=7)
    noise = (out - up).numpy()
    assert abs(noise.mean()) < 5 * sigma / math.sqrt(D)
    # var of the sample variance of a Gaussian: 2 sigma^4 / (D - 1)
    assert abs(noise.var() - sigma**2) < 5 * math.sqrt(2 * sigma**4 / (D - 1))
    last, info_T = server_step(w, up, t=5, rounds=5, rho_t=1e9, sigma_t=sigma, seed=7)
    torch.testing.assert_close(last, up)
    assert info_T.sigma == 0.0
    again, _ = server_step(w, up, t=1, rounds=5, rho_t=1e9, sigma_t=sigma, seed=7)
    assert torch.equal(again, out)
    clipped, inf2 = server_step(w, torch.full((D,), 1.0, dtype=torch.float64), t=5, rounds=5, rho_t=2.0, sigma_t=sigma, seed=7)
    assert float(clipped.norm()) <= 2.0 + 1e-9 and inf2.clipped


def test_rho_schedules():
    lin = RhoSchedule.from_config({"kind": "linear", "a": 0.1, "b": 2.0, "cap": 15.0})
    assert lin(1) == pytest.approx(2.1) and lin(100) == pytest.approx(12.0) and lin(200) == 15.0
    assert RhoSchedule.from_config(4.0)(77) == 4.0
    s = SigmaSchedule.from_config([0.1, 0.2, 0.3], rounds=4)
    assert s(2) == 0.2
    rhos, sigmas = contraction_schedule(lin, SigmaSchedule.from_config(0.01, 100), t_adv=98, rounds=100, sigma_T=0.5)
    assert rhos == pytest.approx([11.9, 12.0]) and sigmas == [0.01, 0.5]
    assert contraction_schedule(lin, SigmaSchedule.from_config(0.01, 10), t_adv=10, rounds=10, sigma_T=0.5) == ([], [])


# --- a whole round by hand ----------------------------------------------------------------------


def test_fedavg_round_equals_hand_computation(tmp_path):
    """Two clients, one sample each, one step from w = 0: the FedAvg round worked out in numpy."""
    from crfl.data import Dataset

    x = np.array([[255, 0, 0], [0, 255, 255]], dtype=np.uint8)
    y = np.array([1, 0])
    ds = Dataset("hand", x, y, x, y, num_classes=2, input_scale=255.0, feature_names=("a", "b", "c"),
                 class_names=("0", "1"))
    cfg = resolve(None, None, {
        "data.num_clients": 2, "data.partition": "iid", "clients.batch_size": 1, "clients.local_iters": 1,
        "clients.lr": 0.5, "attack.num_attackers": 0, "server.rounds": 1, "server.rho": 100.0,
        "server.sigma": 0.0, "model.init": "zeros", "attack.trigger": "loan", "attack.features": ["a"],
        "attack.poison_per_batch": 0,
    })
    res = train(cfg, tmp_path / "run", dataset=ds)
    # at w = 0, P = (1/2, 1/2); grad W = (P - e_y) x^T, grad b = P - e_y
    xs = x.astype(float) / 255
    upd = []
    for xi, yi in zip(xs, y):
        g = np.array([0.5, 0.5]) - np.eye(2)[yi]
        upd.append(-0.5 * np.concatenate([np.outer(g, xi).ravel(), g]))
    expected = np.mean(upd, axis=0)
    np.testing.assert_allclose(res.final_params.numpy(), expected, atol=1e-7)


# --- attack -------------------------------------------------------------------------------


def test_pixel_trigger_norm_and_dba_parts():
    d = pixel_delta((28, 28), [(23, 25), (24, 24), (25, 23), (25, 25)], 0.1)
    assert float(d.norm()) == pytest.approx(0.1)
    assert float(d[23 * 28 + 25]) == pytest.approx(0.05)
    plan = build_plan(num_clients=5, attackers=[0, 3], rounds=(2,), poison_per_batch=2, batch_size=10, target=0,
                      num_classes=10, gamma=3.0, kind="dba", magnitude=0.1, image_shape=(28, 28), feature_names=None,
                      num_features=784)
    parts = [plan.local_triggers[0].delta, plan.local_triggers[3].delta]
    torch.testing.assert_close(parts[0] + parts[1], plan.trigger.delta)
    assert float((parts[0] * parts[1]).abs().sum()) == 0.0


def test_attack_raises_backdoor_accuracy_without_noise(tmp_path, tiny_images):
    cfg = small_config(**{"server.sigma": 0.0, "attack.gamma": 6.0, "attack.poison_per_batch": 10,
                          "attack.magnitude": 1.5, "server.rho": 50.0})
    res = train(cfg, tmp_path / "r", dataset=tiny_images)
    bd = [r["backdoor_acc"] for r in res.records]
    assert bd[2] > bd[1] + 0.3, bd
    log = res.attack_log[0]
    assert log["round"] == 3 and log["attackers"] == [0]
    assert log["p"] == pytest.approx([1 / 6])
    assert log["tau"] == [5] and log["poison_ratio"] == [0.5]
    assert 0 < log["measured"]["actual_delta_norm_max"][0] <= 1.5 + 1e-6  # clamping can only shrink the trigger
    assert log["measured"]["poison_ratio_per_step"] == log["poison_ratio"]  # server-owned ratio = observed one


# --- run directory, resume, determinism -------------------------------------------------------


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_seed_same_bytes_and_resume_equals_uninterrupted(tmp_path, tiny_images):
    cfg = small_config()
    a = train(cfg, tmp_path / "a", dataset=tiny_images)
    b = train(cfg, tmp_path / "b", dataset=tiny_images)
    assert torch.equal(a.final_params, b.final_params)
    assert _digest(tmp_path / "a" / "rounds.csv") == _digest(tmp_path / "b" / "rounds.csv")
    assert _digest(tmp_path / "a" / "model_final.pt") == _digest(tmp_path / "b" / "model_final.pt")
    # interrupted after round 4, then resumed
    train(cfg, tmp_path / "c", dataset=tiny_images, stop_after=4)
    assert not (tmp_path / "c" / "model_final.pt").exists()
    c = train(None, tmp_path / "c", resume=True, dataset=tiny_images)
    assert torch.equal(a.final_params, c.final_params)
    assert _digest(tmp_path / "a" / "rounds.csv") == _digest(tmp_path / "c" / "rounds.csv")
    other = train(cfg.replace(seed=2), tmp_path / "d", dataset=tiny_images)
    assert not torch.equal(a.final_params, other.final_params)


def test_final_model_is_clipped_and_run_dir_complete(tmp_path, tiny_images):
    cfg = small_config()
    res = train(cfg, tmp_path / "r", dataset=tiny_images)
    out = tmp_path / "r"
    for f in ("config.yaml", "rounds.csv", "attack.json", "model_final.pt", "checkpoint.pt", "summary.json"):
        assert (out / f).is_file(), f
    assert float(res.final_params.norm()) <= res.setup.rho(cfg.server.rounds) + 1e-5
    assert [r["round"] for r in res.records] == list(range(1, 7))
    assert not list(out.glob(".*.tmp"))
    with pytest.raises(ConfigError, match="already holds a run"):
        train(cfg, out, dataset=tiny_images)


# --- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "over, match",
    [
        ({"server.sigma": -0.1}, r"'server.sigma' parameter must be a float in \[0, inf\). Got -0.1"),
        ({"attack.poison_per_batch": 30}, r"'attack.poison_per_batch' parameter must be an integer in \[0, 20\]. Got 30"),
        ({"clients.lr": 0}, r"'clients.lr' parameter must be a float in \(0, inf\). Got 0"),
        ({"data.partition": "shards"}, r"'data.partition' parameter must be one of 'dirichlet', 'iid', 'natural'. Got 'shards'"),
        ({"attack.rounds": [7]}, r"'attack.rounds' parameter must be an integer in \[1, 6\]. Got 7"),
        ({"server.rounds": 0}, r"'server.rounds' parameter must be an integer in \[1, inf\]. Got 0"),
        ({"attack.gama": 3}, r"Unknown parameter\(s\) \['gama'\] in section 'attack'"),
        ({"certify.bound": "wilson"}, r"'certify.bound' parameter must be one of 'hoeffding', 'clopper-pearson'"),
    ],
)
def test_bad_config_values_name_parameter_and_value(over, match):
    with pytest.raises(ConfigError, match=match):
        small_config(**over)


def test_bad_values_found_against_the_data(tmp_path, tiny_images):
    with pytest.raises(ConfigError, match=r"'attack.attackers' parameter must be an integer in \[0, 5\]. Got 9"):
        train(small_config(**{"attack.attackers": [9]}), tmp_path / "a", dataset=tiny_images)
    with pytest.raises(ConfigError, match=r"'attack.target' parameter must be an integer in \[0, 3\]. Got 11"):
        train(small_config(**{"attack.target": 11}), tmp_path / "b", dataset=tiny_images)
    with pytest.raises(ConfigError, match=r"'aggregation.name' parameter must be one of"):
        train(small_config(**{"aggregation.name": "mean"}), tmp_path / "c", dataset=tiny_images)
    with pytest.raises(ConfigError, match=r"'attack.pixels\[0\] row' parameter must be an integer in \[0, 7\]. Got 23"):
        train(small_config(**{"attack.pixels": [[23, 1]]}), tmp_path / "d", dataset=tiny_images)


def test_setup_caches_are_independent_of_call_order():
    """certify's training-input statistics before the first evaluation (this order raised KeyError: 'y')."""
    from crfl.readings.base import training_input_stats
    from crfl.setup import evaluate, prepare

    ds = synthetic_images(n_train=200, side=28)
    cfg = resolve(None, None, {"data.num_clients": 4, "server.rounds": 2, "attack.rounds": [1]})
    first, second = prepare(cfg, ds), prepare(cfg, ds)
    stats = training_input_stats(first)
    x = ds.x_train.reshape(len(ds.x_train), -1).astype(np.float64) / ds.input_scale
    assert stats == pytest.approx((np.linalg.norm(x, axis=1).max(), x.min(), x.max()), rel=1e-12)
    assert first.train_input_stats == stats and first.eval_inputs == {}
    acc = evaluate(first, first.w0)
    assert acc == evaluate(second, second.w0)  # the other order
    assert training_input_stats(second) == stats and "y" in first.eval_inputs
