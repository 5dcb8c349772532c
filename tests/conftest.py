"""Shared fixtures: small synthetic datasets that behave like the real ones (uint8 images, float tables)."""

from __future__ import annotations

import numpy as np
import pytest

from crfl.data import Dataset


def synthetic_images(n_train: int = 600, n_test: int = 200, side: int = 8, classes: int = 4, seed: int = 0) -> Dataset:
    """Learnable uint8 'images': each class lights up its own block of pixels, plus noise."""
    rng = np.random.default_rng(seed)
    d = side * side

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, classes, n)
        x = rng.integers(0, 60, (n, d))
        block = d // classes
        for c in range(classes):
            rows = np.nonzero(y == c)[0]
            x[np.ix_(rows, np.arange(c * block, (c + 1) * block))] += 150
        return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)

    xtr, ytr = make(n_train)
    xte, yte = make(n_test)
    return Dataset(
        name="synthetic", x_train=xtr, y_train=ytr, x_test=xte, y_test=yte, num_classes=classes,
        input_scale=255.0, image_shape=(side, side), class_names=tuple(str(c) for c in range(classes)),
        source={"kind": "synthetic"},
    )


@pytest.fixture
def tiny_images() -> Dataset:
    return synthetic_images()
