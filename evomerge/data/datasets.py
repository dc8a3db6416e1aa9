"""Offline classification datasets with deterministic train/test splits."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from evomerge.errors import SpecError
from evomerge.schema import did_you_mean


@dataclass(frozen=True)
class Dataset:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def n_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return x.astype(np.float32), y.astype(np.int64)


def _wine() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_wine

    x, y = load_wine(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    order = np.random.default_rng(0).permutation(len(y))
    return x[order].astype(np.float32), y[order].astype(np.int64)


DATASETS: dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]] = {
    "digits": _digits,  # 1,797 8x8 images, raw 0-16 pixels, in sklearn's order (the M2N2 paper's setting)
    "wine": _wine,  # 178 samples, 13 standardised features, 3 classes (small and fast, for tests)
}


def load_dataset(name: str, train_fraction: float = 0.8) -> Dataset:
    """First `train_fraction` of the examples train, the rest test (the M2N2 paper's split)."""
    if name not in DATASETS:
        raise SpecError(
            "evaluator.dataset",
            f"unknown dataset {name!r}{did_you_mean(name, DATASETS)}; valid: {', '.join(sorted(DATASETS))}",
        )
    x, y = DATASETS[name]()
    cut = int(len(x) * train_fraction)
    return Dataset(x[:cut], y[:cut], x[cut:], y[cut:])
