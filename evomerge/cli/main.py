"""`evomerge run / resume / report / front / export / merge / fisher / ls`: the command line over specs and runs."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from evomerge.errors import EvomergeError

EPILOG = """examples:
  evomerge run search_spaces/m2n2_digits_scratch.yaml            # the paper's from-scratch search
  evomerge run search_spaces/m2n2_digits_pretrained.yaml --seed 3
  evomerge resume runs/m2n2-digits-scratch                        # continue after Ctrl-C or a crash
  evomerge report runs/m2n2-digits-scratch runs/ga-digits-scratch # table + one comparison plot
  evomerge run search_spaces/map_mnist_2tasks.yaml               # MAP trade-off front of 2 tasks
  evomerge front runs/map-mnist-2tasks                            # the front as a table
  evomerge export runs/map-mnist-2tasks --point 3                 # the merged model of front point 3
  evomerge fisher spec.yaml --model math.safetensors --subset low # Fisher file for a `fisher` merge plan
  evomerge ls
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evomerge",
        description="Evolutionary and multi-objective search for model merging.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run", help="start a search from a YAML spec", description="Validate SPEC, then run it into OUTPUT/NAME."
    )
    run.add_argument("spec", metavar="SPEC", help="path to a search spec (see search_spaces/)")
    run.add_argument("--budget", type=int, help="evaluations to spend (overrides the spec's budget)")
    run.add_argument("--seed", type=int, help="random seed (overrides the spec's seed)")
    run.add_argument("--name", help="run name, i.e. the directory under the output root (overrides the spec's name)")
    run.add_argument("--output", help="root folder for run directories (default: the spec's output, 'runs')")
    run.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch and BLAS threads of each evaluating process (overrides the spec's runtime.threads, default 1: "
        "fastest on a busy machine; one per core can be faster on an idle one)",
    )
    run.add_argument("--quiet", action="store_true", help="no progress display")
    _executor_flags(run, "the spec's runtime.executor, in this process unless it names Ray")

    resume = sub.add_parser(
        "resume",
        help="continue an interrupted run",
        description="Continue RUN from its last snapshot and journal. By default it evaluates with the executor the "
        "run used (runtime.executor in RUN/spec.yaml, e.g. the Ray cluster it ran on); --ray moves it to a "
        "cluster, --in-process brings it back to this process.",
    )
    resume.add_argument("run", metavar="RUN", help="a run directory, e.g. runs/m2n2-digits-scratch")
    resume.add_argument("--budget", type=int, help="new total budget (to extend a finished run)")
    resume.add_argument("--quiet", action="store_true", help="no progress display")
    _executor_flags(resume, "the executor the run used, as its spec.yaml names it")

    report = sub.add_parser(
        "report",
        help="plots and a table for one or more runs",
        description="Redraw each run's plots and print a table; with several runs also draw one comparison plot.",
    )
    report.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    report.add_argument("--out", help="comparison plot path (default: OUTPUT/comparison.png beside the first run)")
    report.add_argument("--metric", default="test_accuracy", help="curve column to compare (default: test_accuracy)")
    report.add_argument("--json", action="store_true", help="print the runs' summaries as JSON instead of a table")

    merge = sub.add_parser(
        "merge",
        help="apply a fixed merge to checkpoints on disk",
        description="Merge the checkpoints a PLAN names, streaming tensor by tensor, into the folder OUT "
        "(safetensors, sharded above max_shard_size, with the first model folder's config and tokenizer files).",
    )
    merge.add_argument(
        "plan", metavar="PLAN", help="merge plan YAML (method, base, models) or a mergekit config (merge_method, ...)"
    )
    merge.add_argument("--out", required=True, metavar="DIR", help="output model folder (must not exist)")
    merge.add_argument(
        "--allow-pickle", action="store_true", help="read .bin/.pt files with torch.load(weights_only=True)"
    )

    export = sub.add_parser(
        "export",
        help="write the merged model of a run's individual",
        description="Write one individual of RUN as a safetensors model folder with recipe.json beside it "
        "(default folder: RUN/export/best, RUN/export/id-ID or RUN/export/point-K).",
    )
    export.add_argument("run", metavar="RUN", help="a run directory")
    which = export.add_mutually_exclusive_group()
    which.add_argument("--best", action="store_true", help="the best individual on the search split (default)")
    which.add_argument("--id", type=int, metavar="ID", help="an archive member's id (see journal.jsonl)")
    which.add_argument(
        "--point", type=int, metavar="K", help="point K of the run's trade-off front (see `evomerge front`)"
    )
    export.add_argument("--out", metavar="DIR", help="output folder (must not exist)")
    export.add_argument(
        "--objectives",
        metavar="NAME:GOAL,...",
        help="with --point: number the front as `evomerge front --objectives` does (default: the strategy's)",
    )

    front = sub.add_parser(
        "front",
        help="print a run's trade-off front",
        description="Print the non-dominated evaluations of RUN (real objectives on the search split; the "
        "surrogate's predictions and held-out test values where the run has them), with the hypervolume and "
        "the candidates dropped because their evaluation failed. Point numbers are what `export --point` takes.",
    )
    front.add_argument("run", metavar="RUN", help="a run directory")
    front.add_argument(
        "--objectives",
        metavar="NAME:GOAL,...",
        help="other metrics to build the front from, e.g. accuracy_low:max,distance:min (default: the strategy's)",
    )
    front.add_argument("--plot", action="store_true", help="also redraw front.csv and plots/front.png")

    fisher = sub.add_parser(
        "fisher",
        help="estimate a model's diagonal Fisher information on a spec's evaluator data (cached)",
        description="Estimate the diagonal Fisher information of MODEL on the search split of SPEC's evaluator (the "
        "mean over examples x, and over labels y weighted by the model's p(y | x), of the squared gradient of "
        "log p(y | x), as Fisher merging takes it) and write it as a safetensors file: float32 tensors under the "
        "model's tensor names, for the `fisher` merge method (a merge plan's `fishers:`). It is cached under "
        "$EVOMERGE_CACHE/fisher/ (default ~/.cache/evomerge), keyed by the evaluator spec, the model's content "
        "hash, --examples, --seed and --subset, so asking again is "
        "instant. Prints the file's path.",
    )
    fisher.add_argument("spec", metavar="SPEC", help="a search spec; its evaluator gives the data and the model layout")
    fisher.add_argument("--model", required=True, metavar="PATH", help="a safetensors file or an HF model folder")
    fisher.add_argument("--examples", type=int, metavar="N", help="use N examples drawn with --seed (default: all)")
    fisher.add_argument("--seed", type=int, default=0, help="which examples --examples draws (default: 0)")
    fisher.add_argument(
        "--subset",
        metavar="NAME",
        help="only this part of the search split: a class group (classification's groups) or a task (multitask's "
        "tasks), e.g. the one MODEL was fine-tuned for (default: all of it)",
    )
    fisher.add_argument("--out", metavar="FILE", help="also write the Fisher file here (default: only the cache)")

    models = sub.add_parser(
        "build-models",
        help="build (or find cached) the seed models a spec starts from",
        description="Build the models SPEC's search starts from, e.g. the multi-task benchmark's pre-trained and "
        "fine-tuned backbones or the trained specialists, cache them as safetensors and print where they are.",
    )
    models.add_argument("spec", metavar="SPEC", help="path to a search spec")

    ls = sub.add_parser(
        "ls", help="list the runs under a folder", description="List run directories with their status and results."
    )
    ls.add_argument(
        "root", nargs="?", default="runs", metavar="ROOT", help="folder holding run directories (default: runs)"
    )
    return parser


