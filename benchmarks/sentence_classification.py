"""Ladder 7, MiniLM part: merging a real pre-trained encoder, all-MiniLM-L6-v2, fine-tuned on two sentence tasks
that `evomerge.data.sentence_tasks` builds here from text that ships with Python (nothing is downloaded).

Tasks: `order` (pydoc reference sentences, half with two words swapped) and `replaced` (standard-library docstring
sentences, half with one word replaced), binary, balanced; 96 validation sentences per task (searched on), 192 test
sentences (reported). Each fine-tune trains the backbone and its own head; merges combine backbones only, each task
read through its fine-tune's head, fixed (the `sequence_classification` evaluator with `head` files). Rows: the base
backbone, each fine-tune, task arithmetic at c = 1 and at one validation-tuned scale, TIES and DARE-TIES at c = 1,
mergekit-evolve's recipe (CMA-ES over per-layer-group TIES weights and densities) and M2N2 over per-layer recipes
(48 evaluations, two seeds each), and the MAP front over the two validation accuracies against a grid over the two
task coefficients (hypervolume above chance). Per task: test accuracy and normalised accuracy (merged / that task's
fine-tune). Searches run through the real driver (in-process executor) and are read back from their run
directories; the fixed merges are scored with the evaluator and space an evaluating process holds. Also
evaluations/s per search and a worker's time in materialisation against the forward pass.

    OMP_NUM_THREADS=1 python benchmarks/sentence_classification.py          # 11-13 minutes on 2 shared cores
    OMP_NUM_THREADS=1 python benchmarks/sentence_classification.py --quick  # smaller everything: a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _results import save_result
from language_models import QUIET, RECIPE_SPACE, fixed_space, run_search, ta_space, time_shares

TASKS = ("order", "replaced")
OBJECTIVES = {f"accuracy_{t}": "max" for t in TASKS}
TA_HIGH = 1.5  # task-coefficient box [0, 1.5] for the tuned scale, the grid and MAP


def evaluator_spec(st) -> dict[str, Any]:
    tasks = {
        t: {
            "validation": str(st.datasets[t]["validation"]),
            "test": str(st.datasets[t]["test"]),
            "head": str(st.heads[t]),
        }
        for t in TASKS
    }
    return {
        "name": "sequence_classification",
        "model": str(st.base),
        "tasks": tasks,
        "pooling": "mean",
        "max_length": st.info["recipe"]["max_length"],
        "batch_size": 64,
        "device": "cpu",
        "dtype": "float32",
    }


EVOLVE_SPACE = {  # mergekit-evolve's genome: TIES weight per model and layer group, density per layer group
    "name": "merge",
    "methods": ["ties"],
    "base": 0,
    "blocks": "layer",
    "layer_granularity": 2,  # MiniLM's 6 layers in 3 groups, plus the embeddings and the pooler
    "genes": {
        "weights": {"low": 0.0, "high": 2.0, "per": "model_block"},  # the start (0.5) is c = 1
        "density": {"low": 0.1, "high": 1.0, "per": "block"},
    },
    "fixed": {"scale": 1.0},
}


def spec(st, name: str, space: dict, strategy: dict, budget: int, seed: int = 0) -> dict[str, Any]:
    return {
        "name": name,
        "budget": budget,
        "seed": seed,
        "evaluator": evaluator_spec(st),
        "models": {"init": "files", "paths": [str(st.base), *(str(st.finetuned[t]) for t in TASKS)]},
        "space": space,
        "strategy": strategy,
        "runtime": dict(QUIET),
    }


class Worker:
    """What an evaluating process holds: the evaluator (resident MiniLM, fixed heads) and, per space, a
    Materializer over the seeds."""

    def __init__(self, st, out: Path):
        from evomerge.runtime.driver import evaluation_parts, make_seeds
        from evomerge.spec import spec_from_dict

        self.base_spec = spec(st, "worker", ta_space(TA_HIGH), {"name": "random", "objectives": OBJECTIVES}, 1)
        parsed = spec_from_dict({**self.base_spec, "output": str(out)})
        self.seeds_dir = out / "worker" / "seeds"
        make_seeds(parsed, self.seeds_dir)
        self.evaluator, _ = evaluation_parts(parsed, self.seeds_dir)
        self.spaces: dict[str, Any] = {}

    def materializer(self, space: dict):
        from evomerge.runtime.driver import evaluator_device, search_space
        from evomerge.runtime.executor import Materializer
        from evomerge.spec import spec_from_dict

        key = json.dumps(space, sort_keys=True)
        if key not in self.spaces:
            strategy = {"name": "m2n2"} if space["name"] == "recipe" else self.base_spec["strategy"]
            parsed = spec_from_dict({**self.base_spec, "space": space, "strategy": strategy})
            built = search_space(parsed, self.seeds_dir, self.evaluator.layout(), evaluator_device(self.evaluator))
            self.spaces[key] = Materializer(self.evaluator, built)
        return self.spaces[key]

    def validate(self, space: dict, genome) -> dict[str, float]:
        return dict(self.evaluator.evaluate(self.materializer(space)(np.asarray(genome, dtype=np.float64))).objectives)

    def test(self, space: dict, genome) -> dict[str, float]:
        return {k: float(v) for k, v in self.evaluator.test(self.materializer(space)(np.asarray(genome))).items()}


def row(label: str, val: dict[str, float] | None, test: dict[str, float], evaluations: int | None, note: str = ""):
    return {
        "model": label,
        "val_accuracy": None if val is None else val["accuracy"],
        "test_accuracy": {t: test[f"accuracy_{t}"] for t in TASKS},
        "test_mean_accuracy": test["accuracy"],
        "val_evaluations": evaluations,
        "note": note,
    }


def normalise(rows: list[dict], finetuned: dict[str, float]) -> None:
    """Normalised accuracy: a row's test accuracy on a task over that task's fine-tune's."""
    for r in rows:
        r["test_normalised"] = {t: r["test_accuracy"][t] / finetuned[t] for t in TASKS}
        r["test_mean_normalised"] = float(np.mean(list(r["test_normalised"].values())))


