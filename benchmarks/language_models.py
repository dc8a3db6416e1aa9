"""Ladder 7: merging language models offline, on the tiny Llama that `evomerge.data.language_models` builds here
(a base pre-trained on standard-library code and pydoc prose, one fine-tune per domain and one on 2-digit
addition as 4-option multiple choice).

Two task sets, each searched on the validation splits (64 examples per task) and reported on the test splits:
two tasks (code, prose) and three (code, prose, arith). Per task set, rows: the base, each fine-tune, task
arithmetic at c = 1 and at one validation-tuned scale, TIES and DARE-TIES at c = 1, mergekit-evolve's recipe
(CMA-ES over per-layer-group TIES weights and densities) and M2N2 over per-layer recipes (each over several
seeds: mean ± sd), and the best point of each front; then the MAP and NSGA-II fronts over the per-task validation
metrics (log-likelihood for code and prose, accuracy for arith) at equal budgets, as hypervolume shares of a grid
over the task coefficients. Two tasks' searches maximise `causal_lm`'s `score`; three tasks' maximise
`norm_score` (benchmarks/_lm_normalised.py), since `score` there is almost all arith accuracy. On two tasks also:
evaluations/s of one M2N2 search in-process and through a local Ray with 1 and 2 workers (run first), subset
fitness (Spearman of 10%-subset fitness against full fitness over random candidates) and the worker's time in
materialisation vs the forward pass. Searches run through the real driver and are read back from their run
directories; the fixed merges are scored with the same evaluator and space a worker holds.

    python benchmarks/language_models.py            # about 35-40 minutes on 2 shared cores, one torch thread
    python benchmarks/language_models.py --quick    # 1 seed, smaller budgets and grids: language_models_quick.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from _lm_normalised import normalised_score
from _results import save_result

TASK_SETS = {2: ("code", "prose"), 3: ("code", "prose", "arith")}
QUIET = {"progress": False, "log_every": 10**6, "snapshot_every": 10**6, "threads": 1}
NORMALISED = "_lm_normalised:build"
SCALES = [0.2, 0.4, 0.6, 0.8, 1.0]
GOALS = {"spearman": 0.9, "forward_share": 0.8, "ray_speedup": 1.7}  # ray: 2 workers over 1, as ladder 5


def metric(task: str) -> str:
    """A task's front objective: mean token loglik for a text domain, multiple-choice accuracy for arith."""
    return "acc_arith" if task == "arith" else f"loglik_{task}"


def objectives(tasks: tuple[str, ...]) -> dict[str, str]:
    return {metric(t): "max" for t in tasks}


def texts(tasks: tuple[str, ...]) -> list[str]:
    return [t for t in tasks if t != "arith"]


def evaluator_spec(lm, tasks: tuple[str, ...], subset: int | None = None, reference: dict | None = None) -> dict:
    """`causal_lm` over the tasks' validation (search) and test files; with `reference`, the normalised variant."""
    datasets = []
    for t in tasks:
        entry = {
            "name": t,
            "kind": "multiple_choice" if t == "arith" else "loglik",
            "search": str(lm.datasets[t]["validation"]),
            "test": str(lm.datasets[t]["test"]),
        }
        if subset is not None:
            entry["subset"] = subset
        datasets.append(entry)
    out = {"name": "causal_lm", "model": str(lm.base), "device": "cpu", "dtype": "float32", "datasets": datasets}
    if reference is not None:
        out |= {"name": NORMALISED, "reference": reference}
    return out


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
RECIPE_SPACE = {"name": "recipe", "blocks": "layer"}


def spec(
    lm,
    tasks: tuple[str, ...],
    name: str,
    space: dict,
    strategy: dict,
    budget: int,
    seed: int = 0,
    evaluator: dict | None = None,
    executor: dict | None = None,
) -> dict[str, Any]:
    runtime = dict(QUIET) | ({"executor": executor} if executor else {})
    return {
        "name": name,
        "budget": budget,
        "seed": seed,
        "evaluator": evaluator or evaluator_spec(lm, tasks),
        "models": {"init": "files", "paths": [str(lm.base), *(str(lm.finetuned[t]) for t in tasks)]},
        "space": space,
        "strategy": strategy,
        "runtime": runtime,
    }


