"""Plain-text tables of runs for `evomerge report` and `evomerge ls`."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from evomerge.store import RunDir


def read_curve(run: RunDir) -> list[dict[str, float]]:
    if not run.curve_path.exists():
        return []
    with open(run.curve_path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _journal_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def run_rows(runs: list[RunDir]) -> list[dict[str, str]]:
    rows = []
    for run in runs:
        info = run.info()
        summary = run.summary() or {}
        status = info.get("status", "?")
        evaluations = summary.get("evaluations", 0)
        if status == "running":
            evaluations = _journal_lines(run.journal_path)  # live progress of a running (or dead) driver
            if not run.lock().held_elsewhere():
                status = "stopped (resume it)"  # its driver died without a clean stop
        rows.append(
            {
                "run": run.path.name,
                "status": status,
                "strategy": summary.get("strategy") or run.load_spec().strategy.name,
                "evals": f"{_fmt(evaluations)}/{_fmt(info.get('budget'))}",
                "best train": _fmt(summary.get("best_train")),
                "test acc": _fmt((summary.get("test") or {}).get("accuracy")),
                "failed": _fmt(summary.get("failures")),
                "wall s": _fmt(summary.get("wall_seconds"), 1),
                "evals/s": _fmt(summary.get("evaluations_per_second"), 0),
                "overhead": _fmt(summary.get("overhead_share"), 3),
            }
        )
    return rows


def format_table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "(no runs)"
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in keys}
    lines = ["  ".join(k.ljust(widths[k]) for k in keys), "  ".join("-" * widths[k] for k in keys)]
    lines += ["  ".join(r[k].ljust(widths[k]) for k in keys) for r in rows]
    return "\n".join(lines)
