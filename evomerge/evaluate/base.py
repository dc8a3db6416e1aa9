"""What an evaluator is: named objectives plus an optional per-example score vector."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from evomerge.errors import EvaluationError
from evomerge.weights import Layout


@dataclass
class EvalResult:
    """`per_example` feeds M2N2's competition (one non-negative score per training example)."""

    objectives: dict[str, float]
    per_example: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Evaluator(Protocol):
    def layout(self) -> Layout:
        """Names and shapes of the parameters this evaluator's model takes."""
        ...

    def evaluate(self, params: dict[str, torch.Tensor]) -> EvalResult:
        """Score on the search split; this is what the budget counts."""
        ...


@runtime_checkable
class HeldOut(Protocol):
    """An evaluator with a held-out split: its metrics are reported (curves, summary, fronts), never selected on."""

    def test(self, params: dict[str, torch.Tensor]) -> dict[str, float]: ...


@runtime_checkable
class TrainsSpecialists(Protocol):
    """An evaluator that can train its model on some of its classes: `models.init: specialists` (the M2N2
    paper's pre-trained setting) trains one model per class group from `flat` weights and caches it."""

    def train_specialist(self, flat: np.ndarray, classes: list[int], steps: int, lr: float) -> np.ndarray: ...


@runtime_checkable
class ProvidesSeedModels(Protocol):
    """An evaluator that comes with its own seed models (a base and its fine-tunes): `models.init: evaluator`."""

    def seed_models(self) -> list[dict[str, torch.Tensor]]: ...


@runtime_checkable
class DescribesSeedModels(Protocol):
    """Lines `evomerge build-models` prints about an evaluator's own seed models (where they are cached, how well
    each does)."""

    def describe_seed_models(self) -> list[str]: ...


@runtime_checkable
class TracksCandidates(Protocol):
    """An evaluator told the id of the candidate it is about to evaluate (faults injected per candidate)."""

    candidate_id: int | None


@runtime_checkable
class ResidentModel(Protocol):
    """An evaluator that keeps one model instantiated on its device, in its dtype (a language model): evomerge
    writes each candidate tensor by tensor into `resident_parameters()` in place (no re-instantiation, no copy of
    the model) and then calls `evaluate`/`test` with those same tensors. Names and shapes are the `layout()`'s;
    a tied output head appears once, under the name the checkpoint files use."""

    def resident_parameters(self) -> dict[str, torch.Tensor]: ...


@runtime_checkable
class RunBound(Protocol):
    """An evaluator that keeps files of its own per run (e.g. fault markers): the driver and every Ray worker
    call `bind_run` with the run directory before the first evaluation, so two runs never share that state."""

    def bind_run(self, run_dir: Path) -> None: ...


@runtime_checkable
class EstimatesFisher(Protocol):
    """An evaluator that can estimate the diagonal Fisher information of given weights on its search split, for
    Fisher merging (Matena & Raffel, 2022): `evomerge fisher` and a merge plan's `fisher_estimate` call it.

    It is the Fisher of the model's own predictive distribution, as Matena & Raffel take it, not the "empirical"
    Fisher of the true labels: F = mean over examples x of E_{y ~ p(y | x; θ)} (∂ log p(y | x; θ) / ∂θ)², squared
    entry by entry. A classifier computes the expectation exactly (every label weighted by its probability); a
    language model, whose labels are next tokens, may sample one token per position from its predictive (with
    `seed`) and take the sequence's log-likelihood as the mean over positions. (On the digits specialists the
    empirical Fisher of all examples merged far worse than plain averaging: a specialist's gradients are largest
    on the classes it gets wrong, so it was trusted most where it knows least.)

    `examples` caps how many examples are used (None: all), taken as a `seed`ed random subset, so that a large
    model's Fisher costs `examples` backward passes (per label, for exact expectations); `subset` names a part of
    the search split (a class group, a task, a dataset: whatever the evaluator calls its parts; None: all of it),
    e.g. the task a fine-tuned model was trained for. Returns float32 CPU tensors, >= 0, with the `layout()`'s
    names and shapes.
    """

    def fisher(
        self, params: dict[str, torch.Tensor], examples: int | None, seed: int, subset: str | None = None
    ) -> dict[str, torch.Tensor]: ...


