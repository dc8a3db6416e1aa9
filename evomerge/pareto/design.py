"""Space-filling first designs: the one-hot vertices plus a scrambled Sobol set.

A regular grid collapses to {0, 1} corners once d reaches 8 at MAP's budgets; Sobol points keep
covering the interior at any d.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.stats import qmc


def vertices_and_sobol(low: np.ndarray, high: np.ndarray, n: int, seed: int) -> np.ndarray:
    """`n` points in the box: the d one-hot vertices (low elsewhere) first, then Sobol points."""
    low, high = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
    d = len(low)
    vertices = np.tile(low, (min(d, n), 1))
    for i in range(len(vertices)):
        vertices[i, i] = high[i]
    rest = n - len(vertices)
    if rest <= 0:
        return vertices
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Sobol balance wants powers of two; we want exact counts
        unit = qmc.Sobol(d, scramble=True, seed=np.random.default_rng(seed)).random(rest)
    return np.vstack([vertices, low + unit * (high - low)])
