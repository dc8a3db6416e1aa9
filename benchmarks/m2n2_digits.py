"""Ladder step 1: M2N2 parity on scikit-learn digits, with its ablations and baselines.

Runs every method of the paper's two settings (from scratch, 50,000 evaluations; from the two
pre-trained specialists, 10,000) for several seeds through the public `start_run` API, then one
timing run of from-scratch M2N2 alone on the machine. Prints a table, writes
benchmarks/results/m2n2_digits.json and the accuracy curves as benchmarks/results/m2n2_digits.png.

Each (method, seed) is an ordinary run directory under --runs-dir, so an interrupted benchmark
picks up where it stopped when run again.

    python benchmarks/m2n2_digits.py                 # 10 seeds, about 50 minutes on 2 cores
    python benchmarks/m2n2_digits.py --quick         # 1 seed, 1/10 of the budgets (a smoke test)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from _results import RESULTS, save_result

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "search_spaces"


@dataclass(frozen=True)
class Method:
    label: str
    setting: str  # "scratch" or "pretrained"
    spec: str
    published: float  # test accuracy read from the paper's figure, at the budget


METHODS = [
    Method("M2N2", "scratch", "m2n2_digits_scratch.yaml", 87.0),
    Method("M2N2 w/o crossover", "scratch", "m2n2_digits_scratch_no_crossover.yaml", 77.0),
    Method("GA w/o crossover", "scratch", "ga_digits_scratch_no_crossover.yaml", 71.0),
    Method("GA", "scratch", "ga_digits_scratch.yaml", 68.0),
    Method("CMA-ES", "scratch", "cma_es_digits_scratch.yaml", 86.0),
    Method("MAP-Elites", "scratch", "map_elites_digits_scratch.yaml", 60.0),
    Method("M2N2", "pretrained", "m2n2_digits_pretrained.yaml", 68.5),
    Method("M2N2 w/o attraction", "pretrained", "m2n2_digits_pretrained_no_attraction.yaml", 66.0),
    Method("M2N2 w/o split point", "pretrained", "m2n2_digits_pretrained_no_split_point.yaml", 58.0),
    Method("MAP-Elites", "pretrained", "map_elites_digits_pretrained.yaml", 62.0),
    Method("brute-force SLERP", "pretrained", "slerp_sweep_digits_pretrained.yaml", 57.7),
    Method("GA", "pretrained", "ga_digits_pretrained.yaml", 52.0),
]
GOALS = {("M2N2", "scratch"): 87.0, ("M2N2", "pretrained"): 68.5}


def run_one(spec_file: str, seed: int, runs_dir: str, budget: int | None, threads: int) -> dict:
    """One search in a fresh process; reuses a finished run and resumes an unfinished one."""
    from evomerge.runtime import resume_run, start_run
    from evomerge.spec import load_spec
    from evomerge.store import RunDir

    name = f"{Path(spec_file).stem}-s{seed}"
    overrides = {
        "seed": seed,
        "name": name,
        "output": runs_dir,
        "runtime": {"threads": threads, "progress": False, "log_every": 250, "snapshot_every": 10000},
    }
    if budget:
        overrides["budget"] = budget
    spec = load_spec(SPECS / spec_file, overrides)
    path = Path(runs_dir) / name
    start = time.perf_counter()
    if (path / "run.json").exists():
        run = RunDir.open(path)
        if (run.summary() or {}).get("status") != "finished":
            resume_run(path, progress=False)
    else:
        run = start_run(spec, progress=False)
    from evomerge.report.tables import read_curve

    summary = run.summary()
    summary["process_seconds"] = time.perf_counter() - start
    summary["curve"] = [(p["evaluations"], p.get("test_accuracy")) for p in read_curve(run)]
    return summary


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def timing_run(runs_dir: str, budget: int | None) -> dict:
    """From-scratch M2N2 alone on the machine (the spec's defaults: one thread), timed from the outside too."""
    from evomerge.runtime import start_run
    from evomerge.spec import load_spec

    name = f"timing-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    overrides = {
        "name": name,
        "output": runs_dir,
        "runtime": {"progress": False, "log_every": 500, "snapshot_every": 10000},
    }
    if budget:
        overrides["budget"] = budget
    start = time.perf_counter()
    run = start_run(load_spec(SPECS / "m2n2_digits_scratch.yaml", overrides), progress=False)
    total = time.perf_counter() - start
    summary = run.summary()
    return {
        "evaluations": summary["evaluations"],
        "process_seconds": round(total, 2),
        "search_seconds": summary["wall_seconds"],
        "evaluations_per_second": summary["evaluations_per_second"],
        "evaluator_share": summary["evaluator_share"],
        "test_share": summary["test_share"],
        "strategy_share": summary.get("strategy_share", 0.0),
        "overhead_share": summary["overhead_share"],
        "test_accuracy": summary["test"].get("accuracy"),
    }


