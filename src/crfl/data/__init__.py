"""Datasets (registry) and client partitions."""

from crfl.data.base import DataError, Dataset, dataset_names, describe_datasets, load_dataset, register_dataset
from crfl.data import images, loan  # noqa: F401  (registers the loaders)
from crfl.data.partition import partition

__all__ = [
    "DataError",
    "Dataset",
    "dataset_names",
    "describe_datasets",
    "load_dataset",
    "partition",
    "register_dataset",
]
