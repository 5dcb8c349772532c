"""The decoded-data cache (crfl.data.cache): hits return the decoded arrays, a changed source or a
damaged entry is never served, entries are written atomically, unwritable folders fall back."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest

from crfl.data import cache, images, load_dataset
from tests.test_data import write_idx, write_mnist_dir


@pytest.fixture(autouse=True)
def user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(d))
    monkeypatch.delenv("CRFL_CACHE_DIR", raising=False)
    monkeypatch.delenv("CRFL_DATA_CACHE", raising=False)
    return d / "crfl"


def _entries(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.npz")) if folder.is_dir() else []


def _count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = images._decode_idx

    def counting(path, magic, kind):
        calls.append(Path(path).name)
        return real(path, magic, kind)

    monkeypatch.setattr(images, "_decode_idx", counting)
    return calls


def _same(a, b) -> None:
    for k in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k))
        assert getattr(a, k).dtype == getattr(b, k).dtype


def test_second_load_comes_from_the_cache_next_to_the_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "mnist"
    data.mkdir()
    arrays = write_mnist_dir(data, gz=True)
    calls = _count_decodes(monkeypatch)
    first = load_dataset("mnist", data)
    assert len(calls) == 4 and len(_entries(data / cache.CACHE_SUBDIR)) == 4
    second = load_dataset("mnist", data)
    assert len(calls) == 4  # no file decoded again
    _same(first, second)
    np.testing.assert_array_equal(second.x_train, arrays["train-images-idx3-ubyte"].reshape(12, 784))
    assert second.x_train.flags.writeable  # like a decoded array (a run may modify its copy)
    assert not list(data.glob(f"{cache.CACHE_SUBDIR}/*.tmp"))


def test_plain_idx_files_are_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, user_cache: Path) -> None:
    write_mnist_dir(tmp_path, gz=False)
    load_dataset("mnist", tmp_path)
    assert not (tmp_path / cache.CACHE_SUBDIR).exists() and not _entries(user_cache)


def test_stale_entry_is_rebuilt_when_the_source_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_mnist_dir(tmp_path, gz=True)
    load_dataset("mnist", tmp_path)
    src = tmp_path / "train-images-idx3-ubyte.gz"
    new = np.full((12, 28, 28), 7, dtype=np.uint8)
    st = src.stat()
    write_idx(src, new)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime: the gzip trailer's checksum still differs
    calls = _count_decodes(monkeypatch)
    ds = load_dataset("mnist", tmp_path)
    assert calls == ["train-images-idx3-ubyte.gz"]
    np.testing.assert_array_equal(ds.x_train, new.reshape(12, 784))
    calls.clear()
    np.testing.assert_array_equal(load_dataset("mnist", tmp_path).x_train, new.reshape(12, 784))
    assert calls == []  # the rebuilt entry serves the next load


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "other-kind"])
def test_corrupt_entry_never_loads_wrong_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str) -> None:
    arrays = write_mnist_dir(tmp_path, gz=True)
    load_dataset("mnist", tmp_path)
    entry = next(p for p in _entries(tmp_path / cache.CACHE_SUBDIR) if p.name.startswith("train-images"))
    raw = bytearray(entry.read_bytes())
    if damage == "flip":  # one pixel of the stored array (the end of the file is the last array's data)
        pos = bytes(raw).rindex(arrays["train-images-idx3-ubyte"].astype(np.uint8).reshape(-1)[-64:].tobytes())
        raw[pos + 10] ^= 0xFF
        entry.write_bytes(bytes(raw))
    elif damage == "truncate":
        entry.write_bytes(bytes(raw[: len(raw) // 2]))
    elif damage == "garbage":
        entry.write_bytes(b"not an npz file")
    else:  # a valid entry, but of another file: its recorded source does not match
        other = next(p for p in _entries(tmp_path / cache.CACHE_SUBDIR) if p.name.startswith("t10k-images"))
        entry.write_bytes(other.read_bytes())
    calls = _count_decodes(monkeypatch)
    ds = load_dataset("mnist", tmp_path)
    assert calls == ["train-images-idx3-ubyte.gz"]
    np.testing.assert_array_equal(ds.x_train, arrays["train-images-idx3-ubyte"].reshape(12, 784))
    assert cache.read_entry(entry, "idx-2051", cache.source_signature(tmp_path / "train-images-idx3-ubyte.gz")) is not None


def test_read_only_data_dir_falls_back_to_the_user_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, user_cache: Path
) -> None:
    data = tmp_path / "ro"
    data.mkdir()
    write_mnist_dir(data, gz=True)
    data.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: make the folder read-only as far as the cache can tell
        real = os.access
        monkeypatch.setattr(cache.os, "access", lambda p, m: False if Path(p).resolve() == data.resolve() else real(p, m))
    try:
        first = load_dataset("mnist", data)
        assert not (data / cache.CACHE_SUBDIR).exists()
        assert len(_entries(user_cache)) == 4
        calls = _count_decodes(monkeypatch)
        _same(first, load_dataset("mnist", data))
        assert calls == []
    finally:
        data.chmod(0o755)


def test_nothing_writable_still_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_mnist_dir(tmp_path, gz=True)
    monkeypatch.setattr(cache, "entry_path", lambda source, kind: None)
    calls = _count_decodes(monkeypatch)
    load_dataset("mnist", tmp_path)
    load_dataset("mnist", tmp_path)
    assert len(calls) == 8


def test_cache_can_be_turned_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, user_cache: Path) -> None:
    monkeypatch.setenv("CRFL_DATA_CACHE", "0")
    write_mnist_dir(tmp_path, gz=True)
    load_dataset("mnist", tmp_path)
    assert not (tmp_path / cache.CACHE_SUBDIR).exists() and not _entries(user_cache)


def test_interrupted_write_leaves_no_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "x.gz"
    src.write_bytes(gzip.compress(b"abc"))
    folder = tmp_path / "c"
    folder.mkdir()

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache.np, "savez", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache.write_entry(folder / "x.npz", "k", cache.source_signature(src), {"a": np.arange(3)})
    assert list(folder.iterdir()) == []


def test_decoder_errors_are_not_cached(tmp_path: Path) -> None:
    from crfl.data import DataError

    write_mnist_dir(tmp_path, gz=True)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x0c" + b"\x01" * 5))
    for _ in range(2):  # the truncated file is reported each time, from the file
        with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz is truncated"):
            load_dataset("mnist", tmp_path)
    assert not [p for p in _entries(tmp_path / cache.CACHE_SUBDIR) if p.name.startswith("train-labels")]


def test_packaged_data_is_cached_in_the_user_cache(user_cache: Path) -> None:
    path = images.mnist_5k_path()
    assert cache._system_owned(path.parent) or not os.access(path.parent, os.W_OK)
    images._read_mnist_5k.cache_clear()
    a = load_dataset("mnist-5k")
    images._read_mnist_5k.cache_clear()
    assert [p.name.split("-", 1)[1] for p in _entries(user_cache)] == ["mnist_5k.csv.gz.mnist-5k.npz"]
    b = load_dataset("mnist-5k")
    _same(a, b)
    assert not (path.parent / cache.CACHE_SUBDIR).exists()
