"""Non-domination, hypervolume and IGD+ for minimisation problems.

Our own small implementations (fronts here hold tens to hundreds of points; beyond 4 objectives
the hypervolume is pymoo's); the tests check them against pymoo's on hand-made and random sets.
"""

from __future__ import annotations

import numpy as np


def non_dominated(F: np.ndarray) -> np.ndarray:
    """Boolean mask of the rows no other row dominates (≤ everywhere, < somewhere); duplicates all stay."""
    F = np.asarray(F, dtype=np.float64)
    if F.ndim != 2:
        raise ValueError(f"expected an (n, m) array of objectives, got shape {F.shape}")
    if F.shape[1] == 2:
        return _non_dominated_2d(F)
    dominated = np.zeros(len(F), dtype=bool)
    for start in range(0, len(F), 512):  # blocks of dominators keep memory at 512 × n, not n × n
        block = F[start : start + 512]
        leq = np.all(block[:, None, :] <= F[None, :, :], axis=2)  # leq[i, j]: block row i ≤ row j everywhere
        lt = np.any(block[:, None, :] < F[None, :, :], axis=2)
        dominated |= np.any(leq & lt, axis=0)
    return ~dominated


def _non_dominated_2d(F: np.ndarray) -> np.ndarray:
    """O(n log n): a point is dominated by one with a smaller first objective and a second objective no
    larger, or by one with an equal first objective and a smaller second."""
    order = np.lexsort((F[:, 1], F[:, 0]))
    keep = np.zeros(len(F), dtype=bool)
    best_before = np.inf  # the smallest second objective among points with a strictly smaller first
    i = 0
    while i < len(order):
        j = i
        while j < len(order) and F[order[j], 0] == F[order[i], 0]:
            j += 1
        group = order[i:j]
        lowest = F[group[0], 1]  # the group is sorted by the second objective
        keep[group] = (F[group, 1] == lowest) & (lowest < best_before)
        best_before = min(best_before, lowest)
        i = j
    return keep


def hypervolume(F: np.ndarray, reference: np.ndarray) -> float:
    """Volume dominated by F and bounded by `reference` (exact, by slicing along the last objective)."""
    F = np.asarray(F, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if len(F) == 0:
        return 0.0
    F = F[np.all(F < reference, axis=1)]
    if len(F) == 0:
        return 0.0
    F = F[non_dominated(F)]
    if F.shape[1] > 4:  # slicing is exponential in the objectives; pymoo's HV stays fast there
        from pymoo.indicators.hv import HV

        return float(HV(ref_point=reference)(F))
    return _slice_volume(F, reference)


def _slice_volume(F: np.ndarray, reference: np.ndarray) -> float:
    if F.shape[1] == 1:
        return float(reference[0] - F[:, 0].min())
    if F.shape[1] == 2:
        order = np.argsort(F[:, 0], kind="stable")
        volume, best_y = 0.0, reference[1]
        for x, y in F[order]:
            if y < best_y:
                volume += (reference[0] - x) * (best_y - y)
                best_y = y
        return float(volume)
    order = np.argsort(F[:, -1], kind="stable")
    F = F[order]
    volume = 0.0
    for i in range(len(F)):
        upper = F[i + 1, -1] if i + 1 < len(F) else reference[-1]
        depth = upper - F[i, -1]
        if depth <= 0:
            continue
        layer = F[: i + 1, :-1]
        volume += depth * _slice_volume(layer[non_dominated(layer)], reference[:-1])
    return float(volume)


def igd_plus(F: np.ndarray, reference_front: np.ndarray) -> float:
    """Mean over the reference front of the distance to F counting only where F is worse (Ishibuchi et al. 2015)."""
    F = np.asarray(F, dtype=np.float64)
    Z = np.asarray(reference_front, dtype=np.float64)
    if len(F) == 0:
        return float("inf")
    gaps = np.maximum(F[None, :, :] - Z[:, None, :], 0.0)  # (reference, candidate, objective)
    return float(np.sqrt((gaps**2).sum(axis=2)).min(axis=1).mean())
