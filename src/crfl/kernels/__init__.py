"""Compiled kernels: small C++ sources next to this file, built on first use, with a torch fallback.

A kernel is a C++ file ``crfl/kernels/<name>.cpp`` exporting ``extern "C"`` functions over raw
pointers. :func:`load` compiles it once per machine with the system's C++ compiler into the user
cache (``CRFL_CACHE_DIR``, else ``$XDG_CACHE_HOME/crfl``, else ``~/.cache/crfl``; subfolder
``kernels/<key>``, the key hashing the source, the flags, the compiler's version and the CPU's
feature flags) and returns the library through :mod:`ctypes`, or None where no compiler is found
or the build fails (the caller then runs its torch version, and says so once in the log).
``CRFL_KERNELS=0`` turns every kernel off (the torch versions run); tests use it to compare both.

Arithmetic: the flags are ``-O3 -march=native -fopenmp-simd`` and nothing that relaxes IEEE
semantics (no ``-ffast-math``): every operation is correctly rounded in the standard model
(contracted multiply-adds are one rounding, which the standard model's bounds cover), sums may be
reordered only where a loop says ``#pragma omp simd reduction`` (docs/theory.md (g) step 7 allows
sums in any order), and ``exp`` is the C library's (within one ulp) or a kernel's own vector routine
whose error bound its comment proves (``linear_sgd``: 2.7 u). The build is atomic: a
compile writes a temporary file renamed into place, so concurrent processes (sweep workers) never
load a half-written library. A kernel may add flags of its own on a line
``// crfl-kernel-flags: -ffp-contract=off`` (normal.cpp: no fused multiply-adds, to match numpy bit
for bit); they are part of the source, hence of the cache key. The line is parsed strictly
(:func:`_own_flags`): a line that mentions the tag in another form, or a flag outside
:data:`OWN_FLAGS_ALLOWED`, refuses the build (the kernel is unavailable and the log says why) rather
than building without the flags.

Threads: ctypes releases the GIL during a foreign call, so :func:`parallel_for` runs a kernel on
disjoint slices of the work from ``torch.get_num_threads()`` Python threads; the kernels
themselves are single-threaded and their result does not depend on the split.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

log = logging.getLogger("crfl.kernels")

SOURCE_DIR = Path(__file__).resolve().parent
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC")

_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}
_pool: ThreadPoolExecutor | None = None


def enabled() -> bool:
    """False when ``CRFL_KERNELS`` is 0/off/false/no (read on every call, so tests can switch it)."""
    return os.environ.get("CRFL_KERNELS", "1").strip().lower() not in ("0", "off", "false", "no")


def _compiler() -> str | None:
    for cand in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cand and shutil.which(cand):
            return cand
    return None


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _cache_root() -> Path:
    if os.environ.get("CRFL_CACHE_DIR"):
        return Path(os.environ["CRFL_CACHE_DIR"]) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "crfl" / "kernels"


#: The flags a kernel may ask for (``// crfl-kernel-flags: ...``): only ones that keep or tighten IEEE
#: semantics (no fused multiply-adds; sqrt without errno is still the correctly rounded instruction).
OWN_FLAGS_ALLOWED = frozenset({"-ffp-contract=off", "-fno-math-errno"})
_FLAGS_TAG = re.compile(r"crfl-kernel-flags", re.IGNORECASE)
_FLAGS_LINE = re.compile(r"^\s*//\s*crfl-kernel-flags\s*:?(?P<flags>.*)$", re.IGNORECASE)


def _own_flags(text: bytes) -> list[str]:
    """The flags a kernel asks for: every line that mentions ``crfl-kernel-flags`` must read
    ``// crfl-kernel-flags: FLAG ...`` (spaces and the colon optional, any line of the file) with
    flags from :data:`OWN_FLAGS_ALLOWED`; anything else raises ValueError (the build is refused,
    never run without the flags: GCC would then contract multiply-adds)."""
    flags: list[str] = []
    for no, line in enumerate(text.decode("utf-8", "replace").splitlines(), 1):
        if not _FLAGS_TAG.search(line):
            continue
        m = _FLAGS_LINE.match(line)
        if m is None:
            raise ValueError(f"line {no} mentions crfl-kernel-flags but is not '// crfl-kernel-flags: FLAG ...': {line.strip()!r}")
        bad = [f for f in m["flags"].split() if f not in OWN_FLAGS_ALLOWED]
        if bad:
            raise ValueError(f"line {no} asks for {', '.join(bad)}; allowed: {', '.join(sorted(OWN_FLAGS_ALLOWED))}")
        flags += [f for f in m["flags"].split() if f not in flags]
    return flags


def _build(name: str, source: Path) -> Path | None:
    cxx = _compiler()
    if cxx is None:
        log.info("kernel %s: no C++ compiler found (c++, g++, clang++ or $CXX); using the torch version", name)
        return None
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as err:
        log.info("kernel %s: %s --version failed (%s); using the torch version", name, cxx, err)
        return None
    text = source.read_bytes()
    try:
        own = _own_flags(text)
    except ValueError as err:
        log.warning("kernel %s: its crfl-kernel-flags are refused (%s); using the torch version", name, err)
        return None
    key = hashlib.sha256(b"\0".join([
        text, " ".join(FLAGS).encode(), version.encode(), _cpu_flags().encode(), platform.machine().encode(),
    ])).hexdigest()[:20]
    target = _cache_root() / key / f"{name}.so"
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
    except OSError as err:
        log.info("kernel %s: cannot write the cache %s (%s); using the torch version", name, target.parent, err)
        return None
    try:
        res = subprocess.run([cxx, *FLAGS, *own, str(source), "-o", tmp], capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            log.warning("kernel %s: the build failed; using the torch version:\n%s", name, res.stderr[-2000:])
            return None
        os.replace(tmp, target)  # atomic: a concurrent loader sees the old state or the whole library
        return target
    except (OSError, subprocess.SubprocessError) as err:
        log.warning("kernel %s: the build failed (%s); using the torch version", name, err)
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(name: str, source: Path | None = None) -> ctypes.CDLL | None:
    """The compiled kernel ``name`` (``crfl/kernels/<name>.cpp``, or ``source``), or None (kernels
    off, no compiler, failed build). Built at most once per process and once per machine."""
    if not enabled():
        return None
    src = Path(source) if source is not None else SOURCE_DIR / f"{name}.cpp"
    key = f"{name}:{src}"
    with _lock:
        if key not in _loaded:
            path = _build(name, src)
            lib = None
            if path is not None:
                try:
                    lib = ctypes.CDLL(str(path))
                except OSError as err:
                    log.warning("kernel %s: cannot load %s (%s); using the torch version", name, path, err)
            _loaded[key] = lib
            log.debug("kernel %s: %s", name, path if lib is not None else "torch version")
        return _loaded[key]


def engine(name: str) -> str:
    """'compiled' or 'torch': which version of kernel ``name`` runs here (for provenance)."""
    return "compiled" if load(name) is not None else "torch"


def ptr(t: torch.Tensor) -> ctypes.c_void_p:
    """A contiguous CPU tensor's data pointer for a kernel argument."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("kernels take contiguous CPU tensors")
    return ctypes.c_void_p(t.data_ptr())


def parallel_for(n: int, fn: Callable[[int, int], None], threads: int | None = None) -> None:
    """Run ``fn(lo, hi)`` on [0, n) split into at most ``threads`` (default torch.get_num_threads())
    contiguous slices, one per thread; ``fn`` must call a kernel (which releases the GIL)."""
    global _pool
    k = max(1, min(n, threads if threads is not None else torch.get_num_threads()))
    if k == 1:
        if n > 0:
            fn(0, n)
        return
    with _lock:
        if _pool is None or _pool._max_workers < k:  # noqa: SLF001 (grow the pool when torch's thread count grows)
            _pool = ThreadPoolExecutor(max_workers=k, thread_name_prefix="crfl-kernel")
        pool = _pool
    bounds = [n * i // k for i in range(k + 1)]
    futures = [pool.submit(fn, bounds[i], bounds[i + 1]) for i in range(1, k)]
    fn(bounds[0], bounds[1])  # this thread takes the first slice
    for f in futures:
        f.result()