@runtime_checkable
class SubsetFromSeeds(Protocol):
    """An evaluator whose fitness runs on a subset of its search split chosen from how the seed models score every
    example of it (representative "anchor" examples), so that a cheap subset still tells candidates apart as the
    whole split would.

    Before its first evaluation, every process of a run (the driver in-process, each Ray worker, a resumed run)
    asks `needs_seed_scores()`; if so, the run's recorded choice (`RUN/subset.json`) is passed to `use_subset`. The
    first process to find none makes it: `full_scores` of each seed model (per-example scores on the whole search
    split, in the order `evaluate`'s would have), stacked [seeds, examples], go to `choose_subset`, whose
    JSON-serialisable answer is recorded and then passed to `use_subset`. A run thus keeps one subset for life,
    whatever machine resumes it."""

    def needs_seed_scores(self) -> bool: ...

    def full_scores(self, params: dict[str, torch.Tensor]) -> np.ndarray: ...

    def choose_subset(self, seed_scores: np.ndarray) -> dict[str, Any]: ...

    def use_subset(self, record: dict[str, Any]) -> None: ...


@dataclass
class EvaluatorFacts:
    """What the driver may know of an evaluator it does not hold (a distributed run's is on the workers): enough to
    check a strategy against it before the first evaluation."""

    metric_names: list[str] | None = None  # every objective it can report, when it lists them
    tasks: list[str] | None = None  # its tasks in order, when it has several
    n_examples: int | None = None  # length of its per-example scores, when fixed


@runtime_checkable
class ListsMetrics(Protocol):
    def metric_names(self) -> list[str]: ...


@runtime_checkable
class MultiTask(Protocol):
    tasks: list[str]


@runtime_checkable
class FixedExamples(Protocol):
    n_examples: int


def evaluator_facts(evaluator: Evaluator) -> EvaluatorFacts:
    return EvaluatorFacts(
        list(evaluator.metric_names()) if isinstance(evaluator, ListsMetrics) else None,
        list(evaluator.tasks) if isinstance(evaluator, MultiTask) else None,
        evaluator.n_examples if isinstance(evaluator, FixedExamples) else None,
    )


def as_result(raw: Any, n_examples: int | None) -> EvalResult:
    """Accept an EvalResult or a plain dict from user code; refuse NaN and wrong-length scores."""
    if isinstance(raw, dict):
        if "objectives" in raw:
            raw = EvalResult(dict(raw["objectives"]), raw.get("per_example"), dict(raw.get("info", {})))
        else:
            raw = EvalResult({k: v for k, v in raw.items()})
    if not isinstance(raw, EvalResult):
        raise EvaluationError(f"evaluator returned {type(raw).__name__}, expected EvalResult or a dict of objectives")
    objectives = {}
    for name, value in raw.objectives.items():
        try:
            value = float(value)
        except (TypeError, ValueError) as err:
            raise EvaluationError(f"objective {name!r} is {value!r}, not a number") from err
        if not math.isfinite(value):
            raise EvaluationError(f"objective {name!r} is {value}")
        objectives[name] = value
    per_example = raw.per_example
    if per_example is not None:
        per_example = np.asarray(per_example, dtype=np.float32).ravel()
        if n_examples is not None and per_example.shape[0] != n_examples:
            raise EvaluationError(f"per-example scores have length {per_example.shape[0]}, expected {n_examples}")
        if not np.all(np.isfinite(per_example)):
            raise EvaluationError("per-example scores contain NaN or inf")
        if np.any(per_example < 0):
            raise EvaluationError("per-example scores must be non-negative")
    return EvalResult(objectives, per_example, raw.info)
