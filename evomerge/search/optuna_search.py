"""Optuna's samplers (NSGA-II, NSGA-III, TPE, GP) as a multi-objective ask/tell strategy over a box space.

Optuna is imported lazily, so evomerge still runs where it is not installed. Resume must ask exactly
what an uninterrupted run asks, and Optuna samplers keep private state (random streams, GP caches)
that cannot be snapshot without pickle. So every ask builds a fresh sampler seeded from
(seed, trial number): a proposal is then a pure function of the study's trials, which the
state_dict stores and `load_state_dict` rebuilds trial by trial. The samplers read every trial, so
the state grows with the run, but only in the snapshot's body (arrays of params, values, states,
times and NSGA generations; JSON bytes for the other attributes), never in its size-capped header.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.util
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from evomerge.evaluate.base import EvalResult
from evomerge.pareto.objectives import Objectives, check_objectives
from evomerge.schema import require
from evomerge.search import STRATEGIES
from evomerge.search.base import Candidate, Proposal, Strategy
from evomerge.space.base import BoxSpace

if TYPE_CHECKING:
    import optuna

Sampler = Literal["nsga2", "nsga3", "tpe", "gp"]


@dataclass
class OptunaOptions:
    sampler: Sampler = "tpe"
    objectives: dict[str, Literal["max", "min"]] = field(
        default_factory=lambda: {"accuracy_odd": "max", "accuracy_even": "max"}
    )
    population: int = 20  # NSGA-II / NSGA-III population_size
    startup_trials: int = 10  # TPE / GP random trials before the model is used

    def check(self, path: str) -> None:
        check_objectives(self.objectives, f"{path}.objectives")
        require(self.population >= 2, f"{path}.population", f"got {self.population}, must be >= 2")
        require(self.startup_trials >= 1, f"{path}.startup_trials", f"got {self.startup_trials}, must be >= 1")
        require(
            importlib.util.find_spec("optuna") is not None,
            f"{path}.name",
            "strategy 'optuna' needs the optuna package: pip install 'optuna>=4'",
        )


def trial_seed(seed: int, number: int) -> int:
    """The sampler seed of trial `number`: independent streams per trial, the same on every resume."""
    return int(np.random.SeedSequence([seed % 2**64, number]).generate_state(1)[0])


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """NSGA-III (and GP in some versions) warn that they are experimental on every construction."""
    from optuna.exceptions import ExperimentalWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        yield


def make_sampler(options: OptunaOptions, seed: int) -> optuna.samplers.BaseSampler:
    import optuna

    with _quiet():
        if options.sampler == "nsga2":
            return optuna.samplers.NSGAIISampler(population_size=options.population, seed=seed)
        if options.sampler == "nsga3":
            return optuna.samplers.NSGAIIISampler(population_size=options.population, seed=seed)
        if options.sampler == "gp":
            return optuna.samplers.GPSampler(n_startup_trials=options.startup_trials, seed=seed)
        return optuna.samplers.TPESampler(n_startup_trials=options.startup_trials, seed=seed)


def _dominates(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.all(a <= b) and np.any(a < b))


_EPOCH = _dt.datetime(1970, 1, 1)  # Optuna's in-memory storage stamps trials with naive local times
_NONE = np.iinfo(np.int64).min  # no time (a trial still running) or no such attribute, in an int64 column


def _microseconds(moment: _dt.datetime | None) -> int:
    return int(_NONE) if moment is None else (moment - _EPOCH) // _dt.timedelta(microseconds=1)


def _moment(microseconds: int) -> _dt.datetime | None:
    return None if microseconds == _NONE else _EPOCH + _dt.timedelta(microseconds=int(microseconds))


def _json_bytes(obj: Any) -> np.ndarray:
    """JSON as a byte array, so that it lands in the snapshot's body rather than its header."""
    return np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8)


def _from_json_bytes(data: np.ndarray) -> Any:
    return json.loads(np.asarray(data, dtype=np.uint8).tobytes().decode())


