"""Executors run evaluations; the driver only submits candidates and collects outcomes.

The in-process executor evaluates one candidate at a time in the driver's process. A failure
(an exception, NaN, a wrong-length score vector) becomes a failed outcome, never a crash.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from evomerge.errors import EvaluationError, EvomergeError
from evomerge.evaluate.base import EvalResult, Evaluator, as_result
from evomerge.search.base import Candidate
from evomerge.space.base import Space


class ExecutorFailure(EvomergeError):
    """The executor cannot go on (its cluster failed, no worker can start); the driver stops resumable."""


@dataclass
class Outcome:
    candidate: Candidate
    result: EvalResult | None
    error: str | None = None
    seconds: float = 0.0


class Executor(Protocol):
    capacity: int

    def submit(self, candidate: Candidate) -> None: ...

    def collect(self) -> list[Outcome]:
        """Outcomes finished since the last call (waits for at least one if any is in flight)."""
        ...

    def in_flight(self) -> int: ...

    def test(self, genome: np.ndarray) -> dict[str, float]: ...

    def close(self) -> None: ...


def evaluate_candidate(evaluator: Evaluator, space: Space, candidate: Candidate, n_examples: int | None) -> Outcome:
    start = time.perf_counter()
    if hasattr(evaluator, "candidate_id"):  # evaluators that want to know which candidate this is
        evaluator.candidate_id = candidate.id
    try:
        result = as_result(evaluator.evaluate(space.decode(candidate.genome)), n_examples)
        return Outcome(candidate, result, None, time.perf_counter() - start)
    except EvaluationError as err:
        return Outcome(candidate, None, str(err), time.perf_counter() - start)
    except Exception as err:  # noqa: BLE001 - any evaluator bug fails this candidate only
        return Outcome(candidate, None, f"{type(err).__name__}: {err}", time.perf_counter() - start)


class InProcessExecutor:
    capacity = 1

    def __init__(self, evaluator: Evaluator, space: Space):
        self.evaluator = evaluator
        self.space = space
        self.n_examples: int | None = getattr(evaluator, "n_examples", None)
        self._queue: list[Candidate] = []

    def submit(self, candidate: Candidate) -> None:
        self._queue.append(candidate)

    def in_flight(self) -> int:
        return len(self._queue)

    def collect(self) -> list[Outcome]:
        outcomes = [evaluate_candidate(self.evaluator, self.space, c, self.n_examples) for c in self._queue]
        self._queue.clear()
        for outcome in outcomes:
            if outcome.result is not None and outcome.result.per_example is not None and self.n_examples is None:
                self.n_examples = outcome.result.per_example.shape[0]
        return outcomes

    def test(self, genome: np.ndarray) -> dict[str, float]:
        test = getattr(self.evaluator, "test", None)
        return {} if test is None else {k: float(v) for k, v in test(self.space.decode(genome)).items()}

    def close(self) -> None:
        self._queue.clear()
