"""The round's work outside the local SGD, made cheaper without changing a result (issue 20).

The batches are the draws of the loop they replace (same generator calls, same positions), the
aggregation's finiteness check refuses exactly what the entry-by-entry check refuses, and the
options check still rejects unknown options.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from crfl import aggregation
from crfl.clients import ClientData, client_batches, client_round_batches, round_batches
from crfl.rng import numpy_generator
from crfl.validation import ConfigError


def _loop_client_batches(num_samples: int, batch_size: int, tau: int, rng: np.random.Generator) -> np.ndarray:
    """The per-step loop the vectorised ``client_batches`` replaced: one permutation per epoch, cut in order."""
    per_epoch = math.ceil(num_samples / batch_size)
    out = np.full((tau, batch_size), -1, dtype=np.int64)
    s = 0
    while s < tau:
        perm = rng.permutation(num_samples)
        for j in range(per_epoch):
            if s >= tau:
                break
            chunk = perm[j * batch_size : (j + 1) * batch_size]
            out[s, : len(chunk)] = chunk
            s += 1
    return out


@pytest.mark.parametrize("n, n_B, tau", [
    (3000, 100, 30),  # the paper's MNIST client: one epoch of full batches
    (23, 10, 6),  # two epochs with a short last batch
    (23, 10, 4),  # a second epoch cut after its first batch
    (57, 16, 11),  # tau not a multiple of the batches per epoch
    (5, 10, 3),  # fewer samples than a batch: every batch short
    (40, 10, 1),
    (40, 10, 0),
])
def test_client_batches_are_the_loops_draws(n, n_B, tau):
    fast = client_batches(n, n_B, tau, numpy_generator(5, "batches", 3, 2))
    slow = _loop_client_batches(n, n_B, tau, numpy_generator(5, "batches", 3, 2))
    assert fast.dtype == np.int64 and fast.shape == (tau, n_B)
    np.testing.assert_array_equal(fast, slow)


def test_client_batches_leave_the_generator_where_the_loop_leaves_it():
    """The same number of draws: a later draw from the generator agrees too."""
    g1, g2 = numpy_generator(1, "batches", 1, 0), numpy_generator(1, "batches", 1, 0)
    client_batches(57, 16, 11, g1)
    _loop_client_batches(57, 16, 11, g2)
    assert g1.integers(1 << 62) == g2.integers(1 << 62)


def test_empty_shard_has_only_empty_batches():
    """(The loop never ended on an empty shard with tau > 0.)"""
    out = client_batches(0, 10, 3, numpy_generator(0, "batches", 1, 0))
    assert out.shape == (3, 10) and (out == -1).all()


def test_round_batches_are_the_per_client_loops_draws():
    rng = np.random.default_rng(0)
    sizes = [3000, 57, 40, 5]  # full batches (3000, 40: no padded slot), short last batches (57, 5)
    perm = rng.permutation(sum(sizes))
    shards = tuple(np.sort(perm[sum(sizes[:i]) : sum(sizes[: i + 1])]).astype(np.int64) for i in range(len(sizes)))
    data = ClientData(torch.zeros(sum(sizes), 2, dtype=torch.uint8), torch.zeros(sum(sizes), dtype=torch.int64), 255.0, shards)
    tau = np.array([30, 8, 4, 2])
    idx = round_batches(data, 10, tau, seed=9, t=7)
    assert idx.shape == (4, 30, 10) and idx.dtype == np.int64
    for i, shard in enumerate(shards):
        pos = _loop_client_batches(len(shard), 10, int(tau[i]), numpy_generator(9, "batches", 7, i))
        want = np.where(pos >= 0, shard[np.maximum(pos, 0)], -1)
        np.testing.assert_array_equal(idx[i, : tau[i]], want)
        np.testing.assert_array_equal(client_round_batches(shard, i, 10, int(tau[i]), 9, 7), want)
        assert (idx[i, tau[i] :] == -1).all()


# --- aggregation's input checks ----------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_update_is_refused_naming_its_row(bad):
    u = torch.randn(5, 40, dtype=torch.float64)
    u[3, 17] = bad
    with pytest.raises(ConfigError, match=r"client index \[3\]"):
        aggregation.aggregate("fedavg", u, torch.ones(5))


def test_opposite_infinities_in_one_row_are_refused():
    u = torch.zeros(3, 4, dtype=torch.float64)
    u[1, 0], u[1, 1] = math.inf, -math.inf
    with pytest.raises(ConfigError, match=r"client index \[1\]"):
        aggregation.aggregate("fedavg", u, torch.ones(3))


def test_finite_updates_whose_row_sum_overflows_are_accepted():
    """Finite entries with an infinite row sum: the fast check falls back to the exact one."""
    big = torch.finfo(torch.float32).max
    u = torch.full((3, 4), big, dtype=torch.float32)
    u[0] = 0.0
    assert not torch.isfinite(u.sum(dim=1)).all()
    r = aggregation.aggregate("median", u, torch.ones(3))
    assert torch.equal(r.update, torch.full((4,), big))


def test_unknown_option_still_refused_and_known_ones_pass():
    u = torch.randn(6, 3, dtype=torch.float64)
    with pytest.raises(ConfigError, match="'options'"):
        aggregation.aggregate("fedavg", u, torch.ones(6), beta=0.1)
    assert aggregation.aggregate("krum", u, torch.ones(6), f=1).weights is not None
