"""Brute-force sweep over a box space: the paper's 10,000-point SLERP baseline."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from evomerge.evaluate.base import EvalResult
from evomerge.schema import require
from evomerge.search import STRATEGIES
from evomerge.search.base import Candidate, Proposal, Strategy
from evomerge.space.base import BoxSpace


@dataclass
class GridOptions:
    points: int = 10000
    objective: str = "accuracy"

    def check(self, path: str) -> None:
        require(self.points >= 1, f"{path}.points", f"got {self.points}, must be >= 1")


def grid_points(low: np.ndarray, high: np.ndarray, points: int) -> np.ndarray:
    """About `points` points on a regular grid (exactly `points` in one dimension), ends included."""
    per_axis = points if len(low) == 1 else max(2, round(points ** (1 / len(low))))
    axes = [np.linspace(lo, hi, per_axis) for lo, hi in zip(low, high)]
    return np.array(list(itertools.product(*axes)), dtype=np.float64)


class GridSearch(Strategy):
    def __init__(self, options: GridOptions, space: BoxSpace, seed: int):
        super().__init__(seed)
        self.options = options
        self.points = grid_points(np.asarray(space.low), np.asarray(space.high), options.points)
        self.next = 0
        self.best_genome: np.ndarray | None = None
        self.best_value = -np.inf

    @property
    def finished(self) -> bool:
        return self.next >= len(self.points)

    def ask(self) -> Proposal | None:
        if self.finished:
            return None
        self.next += 1
        point = self.points[self.next - 1].astype(np.float32)
        return Proposal(point, {"point": self.next - 1, "genes": [float(v) for v in point]})

    def tell(self, candidate: Candidate, result: EvalResult | None) -> None:
        if result is None:
            return
        value = result.objectives[self.options.objective]
        if value > self.best_value:
            self.best_value, self.best_genome = value, candidate.genome.copy()

    def best(self) -> tuple[np.ndarray, float] | None:
        return None if self.best_genome is None else (self.best_genome, float(self.best_value))

    def stats(self) -> dict[str, float]:
        return {"points_done": self.next, "points_total": len(self.points)}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(next=self.next, best_genome=self.best_genome, best_value=float(self.best_value))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.next = int(state["next"])
        self.best_genome = state["best_genome"]
        self.best_value = float(state["best_value"])


@STRATEGIES.register("grid", GridOptions, "brute-force sweep over a regular grid", {"box"})
def build_grid(options: GridOptions, space: BoxSpace, seed: int) -> GridSearch:
    return GridSearch(options, space, seed)
