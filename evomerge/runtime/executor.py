"""Executors run evaluations; the driver only submits candidates and collects outcomes.

The in-process executor evaluates one candidate at a time in the driver's process. A failure
(an exception, NaN, a wrong-length score vector) becomes a failed outcome, never a crash.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from evomerge.errors import EvaluationError, EvomergeError
from evomerge.evaluate.base import (
    EvalResult,
    Evaluator,
    HeldOut,
    ResidentModel,
    TracksCandidates,
    as_result,
    evaluator_facts,
)
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


@runtime_checkable
class ReportsWorkers(Protocol):
    """An executor with workers of its own (Ray): their load for progress lines and their totals for the summary."""

    def busy(self) -> tuple[int, int]:
        """(workers evaluating now, workers)"""
        ...

    def worker_stats(self) -> list[dict[str, Any]]:
        """One dict per worker, with at least `busy_seconds`."""
        ...


class Materializer:
    """Writes every candidate into one set of tensors kept for the process's life: the evaluator's resident model,
    or buffers on the seeds' device (none for the `weights` space, whose genomes are the weights). A candidate then
    allocates only per-tensor scratch, never a model."""

    def __init__(self, evaluator: Evaluator, space: Space):
        self.space = space
        self.buffers = evaluator.resident_parameters() if isinstance(evaluator, ResidentModel) else space.new_buffers()

    def __call__(self, genome: np.ndarray) -> dict[str, torch.Tensor]:
        if self.buffers is None:
            return self.space.decode(genome)
        self.space.write(genome, self.buffers)
        return self.buffers


class CandidateEvaluation:
    """How one process (the driver in-process, or a Ray worker) evaluates candidates with its evaluator: each genome
    written into the reused buffers, the id told to an evaluator that tracks candidates, any failure turned into a
    failed outcome. The evaluator's capabilities are checked once here, not per candidate: a runtime protocol check
    costs tens of µs, a digits evaluation about a millisecond."""

    def __init__(self, evaluator: Evaluator, space: Space):
        self.evaluator = evaluator
        self.materialize = Materializer(evaluator, space)
        self.facts = evaluator_facts(evaluator)
        self.n_examples = self.facts.n_examples  # per-example scores of another length are refused
        self._tracks_candidates = isinstance(evaluator, TracksCandidates)
        self._held_out = isinstance(evaluator, HeldOut)

    def evaluate(self, candidate: Candidate) -> Outcome:
        start = time.perf_counter()
        if self._tracks_candidates:
            self.evaluator.candidate_id = candidate.id
        try:
            result = as_result(self.evaluator.evaluate(self.materialize(candidate.genome)), self.n_examples)
            return Outcome(candidate, result, None, time.perf_counter() - start)
        except EvaluationError as err:
            return Outcome(candidate, None, str(err), time.perf_counter() - start)
        except Exception as err:  # noqa: BLE001 - any evaluator bug fails this candidate only
            return Outcome(candidate, None, f"{type(err).__name__}: {err}", time.perf_counter() - start)

    def test(self, genome: np.ndarray) -> dict[str, float]:
        """Held-out metrics of one genome ({} for an evaluator without a test split)."""
        if not self._held_out:
            return {}
        return {k: float(v) for k, v in self.evaluator.test(self.materialize(genome)).items()}


class InProcessExecutor:
    capacity = 1

    def __init__(self, evaluator: Evaluator, space: Space):
        self.evaluation = CandidateEvaluation(evaluator, space)
        self._queue: list[Candidate] = []

    def submit(self, candidate: Candidate) -> None:
        self._queue.append(candidate)

    def in_flight(self) -> int:
        return len(self._queue)

    def collect(self) -> list[Outcome]:
        outcomes = [self.evaluation.evaluate(c) for c in self._queue]
        self._queue.clear()
        for outcome in outcomes:  # the first length seen is the run's
            scores = None if outcome.result is None else outcome.result.per_example
            if scores is not None and self.evaluation.n_examples is None:
                self.evaluation.n_examples = scores.shape[0]
        return outcomes

    def test(self, genome: np.ndarray) -> dict[str, float]:
        return self.evaluation.test(genome)

    def close(self) -> None:
        self._queue.clear()
