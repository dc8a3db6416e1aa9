"""Uniform random points in the box: the baseline every front-finding method has to beat."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from evomerge.evaluate.base import EvalResult
from evomerge.pareto import check_objectives
from evomerge.search import STRATEGIES
from evomerge.search.base import Candidate, ParetoStrategy, Proposal
from evomerge.search.map import TWO_TASKS
from evomerge.space.base import BoxSpace


@dataclass
class RandomOptions:
    objectives: dict[str, Literal["max", "min"]] = field(default_factory=lambda: dict(TWO_TASKS))

    def check(self, path: str) -> None:
        check_objectives(self.objectives, f"{path}.objectives", minimum=1)


class RandomSearch(ParetoStrategy):
    def __init__(self, options: RandomOptions, space: BoxSpace, seed: int):
        super().__init__(options.objectives, seed)
        self.low, self.high = np.asarray(space.low, dtype=np.float64), np.asarray(space.high, dtype=np.float64)

    def ask(self) -> Proposal:
        x = self.low + self.rng.random(len(self.low)) * (self.high - self.low)
        return Proposal(x, {"genes": [float(v) for v in x]})

    def tell(self, candidate: Candidate, result: EvalResult | None) -> None:
        if result is not None:
            self.record(candidate.genome, self.objectives.minimised(result.objectives))


@STRATEGIES.register("random", RandomOptions, "uniform random points in the box (a baseline)", {"box"})
def build_random(options: RandomOptions, space: BoxSpace, seed: int) -> RandomSearch:
    return RandomSearch(options, space, seed)