def run_search(spec_dict: dict, out: Path):
    from evomerge.runtime import start_run
    from evomerge.spec import spec_from_dict

    run = start_run(spec_from_dict({**spec_dict, "output": str(out)}), progress=False)
    return run, json.loads(run.summary_path.read_text())


class Worker:
    """What an evaluating process holds: the evaluator (resident model) and, per space, a Materializer."""

    def __init__(self, lm, tasks: tuple[str, ...], out: Path, subset: int | None = None):
        from evomerge.runtime.driver import evaluation_parts, make_seeds
        from evomerge.spec import spec_from_dict

        name = f"worker{len(tasks)}" + ("" if subset is None else f"-subset{subset}")
        strategy = {"name": "random", "objectives": objectives(tasks)}
        self.base_spec = spec(lm, tasks, name, ta_space(), strategy, 1, evaluator=evaluator_spec(lm, tasks, subset))
        parsed = spec_from_dict({**self.base_spec, "output": str(out)})
        self.seeds_dir = out / name / "seeds"
        make_seeds(parsed, self.seeds_dir)
        self.evaluator, _ = evaluation_parts(parsed, self.seeds_dir)
        self.spaces: dict[str, Any] = {}

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
        return dict(self.evaluator.evaluate(self.materializer(space)(np.asarray(genome, dtype=np.float64))).objectives)

    def test(self, space: dict, genome) -> dict[str, float]:
        return {k: float(v) for k, v in self.evaluator.test(self.materializer(space)(np.asarray(genome))).items()}


@dataclass
class Section:
    """One task set: its worker, what its searches maximise on validation and what its verdicts compare on test.

    Two tasks keep `causal_lm`'s `score` (as before) and compare test mean loglik; three tasks search and
    compare `norm_score`, whose references (the fine-tunes' own metrics) are known once those are scored."""

    lm: Any
    tasks: tuple[str, ...]
    worker: Worker
    reference: dict[str, dict[str, float]] | None = None  # split -> per-task metric of that task's fine-tune
    fine_tunes: list[dict[str, float]] = field(default_factory=list)  # their validation metrics

    @property
    def label(self) -> str:
        return f"{len(self.tasks)} tasks ({', '.join(self.tasks)})"

    @property
    def normalised(self) -> bool:
        return len(self.tasks) > 2

    @property
    def objective(self) -> str:
        return "norm_score" if self.normalised else "score"

    @property
    def key(self) -> str:
        return "test_norm_score" if self.normalised else "test_mean_loglik"

    def evaluator(self) -> dict:
        return evaluator_spec(self.lm, self.tasks, reference=self.reference if self.normalised else None)

    def val_objective(self, metrics: dict[str, float]) -> float:
        """What a search maximises, from a candidate's validation metrics (front values hold the per-task ones)."""
        if self.normalised:
            return normalised_score(metrics, self.reference["search"])
        if "score" in metrics:
            return metrics["score"]
        return float(np.mean([metrics[f"loglik_{d}"] for d in texts(self.tasks)]))

    def val_measures(self, metrics: dict[str, float]) -> dict[str, float | None]:
        out = {
            "val_score": metrics.get("score"),
            "val_mean_loglik": float(np.mean([metrics[f"loglik_{d}"] for d in texts(self.tasks)])),
        }
        if self.normalised:
            out["val_norm_score"] = normalised_score(metrics, self.reference["search"])
        if "arith" in self.tasks:
            out["val_acc_arith"] = metrics["acc_arith"]
        return out

    def test_measures(self, metrics: dict[str, float]) -> dict[str, float]:
        out = {f"test_perplexity_{d}": metrics[f"perplexity_{d}"] for d in texts(self.tasks)}
        if "arith" in self.tasks:
            out["test_acc_arith"] = metrics["acc_arith"]
        out["test_mean_loglik"] = float(np.mean([metrics[f"loglik_{d}"] for d in texts(self.tasks)]))
        out["test_score"] = metrics["score"]
        if self.normalised:
            out["test_norm_score"] = normalised_score(metrics, self.reference["test"])
        return out

    def row(self, label: str, val: dict | None, test: dict, evaluations: int | None, note: str = "") -> dict:
        measures = self.val_measures(val) if val is not None else {}
        return {"model": label, **measures, **self.test_measures(test), "val_evaluations": evaluations, "note": note}

    def columns(self) -> list[tuple[str, str, int]]:
        """(header, row key, decimals) of the table."""
        cols = [("val norm score", "val_norm_score", 3)] if self.normalised else [("val score", "val_score", 4)]
        cols += [("val mean loglik", "val_mean_loglik", 3)]
        cols += [(f"test ppl {d}", f"test_perplexity_{d}", 1) for d in texts(self.tasks)]
        if "arith" in self.tasks:
            cols += [("test acc arith", "test_acc_arith", 3)]
        cols += [("test mean loglik", "test_mean_loglik", 3)]
        cols += [("test norm score", "test_norm_score", 3)] if self.normalised else [("test score", "test_score", 4)]
        return cols


