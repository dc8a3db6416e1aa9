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

import numpy as np
import torch

from evomerge.errors import EvomergeError, RunDirError
from evomerge.evaluate import EVALUATORS, Evaluator
from evomerge.evaluate.base import EvaluatorFacts, ResidentModel, RunBound, SubsetFromSeeds, evaluator_facts
from evomerge.runtime.executor import InProcessExecutor, ReportsWorkers
from evomerge.runtime.manager import SearchManager
from evomerge.runtime.threads import limit_threads
from evomerge.search import STRATEGIES, Strategy
from evomerge.search.base import EvaluatorChecked, MultiObjective
from evomerge.seeds import build_seeds, load_seeds, save_seeds, seed_dtypes, seed_sources
from evomerge.space import SPACES, Space
from evomerge.space.weights import check_size as check_weights_size
from evomerge.spec import ExecutorSpec, SearchSpec
from evomerge.store import NoSpaceError, RunDir, read_journal
from evomerge.store.atomic import atomic_write_text, reporting_full_disk
from evomerge.store.lock import taking_turns
from evomerge.weights import Layout
from evomerge.weights.io import write_model
from evomerge.weights.seed_models import SeedModels


def build_evaluator(spec: SearchSpec, run_dir: Path) -> Evaluator:
    """The evaluator, bound to its run (only processes that evaluate build one)."""
    evaluator = EVALUATORS.build(spec.evaluator)
    if isinstance(evaluator, RunBound):
        evaluator.bind_run(run_dir)
    return evaluator


def evaluator_device(evaluator: Evaluator) -> torch.device:
    """Where seeds and candidates live: the device of the evaluator's resident model, else the CPU."""
    if isinstance(evaluator, ResidentModel):
        return next(iter(evaluator.resident_parameters().values())).device
    return torch.device("cpu")


def make_seeds(spec: SearchSpec, seeds_dir: Path, evaluator: Evaluator | None = None) -> None:
    """A fresh run's seed models: the user's checkpoints checked against each other and recorded, or models evomerge
    makes (random inits, trained specialists, an evaluator's own), which are small, saved."""
    sources = seed_sources(spec.models)
    if sources is not None:  # names, shapes, dtypes and shards checked from the headers, before anything is saved
        checked = SeedModels.from_files(sources, expected=None if evaluator is None else evaluator.layout())
        save_seeds(seeds_dir, None, checked.layout, sources)
        return
    evaluator = evaluator if evaluator is not None else build_evaluator(spec, seeds_dir.parent)
    layout = evaluator.layout()
    if spec.space.name == "weights":
        check_weights_size(layout)  # before seed models of that size are built
    save_seeds(seeds_dir, build_seeds(spec.models, evaluator, spec.evaluator.to_plain(), spec.seed), layout)


SUBSET_FILE = "subset.json"


def settle_subset(evaluator: Evaluator, seeds_dir: Path) -> None:
    """Give an evaluator that picks its search subset from the seeds' scores (`SubsetFromSeeds`) the run's choice,
    made by the first process that needs it: each seed scored on the whole search split, the evaluator's choice
    recorded in RUN/subset.json. Later processes (other Ray workers, a resumed run) read the record, so a run keeps
    one subset for life."""
    if not isinstance(evaluator, SubsetFromSeeds) or not evaluator.needs_seed_scores():
        return
    record = seeds_dir.parent / SUBSET_FILE
    with taking_turns(seeds_dir.parent / f".{SUBSET_FILE}.lock"):
        if not record.is_file():
            seeds = load_seeds(seeds_dir, evaluator.layout())
            scores = [
                evaluator.full_scores({n: seeds.tensor(k, n) for n in seeds.layout.names}) for k in range(len(seeds))
            ]
            atomic_write_text(record, json.dumps(evaluator.choose_subset(np.stack(scores))) + "\n")
    try:
        evaluator.use_subset(json.loads(record.read_text()))
    except (ValueError, EvomergeError) as err:  # a record edited or cut by hand
        raise EvomergeError(f"{record}: {err}") from err


