"""Start and resume searches: build the parts a spec names and hand them to the driver loop."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from evomerge.errors import RunDirError
from evomerge.evaluate import EVALUATORS, Evaluator
from evomerge.evaluate.base import RunBound
from evomerge.pareto import Objectives
from evomerge.runtime.executor import InProcessExecutor
from evomerge.runtime.manager import SearchManager
from evomerge.runtime.threads import limit_threads
from evomerge.search import STRATEGIES, Strategy
from evomerge.seeds import build_seeds, in_seed_dtypes, load_seeds, save_seeds, seed_sources
from evomerge.space import SPACES, Space
from evomerge.space.weights import check_size as check_weights_size
from evomerge.spec import ExecutorSpec, SearchSpec
from evomerge.store import NoSpaceError, RunDir, read_journal
from evomerge.store.atomic import atomic_write_text, reporting_full_disk
from evomerge.weights.io import save_tensors


def build_evaluator_and_space(
    spec: SearchSpec,
    seeds_dir: Path,
    fresh_seeds: bool = False,
    run_dir: Path | None = None,
    verify_seeds: bool = False,
) -> tuple[Evaluator, Space]:
    """The evaluator, bound to its run, and the space over the seed models in `seeds_dir` (built and saved there
    first if fresh).

    The driver and every Ray worker build them the same way; `run_dir` defaults to the folder holding
    `seeds_dir` (RUN/seeds), which is all a worker is given.
    """
    evaluator = EVALUATORS.build(spec.evaluator)
    if isinstance(evaluator, RunBound):
        evaluator.bind_run(run_dir if run_dir is not None else seeds_dir.parent)
    layout = evaluator.layout()
    if spec.space.name == "weights":
        check_weights_size(layout)  # before seed models of that size are built
    if fresh_seeds:
        seeds = build_seeds(spec.models, evaluator, spec.evaluator.to_plain(), spec.seed)
        save_seeds(seeds_dir, seeds, layout, seed_sources(spec.models))
    else:
        seeds = load_seeds(seeds_dir, layout, verify=verify_seeds)
    return evaluator, SPACES.build(spec.space, layout=layout, seeds=seeds)


def build_parts(run: RunDir, spec: SearchSpec, fresh_seeds: bool) -> tuple[Evaluator, Space, Strategy]:
    """The evaluator, the space over the run's seed models, and a fresh strategy."""
    evaluator, space = build_evaluator_and_space(spec, run.seeds_dir, fresh_seeds, run.path, verify_seeds=True)
    strategy = STRATEGIES.build(spec.strategy, space=space, seed=spec.seed)
    metric_names = getattr(evaluator, "metric_names", None)
    if isinstance(getattr(strategy, "objectives", None), Objectives) and metric_names is not None:
        strategy.objectives.check_names(metric_names())  # before the first evaluation, not at the first result
    check_evaluator = getattr(strategy, "check_evaluator", None)
    if check_evaluator is not None:
        check_evaluator(evaluator)
    return evaluator, space, strategy


def build_manager(run: RunDir, spec: SearchSpec, budget: int, fresh_seeds: bool, progress: bool) -> SearchManager:
    limit_threads(spec.runtime.threads)
    evaluator, space, strategy = build_parts(run, spec, fresh_seeds)
    chosen = spec.runtime.executor
    if chosen.name == "ray":
        from evomerge.runtime.ray_pool import RayExecutor

        executor = RayExecutor(spec.to_plain(), run.seeds_dir, chosen, threads=spec.runtime.threads)
        deterministic = chosen.deterministic
    else:
        executor, deterministic = InProcessExecutor(evaluator, space), True
    return SearchManager(run, spec, strategy, executor, space, budget, progress, deterministic)


def start_run(spec: SearchSpec, root: str | Path | None = None, progress: bool = True) -> RunDir:
    """Create the run directory (locked) and run; a run that fails before its first evaluation leaves nothing."""
    root = Path(root if root is not None else spec.output)
    fresh = not (root / spec.name).exists()
    run = RunDir.create(spec, root)
    try:
        try:
            manager = build_manager(run, spec, spec.budget, fresh_seeds=True, progress=progress)
        except BaseException:
            if fresh:
                shutil.rmtree(run.path, ignore_errors=True)
            raise
        _drive(run, manager)
    finally:
        run.held_lock.release()
    return run


