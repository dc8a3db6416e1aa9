"""Ladder 7: merging language models offline, on the tiny Llama that `evomerge.data.language_models` builds here
(a base pre-trained on standard-library code and pydoc prose, one fine-tune per domain).

Two domains (code, prose), searched on the validation splits (64 examples each), reported on the test splits.
Rows: the base, each fine-tune, task arithmetic at c = 1 and at one validation-tuned scale, TIES and DARE-TIES
at c = 1, mergekit-evolve's recipe (CMA-ES over per-layer-group TIES weights and densities), M2N2 over per-layer
recipes, the MAP front over the two validation log-likelihoods against a grid over the two task coefficients
(hypervolume, both measured on validation), then subset fitness (Spearman of 10%-subset fitness against full
fitness over random candidates) and speed (evaluations/s in-process; the worker's time in materialisation vs the
forward pass). Searches run through the real driver (in-process executor) and are read back from their run
directories; the fixed merges are scored with the same evaluator and space a worker holds.

    python benchmarks/language_models.py            # about 10 minutes on 2 quiet cores
    python benchmarks/language_models.py --quick    # smaller search budgets and grids
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _results import save_result

DOMAINS = ("code", "prose")
OBJECTIVES = {"loglik_code": "max", "loglik_prose": "max"}
QUIET = {"progress": False, "log_every": 10**6, "snapshot_every": 10**6, "threads": 1}


def evaluator_spec(lm, subset: int | None = None) -> dict[str, Any]:
    datasets = []
    for d in DOMAINS:
        entry = {
            "name": d,
            "kind": "loglik",
            "search": str(lm.datasets[d]["validation"]),
            "test": str(lm.datasets[d]["test"]),
        }
        if subset is not None:
            entry["subset"] = subset
        datasets.append(entry)
    return {"name": "causal_lm", "model": str(lm.base), "device": "cpu", "dtype": "float32", "datasets": datasets}


def ta_space(high: float = 1.0) -> dict[str, Any]:
    return {
        "name": "merge",
        "methods": ["task_arithmetic"],
        "base": 0,
        "genes": {"weights": {"low": 0.0, "high": high, "per": "model"}},
        "fixed": {"scale": 1.0},
    }


def fixed_space(method: str, **fixed) -> dict[str, Any]:
    """One method with per-model weights in [0, 1] as genes (genome ones = c = 1) and the rest held fixed."""
    return {
        "name": "merge",
        "methods": [method],
        "base": 0,
        "genes": {"weights": {"low": 0.0, "high": 1.0, "per": "model"}},
        "fixed": {"scale": 1.0, **fixed},
    }


EVOLVE_SPACE = {  # mergekit-evolve's genome: TIES weight per model and layer group, density per layer group
    "name": "merge",
    "methods": ["ties"],
    "base": 0,
    "blocks": "layer",
    "layer_granularity": 2,
    "genes": {
        "weights": {"low": 0.0, "high": 2.0, "per": "model_block"},  # the start (0.5) is c = 1
        "density": {"low": 0.1, "high": 1.0, "per": "block"},
    },
    "fixed": {"scale": 1.0},
}


def spec(lm, name: str, space: dict, strategy: dict, budget: int, seed: int = 0, **evaluator) -> dict[str, Any]:
    return {
        "name": name,
        "budget": budget,
        "seed": seed,
        "evaluator": {**evaluator_spec(lm), **evaluator},
        "models": {"init": "files", "paths": [str(lm.base), str(lm.finetuned["code"]), str(lm.finetuned["prose"])]},
        "space": space,
        "strategy": strategy,
        "runtime": dict(QUIET),
    }


def run_search(spec_dict: dict, out: Path):
    from evomerge.runtime import start_run
    from evomerge.spec import spec_from_dict

    run = start_run(spec_from_dict({**spec_dict, "output": str(out)}), progress=False)
    return run, json.loads(run.summary_path.read_text())


class Worker:
    """What an evaluating process holds: the evaluator (resident model) and, per space, a Materializer."""

    def __init__(self, lm, out: Path, subset: int | None = None):
        from evomerge.runtime.driver import evaluation_parts, make_seeds
        from evomerge.spec import spec_from_dict

        self.lm = lm
        name = "worker" if subset is None else f"worker-subset{subset}"
        self.base_spec = spec(lm, name, ta_space(), {"name": "random", "objectives": OBJECTIVES}, 1)
        self.base_spec["evaluator"] = evaluator_spec(lm, subset)
        parsed = spec_from_dict({**self.base_spec, "output": str(out)})
        self.seeds_dir = out / name / "seeds"
        make_seeds(parsed, self.seeds_dir)
        self.evaluator, _ = evaluation_parts(parsed, self.seeds_dir)
        self.spaces: dict[str, Any] = {}
        self.evaluations = 0

    def materializer(self, space: dict):
        from evomerge.runtime.driver import evaluator_device, search_space
        from evomerge.runtime.executor import Materializer
        from evomerge.spec import spec_from_dict

        key = json.dumps(space, sort_keys=True)
        if key not in self.spaces:
            strategy = (
                {"name": "m2n2", "objective": "score"} if space["name"] == "recipe" else self.base_spec["strategy"]
            )
            parsed = spec_from_dict({**self.base_spec, "space": space, "strategy": strategy})
            built = search_space(parsed, self.seeds_dir, self.evaluator.layout(), evaluator_device(self.evaluator))
            self.spaces[key] = Materializer(self.evaluator, built)
        return self.spaces[key]

    def validate(self, space: dict, genome) -> dict[str, float]:
        self.evaluations += 1
        return dict(self.evaluator.evaluate(self.materializer(space)(np.asarray(genome, dtype=np.float64))).objectives)

    def test(self, space: dict, genome) -> dict[str, float]:
        return {k: float(v) for k, v in self.evaluator.test(self.materializer(space)(np.asarray(genome))).items()}


def row(label: str, val: dict[str, float] | None, test: dict[str, float], evaluations: int | None, note: str = ""):
    return {
        "model": label,
        "val_score": None if val is None else val.get("score"),
        "val_mean_loglik": None if val is None else float(np.mean([val[f"loglik_{d}"] for d in DOMAINS])),
        "test_score": test.get("score"),
        "test_perplexity": {d: test[f"perplexity_{d}"] for d in DOMAINS},
        "test_mean_loglik": float(np.mean([test[f"loglik_{d}"] for d in DOMAINS])),
        "val_evaluations": evaluations,
        "note": note,
    }


def fixed_rows(worker: Worker, scales: list[float]) -> tuple[list[dict], dict[str, dict]]:
    ta = ta_space()
    rows, vals = [], {}
    for label, genome in (("base", [0, 0]), ("fine-tuned code", [1, 0]), ("fine-tuned prose", [0, 1])):
        vals[label] = worker.validate(ta, genome)
        rows.append(row(label, vals[label], worker.test(ta, genome), None))
    vals["ta1"] = worker.validate(ta, [1, 1])
    rows.append(row("task arithmetic, c = 1", vals["ta1"], worker.test(ta, [1, 1]), None))
    scored = [(worker.validate(ta, [c, c])["score"], c) for c in scales]
    best_c = max(scored)[1]
    label = f"task arithmetic, c = {best_c:.2f} (best of {len(scales)} scales on validation)"
    rows.append(row(label, worker.validate(ta, [best_c] * 2), worker.test(ta, [best_c] * 2), len(scales)))
    rows[-1]["scales"] = {f"{c:.2f}": s for s, c in scored}
    for label, space in (
        ("TIES, density 0.5, c = 1", fixed_space("ties", density=0.5)),
        ("DARE-TIES, drop 0.5, consensus elect, c = 1", fixed_space("dare", drop_rate=0.5, consensus="elect")),
    ):
        rows.append(row(label, worker.validate(space, [1, 1]), worker.test(space, [1, 1]), None))
    return rows, vals


def search_rows(lm, out: Path, budget: int, seeds: int) -> tuple[list[dict], list[dict]]:
    """mergekit-evolve's recipe (CMA-ES) and M2N2 over recipes; the best individual's test metrics."""
    searches = {
        "CMA-ES over per-layer-group TIES weights + densities (mergekit-evolve)": (
            EVOLVE_SPACE,
            {"name": "cma_es", "population": 8, "sigma0": 0.2, "objective": "score"},
        ),
        "M2N2 over per-layer recipes (base, code, prose)": (
            {"name": "recipe", "blocks": "layer"},
            {"name": "m2n2", "population": 10, "objective": "score"},
        ),
    }
    from evomerge.store import read_journal

    rows, speed = [], []
    for label, (space, strategy) in searches.items():
        per_seed = []
        for seed in range(seeds):
            name = f"{strategy['name']}-{space['name']}-{seed}"
            run, summary = run_search(spec(lm, name, space, strategy, budget, seed), out)
            entries, _ = read_journal(run.journal_path)
            ok = [e for e in entries if e["status"] == "ok"]  # the strategy's best (M2N2's archive may drop a seed)
            best = min(ok, key=lambda e: abs(e["objectives"]["score"] - summary["best_train"]))
            summary["best_seen_val_score"] = max(e["objectives"]["score"] for e in ok)
            summary["best_val_mean_loglik"] = float(np.mean([best["objectives"][f"loglik_{d}"] for d in DOMAINS]))
            per_seed.append(summary)
            speed.append({"run": name, "evaluations_per_second": summary["evaluations_per_second"]})
            speed[-1] |= {k: summary[k] for k in ("evaluator_share", "strategy_share", "overhead_share", "test_share")}
        for seed, summary in enumerate(per_seed):
            test = summary["test"]
            r = row(f"{label}" + (f" [seed {seed}]" if seeds > 1 else ""), None, test, summary["evaluations"])
            r["val_score"], r["val_mean_loglik"] = summary["best_train"], summary["best_val_mean_loglik"]
            r["best_seen_val_score"] = summary["best_seen_val_score"]
            if summary["best_seen_val_score"] > summary["best_train"]:
                r["note"] = f"reported best is below the best score it evaluated ({summary['best_seen_val_score']:.4f})"
            rows.append(r)
    return rows, speed


def front_rows(lm, out: Path, grid_per_axis: int, vals: dict[str, dict]) -> tuple[dict, list[dict]]:
    """MAP's front over the two validation log-likelihoods against a grid over the two task coefficients."""
    from evomerge.pareto import hypervolume
    from evomerge.report.front import read_front

    budget_map = 12 + 10
    grid_points = grid_per_axis**2
    runs = {}
    for name, strategy, budget in (
        ("map", {"name": "map", "objectives": OBJECTIVES}, budget_map),
        ("grid", {"name": "grid", "points": grid_points, "objective": "score"}, grid_points),
    ):
        run, summary = run_search(spec(lm, f"front-{name}", ta_space(), strategy, budget), out)
        runs[name] = (read_front(run, OBJECTIVES), summary)
    # reference (minimised): the worse of the two fine-tunes on each domain, so only merges that beat both
    # fine-tunes' off-domain loss count
    nadir = np.array(
        [-vals["fine-tuned prose"]["loglik_code"], -vals["fine-tuned code"]["loglik_prose"]], dtype=np.float64
    )
    hv = {name: hypervolume(front.minimised(front.points), nadir) for name, (front, _) in runs.items()}
    result = {
        "reference_loglik": {"code": -nadir[0], "prose": -nadir[1]},
        "grid_points": grid_points,
        "map_evaluations": runs["map"][1]["evaluations"],
        "hv_grid": hv["grid"],
        "hv_map": hv["map"],
        "hv_share": hv["map"] / hv["grid"] if hv["grid"] > 0 else None,
        "front_sizes": {name: len(front.points) for name, (front, _) in runs.items()},
        "evaluations_per_second": {name: s["evaluations_per_second"] for name, (_, s) in runs.items()},
        "fronts": {name: [{"genes": p.genes, **p.values} for p in front.points] for name, (front, _) in runs.items()},
    }
    rows = []
    for name, label in (("map", "MAP front point"), ("grid", f"grid {grid_per_axis}x{grid_per_axis} point")):
        front, summary = runs[name]
        best = max(front.points, key=lambda p: np.mean(list(p.values.values())))
        genes = ", ".join(f"{g:.2f}" for g in best.genes or [])
        # the grid is a single-objective run, so its front carries no test metrics: a worker scores the point
        test = best.test or _WORKER["full"].test(ta_space(), best.genes)
        r = row(f"{label} with the best mean validation loglik (c = {genes})", None, test, summary["evaluations"])
        r["val_mean_loglik"] = float(np.mean(list(best.values.values())))
        rows.append(r)
    return result, rows