def fixed_rows(worker: Worker, scales: list[float]) -> list[dict]:
    ta = ta_space(TA_HIGH)
    rows = []
    one = 1 / TA_HIGH  # the genome value of c = 1
    models = (("base", [0, 0]), ("fine-tuned order", [one, 0]), ("fine-tuned replaced", [0, one]))
    for label, genome in models:
        rows.append(row(label, worker.validate(ta, genome), worker.test(ta, genome), None))
    rows.append(row("task arithmetic, c = 1", worker.validate(ta, [one, one]), worker.test(ta, [one, one]), None))
    # accuracies are counts over 96 sentences averaged in float32: round, so that equal counts tie and the tie goes
    # to the smaller scale (the one closer to the base), not to the last bit of a float32 mean
    scored = [(round(worker.validate(ta, [c / TA_HIGH] * 2)["accuracy"], 6), -c, c) for c in scales]
    best = max(scored)
    best_c, genome = best[2], [best[2] / TA_HIGH] * 2
    label = f"task arithmetic, c = {best_c:.1f} (best of {len(scales)} scales on validation)"
    rows.append(row(label, {"accuracy": best[0]}, worker.test(ta, genome), len(scales)))
    rows[-1]["scales"] = {f"{c:.1f}": s for s, _, c in scored}
    for label, space in (
        ("TIES, density 0.5, c = 1", fixed_space("ties", density=0.5)),
        ("DARE-TIES, drop 0.5, consensus elect, c = 1", fixed_space("dare", drop_rate=0.5, consensus="elect")),
    ):
        rows.append(row(label, worker.validate(space, [1, 1]), worker.test(space, [1, 1]), None))
    return rows