def search_space(
    spec: SearchSpec,
    seeds_dir: Path,
    layout: Layout | None = None,
    device: torch.device | None = None,
    verify: bool = False,
) -> Space:
    """The space over the run's seed models: left in their files and read a tensor at a time (the driver of a
    distributed run, `export`), or resident on `device` (a process that evaluates). `layout` is the evaluator's,
    which the seeds must match; `verify` checks recorded checkpoints' content hashes (on start and resume)."""
    seeds = load_seeds(seeds_dir, layout, verify=verify)
    if spec.space.name == "weights":
        check_weights_size(seeds.layout)
    if device is not None:
        seeds = seeds.resident(device)
    return SPACES.build(spec.space, layout=seeds.layout, seeds=seeds)


def evaluation_parts(spec: SearchSpec, seeds_dir: Path, run_dir: Path | None = None) -> tuple[Evaluator, Space]:
    """What an evaluating process holds (a Ray worker, or the driver when it evaluates in-process): the evaluator and
    the space over the seeds, resident on the evaluator's device. `run_dir` defaults to the folder holding
    `seeds_dir` (RUN/seeds), which is all a worker is given."""
    evaluator = build_evaluator(spec, run_dir if run_dir is not None else seeds_dir.parent)
    settle_subset(evaluator, seeds_dir)
    return evaluator, search_space(spec, seeds_dir, evaluator.layout(), evaluator_device(evaluator))


def check_strategy(strategy: Strategy, facts: EvaluatorFacts) -> None:
    """Refuse, before the first evaluation, a strategy that does not fit what the evaluator reports."""
    if isinstance(strategy, MultiObjective) and facts.metric_names is not None:
        strategy.objectives.check_names(facts.metric_names)  # not at the first result
    if isinstance(strategy, EvaluatorChecked):
        strategy.check_evaluator(facts)


def build_manager(run: RunDir, spec: SearchSpec, budget: int, fresh_seeds: bool, progress: bool) -> SearchManager:
    """In-process, the driver evaluates: it holds the evaluator and the seeds on its device. With Ray it holds only
    the search: the space reads the seed files a tensor at a time when it must (SLERP angles, the best model), and
    the evaluator exists only on the workers (and briefly here to make seeds evomerge builds itself)."""
    limit_threads(spec.runtime.threads)
    chosen = spec.runtime.executor
    verify = not fresh_seeds  # fresh seeds were just hashed into seeds.json; a resume checks them against it
    if chosen.name != "ray":
        evaluator = build_evaluator(spec, run.path)
        if fresh_seeds:
            make_seeds(spec, run.seeds_dir, evaluator)
        settle_subset(evaluator, run.seeds_dir)
        space = search_space(spec, run.seeds_dir, evaluator.layout(), evaluator_device(evaluator), verify=verify)
        strategy = STRATEGIES.build(spec.strategy, space=space, seed=spec.seed)
        check_strategy(strategy, evaluator_facts(evaluator))
        executor = InProcessExecutor(evaluator, space)
        return SearchManager(run, spec, strategy, executor, space, budget, progress, True)
    from evomerge.runtime.ray_pool import RayExecutor

    if fresh_seeds:
        make_seeds(spec, run.seeds_dir)
    space = search_space(spec, run.seeds_dir, verify=verify)
    strategy = STRATEGIES.build(spec.strategy, space=space, seed=spec.seed)
    ray_executor = RayExecutor(spec.to_plain(), run.seeds_dir, chosen, threads=spec.runtime.threads)
    try:
        check_strategy(strategy, ray_executor.evaluator_facts())
    except BaseException:
        ray_executor.close()
        raise
    return SearchManager(run, spec, strategy, ray_executor, space, budget, progress, chosen.deterministic)


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
    if isinstance(manager.executor, ReportsWorkers):
        summary["workers"] = manager.executor.worker_stats()
        for worker in summary["workers"]:
            worker["busy_share"] = round(worker["busy_seconds"] / max(summary["wall_seconds"], 1e-9), 4)
    atomic_write_text(run.summary_path, json.dumps(summary, indent=2) + "\n")
    write_curve(run.curve_path, manager.state.curve)
    genome = manager.best_genome()
    if genome is not None:
        write_model(
            run.best_path, manager.space, genome, seed_dtypes(run.seeds_dir), {"best_train": str(summary["best_train"])}
        )
    from evomerge.report import plot_run

    summary["plots"] = plot_run(run)
    if isinstance(manager.strategy, MultiObjective):
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
