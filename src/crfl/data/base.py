"""The dataset contract and the dataset registry.

A loader turns files into a :class:`Dataset`: train and test arrays, kept in
their compact storage type (uint8 pixels for images, so that a 700k-image
EMNIST stays at ~0.5 GiB until a batch needs floats). ``x / input_scale`` gives
the model input in [0, 1], as in the paper (pixel / 255; LOAN min-max scaled).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from crfl import registry


class DataError(ValueError):
    """A dataset file is missing or not what was expected; the message names the file."""


@dataclass(frozen=True)
class Dataset:
    """A classification dataset, split into train and test.

    Attributes:
        name: registry name (``mnist-5k``, ``fashion-mnist``, ...).
        x_train, x_test: (n, d) arrays; uint8 pixels for images, float32 in [0, 1] for tables.
        y_train, y_test: (n,) int64 labels in [0, num_classes).
        num_classes: C.
        input_scale: divide x by this to get the model input (255.0 for uint8 images, 1.0 otherwise).
        image_shape: (height, width) of images, None for tabular data.
        feature_names: column names of tabular data (the LOAN trigger needs them), None for images.
        class_names: one name per class.
        groups_train, groups_test: (n,) int group ids for natural partitions (LOAN: one per
            state), None where the data has no natural groups.
        group_names: name of each group id.
        source: provenance (files read, their sizes), written into the run's config.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_scale: float
    image_shape: tuple[int, int] | None = None
    feature_names: tuple[str, ...] | None = None
    class_names: tuple[str, ...] = ()
    groups_train: np.ndarray | None = None
    groups_test: np.ndarray | None = None
    group_names: tuple[str, ...] | None = None
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def input_box(self) -> tuple[float, float]:
        """[low, high] holding every model input x / input_scale: [0, 1] for every crfl dataset
        (pixels / 255, LOAN features min-max scaled), the box the triggers clamp to as well."""
        return (0.0, 1.0)

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])


Loader = Callable[..., Dataset]
_REGISTRY: registry.Entries[Loader] = {}


def register_dataset(name: str, description: str) -> Callable[[Loader], Loader]:
    """Decorator: register ``loader(data_dir: Path | None, seed: int, **options) -> Dataset``."""
    return registry.register(_REGISTRY, name, description)


def dataset_names() -> list[str]:
    return registry.names(_REGISTRY)


def describe_datasets() -> dict[str, str]:
    return registry.describe(_REGISTRY)


def loader(name: str) -> Loader:
    """The registered loader function of ``name``."""
    return registry.lookup(_REGISTRY, "dataset", name)


def load_dataset(name: str, data_dir: str | Path | None = None, seed: int = 1, **options: Any) -> Dataset:
    """Load a registered dataset; an unknown name lists the valid ones."""
    fn = registry.lookup(_REGISTRY, "dataset", name)
    return check_dataset(fn(Path(data_dir) if data_dir is not None else None, seed, **options))


def check_dataset(ds: Dataset) -> Dataset:
    """Reject empty or degenerate data at load time, naming the dataset and what is wrong."""
    where = f"the dataset {ds.name!r}"
    if ds.num_classes < 2:
        raise DataError(f"{where} has {ds.num_classes} class(es); classification needs at least 2")
    for split, x, y in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)):
        if x.ndim != 2 or x.shape[1] < 1:
            raise DataError(f"{where} has {split} inputs of shape {x.shape}; expected (samples, features) with features >= 1")
        if len(y) == 0:
            raise DataError(f"{where} has an empty {split} set; training and certification need at least one {split} sample")
        if y.ndim != 1 or len(y) != len(x):
            raise DataError(f"{where} has {len(x)} {split} inputs but labels of shape {y.shape}; expected one label per input")
        if int(y.min()) < 0 or int(y.max()) >= ds.num_classes:
            raise DataError(f"{where} has {split} labels outside [0, {ds.num_classes}): found {int(y.min())}..{int(y.max())}")
        if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
            raise DataError(f"{where} has NaN or infinite {split} features; fill or drop them before loading")
    if x.shape[1] != ds.x_train.shape[1]:
        raise DataError(f"{where} has {ds.x_train.shape[1]} train features but {x.shape[1]} test features")
    if len(np.unique(ds.y_train)) < 2:
        raise DataError(f"{where} has a single class in its training set; the model cannot learn to separate classes")
    return ds