def aggregate(label: str, per_seed: list[dict]) -> dict[str, Any]:
    """One row of means over seeds, with their standard deviations under `sd` and the seeds' rows kept."""
    numeric = [k for k, v in per_seed[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    out: dict[str, Any] = {"model": label}
    out |= {k: float(np.mean([r[k] for r in per_seed])) for k in numeric}
    if len(per_seed) > 1:
        out["sd"] = {k: float(np.std([r[k] for r in per_seed], ddof=1)) for k in numeric}
    out["seeds"] = len(per_seed)
    out["note"] = "; ".join(f"seed {i}: {r['note']}" for i, r in enumerate(per_seed) if r.get("note"))
    out["per_seed"] = per_seed
    return out


def fixed_rows(section: Section) -> list[dict]:
    """Base, fine-tunes, task arithmetic (c = 1, tuned scale), TIES and DARE-TIES; records the fine-tunes' metrics
    in the section (its references)."""
    worker, ta, n = section.worker, ta_space(), len(section.tasks)
    one_hot = {label: [float(i == k) for i in range(n)] for k, label in enumerate(section.tasks)}
    singles = [("base", [0.0] * n)] + [(f"fine-tuned {t}", g) for t, g in one_hot.items()]
    scored = {label: (worker.validate(ta, g), worker.test(ta, g)) for label, g in singles}
    section.fine_tunes = [scored[f"fine-tuned {t}"][0] for t in section.tasks]
    section.reference = {
        split: {metric(t): scored[f"fine-tuned {t}"][k][metric(t)] for t in section.tasks}
        for k, split in enumerate(("search", "test"))
    }
    rows = [section.row(label, val, test, None) for label, (val, test) in scored.items()]
    rows.append(section.row("task arithmetic, c = 1", worker.validate(ta, [1] * n), worker.test(ta, [1] * n), None))
    tuned = {c: section.val_objective(worker.validate(ta, [c] * n)) for c in SCALES}
    best_c = max(tuned, key=tuned.get)
    label = f"task arithmetic, c = {best_c:.2f} (best of {len(SCALES)} scales on validation)"
    rows.append(section.row(label, worker.validate(ta, [best_c] * n), worker.test(ta, [best_c] * n), len(SCALES)))
    rows[-1]["scales"] = {f"{c:.2f}": v for c, v in tuned.items()}
    for label, space in (
        ("TIES, density 0.5, c = 1", fixed_space("ties", density=0.5)),
        ("DARE-TIES, drop 0.5, consensus elect, c = 1", fixed_space("dare", drop_rate=0.5, consensus="elect")),
    ):
        rows.append(section.row(label, worker.validate(space, [1] * n), worker.test(space, [1] * n), None))
    return rows


def search_rows(section: Section, out: Path, budget: int, seeds: int) -> tuple[list[dict], list[dict]]:
    """mergekit-evolve's recipe (CMA-ES) and M2N2 over recipes, per seed; the best individual's test metrics."""
    from evomerge.store import read_journal

    models = ", ".join(("base", *section.tasks))
    searches = {
        "CMA-ES over per-layer-group TIES weights + densities (mergekit-evolve)": (
            EVOLVE_SPACE,
            {"name": "cma_es", "population": 8, "sigma0": 0.2, "objective": section.objective},
        ),
        f"M2N2 over per-layer recipes ({models})": (
            RECIPE_SPACE,
            {"name": "m2n2", "population": 10, "objective": section.objective},
        ),
    }
    rows, speed = [], []
    for label, (space, strategy) in searches.items():
        per_seed = []
        for seed in range(seeds):
            name = f"{strategy['name']}-{space['name']}-{len(section.tasks)}tasks-{seed}"
            run, summary = run_search(
                spec(section.lm, section.tasks, name, space, strategy, budget, seed, section.evaluator()), out
            )
            entries, _ = read_journal(run.journal_path)
            ok = [e for e in entries if e["status"] == "ok"]  # the strategy's best (M2N2's archive may drop a seed)
            objective = section.objective
            best = min(ok, key=lambda e: abs(e["objectives"][objective] - summary["best_train"]))
            seen = max(e["objectives"][objective] for e in ok)
            note = f"reported best is below the best it evaluated ({seen:.4f})" if seen > summary["best_train"] else ""
            per_seed.append(section.row(label, best["objectives"], summary["test"], summary["evaluations"], note))
            speed.append({"run": name, **{k: summary[k] for k in ("evaluations_per_second", "evaluator_share")}})
        rows.append(aggregate(label, per_seed))
    return rows, speed


def front_rows(section: Section, out: Path, grid_per_axis: int, seeds: int) -> tuple[dict, list[dict], list[dict]]:
    """MAP and NSGA-II fronts over the per-task validation metrics (equal budgets, several seeds) against a grid
    over the task coefficients; hypervolume from the worst fine-tune per task, so only merges that beat every
    fine-tune's weakest value on each task count."""
    from evomerge.pareto import hypervolume
    from evomerge.report.front import read_front

    d = len(section.tasks)
    goals = objectives(section.tasks)
    budget = (d + 1) * (d + 2) + 10  # MAP's default design plus its 10 front points
    grid_points = grid_per_axis**d
    nadir = np.array([-min(m[name] for m in section.fine_tunes) for name in goals], dtype=np.float64)  # minimised
    strategies = {
        "grid": ({"name": "grid", "points": grid_points, "objective": "score"}, grid_points, 1),
        "MAP": ({"name": "map", "objectives": goals}, budget, seeds),
        "NSGA-II": ({"name": "nsga", "objectives": goals, "pop_size": 10}, budget, seeds),
    }
    runs: dict[str, list] = {}
    speed = []
    for method, (strategy, evaluations, n_seeds) in strategies.items():
        for seed in range(n_seeds):
            name = f"front-{strategy['name']}-{d}tasks-{seed}"
            run, summary = run_search(
                spec(section.lm, section.tasks, name, ta_space(), strategy, evaluations, seed), out
            )
            front = read_front(run, goals)
            runs.setdefault(method, []).append((front, summary, hypervolume(front.minimised(front.points), nadir)))
            speed.append({"run": name, **{k: summary[k] for k in ("evaluations_per_second", "evaluator_share")}})
    hv_grid = runs["grid"][0][2]
    result: dict[str, Any] = {
        "reference": {name: -v for name, v in zip(goals, nadir)},
        "grid_points": grid_points,
        "budget": budget,
        "hv_grid": hv_grid,
        "methods": {},
    }
    rows = []
    pick = "norm score" if section.normalised else "mean loglik"
    for method, results in runs.items():
        shares = [hv / hv_grid if hv_grid > 0 else float("nan") for _, _, hv in results]
        result["methods"][method] = {
            "runs": len(results),
            "evaluations": [s["evaluations"] for _, s, _ in results],
            "front_sizes": [len(f.points) for f, _, _ in results],
            "hv": [hv for _, _, hv in results],
            "hv_share": shares,
            "fronts": [[{"genes": p.genes, **p.values} for p in f.points] for f, _, _ in results],
        }
        label = f"{method} front point with the best validation {pick}"
        per_seed = []
        for front, summary, _ in results:
            best = max(front.points, key=lambda p: section.val_objective(p.values))
            genes = ", ".join(f"{g:.2f}" for g in best.genes or [])
            if method == "grid":
                label = f"grid {'x'.join([str(grid_per_axis)] * d)} point with the best validation {pick} (c = {genes})"
            # the grid is a single-objective run, so its front carries no test metrics: a worker scores the point
            test = best.test or section.worker.test(ta_space(), best.genes)
            r = section.row(label, None, test, summary["evaluations"])
            r |= {k: v for k, v in section.val_measures(best.values).items() if v is not None}
            per_seed.append({**r, "genes": best.genes})
        rows.append(per_seed[0] if method == "grid" else aggregate(label, per_seed))
    return result, rows, speed


def spearman(lm, worker: Worker, out: Path, candidates: int, subset: int, seed: int) -> dict[str, Any]:
    """Rank correlation of fitness on a fixed `subset` of each validation split with fitness on all of it, over
    random candidates of the task-arithmetic space (per-model coefficients in [0, 1.5]), on two tasks."""
    from scipy.stats import spearmanr

    part = Worker(lm, TASK_SETS[2], out, subset=subset)
    space = ta_space(1.5)
    genomes = np.random.default_rng(seed).random((candidates, 2))
    a, b = [], []
    t_full = t_part = 0.0
    for g in genomes:
        start = time.perf_counter()
        a.append(worker.validate(space, g))
        t_full += time.perf_counter() - start
        start = time.perf_counter()
        b.append(part.validate(space, g))
        t_part += time.perf_counter() - start
    result: dict[str, Any] = {"candidates": candidates, "subset_per_domain": subset, "split": 64}
    for name in ("score", "loglik_code", "loglik_prose"):
        result[f"spearman_{name}"] = float(spearmanr([x[name] for x in a], [x[name] for x in b]).statistic)
    result["seconds_per_eval_full"] = t_full / candidates
    result["seconds_per_eval_subset"] = t_part / candidates
    return result


def time_shares(worker, spaces: list[tuple[str, dict]], repeats: int) -> list[dict[str, Any]]:
    """Per (label, space): seconds writing a candidate into the resident model (`space.write`) against the forward
    pass (`evaluator.evaluate`), over a few random candidates. `worker` is either benchmark's Worker."""
    out = []
    rng = np.random.default_rng(1)
    for label, space in spaces:
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
                "genes": dim,
                "materialise_s": write / repeats,
                "forward_s": forward / repeats,
                "forward_share": forward / (write + forward),
            }
        )
    return out


