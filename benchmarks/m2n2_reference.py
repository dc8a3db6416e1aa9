"""evomerge's M2N2 against the paper's reference code (SakanaAI/natural_niches), side by side.

The reference is a public repository, not part of evomerge: clone it anywhere and give this script
its folder and a Python that has its requirements (jax, optax, tqdm, scikit-learn):

    git clone https://github.com/SakanaAI/natural_niches /tmp/natural_niches
    python -m venv /tmp/jax && /tmp/jax/bin/pip install jax optax tqdm scikit-learn
    python benchmarks/m2n2_reference.py --reference /tmp/natural_niches --reference-python /tmp/jax/bin/python

Three measurements, written to benchmarks/results/m2n2_reference.json:

- lockstep: one reference run with every draw recorded, replayed through evomerge's M2N2 given the
  same children: the parent-sampling weights, the replaced slot and the crossover must agree;
- accuracy: from-scratch M2N2 at 50,000 evaluations for --seeds seeds on each side: the reference (its
  functions under one jitted scan: the same keys and operations as its own loop, seeds 42, 43, …) and
  evomerge (`m2n2_digits_scratch.yaml`, seeds 0, 1, …, the run directories shared with m2n2_digits.py);
  mean, sd, min, max, runs that lost a whole class, and a two-sided Mann-Whitney U test of the difference,
  over all runs and over the converged ones (best train accuracy >= 0.97; the rest are stuck runs); and
  evomerge's seeds in pairs read at half the budget, the better on train kept (the stuck tail removed);
- speed: the reference's own search loop and evomerge's (`evomerge run`), alternated --pairs times in the
  same session: the reference as shipped (JAX's threads on every core) and pinned to one core (taskset),
  evomerge with `--threads` 1 (its default) and one per core; evaluations/s of each and the ratios
  as shipped, all cores each and one core each.

Finished runs on either side are kept (--runs-dir, --cache-dir), so a rerun only adds what is missing;
--accuracy-only keeps the saved lockstep and speed results and redoes the accuracy part.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from _results import RESULTS, save_result
from m2n2_digits import run_one

ROOT = Path(__file__).resolve().parent.parent
SIDE = Path(__file__).resolve().parent / "reference_side.py"


ONE_CORE = ["taskset", "-c", "0"] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else None


def reference(python: str, *args: str, one_core: bool = False) -> None:
    """A reference_side.py mode; with one_core, pinned to CPU 0 (JAX otherwise spreads over every core)."""
    pin = ONE_CORE if one_core else []
    subprocess.run([*pin, python, str(SIDE), *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def lockstep(record: Path) -> dict:
    """Replay the reference's children through evomerge's archive and compare every decision."""
    import torch

    from evomerge.evaluate.base import EvalResult
    from evomerge.evaluate.classification import ClassificationEvaluator, ClassificationOptions
    from evomerge.merge import split_point_slerp
    from evomerge.search.base import Candidate
    from evomerge.search.m2n2 import M2N2, M2N2Options, match_scores
    from evomerge.space.weights import WeightSpace

    torch.set_num_threads(1)
    rec = dict(np.load(record))
    evaluator = ClassificationEvaluator(ClassificationOptions(device="cpu"))
    space = WeightSpace(evaluator.layout(), list(rec["inits"].astype(np.float32)))
    strategy = M2N2(M2N2Options(), space, seed=0)
    for cid in range(2):
        proposal = strategy.ask()
        strategy.tell(Candidate(cid, proposal.genome, proposal.meta), evaluator.evaluate(space.decode(proposal.genome)))
    worst = {"first_weights": 0.0, "second_weights": 0.0, "crossover": 0.0}
    slot_mismatches = 0
    steps = len(rec["slot"])
    for i in range(steps):
        size = strategy.size
        shared, fitness = strategy.shared_fitness()
        first, second = int(rec["first"][i]), int(rec["second"][i])
        ours_first = np.zeros(20)
        ours_first[:size] = fitness / fitness.sum()
        match = match_scores(shared, first)
        ours_second = np.zeros(20)
        ours_second[:size] = match / match.sum()
        worst["first_weights"] = max(worst["first_weights"], float(np.abs(ours_first - rec["first_weights"][i]).max()))
        worst["second_weights"] = max(
            worst["second_weights"], float(np.abs(ours_second - rec["second_weights"][i]).max())
        )
        crossed = split_point_slerp(
            strategy.genomes[first], strategy.genomes[second], int(rec["split"][i]), rec["w"][i]
        )
        worst["crossover"] = max(worst["crossover"], float(np.abs(crossed - rec["crossed"][i]).max()))
        child = rec["child"][i]
        result: EvalResult = evaluator.evaluate(space.decode(child))
        ids_before = strategy.ids[: strategy.size].copy()
        strategy.tell(Candidate(i + 2, child, {}), result)
        changed = np.flatnonzero(strategy.ids[: len(ids_before)] != ids_before)
        ours_slot = int(changed[0]) if len(changed) else (len(ids_before) if strategy.size > len(ids_before) else 20)
        slot_mismatches += ours_slot != int(rec["slot"][i])
    return {"steps": steps, "slot_mismatches": slot_mismatches, **{f"max_abs_diff_{k}": v for k, v in worst.items()}}


def evomerge_speed(steps: int, workdir: Path, threads: int) -> tuple[float, dict]:
    """`evomerge run --threads` of the from-scratch digits spec, as a user runs it; the search loop's evaluations/s."""
    name = f"speed-{time.time_ns()}"
    spec = ROOT / "search_spaces" / "m2n2_digits_scratch.yaml"
    command = [sys.executable, "-m", "evomerge", "run", str(spec), "--budget", str(steps), "--threads", str(threads)]
    command += ["--output", str(workdir), "--name", name, "--quiet"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((workdir / name / "summary.json").read_text())
    return summary["evaluations_per_second"], summary


def mean_sd_min_max(values: list[float]) -> dict:
    return {
        "mean": round(statistics.fmean(values), 2),
        "sd": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0,
        "min": round(min(values), 2),
        "max": round(max(values), 2),
        "n": len(values),
    }


def reference_accuracy(python: str, checkout: str, seeds: list[int], steps: int, cache: Path) -> list[dict]:
    """The reference's from-scratch runs, one cached JSON per seed so an interrupted benchmark loses nothing."""
    cache.mkdir(parents=True, exist_ok=True)
    missing = [s for s in seeds if not (cache / f"seed{s}-{steps}.json").exists()]
    for seed in missing:
        out = cache / f"seed{seed}-{steps}.tmp"
        reference(python, "accuracy", checkout, str(seed), str(steps), str(out))
        (row,) = json.loads(out.read_text())
        (cache / f"seed{seed}-{steps}.json").write_text(json.dumps(row))
        out.unlink()
        print(f"reference seed {seed}: test {100 * row['test']:.2f}", file=sys.stderr, flush=True)
    return [json.loads((cache / f"seed{s}-{steps}.json").read_text()) for s in seeds]


def two_half_budget_runs(seeds: list[int], runs_dir: str, budget: int) -> dict:
    """What removing the stuck tail alone would give: seeds paired (0, 1), (2, 3), …, each pair's two runs read
    at half the budget off their curves, and the one with the better best train accuracy kept (an evomerge user's
    two independent searches at half the budget each)."""
    from evomerge.report.tables import read_curve
    from evomerge.store import RunDir

    def at_half(seed: int) -> tuple[float, float]:
        curve = read_curve(RunDir.open(Path(runs_dir) / f"m2n2_digits_scratch-s{seed}"))
        point = [p for p in curve if p["evaluations"] <= budget // 2][-1]
        return point["best_train"], 100 * point["test_accuracy"]

    kept = [max(at_half(a), at_half(b))[1] for a, b in zip(seeds[::2], seeds[1::2])]
    return {**mean_sd_min_max(kept), "evaluations_each": budget // 2}


def evomerge_accuracy(seeds: list[int], runs_dir: str, workers: int) -> list[dict]:
    """evomerge's from-scratch M2N2 runs, as m2n2_digits.py makes them (and reusing its finished runs)."""
    with ProcessPoolExecutor(max_workers=workers) as pool:
        jobs = [pool.submit(run_one, "m2n2_digits_scratch.yaml", s, runs_dir, None, 1) for s in seeds]
        summaries = [job.result() for job in jobs]
    return [
        {
            "seed": s,
            "test": r["test"]["accuracy"],
            "train": r["best_train"],
            "coverage": (r.get("final_stats") or {}).get("coverage"),
        }
        for s, r in zip(seeds, summaries)
    ]


CONVERGED_TRAIN = 0.97  # best train accuracy of a run that converged; stuck runs end at 0.82-0.92


def compare(reference_runs: list[dict], evomerge_runs: list[dict]) -> dict:
    """Both sides' spread, lost classes (final coverage < 95%: every member misses a class) and the U test; then
    the same over converged runs only, test and best train accuracy, to tell the algorithm's level from its tail."""
    from scipy.stats import mannwhitneyu

    def side(runs: list[dict]) -> dict:
        converged = [r for r in runs if r["train"] >= CONVERGED_TRAIN]
        return {
            **mean_sd_min_max([100 * r["test"] for r in runs]),
            "lost_class_runs": sum(r["coverage"] < 0.95 for r in runs),
            "converged": {
                **mean_sd_min_max([100 * r["test"] for r in converged]),
                "train_mean": round(statistics.fmean(r["train"] for r in converged), 4),
            },
        }

    def p_value(key: str, converged: bool) -> float:
        pick = [[r[key] for r in runs if not converged or r["train"] >= CONVERGED_TRAIN] for runs in sides]
        return round(float(mannwhitneyu(pick[1], pick[0], alternative="two-sided").pvalue), 3)

    sides = (reference_runs, evomerge_runs)
    return {
        "reference": side(reference_runs),
        "evomerge": side(evomerge_runs),
        "mann_whitney_p": p_value("test", False),
        "converged_mann_whitney_p": {"test": p_value("test", True), "train": p_value("train", True)},
    }


def measure_lockstep_and_speed(args: argparse.Namespace) -> dict:
    """The lockstep replay, then --pairs alternated timings of the reference loop and evomerge."""
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print("lockstep: recording a reference run ...", file=sys.stderr, flush=True)
        reference(args.reference_python, "record", args.reference, "42", str(args.record_steps), str(tmp / "rec.npz"))
        out["lockstep"] = lockstep(tmp / "rec.npz")
        print(f"speed: reference loop and evomerge, alternated {args.pairs} times ...", file=sys.stderr, flush=True)
        cores = os.cpu_count() or 1
        pairs = []
        for _ in range(args.pairs):
            rates, shares = {}, {}
            for side, one_core in (("reference_all_cores", False), ("reference_one_core", True)):
                if one_core and ONE_CORE is None:
                    continue
                speed_args = ("speed", args.reference, str(args.speed_steps), str(tmp / "speed.json"))
                reference(args.reference_python, *speed_args, one_core=one_core)
                rates[side] = json.loads((tmp / "speed.json").read_text())["evaluations_per_second"]
            for side, threads in (("evomerge_one_thread", 1), ("evomerge_all_cores", cores)):
                rates[side], summary = evomerge_speed(args.evomerge_speed_steps, tmp / "runs", threads)
                shares[side] = {k: summary[k] for k in ("evaluator_share", "strategy_share", "overhead_share")}
            pair = {"evals_per_s": {k: round(v, 1) for k, v in rates.items()}, "evomerge_shares": shares}
            pair["ratio_as_shipped"] = round(rates["evomerge_one_thread"] / rates["reference_all_cores"], 2)
            pair["ratio_all_cores"] = round(rates["evomerge_all_cores"] / rates["reference_all_cores"], 2)
            if "reference_one_core" in rates:
                pair["ratio_one_core"] = round(rates["evomerge_one_thread"] / rates["reference_one_core"], 2)
            pairs.append(pair)
        out["speed"] = {"cores": cores, "pairs": pairs}
    return out


def speed_lines(speed: dict) -> list[str]:
    """evals/s of each side per pair; the ratios: as shipped (evomerge's default one thread against JAX on every
    core), all cores each, one core each; evomerge's wall-time shares."""
    lines = [f"speed, evaluations/s in the search loop ({speed['cores']} cores):"]
    for k, p in enumerate(speed["pairs"], 1):
        rates = ", ".join(f"{side.replace('_', ' ')} {rate:,.0f}" for side, rate in p["evals_per_s"].items())
        ratios = f"as shipped {p['ratio_as_shipped']:.2f}x, all cores each {p['ratio_all_cores']:.2f}x"
        if "ratio_one_core" in p:
            ratios += f", one core each {p['ratio_one_core']:.2f}x"
        lines.append(f"  pair {k}: {rates}; evomerge / reference: {ratios}")
    for side in ("evomerge_one_thread", "evomerge_all_cores"):
        shares = [p["evomerge_shares"][side] for p in speed["pairs"]]
        mean = {k: statistics.fmean(s[k] for s in shares) for k in shares[0]}
        lines.append(
            f"  {side.replace('_', ' ')}: evaluator {100 * mean['evaluator_share']:.0f}%, strategy (ask/tell) "
            f"{100 * mean['strategy_share']:.0f}%, driver {100 * mean['overhead_share']:.0f}% of wall time"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True, help="folder of a natural_niches checkout")
    parser.add_argument("--reference-python", default=sys.executable, help="a Python with jax, optax, tqdm, sklearn")
    parser.add_argument("--seeds", type=int, default=20, help="runs per side: reference 42, 43, …, evomerge 0, 1, …")
    parser.add_argument("--steps", type=int, default=50000, help="evaluations per accuracy run (default 50,000)")
    parser.add_argument("--record-steps", type=int, default=3000, help="lockstep length (default 3,000)")
    parser.add_argument("--pairs", type=int, default=3, help="alternated speed measurements (default 3)")
    parser.add_argument("--speed-steps", type=int, default=3000, help="reference loop steps per timing (default 3,000)")
    parser.add_argument("--evomerge-speed-steps", type=int, default=20000, help="evomerge evaluations per timing")
    parser.add_argument("--workers", type=int, default=2, help="evomerge accuracy runs in parallel (default 2)")
    parser.add_argument("--runs-dir", default=str(ROOT / "runs" / "bench-m2n2-digits"), help="evomerge run dirs")
    parser.add_argument("--cache-dir", default=str(ROOT / "runs" / "bench-m2n2-reference"), help="reference results")
    parser.add_argument("--skip-accuracy", action="store_true", help="lockstep and speed only")
    parser.add_argument(
        "--accuracy-only", action="store_true", help="keep the saved lockstep and speed results; redo the accuracy part"
    )
    args = parser.parse_args()
    if args.accuracy_only:
        saved = json.loads((RESULTS / "m2n2_reference.json").read_text())
        out = {"lockstep": saved["lockstep"], "speed": saved["speed"]}
    else:
        out = measure_lockstep_and_speed(args)
    if not args.skip_accuracy:
        ref_seeds, our_seeds = [42 + k for k in range(args.seeds)], list(range(args.seeds))
        print(f"accuracy: {args.seeds} seeds per side ...", file=sys.stderr, flush=True)
        out["reference_runs"] = reference_accuracy(
            args.reference_python, args.reference, ref_seeds, args.steps, Path(args.cache_dir)
        )
        out["evomerge_runs"] = evomerge_accuracy(our_seeds, args.runs_dir, args.workers)
        out["accuracy"] = compare(out["reference_runs"], out["evomerge_runs"])
        out["accuracy"]["two_half_budget_runs"] = two_half_budget_runs(our_seeds, args.runs_dir, args.steps)

    lock = out["lockstep"]
    lines = [
        f"lockstep over {lock['steps']:,} reference steps: replaced-slot mismatches {lock['slot_mismatches']}, "
        f"max |Δ| first-parent weights {lock['max_abs_diff_first_weights']:.1e}, second-parent weights "
        f"{lock['max_abs_diff_second_weights']:.1e}, crossover {lock['max_abs_diff_crossover']:.1e}",
    ]
    lines += speed_lines(out["speed"])
    if "accuracy" in out:
        acc = out["accuracy"]
        for who in ("reference", "evomerge"):
            a = acc[who]
            lines.append(
                f"{who:<9} M2N2 from scratch, {a['n']} seeds: test {a['mean']:.2f} ± {a['sd']:.2f} "
                f"(min {a['min']:.2f}, max {a['max']:.2f}); runs that lost a whole class: {a['lost_class_runs']}"
            )
        lines.append(f"two-sided Mann-Whitney U test, evomerge vs reference: p = {acc['mann_whitney_p']:.3f}")
        for who in ("reference", "evomerge"):
            c = acc[who]["converged"]
            lines.append(
                f"{who:<9} converged runs only (best train >= {CONVERGED_TRAIN}): {c['n']} of {acc[who]['n']}, test "
                f"{c['mean']:.2f} ± {c['sd']:.2f} (min {c['min']:.2f}, max {c['max']:.2f}), "
                f"best train {c['train_mean']:.4f}"
            )
        cp = acc["converged_mann_whitney_p"]
        lines.append(f"converged runs, Mann-Whitney U: test p = {cp['test']:.3f}, best train p = {cp['train']:.3f}")
        two = acc["two_half_budget_runs"]
        lines.append(
            f"evomerge, the better on train of two runs of {two['evaluations_each']:,} evaluations each ({two['n']} "
            f"pairs of seeds): test {two['mean']:.2f} ± {two['sd']:.2f} (min {two['min']:.2f}, max {two['max']:.2f})"
        )
    table = "\n".join(lines)
    print(table)
    save_result("m2n2_reference", table, [], **out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