def _executor_flags(parser: argparse.ArgumentParser, default: str) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="evaluate on Ray actors: 'local' starts Ray here, 'auto' joins the running cluster, or host:port "
        f"(default: {default})",
    )
    where.add_argument(
        "--in-process",
        action="store_true",
        help="evaluate in this process, whatever executor the spec names; Ray is not imported "
        "(e.g. to go on after the run's cluster is gone)",
    )
    parser.add_argument("--workers", type=int, metavar="N", help="Ray evaluator workers (default: the spec's, 2)")
    parser.add_argument("--deterministic", action="store_true", help="with --ray: apply results in submission order")
    parser.set_defaults(command_parser=parser)  # for main's check of --in-process against the Ray-only flags


def _executor_override(args: argparse.Namespace, current):
    """The spec's executor with the command line's --ray/--in-process/--workers/--deterministic applied
    (None: unchanged)."""
    import dataclasses

    from evomerge.schema import require

    if args.in_process:
        return dataclasses.replace(current, name="inprocess")
    if args.ray is None and args.workers is None and not args.deterministic:
        return None
    changes = {"name": "ray"} if args.ray is not None else {}
    if args.ray is not None:
        changes["address"] = args.ray
    if args.workers is not None:
        require(args.workers >= 1, "--workers", f"got {args.workers}, must be >= 1")
        changes["workers"] = args.workers
    if args.deterministic:
        changes["deterministic"] = True
    return dataclasses.replace(current, **changes)


