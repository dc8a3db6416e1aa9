"""Optuna's samplers (NSGA-II, NSGA-III, TPE, GP) as a multi-objective ask/tell strategy over a box space.

Optuna is imported lazily, so evomerge still runs where it is not installed. Resume must ask exactly
what an uninterrupted run asks, and Optuna samplers keep private state (random streams, GP caches)
that cannot be snapshot without pickle. So every ask builds a fresh sampler seeded from
(seed, trial number): a proposal is then a pure function of the study's trials, which the
state_dict stores as plain arrays and JSON, and `load_state_dict` rebuilds trial by trial.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.util
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


def _iso(moment: _dt.datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def _from_iso(text: str | None) -> _dt.datetime | None:
    return None if text is None else _dt.datetime.fromisoformat(text)


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
        """Every trial as arrays (params, values; NaN where none) and JSON (state, attrs, times)."""
        trials = self._trials()
        params = np.array([[t.params[name] for name in self.names] for t in trials], dtype=np.float64)
        values = np.full((len(trials), len(self.objectives)), np.nan)
        for i, t in enumerate(trials):
            if t.values is not None:
                values[i] = t.values
        state = super().state_dict()
        state.update(
            seed=self.seed,
            params=params.reshape(len(trials), len(self.names)),
            values=values,
            trials=[
                {
                    "number": t.number,
                    "state": t.state.name,
                    "system_attrs": dict(t.system_attrs),
                    "user_attrs": dict(t.user_attrs),
                    "datetime_start": _iso(t.datetime_start),
                    "datetime_complete": _iso(t.datetime_complete),
                }
                for t in trials
            ],
            study_system_attrs=dict(self.study._storage.get_study_system_attrs(self.study._study_id)),
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Rebuild the study through the storage API; RUNNING trials come back RUNNING, ready to be told."""
        from optuna.trial import FrozenTrial, TrialState

        super().load_state_dict(state)
        self.seed = int(state["seed"])
        self._reset()
        storage, study_id = self.study._storage, self.study._study_id
        # NSGA-II/III cache parent populations here as trial ids; a fresh in-memory storage holding one
        # study gives trial id == trial number, as the saved one did, so the cached ids stay valid.
        for key, value in state["study_system_attrs"].items():
            storage.set_study_system_attr(study_id, key, value)
        params, values = np.asarray(state["params"]), np.asarray(state["values"])
        for i, info in enumerate(state["trials"]):
            trial_state = TrialState[info["state"]]
            template = FrozenTrial(
                number=int(info["number"]),
                state=trial_state,
                value=None,
                values=[float(v) for v in values[i]] if trial_state == TrialState.COMPLETE else None,
                datetime_start=_from_iso(info["datetime_start"]),
                datetime_complete=_from_iso(info["datetime_complete"]),
                params={name: float(params[i, j]) for j, name in enumerate(self.names)},
                distributions=dict(self.distributions),
                user_attrs=dict(info["user_attrs"]),
                system_attrs=dict(info["system_attrs"]),
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