_WORKER: dict[str, Worker] = {}


def spearman(lm, out: Path, candidates: int, subset: int, seed: int) -> dict[str, Any]:
    """Rank correlation of fitness on a fixed `subset` of each validation split with fitness on all of it, over
    random candidates of the task-arithmetic space (per-model coefficients in [0, 1.5])."""
    from scipy.stats import spearmanr

    full, part = _WORKER["full"], Worker(lm, out, subset=subset)
    space = ta_space(1.5)
    rng = np.random.default_rng(seed)
    genomes = rng.random((candidates, 2))
    a, b = [], []
    t_full = t_part = 0.0
    for g in genomes:
        start = time.perf_counter()
        a.append(full.validate(space, g))
        t_full += time.perf_counter() - start
        start = time.perf_counter()
        b.append(part.validate(space, g))
        t_part += time.perf_counter() - start
    result: dict[str, Any] = {"candidates": candidates, "subset_per_domain": subset, "split": 64}
    for metric in ("score", "loglik_code", "loglik_prose"):
        rho = spearmanr([x[metric] for x in a], [x[metric] for x in b]).statistic
        result[f"spearman_{metric}"] = float(rho)
    result["seconds_per_eval_full"] = t_full / candidates
    result["seconds_per_eval_subset"] = t_part / candidates
    return result


