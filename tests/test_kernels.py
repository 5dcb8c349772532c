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


# ---------------------------------------------------------------------------------------------
# a kernel's own flags (// crfl-kernel-flags: ...): parsed strictly, from an allow-list


def test_own_flags_are_parsed_strictly():
    f = kernels._own_flags
    assert f(b"// crfl-kernel-flags: -ffp-contract=off -fno-math-errno\nint x;\n") == ["-ffp-contract=off", "-fno-math-errno"]
    # tolerated: a header line above it, no space, no colon, upper case, indentation
    assert f(b"// a header\n//crfl-kernel-flags -ffp-contract=off\n") == ["-ffp-contract=off"]
    assert f(b"\n  //  CRFL-KERNEL-FLAGS : -fno-math-errno\n") == ["-fno-math-errno"]
    assert f(b"// no tag here\nint x;  // -ffp-contract=off\n") == []
    for bad in (b"// crfl-kernel-flags: -ffast-math\n",               # not allowed (relaxes IEEE)
                b"// crfl-kernel-flags: -ffp-contract=fast\n",        # not allowed
                b"// crfl-kernel-flags: -ffp-contract=off, -O0\n",    # a stray token is refused, not dropped
                b"/* crfl-kernel-flags: -ffp-contract=off */\n",      # the tag in another form
                b"int x;\n// see the crfl-kernel-flags line\n"):
        with pytest.raises(ValueError, match="line"):
            f(bad)


def test_a_refused_flag_makes_the_kernel_unavailable_and_says_why(tmp_path, cache, caplog):
    src = _source(tmp_path, "// crfl-kernel-flags: -ffast-math\n" + AXPY, name="fast")
    with caplog.at_level("WARNING", logger="crfl.kernels"):
        assert kernels.load("fast", src) is None
    assert "fast: its crfl-kernel-flags are refused" in caplog.text and "-ffast-math" in caplog.text
    assert not cache.exists() or not list(cache.rglob("*.so"))


MAD = r"""
extern "C" double mad(double a, double b, double c) { return a * b + c; }
"""


def test_the_flags_line_reaches_the_compiler(tmp_path, cache):
    if kernels._compiler() is None:
        pytest.skip("no C++ compiler on this machine")
    # a = 1 + 2^-30, b = 1 - 2^-30: a * b = 1 - 2^-60 rounds to 1, so a * b - 1 is 0 unfused, -2^-60 fused
    a, b, c = 1 + 2.0 ** -30, 1 - 2.0 ** -30, -1.0

    def mad(name, text):
        lib = kernels.load(name, _source(tmp_path, text, name=name))
        lib.mad.argtypes, lib.mad.restype = [ctypes.c_double] * 3, ctypes.c_double
        return lib.mad(a, b, c)

    assert mad("mad_off", "// a header line\n//crfl-kernel-flags -ffp-contract=off\n" + MAD) == 0.0
    # without the flag GCC contracts it where the CPU has FMA (as here): the line above is what prevents it
    assert mad("mad", MAD) in (0.0, -(2.0 ** -60))