def cmd_run(args: argparse.Namespace) -> int:
    from evomerge.runtime import start_run
    from evomerge.schema import require
    from evomerge.spec import load_spec

    spec = load_spec(args.spec, {"budget": args.budget, "seed": args.seed, "name": args.name, "output": args.output})
    if args.threads is not None:
        require(args.threads >= 0, "--threads", f"got {args.threads}, must be >= 0 (0 = torch default)")
        spec.runtime.threads = args.threads
    spec.runtime.executor = _executor_override(args, spec.runtime.executor) or spec.runtime.executor
    print(
        f"run {spec.name}: {spec.strategy.name} on {spec.evaluator.name}, "
        f"budget {spec.budget:,} evaluations, seed {spec.seed}",
        file=sys.stderr,
    )
    path = Path(spec.output) / spec.name
    try:
        run = start_run(spec, progress=not args.quiet)
    except KeyboardInterrupt:
        return _interrupted(path)
    return _print_result(run)


def cmd_resume(args: argparse.Namespace) -> int:
    from evomerge.runtime import resume_run
    from evomerge.store import RunDir

    executor = _executor_override(args, RunDir.open(args.run).load_spec().runtime.executor)
    try:
        run = resume_run(args.run, budget=args.budget, progress=not args.quiet, executor=executor)
    except KeyboardInterrupt:
        return _interrupted(Path(args.run))
    return _print_result(run)


def _interrupted(path: Path, when: str = "") -> int:
    """Exit 130, like a shell's Ctrl-C, so `evomerge run … && evomerge export …` stops; say how to go on."""
    if (path / "run.json").exists():
        print(f"evomerge: interrupted{when}; continue with: evomerge resume {path}", file=sys.stderr)
    else:
        print("evomerge: interrupted before the run started", file=sys.stderr)
    return 130


def _print_result(run) -> int:
    from evomerge.report import format_table, run_rows

    summary = run.summary() or {}
    print(format_table(run_rows([run])))
    for w in summary.get("workers", []):
        state = "lost" if w.get("lost") else f"replaced {w['replaced']}x"
        print(
            f"worker {w['worker']}: node {w['node'][:12]}  {w['evaluations']:,} evals  {w['failures']} failed  "
            f"busy {100 * w['busy_share']:.0f}%  {state}"
        )
    print(f"\nrun directory: {run.path}")
    for plot in sorted(run.plots_dir.glob("*.png")) if run.plots_dir.exists() else []:
        print(f"plot: {plot}")
    if summary.get("status") == "interrupted":
        return _interrupted(run.path, f" after {summary.get('evaluations', 0):,} evaluations")
    return 0 if summary.get("status") == "finished" else 1


