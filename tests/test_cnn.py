"""The ``cnn`` model: the grouped-convolution batch over clients against plain autograd on nn.Modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from crfl.certify import certify_run
from crfl.config import resolve
from crfl.model import CNNModel, LeNet, ModuleModel, build_model, model_names
from crfl.train import train
from crfl.validation import ConfigError
from tests.conftest import synthetic_images


def _reference_net(side: int, num_classes: int, params: torch.Tensor, dtype: torch.dtype) -> nn.Module:
    """An independent LeNet with one client's flat parameters (parameters_to_vector layout)."""
    net = LeNet(side, num_classes).to(dtype)
    torch.nn.utils.vector_to_parameters(params.clone(), net.parameters())
    return net


def _problem(side: int, K: int, n: int, dtype: torch.dtype, seed: int = 0):
    model = build_model("cnn", side * side, 5)
    g = torch.Generator().manual_seed(seed)
    P = torch.stack([model.init(g, dtype) for _ in range(K)])
    P = P + 0.05 * torch.randn(P.shape, generator=g, dtype=dtype)  # rows differ beyond the init's scale
    X = torch.rand(K, n, side * side, generator=g, dtype=dtype)
    Y = torch.randint(0, 5, (K, n), generator=g)
    W = torch.rand(K, n, generator=g, dtype=dtype)
    return model, P, X, Y, W


@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float64, 1e-10, 1e-12), (torch.float32, 1e-5, 1e-6)])
@pytest.mark.parametrize("side", [8, 28])
@pytest.mark.parametrize("K", [1, 3])
def test_loss_grad_equals_per_client_autograd(K, side, dtype, rtol, atol):
    """Row k of the batched gradient == torch.autograd on an nn.Module holding client k's parameters."""
    model, P, X, Y, W = _problem(side, K, n=7, dtype=dtype)
    got = model.loss_grad(P, X, Y, W)
    assert got.shape == (K, model.num_params) and got.dtype == dtype
    for k in range(K):
        net = _reference_net(side, 5, P[k], dtype)
        loss = (F.cross_entropy(net(X[k]), Y[k], reduction="none") * W[k]).sum()
        ref = torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(net.parameters()))])
        torch.testing.assert_close(got[k], ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("side", [8, 28])
def test_logits_and_predict_equal_the_module(side):
    model, P, X, _, _ = _problem(side, 3, n=9, dtype=torch.float64, seed=1)
    Z = model.logits(P, X)
    assert Z.shape == (3, 9, 5)
    for k in range(3):
        ref = _reference_net(side, 5, P[k], torch.float64)(X[k])
        torch.testing.assert_close(Z[k], ref, rtol=1e-10, atol=1e-12)
        assert torch.equal(model.predict(P[k], X[k]), ref.argmax(dim=1))


def test_chunks_and_vmap_give_the_same_gradient():
    """One client per chunk (chunk_images < n), all in one chunk, and torch.func's vmap(grad) agree."""
    model, P, X, Y, W = _problem(8, 5, n=6, dtype=torch.float64, seed=2)
    whole = model.loss_grad(P, X, Y, W)
    small = CNNModel(model.net, 64, 5, chunk_images=4)
    assert small._rows(6) == 1
    torch.testing.assert_close(small.loss_grad(P, X, Y, W), whole, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(small.logits(P, X), model.logits(P, X), rtol=1e-12, atol=1e-14)
    vm = ModuleModel(model.net.double(), 64, 5)
    torch.testing.assert_close(vm.loss_grad(P, X, Y, W), whole, rtol=1e-10, atol=1e-12)


def test_geometry_and_parameter_count():
    """LeNet-5's shapes on 28x28 (28 -> 14 -> 10 -> 5); padded second convolution on 8x8 (8 -> 4 -> 4 -> 2)."""
    assert "cnn" in model_names()
    m28 = build_model("cnn", 784, 10)
    assert m28.net.fc1.in_features == 16 * 5 * 5 and not m28.is_linear and m28.name == "cnn"
    assert m28.num_params == (6 * 25 + 6) + (16 * 6 * 25 + 16) + (400 * 64 + 64) + (64 * 10 + 10)
    m8 = build_model("cnn", 64, 4, hidden=32, channels=(4, 8))
    assert m8.net.fc1.in_features == 8 * 2 * 2 and m8.net.fc1.out_features == 32
    assert m8.init(torch.Generator(), kind="zeros").abs().sum() == 0
    a = m8.init(torch.Generator().manual_seed(5))
    assert torch.equal(a, m8.init(torch.Generator().manual_seed(5)))
    assert not torch.equal(a, m8.init(torch.Generator().manual_seed(6)))
    assert a[: 4 * 25].abs().max() <= 1 / 5  # conv1: U(-1/sqrt(25), 1/sqrt(25))


@pytest.mark.parametrize(
    "d,opts,match",
    [
        (50, {}, r"'model.name' parameter 'cnn' needs square images.*num_features = 50"),
        (9, {}, r"side >= 4.*num_features = 9"),
        (64, {"hidden": 0}, r"'model.hidden' parameter must be an integer in \[1, inf\]. Got 0"),
        (64, {"channels": (4,)}, r"'model.channels' parameter must be a pair of integers >= 1. Got \(4,\)"),
        (64, {"channels": (4, 0)}, r"'model.channels' parameter must be an integer in \[1, inf\]. Got 0"),
    ],
)
def test_bad_options_are_refused(d, opts, match):
    with pytest.raises(ConfigError, match=match):
        build_model("cnn", d, 4, **opts)


def test_train_and_certify_end_to_end(tmp_path):
    """`model.name: cnn` through the simulator (all clients batched) and Monte Carlo smoothing."""
    ds = synthetic_images(n_train=400, n_test=100, side=8, classes=4, seed=4)
    cfg = resolve(None, None, {
        "model.name": "cnn", "model.hidden": 32, "data.num_clients": 4, "clients.batch_size": 20, "clients.lr": 0.1,
        "clients.local_epochs": 2, "server.rounds": 6, "attack.num_attackers": 0, "server.sigma": 0.001,
        "server.rho": 100.0, "certify.sigma_T": 0.001, "certify.M": 50,
        "certify.method": "monte-carlo", "attack.pixels": [[7, 7], [6, 6]],
    })
    res = train(cfg, tmp_path / "r", dataset=ds)
    assert res.setup.model.name == "cnn"
    assert res.records[-1]["clean_acc"] >= 0.9  # the synthetic classes light up separate pixel blocks
    s = certify_run(tmp_path / "r", dataset=ds)
    assert s["smoothing"]["method"] == "monte-carlo"
    assert s["certificate"]["radius_certified"] is False
    assert s["results"]["clean"]["smoothed_accuracy"] >= 0.9


@pytest.mark.parametrize("side", [8, 28])
def test_logits_shared_equal_the_module_per_model(side):
    """m models on the same inputs (Monte Carlo smoothing's noisy models), in chunks of points."""
    model, P, X, _, _ = _problem(side, 4, n=11, dtype=torch.float64, seed=3)
    model = CNNModel(model.net.double(), side * side, 5, chunk_images=12)  # 3 points per chunk
    Z = model.logits_shared(P, X[0])
    assert Z.shape == (4, 11, 5)
    for k in range(4):
        torch.testing.assert_close(Z[k], _reference_net(side, 5, P[k], torch.float64)(X[0]), rtol=1e-10, atol=1e-12)
    assert model.logits_shared(P, X[0, :0]).shape == (4, 0, 5)
