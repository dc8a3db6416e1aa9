"""Fronts of cheap functions: pymoo's NSGA-II (NSGA-III beyond 3 objectives) run on surrogates."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.algorithms.moo.nsga3 import NSGA3
from pymoo.core.problem import Problem
from pymoo.optimize import minimize
from pymoo.util.ref_dirs import get_reference_directions

from evomerge.pareto.front import hypervolume, non_dominated


class _CallableProblem(Problem):
    def __init__(self, objective: Callable[[np.ndarray], np.ndarray], n_obj: int, low: np.ndarray, high: np.ndarray):
        super().__init__(n_var=len(low), n_obj=n_obj, xl=low, xu=high)
        self.objective = objective

    def _evaluate(self, x: np.ndarray, out: dict, *args, **kwargs) -> None:
        out["F"] = self.objective(x)


def many_objective_algorithm(n_obj: int, pop_size: int):
    """NSGA-II up to 3 objectives; NSGA-III with Das-Dennis directions beyond, where crowding distance
    stops spreading the front."""
    if n_obj <= 3:
        return NSGA2(pop_size=pop_size)
    partitions = 1
    while len(get_reference_directions("das-dennis", n_obj, n_partitions=partitions + 1)) <= pop_size:
        partitions += 1
    directions = get_reference_directions("das-dennis", n_obj, n_partitions=partitions)
    return NSGA3(ref_dirs=directions, pop_size=max(pop_size, len(directions)))


def front_of(
    objective: Callable[[np.ndarray], np.ndarray],
    n_obj: int,
    low: np.ndarray,
    high: np.ndarray,
    seed: int,
    pop_size: int = 100,
    generations: int = 100,
    extra: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Non-dominated (X, F) of a vectorised objective to minimise; `extra` points compete with the final population."""
    algorithm = many_objective_algorithm(n_obj, pop_size)
    result = minimize(_CallableProblem(objective, n_obj, low, high), algorithm, ("n_gen", generations), seed=seed)
    X = np.atleast_2d(result.pop.get("X"))
    if extra is not None and len(extra):
        X = np.vstack([X, extra])
    F = objective(X)
    keep = non_dominated(F)
    X, F = X[keep], F[keep]
    _, unique = np.unique(np.round(X, 9), axis=0, return_index=True)
    unique = np.sort(unique)
    return X[unique], F[unique]


def spread_out(F: np.ndarray, k: int) -> np.ndarray:
    """Indices of k points spread along a front: the extremes first, then farthest-point in normalised objectives."""
    if len(F) <= k:
        return np.arange(len(F))
    span = np.ptp(F, axis=0)
    Z = (F - F.min(axis=0)) / np.where(span > 0, span, 1.0)
    chosen = list(dict.fromkeys(int(np.argmin(Z[:, j])) for j in range(Z.shape[1])))[:k]
    distance = np.min(np.linalg.norm(Z[:, None, :] - Z[chosen][None, :, :], axis=2), axis=1)
    while len(chosen) < k:
        pick = int(np.argmax(distance))
        chosen.append(pick)
        distance = np.minimum(distance, np.linalg.norm(Z - Z[pick], axis=1))
    return np.array(chosen)


def hypervolume_greedy(F_candidates: np.ndarray, F_known: np.ndarray, reference: np.ndarray, k: int) -> np.ndarray:
    """Indices of up to k candidates that add the most predicted hypervolume to the known front, one at a time."""
    chosen: list[int] = []
    current = np.asarray(F_known, dtype=np.float64).reshape(-1, F_candidates.shape[1])
    base = hypervolume(current, reference)
    for _ in range(min(k, len(F_candidates))):
        gains = np.full(len(F_candidates), -1.0)
        for i in range(len(F_candidates)):
            if i not in chosen:
                gains[i] = hypervolume(np.vstack([current, F_candidates[i]]), reference) - base
        pick = int(np.argmax(gains))
        if gains[pick] <= 0:
            break
        chosen.append(pick)
        current = np.vstack([current, F_candidates[pick]])
        base += gains[pick]
    return np.array(chosen, dtype=np.int64)
