"""The compiled local SGD of the logistic model (crfl/kernels/linear_sgd.cpp) computes what the
torch path (crfl.local.linear_local_updates_torch, the reference) computes, up to float rounding.

Cases: both compute dtypes; uint8 images and float32/float64 features; padded slots and whole padded
steps (idx -1, unequal tau_i); one start model per client (ensembles); C = 47 (class blocks and a
remainder); poisoned rounds (the attackers' rows stay on the torch path, the others take the kernel);
the split of the clients over threads does not change a bit; the engine is recorded in provenance.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from crfl import kernels, local
from crfl.clients import ClientData, Poison, poison_slots
from crfl.model import LinearModel

pytestmark = pytest.mark.skipif(kernels.load("linear_sgd") is None, reason="no C++ compiler: the kernel cannot be built")


def _data(storage: torch.dtype, n: int, d: int, C: int, seed: int = 0) -> ClientData:
    g = torch.Generator().manual_seed(seed)
    if storage == torch.uint8:
        x, scale = torch.randint(0, 256, (n, d), generator=g, dtype=torch.uint8), 255.0
    else:
        x, scale = torch.rand(n, d, generator=g, dtype=torch.float64).to(storage), 1.0
    y = torch.randint(0, C, (n,), generator=g)
    return ClientData(x=x, y=y, input_scale=scale, indices=(np.arange(n),))


def _idx(K: int, taus: list[int], n_B: int, n: int, seed: int = 1) -> np.ndarray:
    """Random rows, -1 after each client's tau_i steps and in a few single slots (short batches)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(K, max(taus), n_B))
    for k, tau in enumerate(taus):
        idx[k, tau:] = -1
    idx[0, 0, n_B // 2:] = -1  # a short batch
    return idx


def _check(model, params, data, idx, lr, dtype, poison=None):
    ref, ref_stats = local.linear_local_updates_torch(model, params, data, idx, lr, dtype, poison)
    new, stats = local.linear_local_updates(model, params, data, idx, lr, dtype, poison)
    assert new.dtype == dtype and new.shape == ref.shape
    # rounding only: each of the tau steps may round w (|w| <= max|params| + max|update|) differently
    eps, steps = torch.finfo(dtype).eps, idx.shape[1]
    atol = 10 * steps * eps * (float(params.abs().max()) + float(ref.abs().max()))
    torch.testing.assert_close(new, ref, rtol=0, atol=atol)
    assert float(ref.abs().max()) > 1e-3  # the clients moved: not both zero
    for k in ("count", "max_norm", "sum_norm"):
        np.testing.assert_allclose(getattr(stats, k), getattr(ref_stats, k), rtol=1e-12)
    return new, stats


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("storage", [torch.uint8, torch.float32, torch.float64])
def test_kernel_equals_the_torch_path(dtype, storage):
    d, C, n_B = 37, 10, 9  # d not a multiple of the vector length: padded pixel columns
    data = _data(storage, 300, d, C)
    model = LinearModel(d, C)
    idx = _idx(4, [5, 3, 5, 0], n_B, 300)  # unequal tau_i, a client without steps
    g = torch.Generator().manual_seed(2)
    assert local._linear_kernel(model, data, dtype) is not None
    _check(model, torch.randn(model.num_params, generator=g) * 0.3, data, idx, 0.1, dtype)
    starts = torch.randn(4, model.num_params, generator=g)  # one start model per client (an ensemble)
    new, _ = _check(model, starts, data, idx, 0.1, dtype)
    assert torch.equal(new[3], torch.zeros_like(new[3]))  # no steps: no update


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kernel_with_many_classes_and_images(dtype):
    """C = 47 (EMNIST bymerge: four full class blocks and a remainder), 28 x 28 uint8 images."""
    d, C, n_B = 784, 47, 21  # n_B odd: a single-row block of the logits
    data = _data(torch.uint8, 500, d, C, seed=3)
    model = LinearModel(d, C)
    idx = _idx(3, [4, 2, 3], n_B, 500, seed=4)
    params = torch.randn(model.num_params, generator=torch.Generator().manual_seed(5)) * 0.05
    _check(model, params, data, idx, 0.5, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_poisoned_rows_stay_on_the_torch_path(dtype, monkeypatch):
    """An attack round: the attackers' rows (poisoned slots) take the torch path, the clean rows the
    kernel; together they equal the torch path on all rows, poison statistics included."""
    d, C, n_B, K = 64, 10, 12, 5
    data = _data(torch.uint8, 400, d, C, seed=6)
    model = LinearModel(d, C)
    idx = _idx(K, [4, 4, 3, 4, 2], n_B, 400, seed=7)
    g = torch.Generator().manual_seed(8)
    deltas = torch.zeros(K, d, dtype=dtype)
    deltas[[1, 3]] = torch.rand(2, d, generator=g, dtype=dtype) * 0.5
    poison = Poison(mask=poison_slots(idx, [1, 3], 4), deltas=deltas, target=2)
    calls = []
    real = local.linear_local_updates_torch
    monkeypatch.setattr(local, "linear_local_updates_torch", lambda *a, **k: calls.append(a[3].shape[0]) or real(*a, **k))
    starts = torch.randn(K, model.num_params, generator=g) * 0.1
    _, stats = local.linear_local_updates(model, starts, data, idx, 0.2, dtype, poison)
    assert calls == [2]  # only the two attackers' rows went to torch
    assert (stats.count[[1, 3]] > 0).all() and (stats.count[[0, 2, 4]] == 0).all()
    monkeypatch.setattr(local, "linear_local_updates_torch", real)
    _check(model, starts, data, idx, 0.2, dtype, poison)


def test_thread_split_changes_no_bit():
    data = _data(torch.uint8, 300, 50, 10, seed=9)
    model = LinearModel(50, 10)
    idx = _idx(7, [3, 3, 2, 3, 1, 3, 3], 8, 300, seed=10)
    params = torch.randn(model.num_params, generator=torch.Generator().manual_seed(11)) * 0.1
    threads = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(local.linear_local_updates(model, params, data, idx, 0.1, torch.float64)[0])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_kernel_off_and_input_bound_take_the_torch_path(monkeypatch):
    from crfl.model import InputBound

    data = _data(torch.uint8, 100, 20, 4)
    model = LinearModel(20, 4)
    assert local.linear_engine(model, data, torch.float64) == "compiled"
    assert local.linear_engine(LinearModel(20, 4, input_bound=InputBound(2.0)), data, torch.float64) == "torch"
    monkeypatch.setenv("CRFL_KERNELS", "0")
    assert local._linear_kernel(model, data, torch.float64) is None
    assert local.linear_engine(model, data, torch.float64) == "torch"


@pytest.mark.parametrize("off", [False, True])
def test_provenance_names_the_engine(tmp_path, monkeypatch, off):
    import yaml

    from crfl.config import resolve
    from crfl.train import train
    from tests.conftest import synthetic_images

    if off:
        monkeypatch.setenv("CRFL_KERNELS", "0")
    cfg = resolve("mnist", None, {"data.num_clients": 3, "clients.batch_size": 8, "clients.local_iters": 2,
                                  "server.rounds": 2, "attack.rounds": [1]})
    train(cfg, tmp_path / "run", dataset=synthetic_images(n_train=120, n_test=20, side=28))
    prov = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["provenance"]
    assert prov["kernels"] == {"linear_sgd": "torch" if off else "compiled"}


@pytest.mark.parametrize("name, dtype, xmin", [("float64", np.float64, -707.0), ("float32", np.float32, -86.0)])
def test_softmax_exp_within_its_proven_bound(name, dtype, xmin):
    """The kernel's vector exp (exp_inplace) against e^x in long double: within the 2.7 u its comment proves
    (docs/theory.md (g) step 7, (A3) allows EXP_ULPS = 4 u); lanes it does not take (underflow, -inf, NaN,
    the tail) are the C library's exp."""
    import ctypes

    fn = getattr(kernels.load("linear_sgd"), f"linear_sgd_exp_{name}")
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_int64], None
    rng = np.random.default_rng(12)
    # the edge arguments first (a whole vector of them, so they are measured on the vector path): the ends of the
    # domain, -0, the reduction's boundaries -ln2/2 and -(k + 1/2) ln2 just inside, tiny |x|
    edges = [xmin, 0.0, -0.0, -np.log(2) / 2, -1.5 * np.log(2), -2.5 * np.log(2), -1e-300 if name == "float64" else -1e-40,
             -np.finfo(dtype).tiny, xmin / 2, -1e-8, -0.5, -1.0, -10.0, -100.0 if name == "float64" else -50.0,
             np.nextafter(dtype(xmin), dtype(0)), -np.log(2)]
    x = np.concatenate([edges, rng.uniform(xmin, 0, 200_000), -rng.exponential(1.0, 100_000),
                        np.linspace(xmin, 0, 99_984)]).astype(dtype)
    assert len(x) % 16 == 0
    y = x.copy()
    fn(y.ctypes.data, len(y))
    ref = np.exp(x.astype(np.longdouble))
    u = float(np.finfo(dtype).eps) / 2
    rel = np.abs((y.astype(np.longdouble) - ref) / ref) / u
    assert float(rel.max()) <= 2.7, (float(rel.max()), x[rel.argmax()])
    assert float(rel.max()) > 0.3  # it is measured: an exact (or unrounded) result would be suspicious
    # a vector with a lane outside [xmin, 0], and a tail: the C library's exp, NaN stays NaN
    odd = np.array([-1.0, -800.0, -np.inf, np.nan, -2.0, -3.0, -4.0, -5.0] * 2 + [-0.5, -1.5, -746.0], dtype=dtype)
    out = odd.copy()
    fn(out.ctypes.data, len(out))
    want = np.array([math.exp(float(v)) if not np.isnan(v) else np.nan for v in odd]).astype(dtype)
    np.testing.assert_allclose(out, want, rtol=4 * u, atol=0)
    assert np.isnan(out[3]) and out[2] == 0.0
    # whole vectors just below the vector path's domain (results near or below the smallest normal, where a
    # scaling by 2^k would round): the C library's exp, bit for bit -- pins the fallback threshold xmin
    low = (np.linspace(xmin - 1.0, xmin - 0.01, 32) if name == "float32" else np.linspace(-744.0, -707.5, 32)).astype(dtype)
    out = low.copy()
    fn(out.ctypes.data, len(out))
    want = np.array([math.exp(float(v)) for v in low]).astype(dtype)
    assert np.array_equal(out, want)


@pytest.mark.slow  # compiles two kernels (the C++ compiler is a process)
@pytest.mark.skipif(not {"avx512f", "avx512dq"} <= set(kernels._cpu_flags().split()),
                    reason="the perturbed lines are the AVX-512 paths, which -march=native compiles only on such a CPU")
@pytest.mark.parametrize("where, old, new", [
    ("the pixels' conversion in registers", "return (V)_mm512_cvtepi64_pd(_mm512_cvtepu8_epi64(_mm_loadl_epi64((const __m128i*)p)));",
     "return (V)_mm512_mul_pd(_mm512_cvtepi64_pd(_mm512_cvtepu8_epi64(_mm_loadl_epi64((const __m128i*)p))), _mm512_set1_pd(1 + 1e-6));"),
    ("the vector exp", "const __m512d t = _mm512_fmadd_pd(_mm512_mul_pd(r, r), q, r);",
     "const __m512d t = _mm512_fmadd_pd(_mm512_mul_pd(r, r), _mm512_mul_pd(q, _mm512_set1_pd(1 + 1e-6)), r);"),
])
def test_a_planted_error_fails_the_comparison(tmp_path, monkeypatch, where, old, new):
    """The comparison with the torch path detects a 1e-6 relative error planted in the kernel's new parts."""
    src = (kernels.SOURCE_DIR / "linear_sgd.cpp").read_text()
    assert src.count(old) == 1, f"{where}: the code to perturb is not in the kernel any more"
    planted = tmp_path / "linear_sgd.cpp"
    planted.write_text(src.replace(old, new))
    monkeypatch.setenv("CRFL_CACHE_DIR", str(tmp_path / "cache"))
    lib = kernels.load("linear_sgd", source=planted)
    assert lib is not None
    real = kernels.load
    monkeypatch.setattr(kernels, "load", lambda name, source=None: lib if name == "linear_sgd" else real(name, source))
    d, C, n_B = 784, 10, 20
    data = _data(torch.uint8, 300, d, C, seed=13)
    model = LinearModel(d, C)
    idx = _idx(2, [3, 3], n_B, 300, seed=14)
    params = torch.randn(model.num_params, generator=torch.Generator().manual_seed(15)) * 0.01
    with pytest.raises(AssertionError):
        _check(model, params, data, idx, 0.1, torch.float64)
    monkeypatch.setattr(kernels, "load", real)
    _check(model, params, data, idx, 0.1, torch.float64)  # the kernel as it is passes