def time_shares(worker: Worker, repeats: int) -> list[dict[str, Any]]:
    """Per space: seconds writing a candidate into the resident model (`space.write`) against the forward pass
    (`evaluator.evaluate`), over a few random candidates."""
    out = []
    rng = np.random.default_rng(1)
    for label, space in (
        ("task arithmetic (2 genes)", ta_space()),
        ("TIES per layer group (12 genes)", EVOLVE_SPACE),
        ("recipe per layer (18 genes)", {"name": "recipe", "blocks": "layer"}),
    ):
        materialize = worker.materializer(space)
        dim = len(materialize.space.initial()[0])
        write = forward = 0.0
        for _ in range(repeats):
            genome = rng.random(dim)
            start = time.perf_counter()
            params = materialize(genome)
            mid = time.perf_counter()
            worker.evaluator.evaluate(params)
            end = time.perf_counter()
            write, forward = write + mid - start, forward + end - mid
        out.append(
            {
                "space": label,
                "materialise_s": write / repeats,
                "forward_s": forward / repeats,
                "forward_share": forward / (write + forward),
            }
        )
    return out


def fmt_row(r: dict[str, Any]) -> str:
    def f(v, d=3):
        return "-" if v is None else f"{v:.{d}f}"

    p = r["test_perplexity"]
    evals = "-" if r["val_evaluations"] is None else str(r["val_evaluations"])
    return (
        f"| {r['model']} | {f(r['val_score'], 4)} | {f(r['val_mean_loglik'])} | {f(p['code'], 1)} | {f(p['prose'], 1)} "
        f"| {f(r['test_mean_loglik'])} | {f(r['test_score'], 4)} | {evals} |"
    )


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """Plain statements of where a method does not beat a simpler one (on test mean loglik)."""
    by = {r["model"]: r for r in rows}
    ta = next(r for r in rows if r["model"].startswith("task arithmetic, c = 1"))
    tuned = next(r for r in rows if "best of" in r["model"])
    out = []

    def compare(r, simpler, what):
        gap = r["test_mean_loglik"] - simpler["test_mean_loglik"]
        verb = "beats" if gap > 0 else "does NOT beat"
        out.append(f"- {r['model']} {verb} {what} on test mean loglik ({gap:+.4f} nats/token).")

    compare(tuned, ta, "task arithmetic at c = 1")
    for r in rows:
        if r["model"].startswith(("TIES", "DARE")):
            compare(r, ta, "task arithmetic at c = 1")
        if r["model"].startswith(("CMA-ES", "M2N2", "MAP")):
            compare(r, tuned, "task arithmetic with one tuned scale")
    best_single = max((by["fine-tuned code"], by["fine-tuned prose"], by["base"]), key=lambda r: r["test_mean_loglik"])
    for r in rows:
        if r["model"].startswith(("task arithmetic, c = 1", "CMA-ES", "M2N2")):
            if r["test_mean_loglik"] <= best_single["test_mean_loglik"]:
                out.append(f"- {r['model']} does NOT beat the best single model ({best_single['model']}).")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller budgets and grids")
    parser.add_argument("--budget", type=int, default=None, help="evaluations per search (default 60, quick 30)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per search")
    parser.add_argument("--subset-candidates", type=int, default=20)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    from evomerge.data.language_models import LanguageModelsRecipe, language_models

    budget = args.budget or (30 if args.quick else 60)
    grid_per_axis = 5 if args.quick else 7
    scales = [0.2, 0.4, 0.6, 0.8, 1.0]
    started = time.perf_counter()
    lm = language_models(LanguageModelsRecipe())
    with tempfile.TemporaryDirectory(prefix="evomerge-lm-bench-") as tmp:
        out = Path(tmp)
        worker = _WORKER.setdefault("full", Worker(lm, out))
        rows, vals = fixed_rows(worker, scales)
        print(f"fixed merges done ({time.perf_counter() - started:.0f} s)", flush=True)
        found, speed = search_rows(lm, out, budget, args.seeds)
        rows += found
        print(f"searches done ({time.perf_counter() - started:.0f} s)", flush=True)
        front, front_table_rows = front_rows(lm, out, grid_per_axis, vals)
        rows += front_table_rows
        print(f"fronts done ({time.perf_counter() - started:.0f} s)", flush=True)
        subset = spearman(lm, out, args.subset_candidates, subset=6, seed=0)
        shares = time_shares(worker, repeats=3)
    speed += [{"run": f"front-{k}", "evaluations_per_second": v} for k, v in front["evaluations_per_second"].items()]

    lines = [
        "| model | val score | val mean loglik | test ppl code | test ppl prose | test mean loglik | test score "
        "| val evaluations |",
        "|---|---|---|---|---|---|---|---|",
        *[fmt_row(r) for r in rows],
    ]
    lines += [
        "",
        "Searches (CMA-ES, M2N2, the tuned scale) maximise the validation `score` (the mean over examples of "
        "exp(mean token loglik)); MAP and the grid maximise the two validation logliks; the verdicts compare "
        "test mean loglik (the mean of the two domains' per-token log-likelihoods).",
        f"Front over (loglik_code, loglik_prose) on validation, reference = the worse fine-tune per domain "
        f"({front['reference_loglik']['code']:.3f}, {front['reference_loglik']['prose']:.3f}): "
        f"MAP {front['map_evaluations']} evaluations, hypervolume {front['hv_map']:.5f} = "
        f"{100 * (front['hv_share'] or 0):.1f}% of the {front['grid_points']}-point grid's {front['hv_grid']:.5f}.",
        f"Subset fitness ({subset['subset_per_domain']} of {subset['split']} examples per domain, "
        f"{subset['candidates']} random task-arithmetic candidates): Spearman score {subset['spearman_score']:.3f}, "
        f"loglik_code {subset['spearman_loglik_code']:.3f}, loglik_prose {subset['spearman_loglik_prose']:.3f}; "
        f"{subset['seconds_per_eval_subset']:.2f} s vs {subset['seconds_per_eval_full']:.2f} s per evaluation.",
        "",
        "| run (in-process) | evaluations/s |",
        "|---|---|",
        *[f"| {s['run']} | {s['evaluations_per_second']:.2f} |" for s in speed],
        "",
        "| worker, per candidate | materialise s | forward s | forward share |",
        "|---|---|---|---|",
        *[
            f"| {s['space']} | {s['materialise_s']:.3f} | {s['forward_s']:.3f} | {100 * s['forward_share']:.0f}% |"
            for s in shares
        ],
        "",
        *verdicts(rows),
    ]
    for r in rows:
        if r["note"]:
            lines.append(f"- {r['model']}: {r['note']}.")
    if subset["spearman_score"] < 0.9:
        lines.append(f"- Subset fitness misses the goal (Spearman >= 0.9): {subset['spearman_score']:.3f}.")
    if front["hv_share"] is not None and front["hv_share"] < 1.0:
        lines.append(f"- MAP's front does not reach the grid's hypervolume ({100 * front['hv_share']:.1f}%).")
    table = "\n".join(lines)
    print(table)
    path = save_result(
        "language_models",
        table,
        rows,
        front=front,
        subset_fitness=subset,
        speed=speed,
        time_shares=shares,
        settings={"budget": budget, "seeds": args.seeds, "grid_per_axis": grid_per_axis, "scales": scales},
        seconds=round(time.perf_counter() - started, 1),
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
