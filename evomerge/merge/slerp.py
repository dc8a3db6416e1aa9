"""Spherical linear interpolation and M2N2's split-point crossover.

SLERP's mixing weights depend only on the two norms and the dot product, so we compute two
scalars per interpolation weight and apply them with vector ops; the per-coordinate `sin` of the
textbook form is never evaluated. With a split point the child uses weight `w` before the split
and `1 - w` after it, with the angle of the whole vectors (as in the M2N2 paper).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from evomerge.merge.base import Conventions

LINEAR_FALLBACK = 1e-6
MERGEKIT_DOT_THRESHOLD = 0.9995  # mergekit interpolates linearly above this |cos|
MERGEKIT_NORM_EPS = 1e-8  # mergekit leaves a vector of no larger norm unnormalised when taking the cosine


def slerp_coefficients(
    t: float, dot: float, norm_x: float, norm_y: float, conventions: Conventions = "evomerge"
) -> tuple[float, float]:
    """(a, b) such that slerp(x, y, t) = a·x + b·y; linear when the angle is degenerate (sin ω < 1e-6, a zero
    vector), or, with mergekit's conventions, when |cos ω| > 0.9995."""
    if conventions == "mergekit":
        cos = dot / (norm_x if norm_x > MERGEKIT_NORM_EPS else 1.0) / (norm_y if norm_y > MERGEKIT_NORM_EPS else 1.0)
        if abs(cos) > MERGEKIT_DOT_THRESHOLD:
            return 1.0 - t, t
        omega = math.acos(cos)
        return math.sin((1.0 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)
    if norm_x == 0.0 or norm_y == 0.0:
        return 1.0 - t, t
    omega = math.acos(min(1.0, max(-1.0, dot / (norm_x * norm_y))))
    sin_omega = math.sin(omega)
    if sin_omega < LINEAR_FALLBACK:
        return 1.0 - t, t
    return math.sin((1.0 - t) * omega) / sin_omega, math.sin(t * omega) / sin_omega


_CHUNK = 1 << 20  # elements cast to float64 at a time: the angle is exact to float64 without a full copy


def dot_products64(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float]:
    """(x·y, x·x, y·y) accumulated in float64, one chunk cast at a time (never a float64 copy of a tensor)."""
    x, y = x.detach().reshape(-1), y.detach().reshape(-1)
    xy = xx = yy = 0.0
    for start in range(0, x.numel(), _CHUNK):
        x64, y64 = x[start : start + _CHUNK].double(), y[start : start + _CHUNK].double()
        xy, xx, yy = xy + float(x64 @ y64), xx + float(x64 @ x64), yy + float(y64 @ y64)
    return xy, xx, yy


def slerp_stats(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(x · y, |x|, |y|) accumulated in float64: the angle of M2N2's crossover, the slerp space and SLERP merges."""
    xy, xx, yy = dot_products64(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y)))
    return xy, math.sqrt(xx), math.sqrt(yy)


def slerp(x: np.ndarray, y: np.ndarray, t: float) -> np.ndarray:
    """SLERP over the whole vectors: t = 0 gives x, t = 1 gives y."""
    a, b = slerp_coefficients(t, *slerp_stats(x, y))
    return (a * x + b * y).astype(x.dtype, copy=False)


def split_point_slerp(x: np.ndarray, y: np.ndarray, split: int, w: float) -> np.ndarray:
    """M2N2 crossover: weight w on coordinates [0, split), 1 - w on [split, n), one angle for both."""
    x, y = x.ravel(), y.ravel()
    stats = slerp_stats(x, y)
    a1, b1 = slerp_coefficients(w, *stats)
    a2, b2 = slerp_coefficients(1.0 - w, *stats)
    child = np.empty_like(x)
    head, tail = slice(0, split), slice(split, None)
    np.multiply(x[head], a1, out=child[head])
    child[head] += b1 * y[head]
    np.multiply(x[tail], a2, out=child[tail])
    child[tail] += b2 * y[tail]
    return child
