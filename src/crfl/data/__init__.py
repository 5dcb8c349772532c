"""Datasets (registry) and client partitions."""

from crfl.data.base import DataError, Dataset, dataset_names, describe_datasets, load_dataset, register_dataset

__all__ = ["DataError", "Dataset", "dataset_names", "describe_datasets", "load_dataset", "register_dataset"]
