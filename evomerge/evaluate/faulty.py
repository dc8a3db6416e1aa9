"""Fault injection: the classification evaluator, misbehaving on chosen candidate ids.

For testing evomerge's fault handling, and a cluster's: `evaluator: {name: faulty, exit_on: [7]}`.
The executor tells it each candidate's id before evaluating (`candidate_id`). "Once" faults
leave a marker file, so a replaced worker on the same machine does not repeat them.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from evomerge.evaluate import EVALUATORS
from evomerge.evaluate.base import EvalResult
from evomerge.evaluate.classification import ClassificationEvaluator, ClassificationOptions


@dataclass
class FaultyOptions(ClassificationOptions):
    raise_on: list[int] = field(default_factory=list)
    nan_on: list[int] = field(default_factory=list)
    wrong_length_on: list[int] = field(default_factory=list)
    exit_on: list[int] = field(default_factory=list)  # kills the worker process every time
    exit_once_on: list[int] = field(default_factory=list)  # kills it the first time only
    hang_on: list[int] = field(default_factory=list)
    hang_s: float = 3600.0
    sleep_on: dict[int, float] = field(default_factory=dict)  # candidate id -> seconds, then a normal result
    marker_dir: str = "/tmp/evomerge-faulty"


class FaultyEvaluator(ClassificationEvaluator):
    def __init__(self, options: FaultyOptions):
        super().__init__(options)
        self.faults = options
        self.candidate_id: int | None = None

    def evaluate(self, params: dict[str, torch.Tensor]) -> EvalResult:
        cid, f = self.candidate_id, self.faults
        if cid in f.exit_once_on:
            marker = Path(f.marker_dir) / f"exit-{cid}"
            if not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.touch()
                os._exit(3)
        if cid in f.exit_on:
            os._exit(3)
        if cid in f.hang_on:
            time.sleep(f.hang_s)
        if cid in f.sleep_on:
            time.sleep(f.sleep_on[cid])
        if cid in f.raise_on:
            raise RuntimeError(f"injected failure for candidate {cid}")
        result = super().evaluate(params)
        if cid in f.nan_on:
            result.objectives["accuracy"] = float("nan")
        if cid in f.wrong_length_on:
            result.per_example = result.per_example[:-1]
        return result


@EVALUATORS.register("faulty", FaultyOptions, "classification evaluator that fails on chosen candidates")
def build_faulty(options: FaultyOptions) -> FaultyEvaluator:
    return FaultyEvaluator(options)