def gap_lines(rows: list[dict]) -> list[str]:
    """Pre-trained setting: each method's lead over brute-force SLERP, ours against the paper's.

    Brute-force SLERP is a fixed function of the specialist pair, so these differences compare the
    methods with the starting models' quality taken out.
    """
    pre = {r["method"]: r for r in rows if r["setting"] == "pretrained"}
    ref = pre.get("brute-force SLERP")
    if ref is None:
        return []
    lines = ["pre-trained: lead over brute-force SLERP   ours    paper"]
    for name, r in pre.items():
        if name != ref["method"]:
            ours, paper = r["mean"] - ref["mean"], r["published"] - ref["published"]
            r["lead_over_bruteforce"] = round(ours, 2)
            lines.append(f"  {name:<38} {ours:>+6.1f}  {paper:>+6.1f}")
    return lines


def timing_line(timing: dict) -> str:
    return (
        f"timing (M2N2 from scratch, {timing['evaluations']:,} evaluations, 1 thread): "
        f"search {timing['search_seconds']:.1f} s, whole process {timing['process_seconds']:.1f} s, "
        f"{timing['evaluations_per_second']:,.0f} evals/s, evaluator {100 * timing['evaluator_share']:.1f}% "
        f"+ test passes {100 * timing['test_share']:.1f}%, strategy (ask/tell) {100 * timing['strategy_share']:.1f}%, "
        f"driver {100 * timing['overhead_share']:.1f}% of wall time"
    )


