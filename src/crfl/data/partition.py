"""Client partitions of a training set, and the seeded per-key train/test split.

The paper (Section 6.1, Appendix A.1) uses two kinds of federated data:

* the image datasets are split among the N clients "in an i.i.d. manner": the
  authors shuffle the training set once and cut it into N equal shards, dropping
  the remainder (MNIST: 60000 / 20 = 3000 digits per client) -- scheme ``iid``;
* LOAN is split by US state, one client per state -- scheme ``natural``.

``dirichlet`` adds the usual label-skew partition (per class, client shares drawn
from Dirichlet(alpha * 1_N)) for experiments beyond the paper.

Every partition is a list of sorted int64 index arrays into ``dataset.x_train``,
one per client, drawn from ``numpy_generator(seed, "partition")``: the same seed
gives the same clients.
"""

from __future__ import annotations

import math

import numpy as np

from crfl.data.base import Dataset
from crfl.rng import numpy_generator
from crfl.validation import ConfigError, check_choice, check_int, check_real

SCHEMES = ("dirichlet", "iid", "natural")
DIRICHLET_ATTEMPTS = 100  # re-draws before a Dirichlet partition with min_size is given up


def partition(
    dataset: Dataset,
    scheme: str,
    num_clients: int | None,
    seed: int,
    *,
    alpha: float = 0.5,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Split the training set of ``dataset`` among clients.

    Args:
        dataset: the data; only ``y_train`` and ``groups_train`` are read.
        scheme: ``iid`` (equal random shards), ``natural`` (one client per group, e.g. per
            state for LOAN) or ``dirichlet`` (label skew).
        num_clients: N. Required for ``iid`` and ``dirichlet``; for ``natural`` None takes
            every group and an integer k the first k groups in sorted-name order.
        seed: run seed; the draw uses the ``partition`` stream.
        alpha: Dirichlet concentration (``dirichlet`` only); small alpha, strong skew.
        min_size: smallest client allowed by ``dirichlet``.

    Returns:
        One sorted int64 array of training-set indices per client; clients are disjoint.
    """
    check_choice("scheme", scheme, SCHEMES)
    n = int(len(dataset.y_train))
    if scheme == "iid":
        return iid_partition(n, _num_clients(num_clients, n, "samples"), seed)
    if scheme == "natural":
        return natural_partition(dataset, num_clients)
    alpha = check_real("alpha", alpha, low=0.0, low_open=True)
    min_size = check_int("min_size", min_size, low=0)
    return dirichlet_partition(dataset.y_train, _num_clients(num_clients, n, "samples"), seed, alpha, min_size)


def iid_partition(num_samples: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """Shuffle once and cut into ``num_clients`` equal shards; the remainder is dropped."""
    order = numpy_generator(seed, "partition").permutation(num_samples)
    shard = num_samples // num_clients
    return [np.sort(order[i * shard : (i + 1) * shard]).astype(np.int64) for i in range(num_clients)]


def natural_partition(dataset: Dataset, num_clients: int | None) -> list[np.ndarray]:
    """One client per group of ``groups_train``, groups taken in sorted-name order.

    Only groups with at least one training sample become clients. With ``num_clients = k``
    the first k of them are used (the authors train 20 of the 51 LOAN states; they take the
    states in directory-listing order, we take sorted state codes so the choice is stable).
    """
    groups = dataset.groups_train
    if groups is None:
        raise ConfigError(
            f"The 'natural' partition needs a dataset with natural groups (such as LOAN's states); "
            f"the dataset {dataset.name!r} has none. Use 'iid' or 'dirichlet' instead."
        )
    groups = np.asarray(groups)
    present = np.unique(groups)
    names = dataset.group_names
    if names is not None:
        present = np.array(sorted(present.tolist(), key=lambda g: (str(names[g]), g)), dtype=present.dtype)
    k = len(present) if num_clients is None else _num_clients(num_clients, len(present), "groups")
    return [np.flatnonzero(groups == g).astype(np.int64) for g in present[:k]]


def dirichlet_partition(
    labels: np.ndarray, num_clients: int, seed: int, alpha: float, min_size: int
) -> list[np.ndarray]:
    """Label-skew partition: each class is shared among clients in Dirichlet(alpha * 1_N) proportions.

    The whole draw is repeated (from the same seeded generator, at most
    ``DIRICHLET_ATTEMPTS`` times) until every client holds at least ``min_size`` samples.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if min_size * num_clients > n:
        raise ConfigError(
            f"The 'min_size' parameter must be at most {n // num_clients} for {num_clients} clients "
            f"and {n} samples. Got {min_size} instead."
        )
    rng = numpy_generator(seed, "partition")
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(DIRICHLET_ATTEMPTS):
        shares: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for idx in by_class:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(num_clients, alpha))
            cuts = np.floor(np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
            for client, part in enumerate(np.split(idx, cuts)):
                shares[client].append(part)
        clients = [np.sort(np.concatenate(s)).astype(np.int64) for s in shares]
        if min(len(c) for c in clients) >= min_size:
            return clients
    raise ConfigError(
        f"No Dirichlet partition with alpha={alpha} gives all {num_clients} clients at least "
        f"{min_size} samples (of {n}) in {DIRICHLET_ATTEMPTS} draws; raise 'alpha' or lower "
        f"'num_clients' or 'min_size'."
    )


def split_by_key(
    keys: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/test split within each key (class or group): ``ceil(f * n_k)`` test items per key.

    Used for the stratified mnist-5k split (key = label) and LOAN's per-state 80/20 split
    (key = state, Appendix A.1). Keys are visited in sorted order; each key's items are
    shuffled and the first ``ceil(f * n_k)`` go to the test set (the rounding of
    scikit-learn's ``train_test_split``, which the authors use). Both returned index arrays
    are then put in random order, so that a prefix of the test set is not one class or state.
    """
    keys = np.asarray(keys)
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for k in np.unique(keys):
        idx = rng.permutation(np.flatnonzero(keys == k))
        n_test = min(len(idx), math.ceil(test_fraction * len(idx) - 1e-9))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    tr = np.concatenate(train) if train else np.zeros(0, np.int64)
    te = np.concatenate(test) if test else np.zeros(0, np.int64)
    return rng.permutation(tr).astype(np.int64), rng.permutation(te).astype(np.int64)


def _num_clients(value: int | None, available: int, what: str) -> int:
    if value is None:
        raise ConfigError(
            f"The 'num_clients' parameter must be an integer in [1, {available}] (the number of {what}). "
            f"Got None instead."
        )
    return check_int("num_clients", value, low=1, high=available)
