"""Datasets that ship inside installed packages (nothing is downloaded at run time)."""

from evomerge.data.datasets import DATASETS, Dataset, load_dataset

__all__ = ["DATASETS", "Dataset", "load_dataset"]
