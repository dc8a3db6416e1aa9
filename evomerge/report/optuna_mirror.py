"""Mirror a run's journal into an Optuna journal file, so `optuna-dashboard RUN/optuna.journal` shows it.

Works for any strategy and while a run is still going: the run's own journal stays the source of
truth, and each call only appends the entries the Optuna study does not hold yet (matched by
`evomerge_id`). The journal keeps no genomes, so trials get parameters only where a strategy put
its genes in the candidate meta (`meta["genes"]`).
"""

from __future__ import annotations

import datetime as _dt
import math
import warnings
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.pareto.objectives import Objectives
from evomerge.report.front import run_objectives
from evomerge.store import RunDir, read_journal

MIRROR_FILE = "optuna.journal"


def _params(meta: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
    """`meta["genes"]` as params x0.. (unit-box distributions, widened if a gene lies outside)."""
    from optuna.distributions import FloatDistribution

    genes = meta.get("genes")
    if not (isinstance(genes, list) and genes and all(isinstance(g, (int, float)) for g in genes)):
        return {}, {}
    if not all(math.isfinite(g) for g in genes):
        return {}, {}
    low, high = min(0.0, *map(float, genes)), max(1.0, *map(float, genes))
    params = {f"x{i}": float(g) for i, g in enumerate(genes)}
    return params, {name: FloatDistribution(low, high) for name in params}


def _trial(entry: dict[str, Any], goals: Objectives) -> Any:
    from optuna.trial import TrialState, create_trial

    meta = entry.get("meta") or {}
    params, distributions = _params(meta)
    user_attrs: dict[str, Any] = {
        "evomerge_id": int(entry["id"]),
        "meta": {k: v for k, v in meta.items() if not (params and k == "genes")},
        "seconds": entry.get("seconds"),
    }
    values = None
    if entry.get("status") == "ok":
        metrics = entry.get("objectives") or {}
        goals.check_names(list(metrics))
        values = [float(metrics[name]) for name in goals.names]
        user_attrs["objectives"] = metrics  # every metric, not only the mirrored ones
    else:
        user_attrs["error"] = entry.get("error")
    ok = values is not None and all(math.isfinite(v) for v in values)
    trial = create_trial(
        state=TrialState.COMPLETE if ok else TrialState.FAIL,
        values=values if ok else None,
        params=params,
        distributions=distributions,
        user_attrs=user_attrs,
    )
    seconds = entry.get("seconds")
    if isinstance(seconds, (int, float)) and trial.datetime_complete is not None:  # shows as the trial's duration
        trial.datetime_start = trial.datetime_complete - _dt.timedelta(seconds=float(seconds))
    return trial


def mirror_run(run_path: str | Path, objectives: dict[str, str] | None = None) -> Path | None:
    """Write or update `RUN/optuna.journal` with one trial per journal entry; None when the run has none.

    `objectives` ({metric: max|min}) picks the trial values and directions (default: the run's own,
    see `run_objectives`). Entries already mirrored are skipped, so calling it again is cheap and safe.
    """
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    run = RunDir.open(run_path)
    entries, _ = read_journal(run.journal_path)
    if not entries:
        return None
    goals = Objectives(objectives or run_objectives(run), path="objectives")
    for name, goal in goals.goals.items():
        if goal not in ("max", "min"):
            raise EvomergeError(f"objectives.{name}: got {goal!r}, allowed: 'max', 'min'")
    directions = [
        optuna.study.StudyDirection.MAXIMIZE if goal == "max" else optuna.study.StudyDirection.MINIMIZE
        for goal in goals.goals.values()
    ]
    path = run.path / MIRROR_FILE
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(path)))
    name = str(run.info().get("name") or run.path.name)
    study = optuna.create_study(study_name=name, storage=storage, directions=directions, load_if_exists=True)
    if list(study.directions) != directions:
        raise EvomergeError(
            f"{path} holds study {name!r} with {len(study.directions)} objective(s) "
            f"({', '.join(d.name.lower() for d in study.directions)}), not {goals.goals}; "
            "delete the file or mirror the same objectives"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if study.metric_names != goals.names:
            study.set_metric_names(goals.names)
    done = {t.user_attrs.get("evomerge_id") for t in study.get_trials(deepcopy=False)}
    new = []
    for entry in entries:
        if int(entry["id"]) not in done:
            done.add(int(entry["id"]))
            new.append(_trial(entry, goals))
    study.add_trials(new)
    return path
