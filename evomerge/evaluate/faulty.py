"""Fault injection: the classification evaluator, misbehaving on chosen candidate ids.

For testing evomerge's fault handling, and a cluster's: `evaluator: {name: faulty, exit_on: [7]}`.
The executor tells it each candidate's id before evaluating (`candidate_id`). "Once" faults
leave a marker file, so a replaced worker (or a resumed driver) does not repeat them; markers live
in the run's `faults/` folder (the evaluator is bound to its run, see `RunBound`), or in
`marker_dir` when given, which runs then share.
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
    exit_once_on_test: bool = False  # the run's first test pass kills its worker
    hang_on: list[int] = field(default_factory=list)
    hang_s: float = 3600.0
    sleep_on: dict[int, float] = field(default_factory=dict)  # candidate id -> seconds, then a normal result
    marker_dir: str | None = None  # default: RUN/faults


class FaultyEvaluator(ClassificationEvaluator):
    def __init__(self, options: FaultyOptions):
        super().__init__(options)
        self.faults = options
        self.candidate_id: int | None = None
        self.marker_dir: Path | None = None if options.marker_dir is None else Path(options.marker_dir)

    def bind_run(self, run_dir: Path) -> None:
        if self.faults.marker_dir is None:
            self.marker_dir = Path(run_dir) / "faults"

    def first_time(self, fault: str, cid: int) -> bool:
        """True the first time `fault` hits candidate `cid` in this run (or marker folder): leaves its marker."""
        if self.marker_dir is None:
            raise RuntimeError(f"{fault} on candidate {cid} needs a run directory or marker_dir for its marker")
        marker = self.marker_dir / f"{fault}-{cid}"
        if marker.exists():
            return False
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        return True

    def test(self, params: dict[str, torch.Tensor]) -> dict[str, float]:
        if self.faults.exit_once_on_test and self.first_time("exit-test", 0):
            os._exit(3)
        return super().test(params)

    def evaluate(self, params: dict[str, torch.Tensor]) -> EvalResult:
        cid, f = self.candidate_id, self.faults
        if cid in f.exit_once_on and self.first_time("exit", cid):
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
