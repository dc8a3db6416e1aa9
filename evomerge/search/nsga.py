"""NSGA-II / NSGA-III on real evaluations, through pymoo's ask/tell.

pymoo asks for an offspring batch; we hand its members out one by one and tell back whatever has
finished, in any order and in partial batches, so a pool of workers never waits for a generation
to complete. Failed candidates are simply never told.

The state is what pymoo's next steps read, so it does not grow with the run: the population
(genes, objectives, and the rank, crowding or niche survival gave each member), the offspring
batches with members still out, the generation counter, pymoo's random stream (the Generator
`algorithm.random_state` that every operator draws from) and NSGA-III's normalisation points.
A restored search continues exactly as one that never stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pymoo.core.evaluator import Evaluator as PymooEvaluator
from pymoo.core.population import Population
from pymoo.core.problem import Problem
from pymoo.problems.static import StaticProblem

from evomerge.evaluate.base import EvalResult
from evomerge.pareto import check_objectives, non_dominated
from evomerge.pareto.solve import many_objective_algorithm
from evomerge.schema import require
from evomerge.search import STRATEGIES
from evomerge.search.base import Candidate, ParetoStrategy, Proposal
from evomerge.search.map import TWO_TASKS
from evomerge.space.base import BoxSpace

# NSGA-III's survival remembers these across generations (NSGA-II's survival keeps nothing)
NORMALISATION = ("ideal_point", "worst_point", "nadir_point", "extreme_points")


@dataclass
class NsgaOptions:
    objectives: dict[str, Literal["max", "min"]] = field(default_factory=lambda: dict(TWO_TASKS))
    pop_size: int = 20
    tell_every: int | None = None  # tell pymoo once this many results wait (default pop_size // 2)

    def check(self, path: str) -> None:
        check_objectives(self.objectives, f"{path}.objectives")
        require(self.pop_size >= 4, f"{path}.pop_size", f"got {self.pop_size}, must be >= 4")
        if self.tell_every is not None:
            require(self.tell_every >= 1, f"{path}.tell_every", f"got {self.tell_every}, must be >= 1")


def population_state(population: Population, evaluated: bool) -> dict[str, Any]:
    """Genes, objectives when evaluated, and the data every member carries (n_gen, rank, crowding, …) as arrays."""
    shared = set.intersection(*(set(member.data) for member in population))
    state: dict[str, Any] = {"X": population.get("X"), "data": {k: population.get(k) for k in sorted(shared)}}
    if evaluated:
        state["F"] = population.get("F")
    return state


def restore_population(state: dict[str, Any], problem: Problem) -> Population:
    """The members back, evaluated the way told offspring are (so G, H and CV come out the same)."""
    population = Population.new("X", np.asarray(state["X"], dtype=np.float64))
    if "F" in state:
        PymooEvaluator().eval(StaticProblem(problem, F=np.asarray(state["F"], dtype=np.float64)), population)
    for key, values in state["data"].items():
        population.set(key, np.asarray(values))
    return population


class NsgaSearch(ParetoStrategy):
    """NSGA-II up to 3 objectives, NSGA-III (Das-Dennis reference directions) beyond."""

    def __init__(self, options: NsgaOptions, space: BoxSpace, seed: int):
        super().__init__(options.objectives, seed)
        self.options = options
        self.low, self.high = np.asarray(space.low, dtype=np.float64), np.asarray(space.high, dtype=np.float64)
        self.tell_every = options.tell_every or max(1, options.pop_size // 2)
        self.problem = Problem(n_var=len(self.low), n_obj=len(self.objectives), xl=self.low, xu=self.high)
        self.algorithm = many_objective_algorithm(len(self.objectives), options.pop_size)
        self.algorithm.setup(self.problem, termination=("n_gen", 2**62), seed=seed)
        self.batches: dict[int, Population] = {}
        self.queue: list[list[int]] = []  # [batch, index] not yet handed out
        self.waiting: list[tuple[list[int], list[float]]] = []  # finished, not yet told to pymoo
        self.outstanding: dict[int, int] = {}  # batch -> members not yet told or failed
        self.asked = 0  # pymoo batches asked so far; the next one's number
        self.told = 0  # results told to pymoo

    # pymoo calls ----------------------------------------------------------------------------
    def _pymoo_ask(self) -> None:
        batch = self.asked
        self.asked += 1
        population = self.algorithm.ask()
        self.batches[batch] = population
        self.outstanding[batch] = len(population)
        self.queue += [[batch, i] for i in range(len(population))]

    def _pymoo_tell(self) -> None:
        refs = [ref for ref, _ in self.waiting]
        F = np.array([values for _, values in self.waiting])
        infills = Population.create(*[self.batches[b][i] for b, i in refs])
        PymooEvaluator().eval(StaticProblem(self.problem, F=F), infills)
        self.algorithm.tell(infills=infills)
        self.told += len(refs)
        self.waiting = []
        self._drop_settled()

    def _drop_settled(self) -> None:
        """Forget batches whose members were all told or failed (pymoo keeps what it needs)."""
        waiting = {ref[0] for ref, _ in self.waiting}
        for batch in list(self.batches):
            if self.outstanding.get(batch, 0) == 0 and batch not in waiting:
                self.batches.pop(batch)
                self.outstanding.pop(batch, None)

    # ask/tell -------------------------------------------------------------------------------
    def ask(self) -> Proposal | None:
        if not self.queue:
            if self.waiting:
                self._pymoo_tell()
            self._pymoo_ask()
        batch, index = self.queue.pop(0)
        x = np.asarray(self.batches[batch][index].X, dtype=np.float64)
        return Proposal(x.copy(), {"batch": batch, "index": index, "genes": [float(v) for v in x]})

    def tell(self, candidate: Candidate, result: EvalResult | None) -> None:
        ref = [int(candidate.meta["batch"]), int(candidate.meta["index"])]
        self.outstanding[ref[0]] -= 1
        if result is None:
            self._drop_settled()
            return
        F = self.objectives.minimised(result.objectives)
        self.waiting.append((ref, F.tolist()))
        if len(self.waiting) >= self.tell_every:
            self._pymoo_tell()
        self.record(candidate.genome, F)

    def stats(self) -> dict[str, float]:
        """front_size counts the non-dominated members of pymoo's population; the run's front is the journal's."""
        population = self.algorithm.pop if self.algorithm.is_initialized else None
        front = 0 if population is None else int(non_dominated(population.get("F")).sum())
        return {"told": self.told, "front_size": front, "generations": int(self.algorithm.n_gen or 0)}

    # state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        algorithm = self.algorithm
        norm = getattr(algorithm.survival, "norm", None)
        state = super().state_dict()
        state.update(
            queue=self.queue,
            waiting=[[ref, values] for ref, values in self.waiting],
            outstanding={str(b): n for b, n in self.outstanding.items()},
            batches={str(b): population_state(p, evaluated=False) for b, p in self.batches.items()},
            asked=self.asked,
            told=self.told,
            generation=algorithm.n_iter,
            initialized=algorithm.is_initialized,
            population=population_state(algorithm.pop, evaluated=True) if algorithm.is_initialized else None,
            pymoo_rng=algorithm.random_state.bit_generator.state,
            normalisation=None if norm is None else {key: getattr(norm, key) for key in NORMALISATION},
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        algorithm = self.algorithm
        algorithm.random_state.bit_generator.state = state["pymoo_rng"]
        algorithm.n_iter = None if state["generation"] is None else int(state["generation"])
        algorithm.is_initialized = bool(state["initialized"])
        if state["population"] is not None:
            algorithm.pop = restore_population(state["population"], self.problem)
        if state["normalisation"] is not None:
            for key, value in state["normalisation"].items():
                setattr(algorithm.survival.norm, key, None if value is None else np.asarray(value))
        self.batches = {int(b): restore_population(p, self.problem) for b, p in state["batches"].items()}
        self.queue = [[int(b), int(i)] for b, i in state["queue"]]
        self.waiting = [([int(b), int(i)], [float(v) for v in values]) for (b, i), values in state["waiting"]]
        self.outstanding = {int(b): int(n) for b, n in state["outstanding"].items()}
        self.asked, self.told = int(state["asked"]), int(state["told"])


@STRATEGIES.register("nsga", NsgaOptions, "NSGA-II/III (pymoo) on real evaluations, told as results arrive", {"box"})
def build_nsga(options: NsgaOptions, space: BoxSpace, seed: int) -> NsgaSearch:
    return NsgaSearch(options, space, seed)
