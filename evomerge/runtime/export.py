"""`evomerge export`: the merged model of one of a run's individuals, with its recipe beside it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evomerge.errors import EvomergeError
from evomerge.merge.mergekit import NotMappable, mergekit_yaml
from evomerge.runtime.driver import search_space
from evomerge.search import STRATEGIES
from evomerge.seeds import seed_dtypes, seed_paths
from evomerge.space.base import ExportsPlan, LayerBlocks
from evomerge.store import NoSpaceError, RunDir, iter_journal, load_state
from evomerge.store.atomic import FULL_DISK
from evomerge.weights.checkpoint import write_checkpoint
from evomerge.yaml_io import dump_plain_yaml


def archive_members(strategy_state: dict[str, Any]) -> dict[int, np.ndarray]:
    """Individual id -> genome for strategies that keep an archive (M2N2, GA, MAP-Elites)."""
    ids, genomes = strategy_state.get("ids"), strategy_state.get("genomes")
    if ids is None or genomes is None:
        return {}
    return {int(i): g for i, g in zip(ids, genomes)}


def export_individual(run_path: str | Path, individual: int | None, out: str | Path | None = None) -> Path:
    """Write individual `individual` (None: the best on the search split) as a safetensors model folder."""
    run = RunDir.open(run_path)
    if not run.snapshot_path.exists():
        raise EvomergeError(f"{run.path} has no snapshot yet; nothing to export")
    spec = run.check_spec_unchanged()
    space = search_space(spec, run.seeds_dir)
    strategy = STRATEGIES.build(spec.strategy, space=space, seed=spec.seed)
    state = load_state(run.snapshot_path)["strategy"]
    strategy.load_state_dict(state)
    label = "best" if individual is None else f"id-{individual}"
    if individual is None:
        best = strategy.best()
        if best is None:
            raise EvomergeError(f"{run.path} has no evaluated individual yet")
        genome = best[0]
        members = {i: g for i, g in archive_members(state).items() if np.array_equal(g, genome)}
        individual = next(iter(members), None)
    else:
        members = archive_members(state)
        if individual not in members:
            known = ", ".join(map(str, sorted(members))) or "none (this strategy keeps only its best)"
            raise EvomergeError(f"individual {individual} is not in the archive of {run.path}; archive ids: {known}")
        genome = members[individual]
    return _write_export(run, spec, space, genome, individual, Path(out) if out else run.path / "export" / label)


def export_front_point(
    run_path: str | Path, point: int, out: str | Path | None = None, objectives: dict[str, str] | None = None
) -> Path:
    """Write front point `point` (numbered as `evomerge front` prints them, with the same `objectives`)
    as a safetensors model folder."""
    from evomerge.report.front import front_genome

    run = RunDir.open(run_path)
    spec = run.check_spec_unchanged()
    genome, chosen = front_genome(run, point, objectives)
    space = search_space(spec, run.seeds_dir)
    label = f"point-{point}" + ("" if objectives is None else "-" + "-".join(f"{k}-{v}" for k, v in objectives.items()))
    target = Path(out) if out else run.path / "export" / label
    return _write_export(run, spec, space, genome, chosen.id, target, {"front_point": point})


def _write_export(
    run: RunDir, spec, space, genome: np.ndarray, individual: int | None, out: Path, extra_recipe: dict | None = None
) -> Path:
    entry = next((e for e in iter_journal(run.journal_path) if e["id"] == individual), None)
    recipe = {
        "run": str(run.path.resolve()),
        "individual": individual,
        **(extra_recipe or {}),
        "space": spec.space.to_plain(),
        "seeds": [str(p.resolve()) for p in seed_paths(run.seeds_dir)],
        "objectives": None if entry is None else entry.get("objectives"),
        "lineage": None if entry is None else entry.get("meta"),
    }
    if spec.space.name != "weights":  # small genomes (recipes, SLERP weights) are the recipe itself
        recipe["genome"] = [float(v) for v in genome]
    if isinstance(space, LayerBlocks):
        recipe["blocks"] = [list(r) for r in space.ranges]
    extra = {"recipe.json": json.dumps(recipe, indent=2) + "\n"}
    plan = space.to_plan(genome, recipe["seeds"]) if isinstance(space, ExportsPlan) else None
    if plan is not None:  # re-apply with `evomerge merge merge_plan.yaml` (e.g. to full-precision models)
        extra["merge_plan.yaml"] = dump_plain_yaml(plan)
        try:  # the same merge as a mergekit config, where mergekit has the method
            extra["mergekit.yaml"] = mergekit_yaml(plan, space.layout.names)
        except NotMappable as why:
            print(f"evomerge: no mergekit.yaml: {why}", file=sys.stderr)
    dtypes = seed_dtypes(run.seeds_dir)
    layout = space.layout
    entries = [(n, tuple(s), dtypes.get(n, torch.float32)) for n, s in zip(layout.names, layout.shapes)]
    tensors = ((n, t.to(dtypes.get(n, torch.float32))) for n, t in space.tensors(genome))
    try:
        return write_checkpoint(out, entries, tensors, extra_files=extra, metadata={"evomerge_run": run.path.name})
    except OSError as err:  # write_checkpoint has removed its partial folder
        if err.errno in FULL_DISK:
            raise NoSpaceError(out, "; nothing was exported; free space and export again") from err
        raise
