"""Numerics shared by the simulator and the Flower server: the clip never zeros a model, zero weight sums are refused."""

from __future__ import annotations

import pytest
import torch

from crfl.aggregation import ZeroWeightSum, aggregate
from crfl.server import clip_to_norm, server_step


def test_clip_of_huge_float32_model_keeps_its_direction():
    w = torch.full((7850,), 3e38, dtype=torch.float32)
    w[::2] = -3e38
    clipped, norm = clip_to_norm(w, 2.5)
    assert norm == pytest.approx(3e38 * 7850**0.5, rel=1e-6)
    assert clipped.dtype == torch.float32
    assert bool(torch.isfinite(clipped).all())
    assert float(torch.linalg.vector_norm(clipped.double())) == pytest.approx(2.5, rel=1e-6)
    torch.testing.assert_close(torch.sign(clipped), torch.sign(w))


def test_server_step_on_huge_update_is_rho_sized():
    w_prev = torch.zeros(100, dtype=torch.float32)
    update = torch.full((100,), 3.0e38, dtype=torch.float32)
    new, info = server_step(w_prev, update, t=1, rounds=3, rho_t=1.0, sigma_t=0.0, seed=1)
    assert info.clipped and float(torch.linalg.vector_norm(new.double())) == pytest.approx(1.0, rel=1e-6)


def test_clip_refuses_non_finite_model():
    w = torch.ones(5)
    w[2] = float("nan")
    with pytest.raises(ValueError, match="1 NaN or infinite entries"):
        clip_to_norm(w, 1.0)


def test_clip_below_rho_is_identity():
    w = torch.tensor([0.3, 0.4])
    clipped, norm = clip_to_norm(w, 1.0)
    assert norm == pytest.approx(0.5) and torch.equal(clipped, w) and clipped is not w


def test_zero_weight_sum_is_refused_by_name():
    u = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(ZeroWeightSum, match="The 'client_weights' parameter must have a positive sum; the 3 weights"):
        aggregate("fedavg", u, torch.zeros(3, dtype=torch.float64))
