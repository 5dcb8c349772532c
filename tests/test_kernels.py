"""The compiled-kernel loader (crfl.kernels): builds, caches, falls back, splits work."""

from __future__ import annotations

import ctypes
import threading

import pytest
import torch

from crfl import kernels

AXPY = r"""
#include <cstdint>
extern "C" void axpy(int64_t n, double a, const double* x, double* y) {
    for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}
"""


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CRFL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(kernels, "_loaded", {})
    return tmp_path / "cache"


def _source(tmp_path, text=AXPY, name="axpy"):
    src = tmp_path / f"{name}.cpp"
    src.write_text(text)
    return src


def _axpy(lib, a, x, y):
    lib.axpy.argtypes = [ctypes.c_int64, ctypes.c_double, ctypes.c_void_p, ctypes.c_void_p]
    lib.axpy(x.numel(), a, kernels.ptr(x), kernels.ptr(y))


def test_builds_once_and_computes(tmp_path, cache):
    if kernels._compiler() is None:
        pytest.skip("no C++ compiler on this machine")
    src = _source(tmp_path)
    lib = kernels.load("axpy", src)
    assert lib is not None
    built = list(cache.rglob("axpy.so"))
    assert len(built) == 1
    x = torch.arange(10, dtype=torch.float64)
    y = torch.ones(10, dtype=torch.float64)
    _axpy(lib, 2.0, x, y)
    assert torch.equal(y, 1 + 2 * torch.arange(10, dtype=torch.float64))
    # a second load in this process is the same library; a new process (cleared table) reuses the file
    assert kernels.load("axpy", src) is lib
    mtime = built[0].stat().st_mtime_ns
    kernels._loaded.clear()
    assert kernels.load("axpy", src) is not None
    assert built[0].stat().st_mtime_ns == mtime
    # an edited source is a new key: rebuilt beside the old one
    kernels._loaded.clear()
    src.write_text(AXPY + "\n// edited\n")
    assert kernels.load("axpy", src) is not None
    assert len(list(cache.rglob("axpy.so"))) == 2


def test_concurrent_loads_build_one_library(tmp_path, cache):
    if kernels._compiler() is None:
        pytest.skip("no C++ compiler on this machine")
    src = _source(tmp_path)
    got = []
    threads = [threading.Thread(target=lambda: got.append(kernels.load("axpy", src))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 4 and got[0] is not None and all(g is got[0] for g in got)
    assert not [p for p in cache.rglob("*") if p.is_file() and p.name != "axpy.so"]  # no temporary left


def test_off_switch_and_missing_compiler(tmp_path, cache, monkeypatch):
    src = _source(tmp_path)
    monkeypatch.setenv("CRFL_KERNELS", "0")
    assert kernels.load("axpy", src) is None
    assert not kernels.enabled()
    monkeypatch.setenv("CRFL_KERNELS", "1")
    monkeypatch.setattr(kernels, "_compiler", lambda: None)
    assert kernels.load("axpy", src) is None
    assert not cache.exists() or not list(cache.rglob("*.so"))


def test_broken_source_falls_back(tmp_path, cache, caplog):
    if kernels._compiler() is None:
        pytest.skip("no C++ compiler on this machine")
    src = _source(tmp_path, "this is not C++", name="broken")
    with caplog.at_level("WARNING", logger="crfl.kernels"):
        assert kernels.load("broken", src) is None
    assert "build failed" in caplog.text
    assert not list(cache.rglob("*.so"))  # the failed build left nothing to load


def test_ptr_refuses_non_contiguous():
    with pytest.raises(ValueError, match="contiguous"):
        kernels.ptr(torch.zeros(4, 4).T)


@pytest.mark.parametrize("n,threads", [(0, 2), (1, 2), (7, 2), (7, 3), (100, 4), (5, 1)])
def test_parallel_for_covers_each_index_once(n, threads):
    seen = torch.zeros(n, dtype=torch.int64)
    lock = threading.Lock()

    def fn(lo, hi):
        assert 0 <= lo < hi <= n
        with lock:
            seen[lo:hi] += 1

    kernels.parallel_for(n, fn, threads=threads)
    assert torch.equal(seen, torch.ones(n, dtype=torch.int64))
