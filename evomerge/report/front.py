"""A run's trade-off front, read from its journal: `front.csv`, the front plots and `evomerge front`.

The front is the non-dominated set of every successful evaluation (all of them cost the same), in
the objectives' own directions. Candidates that failed, NaN objectives included, never reach it
and are listed as dropped. Hypervolume is reported against a stated reference point.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import yaml

from evomerge.errors import EvomergeError
from evomerge.pareto import Objectives, hypervolume, non_dominated
from evomerge.store import RunDir, read_journal
from evomerge.store.atomic import atomic_write_text

FRONT_FILE = "front.csv"


@dataclass
class FrontPoint:
    id: int
    genes: list[float] | None
    values: dict[str, float]  # real, on the search split
    predicted: dict[str, float] | None = None  # the surrogate's, for MAP's front points
    phase: str | None = None
    test: dict[str, float] = field(default_factory=dict)


@dataclass
class RunFront:
    objectives: Objectives
    points: list[FrontPoint]  # the front, best first on the first objective; `--point K` indexes this
    evaluated: list[FrontPoint]  # every successful evaluation
    dropped: list[tuple[int, str]]  # (candidate id, why) for failed candidates
    reference: np.ndarray  # minimised hypervolume reference point

    def minimised(self, points: list[FrontPoint]) -> np.ndarray:
        return np.array([self.objectives.minimised(p.values) for p in points]).reshape(-1, len(self.objectives))

    @property
    def hypervolume(self) -> float:
        return hypervolume(self.minimised(self.points), self.reference)

    def reference_natural(self) -> dict[str, float]:
        return dict(zip(self.objectives.names, (self.objectives.natural(self.reference) + 0.0).tolist()))


def run_objectives(run: RunDir, override: dict[str, str] | None = None) -> dict[str, str]:
    """The objectives a run searched: the strategy's `objectives`, else its single `objective`, else accuracy.

    Read from the raw spec.yaml, so runs of user strategies that cannot be imported here still work.
    """
    if override:
        return override
    spec = yaml.safe_load(run.spec_path.read_text()) or {}
    strategy = spec.get("strategy")
    if isinstance(strategy, dict):
        objectives = strategy.get("objectives")
        if isinstance(objectives, dict) and objectives:
            return {str(k): str(v) for k, v in objectives.items()}
        objective = strategy.get("objective")
        if isinstance(objective, str):
            return {objective: "max" if strategy.get("maximize", True) else "min"}
    return {"accuracy": "max"}


def default_reference(objectives: Objectives, F: np.ndarray) -> np.ndarray:
    """Minimised reference: 0 for maximised metrics that live in [0, 1] (accuracies), else the worst value seen."""
    reference = F.max(axis=0) if len(F) else np.zeros(len(objectives))
    for j, name in enumerate(objectives.names):
        natural = objectives.signs[j] * F[:, j] if len(F) else np.zeros(1)
        if objectives.goals[name] == "max" and np.all((natural >= 0) & (natural <= 1)):
            reference[j] = 0.0
    return reference


def read_front(run: RunDir, objectives: dict[str, str] | None = None) -> RunFront:
    goals = Objectives(run_objectives(run, objectives), path="--objectives")
    entries, _ = read_journal(run.journal_path)
    evaluated, dropped = [], []
    for entry in entries:
        if entry["status"] != "ok":
            dropped.append((int(entry["id"]), str(entry.get("error", "failed"))))
            continue
        meta = entry.get("meta") or {}
        goals.check_names(list(entry["objectives"]))
        evaluated.append(
            FrontPoint(
                id=int(entry["id"]),
                genes=meta.get("genes"),
                values={n: float(entry["objectives"][n]) for n in goals.names},
                predicted=meta.get("predicted"),
                phase=meta.get("phase"),
            )
        )
    F = np.array([goals.minimised(p.values) for p in evaluated]).reshape(-1, len(goals))
    mask = non_dominated(F) if len(F) else np.zeros(0, dtype=bool)
    order = np.lexsort(F[mask].T[::-1]) if mask.any() else np.zeros(0, dtype=np.int64)
    front = [evaluated[i] for i in np.flatnonzero(mask)[order]]
    _attach_test_metrics(run, front)
    return RunFront(goals, front, evaluated, dropped, default_reference(goals, F))


def _attach_test_metrics(run: RunDir, front: list[FrontPoint]) -> None:
    path = run.path / FRONT_FILE
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = {int(r["id"]): r for r in csv.DictReader(f)}
    for point in front:
        row = rows.get(point.id, {})
        point.test = {
            k[len("test_") :]: float(v) for k, v in row.items() if k.startswith("test_") and v not in ("", None)
        }


def write_front(run: RunDir, test: Callable[[np.ndarray], dict[str, float]] | None = None) -> dict[str, Any]:
    """front.csv and the front plots; `test` (the executor's) adds held-out metrics of each front point."""
    front = read_front(run)
    if test is not None:
        for point in front.points:
            if point.genes is not None:
                point.test = test(np.asarray(point.genes))
    names = front.objectives.names
    genes = max((len(p.genes) for p in front.points if p.genes), default=0)
    test_keys = sorted({k for p in front.points for k in p.test})
    header = ["point", "id", "phase", *[f"gene_{i}" for i in range(genes)], *names]
    header += [f"predicted_{n}" for n in names] + [f"test_{k}" for k in test_keys]
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(header)
    for k, p in enumerate(front.points):
        predicted = p.predicted or {}
        writer.writerow(
            [k, p.id, p.phase or "", *(p.genes or [""] * genes), *(p.values[n] for n in names)]
            + [predicted.get(n, "") for n in names]
            + [p.test.get(key, "") for key in test_keys]
        )
    atomic_write_text(run.path / FRONT_FILE, text.getvalue())
    from evomerge.report.front_plots import plot_front

    return {
        "size": len(front.points),
        "hypervolume": front.hypervolume,
        "reference": front.reference_natural(),
        "dropped": [{"id": i, "error": e} for i, e in front.dropped],
        "plots": plot_front(run, front),
    }


def front_rows(front: RunFront) -> list[dict[str, str]]:
    """Rows for the `evomerge front` table."""
    names = front.objectives.names
    predicted = [n for n in names if any(n in (q.predicted or {}) for q in front.points)]
    tested = [n for n in names if any(n in q.test for q in front.points)]

    def cell(values: dict[str, float] | None, name: str) -> str:
        return f"{values[name]:.4f}" if values and name in values else "-"

    rows = []
    for k, p in enumerate(front.points):
        row = {"point": str(k), "id": str(p.id), **{n: cell(p.values, n) for n in names}}
        row.update({f"pred {n}": cell(p.predicted, n) for n in predicted})
        row.update({f"test {n}": cell(p.test, n) for n in tested})
        if p.genes is not None:
            row["genes"] = " ".join(f"{g:.3f}" for g in p.genes[:8]) + (" …" if len(p.genes) > 8 else "")
        rows.append(row)
    return rows


def front_genome(run: RunDir, point: int, objectives: dict[str, str] | None = None) -> tuple[np.ndarray, FrontPoint]:
    """The genes of front point `point` as `evomerge front` (with the same `--objectives`) numbers them."""
    front = read_front(run, objectives)
    if not front.points:
        raise EvomergeError(
            f"the front of {run.path} is empty ({len(front.evaluated)} evaluated, {len(front.dropped)} failed)"
        )
    if not 0 <= point < len(front.points):
        raise EvomergeError(
            f"--point {point} is not on the front of {run.path}; it has points 0..{len(front.points) - 1}"
        )
    chosen = front.points[point]
    if chosen.genes is None:
        raise EvomergeError(f"the strategy of {run.path} does not journal genes, so front points cannot be exported")
    return np.asarray(chosen.genes, dtype=np.float64), chosen