def search_rows(st, out: Path, budget: int, seeds: int) -> tuple[list[dict], list[dict]]:
    """mergekit-evolve's recipe (CMA-ES) and M2N2 over recipes, maximising the mean validation accuracy, one run per
    seed; the best individual's test metrics."""
    from evomerge.store import read_journal

    searches = {
        "CMA-ES over per-layer-group TIES weights + densities (mergekit-evolve)": (
            EVOLVE_SPACE,
            {"name": "cma_es", "population": 8, "sigma0": 0.2, "objective": "accuracy"},
        ),
        "M2N2 over per-layer recipes (base, order, replaced)": (
            RECIPE_SPACE,
            {"name": "m2n2", "population": 10, "objective": "accuracy"},
        ),
    }
    rows, speed = [], []
    for label, (space, strategy) in searches.items():
        for seed in range(seeds):
            name = f"{strategy['name']}-{space['name']}-{seed}"
            run, summary = run_search(spec(st, name, space, strategy, budget, seed), out)
            entries, _ = read_journal(run.journal_path)
            best_seen = max(e["objectives"]["accuracy"] for e in entries if e["status"] == "ok")
            title = label + (f" [seed {seed}]" if seeds > 1 else "")
            r = row(title, {"accuracy": summary["best_train"]}, summary["test"], summary["evaluations"])
            r["best_seen_val_accuracy"] = best_seen
            if round(best_seen, 6) > round(summary["best_train"], 6):
                r["note"] = f"reported best is below the best validation accuracy it evaluated ({best_seen:.4f})"
            rows.append(r)
            speed.append({"run": name, "evaluations": summary["evaluations"]})
            speed[-1] |= {k: summary[k] for k in ("evaluations_per_second", "evaluator_share", "test_share")}
    return rows, speed


def front_rows(st, worker: Worker, out: Path, grid_per_axis: int) -> tuple[dict, list[dict], list[dict]]:
    """MAP's front over the two validation accuracies against a grid over the two task coefficients, both in
    [0, TA_HIGH]; hypervolume above chance (0.5, 0.5)."""
    from evomerge.pareto import hypervolume
    from evomerge.report.front import read_front

    grid_points = grid_per_axis**2
    runs = {}
    for name, strategy, budget in (
        ("map", {"name": "map", "objectives": OBJECTIVES}, 12 + 10),  # (d+1)(d+2) design + 10 front points
        ("grid", {"name": "grid", "points": grid_points, "objective": "accuracy"}, grid_points),
    ):
        run, summary = run_search(spec(st, f"front-{name}", ta_space(TA_HIGH), strategy, budget), out)
        runs[name] = (read_front(run, OBJECTIVES), summary)
    chance = np.array([-1 / len(st.classes[t]) for t in TASKS], dtype=np.float64)  # minimised form
    hv = {name: hypervolume(front.minimised(front.points), chance) for name, (front, _) in runs.items()}
    result = {
        "reference_accuracy": {t: -c for t, c in zip(TASKS, chance)},
        "grid_points": grid_points,
        "map_evaluations": runs["map"][1]["evaluations"],
        "hv_grid": hv["grid"],
        "hv_map": hv["map"],
        "hv_share": hv["map"] / hv["grid"] if hv["grid"] > 0 else None,
        "front_sizes": {name: len(front.points) for name, (front, _) in runs.items()},
        "fronts": {name: [{"genes": p.genes, **p.values} for p in front.points] for name, (front, _) in runs.items()},
    }
    rows, speed = [], []
    for name, label in (("map", "MAP front point"), ("grid", f"grid {grid_per_axis}x{grid_per_axis} point")):
        front, summary = runs[name]
        best = max(front.points, key=lambda p: (round(float(np.mean(list(p.values.values()))), 6), -sum(p.genes or [])))
        coefficients = ", ".join(f"{TA_HIGH * g:.2f}" for g in best.genes or [])
        test = best.test or worker.test(ta_space(TA_HIGH), best.genes)  # a single-objective grid's front has no test
        r = row(f"{label} with the best mean validation accuracy (c = {coefficients})", None, test, None)
        r["val_accuracy"], r["val_evaluations"] = float(np.mean(list(best.values.values()))), summary["evaluations"]
        rows.append(r)
        speed.append({"run": f"front-{name}", "evaluations": summary["evaluations"]})
        speed[-1] |= {k: summary[k] for k in ("evaluations_per_second", "evaluator_share", "test_share")}
    return result, rows, speed