def _attr_columns(attrs: list[dict[str, Any]]) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """Per-trial attributes split into int64 columns for the integer ones (NSGA's generation, set on
    every trial) and, sparse by trial number, the rest (GP's relative params of trials it modelled)."""
    keys = {key for a in attrs for key in a}
    integer = {key for key in keys if all(type(a[key]) is int and _NONE < a[key] < 2**63 for a in attrs if key in a)}
    columns = {key: np.array([a.get(key, _NONE) for a in attrs], dtype=np.int64) for key in sorted(integer)}
    rest = {str(n): {k: v for k, v in a.items() if k not in integer} for n, a in enumerate(attrs)}
    return columns, {n: a for n, a in rest.items() if a}


def _attrs(number: int, columns: dict[str, np.ndarray], rest: dict[str, dict[str, Any]]) -> dict[str, Any]:
    attrs = {key: int(column[number]) for key, column in columns.items() if column[number] != _NONE}
    return {**attrs, **rest.get(str(number), {})}


class OptunaSearch(Strategy):
    """One in-memory Optuna study; candidate meta carries the trial number that results are told to
    (and the genes, as other strategies do, so the journal and its Optuna mirror show parameters)."""

    def __init__(self, options: OptunaOptions, space: BoxSpace, seed: int):
        import optuna

        super().__init__(seed)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.options = options
        self.seed = int(seed)
        self.objectives = Objectives(options.objectives)
        low, high = np.asarray(space.low, dtype=np.float64), np.asarray(space.high, dtype=np.float64)
        self.names = [f"x{i}" for i in range(len(low))]
        self.distributions = {
            name: optuna.distributions.FloatDistribution(float(lo), float(hi))
            for name, lo, hi in zip(self.names, low, high)
        }
        self._reset()

    def _reset(self) -> None:
        """A fresh empty study plus the running summaries derived from it."""
        import optuna

        directions = ["maximize" if goal == "max" else "minimize" for goal in self.objectives.goals.values()]
        self.study = optuna.create_study(
            storage=optuna.storages.InMemoryStorage(),
            study_name="evomerge",
            directions=directions,
            sampler=make_sampler(self.options, self.seed),
        )
        self.told = 0
        self.failures = 0
        self.best_number: int | None = None
        self.best_genome: np.ndarray | None = None
        self.best_value = -np.inf
        self.front: list[tuple[int, np.ndarray]] = []  # (trial number, minimised objectives), non-dominated

    def _trials(self) -> list[optuna.trial.FrozenTrial]:
        return self.study._storage.get_all_trials(self.study._study_id, deepcopy=False)

    def _genome(self, params: dict[str, float]) -> np.ndarray:
        return np.array([params[name] for name in self.names], dtype=np.float32)

    # ask/tell -------------------------------------------------------------------------------
    def ask(self) -> Proposal | None:
        number = len(self._trials())
        self.study.sampler = make_sampler(self.options, trial_seed(self.seed, number))
        with _quiet():
            trial = self.study.ask(self.distributions)
        assert trial.number == number, (trial.number, number)
        genome = self._genome(trial.params)
        return Proposal(genome, {"trial": trial.number, "genes": [float(v) for v in genome]})

    def tell(self, candidate: Candidate, result: EvalResult | None) -> None:
        from optuna.trial import TrialState

        number = int(candidate.meta["trial"])
        minimised = None if result is None else self.objectives.minimised(result.objectives)
        with _quiet():
            if minimised is None or not np.all(np.isfinite(minimised)):
                self.study.tell(number, state=TrialState.FAIL)
            else:
                self.study.tell(number, values=[float(v) for v in self.objectives.natural(minimised)])
        storage = self.study._storage
        self._record(storage.get_trial(storage.get_trial_id_from_study_id_trial_number(self.study._study_id, number)))

    def _record(self, trial: optuna.trial.FrozenTrial) -> None:
        """Update counters, best and front with a finished trial (order-independent, so a rebuild agrees)."""
        from optuna.trial import TrialState

        if trial.state not in (TrialState.COMPLETE, TrialState.FAIL):
            return
        self.told += 1
        if trial.state == TrialState.FAIL:
            self.failures += 1
            return
        minimised = self.objectives.signs * np.asarray(trial.values, dtype=np.float64)
        score = -float(np.mean(minimised))
        if score > self.best_value or (score == self.best_value and trial.number < self.best_number):
            self.best_number, self.best_value = trial.number, score
            self.best_genome = self._genome(trial.params)
        if any(_dominates(f, minimised) for _, f in self.front):
            return
        self.front = [(n, f) for n, f in self.front if not _dominates(minimised, f)] + [(trial.number, minimised)]

    def best(self) -> tuple[np.ndarray, float] | None:
        """The told trial with the highest mean objective (maximised sense); ties go to the earlier trial."""
        return None if self.best_genome is None else (self.best_genome, float(self.best_value))

    def pareto_front(self) -> list[tuple[np.ndarray, dict[str, float]]]:
        """Genomes and natural-direction objectives of the non-dominated told trials, by trial number."""
        trials = self._trials()
        return [
            (self._genome(trials[n].params), dict(zip(self.objectives.names, map(float, trials[n].values))))
            for n, _ in sorted(self.front, key=lambda item: item[0])
        ]

    def stats(self) -> dict[str, float]:
        return {
            "trials_told": self.told,
            "failures": self.failures,
            "in_flight": len(self._trials()) - self.told,
            "front_size": len(self.front),
        }

    # state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Every trial (trial i has number i) as arrays: params, values (NaN where none), state, start and
        end in microseconds, integer attributes as columns; the other trial attributes and the study's
        (NSGA's parent lists: trial ids per generation) as JSON bytes. The header keeps a fixed size."""
        trials = self._trials()
        params = np.array([[t.params[name] for name in self.names] for t in trials], dtype=np.float64)
        values = np.full((len(trials), len(self.objectives)), np.nan)
        for i, t in enumerate(trials):
            if t.values is not None:
                values[i] = t.values
        system_columns, system_rest = _attr_columns([t.system_attrs for t in trials])
        state = super().state_dict()
        state.update(
            seed=self.seed,
            params=params.reshape(len(trials), len(self.names)),
            values=values,
            trial_states=np.array([t.state.value for t in trials], dtype=np.int8),
            started=np.array([_microseconds(t.datetime_start) for t in trials], dtype=np.int64),
            completed=np.array([_microseconds(t.datetime_complete) for t in trials], dtype=np.int64),
            system_attrs=system_columns,
            attrs=_json_bytes(
                {
                    "system": system_rest,
                    "user": {str(t.number): t.user_attrs for t in trials if t.user_attrs},
                    "study": self.study._storage.get_study_system_attrs(self.study._study_id),
                }
            ),
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Rebuild the study through the storage API; RUNNING trials come back RUNNING, ready to be told."""
        from optuna.trial import FrozenTrial, TrialState

        super().load_state_dict(state)
        self.seed = int(state["seed"])
        self._reset()
        storage, study_id = self.study._storage, self.study._study_id
        attrs = _from_json_bytes(state["attrs"])
        # NSGA-II/III cache parent populations here as trial ids; a fresh in-memory storage holding one
        # study gives trial id == trial number, as the saved one did, so the cached ids stay valid.
        for key, value in attrs["study"].items():
            storage.set_study_system_attr(study_id, key, value)
        params, values = np.asarray(state["params"]), np.asarray(state["values"])
        started, completed = np.asarray(state["started"]), np.asarray(state["completed"])
        columns = {key: np.asarray(column) for key, column in state["system_attrs"].items()}
        for i, code in enumerate(np.asarray(state["trial_states"]).tolist()):
            trial_state = TrialState(code)
            template = FrozenTrial(
                number=i,
                state=trial_state,
                value=None,
                values=[float(v) for v in values[i]] if trial_state == TrialState.COMPLETE else None,
                datetime_start=_moment(started[i]),
                datetime_complete=_moment(completed[i]),
                params={name: float(params[i, j]) for j, name in enumerate(self.names)},
                distributions=dict(self.distributions),
                user_attrs=dict(attrs["user"].get(str(i), {})),
                system_attrs=_attrs(i, columns, attrs["system"]),
                intermediate_values={},
                trial_id=-1,
            )
            trial_id = storage.create_new_trial(study_id, template_trial=template)
            restored = storage.get_trial(trial_id)
            if restored.number != template.number or trial_id != template.number:
                raise ValueError(f"optuna state: trial {template.number} came back as number {restored.number}")
            self._record(restored)


@STRATEGIES.register(
    "optuna", OptunaOptions, "Optuna's multi-objective samplers (NSGA-II, NSGA-III, TPE, GP) via ask/tell", {"box"}
)
def build_optuna(options: OptunaOptions, space: BoxSpace, seed: int) -> OptunaSearch:
    return OptunaSearch(options, space, seed)
