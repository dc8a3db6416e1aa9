"""The ask/tell contract every strategy follows, and the random streams they own.

Strategies are pure: no files, no processes, no Ray. The driver assigns candidate ids, so a
strategy can record lineage without knowing how evaluation is scheduled.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch

from evomerge.evaluate.base import EvalResult, EvaluatorFacts

if TYPE_CHECKING:
    from evomerge.pareto import Objectives


@dataclass
class Proposal:
    """What a strategy wants evaluated; `meta` (JSON-able) records how it was made."""

    genome: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Candidate:
    id: int
    genome: np.ndarray
    meta: dict[str, Any]


@runtime_checkable
class MultiObjective(Protocol):
    """A strategy over several named objectives: checked against the evaluator's metrics, and its run gets a
    front (RUN/front.json, plots, an Optuna mirror)."""

    objectives: Objectives


@runtime_checkable
class EvaluatorChecked(Protocol):
    """A strategy with requirements on the evaluator (checked before the first evaluation, from its facts)."""

    def check_evaluator(self, facts: EvaluatorFacts) -> None: ...


class Strategy(ABC):
    """Ask for proposals, tell back results (None = the evaluation failed)."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.noise = torch.Generator().manual_seed(seed)

    @abstractmethod
    def ask(self) -> Proposal | None:
        """The next proposal, or None when nothing can be asked until results come back."""

    @abstractmethod
    def tell(self, candidate: Candidate, result: EvalResult | None) -> None: ...

    @abstractmethod
    def best(self) -> tuple[np.ndarray, float] | None:
        """Genome and search-split score of the best individual so far (the one tested)."""

    @property
    def finished(self) -> bool:
        """True when the strategy has nothing left to ask (a finite sweep); most never finish."""
        return False

    def stats(self) -> dict[str, float]:
        """Numbers logged along the run (archive size, diversity, …)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state, "noise": self.noise.get_state().numpy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.noise.set_state(torch.from_numpy(np.asarray(state["noise"], dtype=np.uint8).copy()))


def sample_index(rng: np.random.Generator, weights: np.ndarray) -> int:
    """Index drawn with probability ∝ weights (uniform when they are all zero); faster than rng.choice."""
    cumulative = np.cumsum(weights, dtype=np.float64)
    total = cumulative[-1]
    if not total > 0:
        return int(rng.integers(len(weights)))
    return min(int(np.searchsorted(cumulative, rng.random() * total, side="right")), len(weights) - 1)


class ParetoStrategy(Strategy):
    """A multi-objective strategy; `best` is the candidate with the best mean objective (turned so higher is
    better), a single number for progress lines, while the run's front is read from its journal."""

    def __init__(self, objectives: dict[str, str], seed: int):
        from evomerge.pareto import Objectives

        super().__init__(seed)
        self.objectives = Objectives(objectives)
        self.best_genome: np.ndarray | None = None
        self.best_value = -np.inf

    def record(self, genome: np.ndarray, minimised: np.ndarray) -> None:
        if -float(np.mean(minimised)) > self.best_value:
            self.best_value = -float(np.mean(minimised))
            self.best_genome = np.asarray(genome).copy()

    def best(self) -> tuple[np.ndarray, float] | None:
        return None if self.best_genome is None else (self.best_genome, float(self.best_value))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "best_genome": self.best_genome, "best_value": float(self.best_value)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.best_genome = state["best_genome"]
        self.best_value = float(state["best_value"])