def ray_speed(lm, out: Path, budget: int) -> list[dict[str, Any]]:
    """One M2N2 search over two tasks' recipes, in-process and through a local Ray with 1 and 2 workers (one CPU
    and one torch thread each); the run's own evaluations/s (worker start-up excluded, test passes included),
    against the mean of the in-process runs before and after."""
    import ray

    from evomerge.store import read_journal

    strategy = {"name": "m2n2", "population": 10, "objective": "score"}
    ray_executors = [
        (f"Ray, {w} worker{'s' * (w > 1)}", {"name": "ray", "address": "auto", "workers": w, "cpus_per_worker": 1.0})
        for w in (1, 2)
    ]
    # in-process before and after Ray: the machine is shared, so the baseline is bracketed in time
    executors = [("in-process", None), *ray_executors, ("in-process, after Ray", None)]
    rows = []
    for label, executor in executors:
        if executor is not None and not ray.is_initialized():
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        if executor is None and ray.is_initialized():
            ray.shutdown()
        retried = []  # a run with failed evaluations measures nothing (a failure costs no forward pass): run again
        for attempt in range(3):
            name = f"speed-{len(rows)}-{attempt}"
            spec_dict = spec(lm, TASK_SETS[2], name, RECIPE_SPACE, strategy, budget, 0, None, executor)
            run, summary = run_search(spec_dict, out)
            failed = [e for e in read_journal(run.journal_path)[0] if e["status"] != "ok"]
            if not failed:
                break
            retried.append(f"{len(failed)} of {summary['evaluations']} failed, the first: {failed[0].get('error')}")
            print(f"{name}: {retried[-1]}", flush=True)
        else:
            raise RuntimeError(f"{label}: evaluations failed in 3 runs: {retried}")
        rows.append(
            {
                "executor": label,
                "evaluations": summary["evaluations"],
                "wall_seconds": summary["wall_seconds"],
                "evaluations_per_second": summary["evaluations"] / summary["wall_seconds"],
                "busy_shares": [w["busy_share"] for w in summary.get("workers", [])],
                "best_train": summary["best_train"],
                "retried_after": retried,
            }
        )
    baseline = float(np.mean([r["evaluations_per_second"] for r in rows if r["executor"].startswith("in-process")]))
    for r in rows:
        r["speedup_vs_inprocess"] = r["evaluations_per_second"] / baseline
        r["speedup_vs_1_worker"] = r["evaluations_per_second"] / rows[1]["evaluations_per_second"]
    return rows


