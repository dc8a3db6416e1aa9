"""NSGA-II / NSGA-III on real evaluations, through pymoo's ask/tell.

pymoo asks for an offspring batch; we hand its members out one by one and tell back whatever has
finished, in any order and in partial batches, so a pool of workers never waits for a generation
to complete. Failed candidates are simply never told. pymoo's objects are not stored: the state
is the log of asks and tells, replayed on resume (pymoo is deterministic given its seed).
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


class NsgaSearch(ParetoStrategy):
    """NSGA-II up to 3 objectives, NSGA-III (Das-Dennis reference directions) beyond."""

    def __init__(self, options: NsgaOptions, space: BoxSpace, seed: int):
        super().__init__(options.objectives, seed)
        self.options = options
        self.seed = seed
        self.low, self.high = np.asarray(space.low, dtype=np.float64), np.asarray(space.high, dtype=np.float64)
        self.tell_every = options.tell_every or max(1, options.pop_size // 2)
        self._start()

    def _start(self) -> None:
        self.problem = Problem(n_var=len(self.low), n_obj=len(self.objectives), xl=self.low, xu=self.high)
        self.algorithm = many_objective_algorithm(len(self.objectives), self.options.pop_size)
        self.algorithm.setup(self.problem, termination=("n_gen", 2**62), seed=self.seed)
        self.batches: dict[int, Population] = {}
        self.events: list[list[Any]] = []
        self.queue: list[list[int]] = []  # [batch, index] not yet handed out
        self.waiting: list[tuple[list[int], list[float]]] = []  # finished, not yet told to pymoo
        self.outstanding: dict[int, int] = {}  # batch -> members not yet told or failed
        self.asked = 0  # pymoo batches asked so far; the next one's number
        self._genomes: list[np.ndarray] = []  # every successful candidate, in tell order (lists: appends stay O(1))
        self._values: list[np.ndarray] = []  # and its minimised objectives

    @property
    def X(self) -> np.ndarray:
        return np.array(self._genomes, dtype=np.float64).reshape(-1, len(self.low))

    @property
    def F(self) -> np.ndarray:
        return np.array(self._values, dtype=np.float64).reshape(-1, len(self.objectives))

    # pymoo calls, logged so a restored strategy can replay them -------------------------------
    def _pymoo_ask(self) -> None:
        batch = self.asked
        self.asked += 1
        population = self.algorithm.ask()
        self.batches[batch] = population
        self.outstanding[batch] = len(population)
        self.queue += [[batch, i] for i in range(len(population))]
        self.events.append(["ask"])

    def _pymoo_tell(self) -> None:
        refs = [ref for ref, _ in self.waiting]
        F = np.array([values for _, values in self.waiting])
        infills = Population.create(*[self.batches[b][i] for b, i in refs])
        PymooEvaluator().eval(StaticProblem(self.problem, F=F), infills)
        self.algorithm.tell(infills=infills)
        self.events.append(["tell", refs, F.tolist()])
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
        self._genomes.append(np.asarray(candidate.genome, dtype=np.float64))
        self._values.append(F)
        if len(self.waiting) >= self.tell_every:
            self._pymoo_tell()
        self.record(candidate.genome, F)

    def stats(self) -> dict[str, float]:
        told = sum(len(e[1]) for e in self.events if e[0] == "tell")
        front = int(non_dominated(self.F).sum()) if self._values else 0
        return {"told": told, "front_size": front, "generations": int(self.algorithm.n_gen or 0)}

    # state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            events=self.events,
            queue=self.queue,
            waiting=[[ref, values] for ref, values in self.waiting],
            outstanding={str(b): n for b, n in self.outstanding.items()},
            X=self.X,
            F=self.F,
            seed=self.seed,
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.seed = int(state["seed"])  # pymoo's replay must use the seed the log was made with
        self._start()
        for event in state["events"]:
            if event[0] == "ask":
                self._pymoo_ask()
            else:
                self.waiting = [(list(ref), list(values)) for ref, values in zip(event[1], event[2])]
                self._pymoo_tell()
        self.queue = [list(ref) for ref in state["queue"]]
        self.waiting = [(list(ref), list(values)) for ref, values in state["waiting"]]
        self.outstanding = {int(b): int(n) for b, n in state["outstanding"].items()}
        self._drop_settled()
        self._genomes, self._values = list(np.asarray(state["X"])), list(np.asarray(state["F"]))


@STRATEGIES.register("nsga", NsgaOptions, "NSGA-II/III (pymoo) on real evaluations, told as results arrive", {"box"})
def build_nsga(options: NsgaOptions, space: BoxSpace, seed: int) -> NsgaSearch:
    return NsgaSearch(options, space, seed)