def resume_run(
    path: str | Path, budget: int | None = None, progress: bool = True, executor: ExecutorSpec | None = None
) -> RunDir:
    """Continue a run; `executor` replaces the spec's (e.g. resume a laptop run on a cluster).

    A resume that cannot replay the journal leaves the run's status as it was.
    """
    run = RunDir.open(path)
    with run.lock():
        spec = run.check_spec_unchanged()
        if executor is not None:
            spec.runtime.executor = executor
        info = run.info()
        done = len(read_journal(run.journal_path)[0])
        budget = _resume_budget(run, info, budget, done)
        manager = build_manager(run, spec, budget, fresh_seeds=info["status"] == "created", progress=progress)
        try:
            replayed = manager.restore()
        except BaseException:
            manager.executor.close()
            raise
        if replayed:
            print(f"resume {run.path.name}: replayed {replayed:,} journaled results", file=sys.stderr)
        _drive(run, manager)
    return run


def _resume_budget(run: RunDir, info: dict[str, Any], budget: int | None, done: int) -> int:
    """The total budget to resume to, refused (before anything is built) when nothing would be done."""
    if budget is None:
        budget = info["budget"]
    elif budget <= 0:
        raise RunDirError(f"--budget must be > 0, got {budget}")
    summary = run.summary() or {}
    if info["status"] == "finished" and summary.get("strategy_finished"):
        raise RunDirError(
            f"{run.path}: its {summary.get('strategy')} search finished after {done:,} evaluations and has nothing "
            "more to ask; a larger --budget cannot extend it"
        )
    if info["status"] == "finished" and budget <= done:
        raise RunDirError(
            f"{run.path} already finished its {done:,} evaluations; pass --budget above {done:,} to extend it"
        )
    if budget < done:
        raise RunDirError(
            f"--budget {budget:,} is below the {done:,} evaluations {run.path} already journaled; "
            f"pass at least {done:,}"
        )
    return budget


def _drive(run: RunDir, manager: SearchManager) -> None:
    try:
        run.update_info(status="running", budget=manager.budget)
        status = manager.loop()
        finish(run, manager, status)
    except KeyboardInterrupt:  # a second Ctrl-C: the journal is complete, the last periodic snapshot stands
        run.update_info(status="interrupted")
        raise
    except NoSpaceError as err:  # the journal ends with a whole entry and the last snapshot stands: resumable
        done = len(read_journal(run.journal_path)[0])
        stopped = NoSpaceError(
            err.path,
            f"; the run stopped with {done:,} of {manager.budget:,} evaluations saved; free space, then continue "
            f"with: evomerge resume {run.path}",
        )
        with contextlib.suppress(OSError, NoSpaceError):  # run.json may have no room either; it keeps "running"
            run.update_info(status="failed", error=str(stopped))
        raise stopped from err
    except BaseException as err:
        run.update_info(status="failed", error=f"{type(err).__name__}: {err}")
        raise
    finally:
        manager.executor.close()


def finish(run: RunDir, manager: SearchManager, status: str) -> dict[str, Any]:
    summary = manager.summary(status)
    stats = getattr(manager.executor, "worker_stats", None)
    if stats is not None:
        summary["workers"] = stats()
        for worker in summary["workers"]:
            worker["busy_share"] = round(worker["busy_seconds"] / max(summary["wall_seconds"], 1e-9), 4)
    atomic_write_text(run.summary_path, json.dumps(summary, indent=2) + "\n")
    write_curve(run.curve_path, manager.state.curve)
    genome = manager.best_genome()
    if genome is not None:
        best = in_seed_dtypes(manager.space.decode(genome), run.seeds_dir)
        save_tensors(run.best_path, best, {"best_train": str(summary["best_train"])})
    from evomerge.report import plot_run

    summary["plots"] = plot_run(run)
    if isinstance(getattr(manager.strategy, "objectives", None), Objectives):  # a multi-objective search
        from evomerge.report.front import write_front
        from evomerge.report.optuna_mirror import MIRROR_FILE, mirror_run

        summary["front"] = write_front(run, manager.executor.test)
        summary["plots"] += summary["front"].pop("plots")
        mirror = run.path / MIRROR_FILE
        try:
            with reporting_full_disk(mirror):  # Optuna writes it, so its errors name no file
                summary["optuna_journal"] = str(mirror_run(run.path))
        except NoSpaceError:
            mirror.unlink(missing_ok=True)  # no torn mirror: it is rebuilt whole from the journal next time
            raise
        atomic_write_text(run.summary_path, json.dumps(summary, indent=2) + "\n")
    run.update_info(status=status, evaluations=summary["evaluations"])
    return summary


def write_curve(path: Path, curve: list[dict[str, float]]) -> None:
    keys: list[str] = []
    for row in curve:
        keys += [k for k in row if k not in keys]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=keys)
    writer.writeheader()
    writer.writerows(curve)
    atomic_write_text(path, text.getvalue())
