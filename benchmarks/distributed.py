"""Ladder step 5: the Ray executor on a local cluster.

1. Manager overhead per evaluation, with a near-zero-cost evaluator (an MLP with one hidden unit
   on the 178-example wine data): wall time per evaluation minus the evaluator's own time, for the
   in-process executor and for Ray (2 workers).
2. A CPU-bound evaluator (digits, hidden layers [1024, 1024], one torch thread per worker) searched
   as recipes over two specialists, so the genome sent is a few numbers and each worker
   materialises the 1.1M-parameter model itself: evaluations/s with 1 and with 2 Ray workers,
   the speed-up, and the workers' busy share.
3. The M2N2 digits search from scratch through Ray (2 workers, asynchronous) against the in-process
   result of benchmarks/m2n2_digits.py at the same budget.

    python benchmarks/distributed.py            # about 6 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from _results import RESULTS, save_result

ROOT = Path(__file__).resolve().parent.parent


def run(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    from evomerge.runtime import start_run
    from evomerge.spec import spec_from_dict

    spec = {**spec, "output": str(out)}
    return start_run(spec_from_dict(spec), progress=False).summary()


def executor(name: str, workers: int = 2) -> dict[str, Any]:
    if name == "inprocess":
        return {"name": "inprocess"}
    return {"name": "ray", "address": "auto", "workers": workers, "cpus_per_worker": 1.0, "in_flight_per_worker": 2}


def search(name: str, evaluator: dict, budget: int, execution: dict, recipe: bool = False, **strategy: Any) -> dict:
    spec = {
        "name": name,
        "budget": budget,
        "evaluator": {"name": "classification", "device": "cpu", **evaluator},
        "strategy": {"name": "m2n2", "population": 20, **strategy},
        "runtime": {"progress": False, "threads": 1, "log_every": 1000, "snapshot_every": 5000, "executor": execution},
    }
    if recipe:
        spec["models"] = {"init": "specialists"}
        spec["space"] = {"name": "recipe", "blocks": "chunks", "chunks": 64}
        spec["strategy"]["mutation_std"] = 0.0
    return spec


def overhead_ms(summary: dict[str, Any]) -> float:
    """Wall time per evaluation not spent inside the evaluator (workers run in parallel: divide by them)."""
    workers = len(summary.get("workers", [])) or 1
    outside = summary["wall_seconds"] - summary["evaluator_share"] * summary["wall_seconds"] / workers
    return 1000 * outside / summary["evaluations"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m2n2-budget", type=int, default=50000, help="budget of the M2N2 digits search via Ray")
    args = parser.parse_args()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows: list[dict[str, Any]] = []
    tiny = {"dataset": "wine", "hidden": [1]}
    heavy = {"dataset": "digits", "hidden": [1024, 1024]}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for name, budget in (("inprocess", 5000), ("ray", 3000)):
            s = run(search(f"zero-{name}", tiny, budget, executor(name)), out)
            rows.append(
                {
                    "measure": "manager overhead per evaluation",
                    "executor": name,
                    "workers": len(s.get("workers", [])) or 1,
                    "evaluations": s["evaluations"],
                    "value": round(overhead_ms(s), 3),
                    "unit": "ms",
                }
            )
        rates = {}
        for workers in (1, 2):
            s = run(search(f"heavy-{workers}", heavy, 500, executor("ray", workers), recipe=True), out)
            rates[workers] = s["evaluations_per_second"]
            busy = min(w["busy_share"] for w in s["workers"])
            rows.append(
                {
                    "measure": "CPU-bound evaluations/s",
                    "executor": "ray",
                    "workers": workers,
                    "evaluations": s["evaluations"],
                    "value": rates[workers],
                    "unit": "evals/s",
                    "min_busy_share": busy,
                }
            )
        rows.append(
            {
                "measure": "speed-up 2 workers / 1",
                "executor": "ray",
                "workers": 2,
                "evaluations": None,
                "value": round(rates[2] / rates[1], 3),
                "unit": "x",
            }
        )
        digits = {"dataset": "digits", "hidden": [256]}
        s = run(search("m2n2-ray", digits, args.m2n2_budget, executor("ray"), mutation_std=0.01), out)
        reference = json.loads((RESULTS / "m2n2_digits.json").read_text())["rows"][0]
        rows.append(
            {
                "measure": "M2N2 digits test accuracy (%)",
                "executor": "ray",
                "workers": 2,
                "evaluations": s["evaluations"],
                "value": round(100 * s["test"]["accuracy"], 2),
                "unit": "%",
                "in_process_mean": reference["mean"],
                "in_process_sd": reference["sd"],
                "wall_seconds": s["wall_seconds"],
            }
        )
    ray.shutdown()

    lines = [f"{'measure':<34} {'executor':<10} {'workers':>7} {'evals':>7} {'value':>10}  note", "-" * 90]
    for r in rows:
        note = ""
        if "min_busy_share" in r:
            note = f"min busy share {r['min_busy_share']:.0%}"
        if "in_process_mean" in r:
            spread = f"{r['in_process_mean']:.1f} ± {r['in_process_sd']:.1f}"
            note = f"in-process (5 seeds): {spread}; Ray run {r['wall_seconds']:.0f} s"
        evals = "-" if r["evaluations"] is None else f"{r['evaluations']:,}"
        lines.append(
            f"{r['measure']:<34} {r['executor']:<10} {r['workers']:>7} {evals:>7} {r['value']:>8} {r['unit']:<5} {note}"
        )
    table = "\n".join(lines)
    print(table)
    save_result("distributed", table, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