def cell(r: dict[str, Any], key: str, digits: int) -> str:
    value = r.get(key)
    if value is None:
        return "-"
    spread = r.get("sd", {}).get(key)
    return f"{value:.{digits}f}" if spread is None else f"{value:.{digits}f} ± {spread:.{digits}f}"


def table(section: Section, rows: list[dict]) -> list[str]:
    cols = section.columns()
    lines = [
        "| model | " + " | ".join(h for h, _, _ in cols) + " | val evaluations |",
        "|---|" + "---|" * (len(cols) + 1),
    ]
    for r in rows:
        evals = "-" if r["val_evaluations"] is None else f"{r['val_evaluations']:.0f}"
        if r.get("seeds"):
            evals += f" x {r['seeds']} seed{'s' * (r['seeds'] > 1)}"
        lines.append(f"| {r['model']} | " + " | ".join(cell(r, k, d) for _, k, d in cols) + f" | {evals} |")
    return lines


def verdicts(section: Section, rows: list[dict[str, Any]]) -> list[str]:
    """Plain statements, on the section's test key, of where a method does or does not beat a simpler one."""
    key, what = section.key, section.key.removeprefix("test_").replace("_", " ")
    by = {r["model"]: r for r in rows}
    ta = by["task arithmetic, c = 1"]
    tuned = next(r for r in rows if "best of" in r["model"])
    singles = [by["base"], *(by[f"fine-tuned {t}"] for t in section.tasks)]
    best_single = max(singles, key=lambda r: r[key])
    out = []

    def compare(r: dict, simpler: dict, name: str) -> None:
        gaps = [s[key] - simpler[key] for s in r.get("per_seed", [r])]
        verb = "beats" if np.mean(gaps) > 0 else "does NOT beat"
        spread = ""
        if len(gaps) > 1:
            spread = f" ± {np.std(gaps, ddof=1):.4f} over {len(gaps)} seeds, ahead in {sum(g > 0 for g in gaps)}"
        out.append(f"- {r['model']} {verb} {name} on test {what} ({np.mean(gaps):+.4f}{spread}).")

    compare(tuned, ta, "task arithmetic at c = 1")
    for r in rows:
        if r["model"].startswith(("TIES", "DARE")):
            compare(r, ta, "task arithmetic at c = 1")
        if r["model"].startswith(("CMA-ES", "M2N2", "MAP", "NSGA-II", "grid")):
            compare(r, tuned, "task arithmetic with one tuned scale")
    for r in rows:
        if not r["model"].startswith(("base", "fine-tuned")) and r[key] <= best_single[key]:
            out.append(f"- {r['model']} does NOT beat the best single model ({best_single['model']}).")
    if "arith" in section.tasks:
        ft = by["fine-tuned arith"]["test_acc_arith"]
        merges = [r for r in rows if not r["model"].startswith(("base", "fine-tuned"))]
        below = [f"{r['model'].split(' (')[0]} {r['test_acc_arith']:.3f}" for r in merges if r["test_acc_arith"] < ft]
        if below:
            out.append(
                f"- These merges do NOT reach the arith fine-tune's test accuracy ({ft:.3f}): {'; '.join(below)}."
            )
    for r in rows:
        if r.get("note"):
            out.append(f"- {r['model']}: {r['note']}.")
    return out