def cmd_report(args: argparse.Namespace) -> int:
    from evomerge.report import compare_runs, format_table, plot_run, run_rows
    from evomerge.store import RunDir

    runs = [RunDir.open(p) for p in args.runs]
    if args.json:
        print(json.dumps({r.path.name: r.summary() for r in runs}, indent=2))
        return 0
    print(format_table(run_rows(runs)))
    for run in runs:
        for plot in plot_run(run):
            print(f"plot: {plot}")
    if len(runs) > 1:
        out = Path(args.out) if args.out else runs[0].path.parent / "comparison.png"
        path = compare_runs(runs, out, args.metric)
        if path:
            print(f"comparison: {path}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from evomerge.merge.plan import MergePlan

    plan = MergePlan.load(args.plan, args.allow_pickle)
    plan.allow_pickle = plan.allow_pickle or args.allow_pickle
    out = plan.run(args.out)
    print(f"merged {len(plan.models)} models with {plan.method.name} into {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from evomerge.runtime.export import export_front_point, export_individual

    if args.point is not None:
        out = export_front_point(args.run, args.point, args.out, _objectives_arg(args.objectives))
        print(f"exported front point {args.point} to {out}")
        return 0
    out = export_individual(args.run, args.id, args.out)
    print(f"exported {'individual ' + str(args.id) if args.id is not None else 'the best individual'} to {out}")
    return 0


def _objectives_arg(text: str | None) -> dict[str, str] | None:
    if not text:
        return None
    from evomerge.pareto import check_objectives

    goals = {}
    for item in text.split(","):
        name, _, goal = item.strip().partition(":")
        goals[name] = goal or "max"
    check_objectives(goals, "--objectives", minimum=1)
    return goals


def cmd_front(args: argparse.Namespace) -> int:
    from evomerge.report import format_table
    from evomerge.report.front import front_rows, read_front, write_front
    from evomerge.store import RunDir

    run = RunDir.open(args.run)
    goals = _objectives_arg(args.objectives)
    if args.plot and goals is not None:
        raise EvomergeError("--plot redraws the run's own front.csv and plots; it cannot be combined with --objectives")
    if args.plot:
        write_front(run)
    front = read_front(run, goals)
    reference = ", ".join(f"{k} {v:g}" for k, v in front.reference_natural().items())
    print(f"{run.path.name}: {len(front.points)} front points of {len(front.evaluated)} evaluated")
    if front.points:
        print(format_table(front_rows(front)))
    print(f"hypervolume {front.hypervolume:.6f} (reference point: {reference})")
    if front.dropped:
        print(f"dropped {len(front.dropped)} failed candidates (not on the front):")
        for cid, error in front.dropped[:20]:
            print(f"  id {cid}: {error}")
        if len(front.dropped) > 20:
            print(f"  ... and {len(front.dropped) - 20} more (see journal.jsonl)")
    return 0


def cmd_fisher(args: argparse.Namespace) -> int:
    from evomerge.fisher import estimate_fisher
    from evomerge.runtime.threads import limit_threads
    from evomerge.spec import load_spec
    from evomerge.store.atomic import atomic_write_bytes

    spec = load_spec(args.spec)
    limit_threads(spec.runtime.threads)
    found = estimate_fisher(spec.evaluator, args.model, args.examples, args.seed, args.subset)
    path = found.path
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(args.out, found.path.read_bytes())
        path = Path(args.out)
    print(f"Fisher of {args.model} ({'cached' if found.cached else 'computed'}): {path}")
    return 0


def cmd_build_models(args: argparse.Namespace) -> int:
    from evomerge.evaluate import EVALUATORS
    from evomerge.evaluate.base import DescribesSeedModels
    from evomerge.seeds import build_seeds
    from evomerge.spec import load_spec

    spec = load_spec(args.spec)
    evaluator = EVALUATORS.build(spec.evaluator)
    seeds = build_seeds(spec.models, evaluator, spec.evaluator.to_plain(), spec.seed)
    print(f"{len(seeds)} seed models for {spec.name} ({spec.models.init})")
    if spec.models.init == "evaluator" and isinstance(evaluator, DescribesSeedModels):
        for line in evaluator.describe_seed_models():
            print(f"  {line}")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from evomerge.report import format_table, run_rows
    from evomerge.store import list_runs

    runs = list_runs(args.root)
    if not runs:
        print(f"no runs under {args.root}/")
        return 0
    print(format_table(run_rows(runs)))
    return 0


COMMANDS = {
    "run": cmd_run,
    "resume": cmd_resume,
    "report": cmd_report,
    "merge": cmd_merge,
    "export": cmd_export,
    "front": cmd_front,
    "fisher": cmd_fisher,
    "build-models": cmd_build_models,
    "ls": cmd_ls,
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "in_process", False) and (args.workers is not None or args.deterministic):
        ray_flag = "--workers" if args.workers is not None else "--deterministic"
        args.command_parser.error(f"argument --in-process: not allowed with argument {ray_flag}")
    try:
        return COMMANDS[args.command](args)
    except EvomergeError as err:
        print(f"evomerge: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk where no NoSpaceError names the file (e.g. a library's own writes)
        from evomerge.store.atomic import FULL_DISK

        if err.errno not in FULL_DISK:
            raise
        print(f"evomerge: error: {err.filename or 'a write'}: no space left on device", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("evomerge: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `evomerge front RUN | head`: the reader left, which is not an error
        sys.stdout = open(os.devnull, "w")  # keeps the interpreter's exit-time flush quiet
        return 0


if __name__ == "__main__":
    sys.exit(main())