def render(rows: list[dict], timing: dict) -> str:
    """The printed table: accuracy per method with its spread, the pre-trained leads and the timing line."""
    header = (
        f"{'setting':<10} {'method':<22} {'budget':>7} {'paper':>6} {'test acc (mean ± sd)':>21} {'min':>6} {'max':>6}"
        f" {'Δ':>6}  within 3"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['setting']:<10} {r['method']:<22} {r['budget']:>7,} {r['published']:>6.1f} "
            f"{r['mean']:>13.2f} ± {r['sd']:<5.2f} {r['min']:>6.1f} {r['max']:>6.1f} {r['delta']:>+6.1f}  "
            f"{'yes' if r['within_3_points'] else 'no'}"
        )
    lines += ["", *gap_lines(rows), "", timing_line(timing)]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, setting in zip(axes, ("scratch", "pretrained")):
        for row in (r for r in rows if r["setting"] == setting):
            curves = [c for c in row["curves"] if c]
            length = min(len(c) for c in curves)
            x = [p[0] for p in curves[0][:length]]
            ys = np.array([[p[1] for p in c[:length]] for c in curves]) * 100
            mean, sd = ys.mean(axis=0), ys.std(axis=0, ddof=1)
            (line,) = ax.plot(x, mean, label=f"{row['method']} ({row['mean']:.1f} ± {row['sd']:.1f})")
            ax.fill_between(x, mean - sd, mean + sd, color=line.get_color(), alpha=0.2, linewidth=0)
            ax.fill_between(x, ys.min(axis=0), ys.max(axis=0), color=line.get_color(), alpha=0.07, linewidth=0)
        origin = "scratch" if setting == "scratch" else "pre-trained specialists"
        ax.set_title(f"digits, from {origin}: mean, ± sd (dark) and min–max (light) over seeds", fontsize=10)
        ax.set_xlabel("evaluations (forward passes over the train split)")
        ax.set_ylabel("test accuracy of best-on-train (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10, help="seeds per method (default 10)")
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel, one torch thread each (default 2)")
    parser.add_argument(
        "--runs-dir", default=str(ROOT / "runs" / "bench-m2n2-digits"), help="where the run directories go"
    )
    parser.add_argument(
        "--quick", action="store_true", help="1 seed and a tenth of each budget: checks the script, not the numbers"
    )
    parser.add_argument("--only", choices=["scratch", "pretrained"], help="one setting only")
    parser.add_argument("--timing-only", action="store_true", help="only the timing run; merge it into the saved JSON")
    parser.add_argument("--keep-timing", action="store_true", help="reuse the saved timing run instead of a new one")
    parser.add_argument("--table-only", action="store_true", help="reprint the saved results' table (no runs)")
    args = parser.parse_args()
    seeds = 1 if args.quick else args.seeds
    runs_dir = args.runs_dir + ("-quick" if args.quick else "")
    methods = [m for m in METHODS if args.only in (None, m.setting)]
    suffix = "_quick" if args.quick else ""
    if args.timing_only or args.table_only:
        saved = RESULTS / f"m2n2_digits{suffix}.json"
        out = json.loads(saved.read_text())
        if args.timing_only:
            out["timing"] = timing_run(runs_dir, 5000 if args.quick else None)
        for row in out["rows"]:  # results saved before the table had these columns
            row.setdefault("min", min(row["per_seed"]))
            row.setdefault("max", max(row["per_seed"]))
        out["table"] = render(out["rows"], out["timing"])
        saved.write_text(json.dumps(out, indent=2) + "\n")
        print(out["table"])
        return 0

    jobs = {}
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        for method in methods:
            budget = (5000 if method.setting == "scratch" else 1000) if args.quick else None
            for seed in range(seeds):
                jobs[(method, seed)] = pool.submit(run_one, method.spec, seed, runs_dir, budget, 1)
        done = 0
        for key, future in jobs.items():
            future.result()
            done += 1
            print(f"[{done}/{len(jobs)}] {key[0].label} ({key[0].setting}) seed {key[1]}", file=sys.stderr, flush=True)

    rows = []
    for method in methods:
        results = [jobs[(method, s)].result() for s in range(seeds)]
        accs = [100 * r["test"]["accuracy"] for r in results]
        mean, sd = mean_sd(accs)
        goal = GOALS.get((method.label, method.setting))
        rows.append(
            {
                "method": method.label,
                "setting": method.setting,
                "budget": results[0]["evaluations"],
                "published": method.published,
                "mean": round(mean, 2),
                "sd": round(sd, 2),
                "min": round(min(accs), 2),
                "max": round(max(accs), 2),
                # runs whose final archive leaves some train examples of a whole class unsolved by every member
                "lost_class_runs": sum((r.get("final_stats") or {}).get("coverage", 1.0) < 0.95 for r in results),
                "delta": round(mean - method.published, 2),
                "within_3_points": abs(mean - method.published) <= 3.0,
                "goal_met": None if goal is None else mean >= goal,
                "per_seed": [round(a, 2) for a in accs],
                "evaluations_per_second": round(statistics.fmean(r["evaluations_per_second"] for r in results), 1),
                "curves": [r["curve"] for r in results],
            }
        )

    if args.keep_timing:
        timing = json.loads((RESULTS / f"m2n2_digits{suffix}.json").read_text())["timing"]
    else:
        print("timing run: from-scratch M2N2 alone on the machine ...", file=sys.stderr, flush=True)
        timing = timing_run(runs_dir, 5000 if args.quick else None)

    table = render(rows, timing)
    print(table)

    rows_out = [{k: v for k, v in r.items() if k != "curves"} for r in rows]
    save_result(f"m2n2_digits{suffix}", table, rows_out, seeds=seeds, timing=timing)
    plot(rows, RESULTS / f"m2n2_digits{suffix}.png")
    print(f"\nwrote {RESULTS / f'm2n2_digits{suffix}.json'} and .png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