def mean_sd(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    values = [scale * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def front_table(fronts: dict[str, dict]) -> list[str]:
    lines = [
        "| tasks | method | runs | evaluations | front size | hypervolume share of the grid's |",
        "|---|---|---|---|---|---|",
    ]
    for tasks, front in fronts.items():
        for method, m in front["methods"].items():
            lines.append(
                f"| {tasks} | {method} | {m['runs']} | {mean_sd(m['evaluations'], digits=0)} "
                f"| {mean_sd(m['front_sizes'])} | {mean_sd(m['hv_share'], 100)}% |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller budgets and grids, 1 seed")
    parser.add_argument("--budget", type=int, default=None, help="evaluations per CMA-ES/M2N2 search (40, quick 12)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per search (3, quick 1)")
    parser.add_argument("--subset-candidates", type=int, default=None, help="(20, quick 10)")
    parser.add_argument("--speed-budget", type=int, default=None, help="evaluations per speed run (30, quick 10)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    from evomerge.data.language_models import LanguageModelsRecipe, language_models

    quick = args.quick
    settings = {
        "budget": args.budget or (12 if quick else 40),
        "seeds": args.seeds or (1 if quick else 3),
        "grid_per_axis": {2: 4 if quick else 7, 3: 3 if quick else 5},
        "subset_candidates": args.subset_candidates or (10 if quick else 20),
        "speed_budget": args.speed_budget or (10 if quick else 30),
        "scales": SCALES,
    }
    started = time.perf_counter()

    def done(what: str) -> None:
        print(f"{what} done ({time.perf_counter() - started:.0f} s)", flush=True)

    lm = language_models(LanguageModelsRecipe())
    results: dict[str, Any] = {"sections": {}, "fronts": {}}
    lines: list[str] = []
    speed: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="evomerge-lm-bench-") as tmp:
        out = Path(tmp)
        ray_rows = ray_speed(lm, out, settings["speed_budget"])
        done("Ray speed")
        sections = {d: Section(lm, tasks, Worker(lm, tasks, out)) for d, tasks in TASK_SETS.items()}
        for d, section in sections.items():
            rows = fixed_rows(section)
            done(f"{d} tasks: fixed merges")
            found, run_speed = search_rows(section, out, settings["budget"], settings["seeds"])
            done(f"{d} tasks: searches")
            front, point_rows, front_speed = front_rows(section, out, settings["grid_per_axis"][d], settings["seeds"])
            done(f"{d} tasks: fronts")
            rows += found + point_rows
            speed += run_speed + front_speed
            results["sections"][str(d)] = {"tasks": section.tasks, "reference": section.reference, "rows": rows}
            results["fronts"][str(d)] = front
            lines += [f"**{section.label}**", "", *table(section, rows), "", *verdicts(section, rows), ""]
        subset = spearman(lm, sections[2].worker, out, settings["subset_candidates"], subset=6, seed=0)
        spaces = [
            ("task arithmetic (2 genes)", ta_space()),
            ("TIES per layer group (12 genes)", EVOLVE_SPACE),
            ("recipe per layer (18 genes)", RECIPE_SPACE),
        ]
        shares = time_shares(sections[2].worker, spaces, repeats=3)
        done("subset fitness and time shares")

    lines += [
        "Fronts over the per-task validation metrics (loglik_code, loglik_prose[, acc_arith]); hypervolume from the "
        "worst fine-tune per task; MAP and NSGA-II (population 10) get MAP's default budget ((d+1)(d+2) + 10).",
        "",
        *front_table(results["fronts"]),
        "",
        f"Subset fitness ({subset['subset_per_domain']} of {subset['split']} examples per domain, "
        f"{subset['candidates']} random task-arithmetic candidates, 2 tasks): Spearman score "
        f"{subset['spearman_score']:.3f}, loglik_code {subset['spearman_loglik_code']:.3f}, loglik_prose "
        f"{subset['spearman_loglik_prose']:.3f}; {subset['seconds_per_eval_subset']:.2f} s vs "
        f"{subset['seconds_per_eval_full']:.2f} s per evaluation.",
        "",
        "| executor (M2N2, 2 tasks) | evaluations | wall s | evaluations/s | vs in-process (mean) | vs 1 Ray worker "
        "| worker busy shares |",
        "|---|---|---|---|---|---|---|",
        *[
            f"| {r['executor']} | {r['evaluations']} | {r['wall_seconds']:.1f} | {r['evaluations_per_second']:.2f} "
            f"| {r['speedup_vs_inprocess']:.2f}x | {r['speedup_vs_1_worker']:.2f}x "
            f"| {', '.join(f'{100 * s:.0f}%' for s in r['busy_shares']) or '-'} |"
            for r in ray_rows
        ],
        "",
        "| worker, per candidate (2 tasks) | materialise s | forward s | forward share |",
        "|---|---|---|---|",
        *[
            f"| {s['space']} | {s['materialise_s']:.3f} | {s['forward_s']:.3f} | {100 * s['forward_share']:.0f}% |"
            for s in shares
        ],
        "",
        f"In-process searches: {mean_sd([s['evaluations_per_second'] for s in speed], digits=2)} evaluations/s over "
        f"{len(speed)} runs (2 and 3 tasks).",
        "",
        *goal_lines(subset, shares, ray_rows, results["fronts"]),
    ]
    text = "\n".join(lines)
    print(text)
    path = save_result(
        "language_models_quick" if quick else "language_models",  # a quick run never replaces the full one
        text,
        [r for s in results["sections"].values() for r in s["rows"]],
        sections=results["sections"],
        fronts=results["fronts"],
        subset_fitness=subset,
        ray_speed=ray_rows,
        speed=speed,
        time_shares=shares,
        settings=settings,
        seconds=round(time.perf_counter() - started, 1),
    )
    print(f"\nwrote {path}")


def goal_lines(subset: dict, shares: list[dict], ray_rows: list[dict], fronts: dict[str, dict]) -> list[str]:
    """Each goal, met or missed, in one line."""

    def verdict(ok: bool) -> str:
        return "meets" if ok else "MISSES"

    two = next(r for r in ray_rows if r["executor"] == "Ray, 2 workers")
    forward = min(s["forward_share"] for s in shares)
    out = [
        f"- Subset fitness {verdict(subset['spearman_score'] >= GOALS['spearman'])} the goal (Spearman >= "
        f"{GOALS['spearman']}): {subset['spearman_score']:.3f} on score.",
        f"- The worker's forward share {verdict(forward >= GOALS['forward_share'])} the goal (>= "
        f"{100 * GOALS['forward_share']:.0f}%): {100 * forward:.0f}% at the least.",
        f"- Ray with 2 workers {verdict(two['speedup_vs_1_worker'] >= GOALS['ray_speedup'])} the goal (>= "
        f"{GOALS['ray_speedup']}x the evaluations/s of 1 worker): {two['speedup_vs_1_worker']:.2f}x; "
        f"{two['speedup_vs_inprocess']:.2f}x in-process.",
    ]
    for r in ray_rows:
        if r["retried_after"]:
            out.append(f"- {r['executor']} was measured on a rerun; the earlier runs: {'; '.join(r['retried_after'])}.")
    for tasks, front in fronts.items():
        for method, m in front["methods"].items():
            if method != "grid" and np.mean(m["hv_share"]) < 1.0:
                out.append(
                    f"- {method}'s {tasks}-task front does not reach the grid's hypervolume "
                    f"({mean_sd(m['hv_share'], 100)}%, grid {front['grid_points']} points)."
                )
    return out


if __name__ == "__main__":
    main()