def fmt_row(r: dict[str, Any]) -> str:
    def f(v, d=3):
        return "-" if v is None else f"{v:.{d}f}"

    a, n = r["test_accuracy"], r["test_normalised"]
    evals = "-" if r["val_evaluations"] is None else str(r["val_evaluations"])
    return (
        f"| {r['model']} | {f(r['val_accuracy'])} | {f(a['order'])} | {f(a['replaced'])} "
        f"| {f(r['test_mean_accuracy'])} | {f(n['order'])} | {f(n['replaced'])} | {f(r['test_mean_normalised'])} "
        f"| {evals} |"
    )


def verdicts(rows: list[dict[str, Any]], se: float) -> list[str]:
    """Plain statements of where a method does not beat a simpler one, on test mean accuracy; a gain below one
    standard error of a test mean (binomial, unpaired: a conservative yardstick) is not counted as a win."""
    by = {r["model"]: r for r in rows}
    ta = by["task arithmetic, c = 1"]
    tuned = next(r for r in rows if "best of" in r["model"])
    grid = next(r for r in rows if r["model"].startswith("grid"))
    out = []

    def compare(r, simpler, what):
        gap = round(r["test_mean_accuracy"] - simpler["test_mean_accuracy"], 6)  # float32 means of equal counts tie
        if gap >= se:
            out.append(f"- {r['model']} beats {what} on test mean accuracy ({gap:+.3f}).")
        elif gap > 0:
            out.append(f"- {r['model']} does NOT clearly beat {what} ({gap:+.3f}, less than one standard error).")
        else:
            out.append(f"- {r['model']} does NOT beat {what} on test mean accuracy ({gap:+.3f}).")

    compare(tuned, ta, "task arithmetic at c = 1")
    for r in rows:
        if r["model"].startswith(("TIES", "DARE")):
            compare(r, ta, "task arithmetic at c = 1")
        if r["model"].startswith(("CMA-ES", "M2N2", "MAP")):
            compare(r, tuned, "task arithmetic with one tuned scale")
        if r["model"].startswith("CMA-ES"):
            compare(r, by["TIES, density 0.5, c = 1"], "TIES at c = 1 (one weight and density for all layers)")
        if r["model"].startswith("MAP"):
            compare(r, grid, "the grid's best point")
    singles = [by["base"], by["fine-tuned order"], by["fine-tuned replaced"]]
    best_single = max(singles, key=lambda r: r["test_mean_accuracy"])
    for r in rows:  # only where a merge fails to beat the best single model
        if r not in singles and r["test_mean_accuracy"] - best_single["test_mean_accuracy"] < se:
            compare(r, best_single, f"the best single model ({best_single['model']})")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller budgets, grid and fine-tunes (a smoke run)")
    parser.add_argument("--budget", type=int, default=None, help="evaluations per search (default 48, quick 16)")
    parser.add_argument("--seeds", type=int, default=None, help="runs per search (default 2, quick 1)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    from evomerge.data.sentence_tasks import SentenceTasksRecipe, sentence_tasks

    budget = args.budget or (16 if args.quick else 48)
    seeds = args.seeds or (1 if args.quick else 2)
    grid_per_axis = 4 if args.quick else 7
    scales = [0.4, 0.6, 0.8, 1.0, 1.2, 1.4]
    recipe = SentenceTasksRecipe(finetune_steps=40) if args.quick else SentenceTasksRecipe()
    started = time.perf_counter()
    st = sentence_tasks(recipe)
    built = time.perf_counter() - started
    print(f"data and fine-tunes ready ({built:.0f} s)", flush=True)
    with tempfile.TemporaryDirectory(prefix="evomerge-minilm-bench-") as tmp:
        out = Path(tmp)
        worker = Worker(st, out)
        rows = fixed_rows(worker, scales)
        print(f"fixed merges done ({time.perf_counter() - started:.0f} s)", flush=True)
        found, speed = search_rows(st, out, budget, seeds)
        rows += found
        print(f"searches done ({time.perf_counter() - started:.0f} s)", flush=True)
        front, front_table_rows, front_speed = front_rows(st, worker, out, grid_per_axis)
        rows += front_table_rows
        speed += front_speed
        print(f"fronts done ({time.perf_counter() - started:.0f} s)", flush=True)
        spaces = [
            ("task arithmetic (2 genes)", ta_space(TA_HIGH)),
            ("TIES per layer group (15 genes)", EVOLVE_SPACE),
            ("recipe per layer (24 genes)", RECIPE_SPACE),
        ]
        shares = time_shares(worker, spaces, repeats=2)
    finetuned = {t: next(r for r in rows if r["model"] == f"fine-tuned {t}")["test_accuracy"][t] for t in TASKS}
    normalise(rows, finetuned)
    n_test = sum(st.info["data"]["counts"][t]["test"] for t in TASKS)
    p = float(np.mean([r["test_mean_accuracy"] for r in rows]))
    se = math.sqrt(p * (1 - p) / n_test)  # binomial, at the rows' mean accuracy

    training = st.info["training"]
    lines = [
        "| model | val mean acc | test acc order | test acc replaced | test mean acc | norm order | norm replaced "
        "| norm mean | val evaluations |",
        "|---|---|---|---|---|---|---|---|---|",
        *[fmt_row(r) for r in rows],
        "",
        f"Validation {st.info['data']['counts']['order']['validation']} and test "
        f"{st.info['data']['counts']['order']['test']} sentences per task (chance 0.5); normalised = test accuracy "
        f"over that task's fine-tune's ({finetuned['order']:.3f} order, {finetuned['replaced']:.3f} replaced). "
        f"One standard error of a test mean accuracy is about {se:.3f}. Searches (tuned scale, CMA-ES, M2N2) "
        "maximise the validation mean accuracy; MAP and the grid the two validation accuracies.",
        f"Fine-tunes: {recipe.finetune_steps} steps of {recipe.batch_size} sentences after a linear probe "
        f"({training['order']['seconds']:.0f} s and {training['replaced']['seconds']:.0f} s when built; this run "
        f"spent {built:.0f} s on data and models).",
        f"Front over (accuracy_order, accuracy_replaced) on validation, reference = chance (0.5, 0.5): MAP "
        f"{front['map_evaluations']} evaluations, hypervolume {front['hv_map']:.4f} = "
        f"{100 * (front['hv_share'] or 0):.1f}% of the {front['grid_points']}-point grid's {front['hv_grid']:.4f}.",
        "",
        "| run (in-process) | evaluations | evaluations/s | evaluator share | test share |",
        "|---|---|---|---|---|",
        *[
            f"| {s['run']} | {s['evaluations']} | {s['evaluations_per_second']:.2f} "
            f"| {100 * s['evaluator_share']:.0f}% | {100 * s['test_share']:.0f}% |"
            for s in speed
        ],
        "",
        "| worker, per candidate | materialise s | forward s | forward share |",
        "|---|---|---|---|",
        *[
            f"| {s['space']} | {s['materialise_s']:.3f} | {s['forward_s']:.3f} | {100 * s['forward_share']:.0f}% |"
            for s in shares
        ],
        "",
        *verdicts(rows, se),
    ]
    for r in rows:
        if r["note"]:
            lines.append(f"- {r['model']}: {r['note']}.")
    if front["hv_share"] is not None and front["hv_share"] < 1.0:
        lines.append(f"- MAP's front does not reach the grid's hypervolume ({100 * front['hv_share']:.1f}%).")
    table = "\n".join(lines)
    print(table)
    seconds = round(time.perf_counter() - started, 1)
    path = save_result(
        "sentence_classification_quick" if args.quick else "sentence_classification",
        table,
        rows,
        front=front,
        speed=speed,
        time_shares=shares,
        training=training,
        data=st.info["data"],
        settings={
            "budget": budget,
            "seeds": seeds,
            "grid_per_axis": grid_per_axis,
            "scales": scales,
            "recipe": st.info["recipe"],
        },
        seconds=seconds,
        build_seconds=round(built, 1),
    )
    print(f"\nwrote {path} ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
