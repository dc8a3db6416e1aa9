"""Nested MAP for many tasks: pair tasks, run a small 2-task MAP per pair, keep the merge the user's
preference weights favour, and recurse on the merged models until one remains.

With task arithmetic a merge of merges is again a coefficient per task (θ0 + α(a τ_i + b τ_j) +
β(c τ_k + d τ_l)), so every level searches the same box of per-task coefficients: gene i is task
i's coefficient and objective i is task i's metric. Pairs are formed greedily by preference
(the two groups the user weights most go first), so the merges they care about are decided with
the fewest compromises.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from evomerge.errors import SpecError
from evomerge.evaluate.base import EvalResult, EvaluatorFacts
from evomerge.pareto import check_objectives
from evomerge.schema import require
from evomerge.search import STRATEGIES
from evomerge.search.base import Candidate, ParetoStrategy, Proposal
from evomerge.search.map import MapOptions, MapRounds
from evomerge.space.base import BoxSpace
from evomerge.space.merge_genes import MergeGenesSpace


@dataclass
class NestedMapOptions:
    objectives: dict[str, Literal["max", "min"]] = field(default_factory=dict)  # one per task, in gene order
    preference: list[float] | None = None  # one non-negative weight per objective; default all equal
    design_points: int = 12  # per pair: a 2-gene quadratic has 6 parameters
    front_points: int = 8  # per pair, so about 20 evaluations per pair
    pop_size: int = 60
    generations: int = 60

    def check(self, path: str) -> None:
        check_objectives(self.objectives, f"{path}.objectives", minimum=3)
        if self.preference is not None:
            names = ", ".join(self.objectives)
            require(
                len(self.preference) == len(self.objectives),
                f"{path}.preference",
                f"got {len(self.preference)} weights; needs one per objective ({len(self.objectives)}: {names})",
            )
            for i, weight in enumerate(self.preference):
                require(weight >= 0, f"{path}.preference[{i}]", f"got {weight}; weights must be >= 0")
            require(sum(self.preference) > 0, f"{path}.preference", "the weights must not all be zero")
        require(
            self.design_points >= 6, f"{path}.design_points", f"got {self.design_points}; a 2-gene quadratic needs >= 6"
        )
        require(self.front_points >= 1, f"{path}.front_points", f"got {self.front_points}, must be >= 1")


class NestedMapSearch(ParetoStrategy):
    def __init__(self, options: NestedMapOptions, space: BoxSpace, seed: int):
        super().__init__(options.objectives, seed)
        self.options = options
        self.seed = seed
        d = len(np.asarray(space.low))
        if d != len(options.objectives):
            raise SpecError(
                "strategy.objectives",
                f"nested MAP pairs one coefficient per task: the space has {d} genes but {len(options.objectives)} "
                "objectives (use a merge space with weights per model and one objective per task)",
            )
        if isinstance(space, MergeGenesSpace):  # merges of merges compose only through per-model weights from 0
            genes = space.options.genes
            weights_gene = genes.get("weights")
            if set(genes) != {"weights"} or weights_gene.per != "model" or weights_gene.low != 0:
                raise SpecError(
                    "space.genes",
                    "nested MAP needs exactly one gene, weights: {low: 0, high: ..., per: model}, so that a gene of 0 "
                    "leaves a task out and a merge of merges is again one coefficient per task",
                )
        self.low, self.high = np.asarray(space.low, dtype=np.float64), np.asarray(space.high, dtype=np.float64)
        weights = options.preference or [1.0] * d
        self.preference = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        # pair engines see natural values (accuracies stay in [0, 1], so `auto` links pick sigmoid) when
        # every task shares one goal; with mixed goals a group's mean is only meaningful minimised
        goals = set(self.objectives.goals.values())
        self.pair_goal = goals.pop() if len(goals) == 1 else "min"
        self.pair_options = MapOptions(
            objectives={"first": self.pair_goal, "second": self.pair_goal},
            design_points=options.design_points,
            front_points=options.front_points,
            pop_size=options.pop_size,
            generations=options.generations,
        )
        self.level = -1
        self.groups: list[tuple[np.ndarray, list[int]]] = [(np.eye(d)[i] * self.high[i], [i]) for i in range(d)]
        self.pairs: list[tuple[int, int]] = []  # indices into groups
        self.engines: list[MapRounds] = []
        self.choices: list[dict[str, Any]] = []
        self._next_level()

    # levels -------------------------------------------------------------------------------
    def _pair_signs(self) -> np.ndarray:
        return np.full(2, -1.0 if self.pair_goal == "max" else 1.0)

    def _weight(self, tasks: list[int]) -> float:
        return float(self.preference[tasks].sum())

    def _next_level(self) -> None:
        self.level += 1
        order = sorted(range(len(self.groups)), key=lambda g: (-self._weight(self.groups[g][1]), g))
        self.pairs = [(order[i], order[i + 1]) for i in range(0, len(order) - 1, 2)]
        self.engines = [
            MapRounds(self.pair_options, np.zeros(2), np.ones(2), self._pair_signs(), self.seed + 1000 * self.level + k)
            for k in range(len(self.pairs))
        ]

    def _close_level(self) -> None:
        """Each pair becomes the merge its real evaluations rate best under the preference weights."""
        merged, used = [], set()
        for (a, b), engine in zip(self.pairs, self.engines):
            (va, ta), (vb, tb) = self.groups[a], self.groups[b]
            wa, wb = self._weight(ta), self._weight(tb)
            scores = (engine.Y * engine.signs) @ np.array([wa, wb])
            alpha, beta = engine.X[int(np.argmin(scores))]
            merged.append((np.clip(alpha * va + beta * vb, self.low, self.high), sorted(ta + tb)))
            self.choices.append({"level": self.level, "groups": [ta, tb], "coefficients": [float(alpha), float(beta)]})
            used |= {a, b}
        carried = [g for i, g in enumerate(self.groups) if i not in used]
        self.groups = merged + carried

    @property
    def finished(self) -> bool:
        return len(self.groups) == 1

    def check_evaluator(self, facts: EvaluatorFacts) -> None:
        """Gene i merges task i's model, so objective i must be task i's metric (checked where tasks are named)."""
        tasks = facts.tasks
        if not tasks or len(tasks) != len(self.objectives):
            return
        for i, (name, task) in enumerate(zip(self.objectives.names, tasks)):
            if not name.endswith(f"_{task}"):
                raise SpecError(
                    f"strategy.objectives.{name}",
                    f"objective {i} must be a metric of task {i}, {task!r} (gene {i} is its coefficient); "
                    f"list the objectives in the evaluator's task order: {', '.join(tasks)}",
                )

    def _group_objectives(self, values: np.ndarray, pair: int) -> np.ndarray:
        """The pair's two objectives: each group's preference-weighted mean of its tasks' metrics."""
        out = []
        for g in self.pairs[pair]:
            tasks = self.groups[g][1]
            w = self.preference[tasks] if self._weight(tasks) > 0 else np.ones(len(tasks))
            out.append(float(np.dot(w, values[tasks]) / w.sum()))
        return np.array(out)

    # ask/tell ---------------------------------------------------------------------------------
    def ask(self) -> Proposal | None:
        while not self.finished:
            for k, engine in enumerate(self.engines):
                asked = engine.ask(self.rng)
                if asked is not None:
                    (alpha, beta), meta = asked
                    a, b = self.pairs[k]
                    x = np.clip(alpha * self.groups[a][0] + beta * self.groups[b][0], self.low, self.high)
                    meta.pop("predicted", None)
                    meta.update(level=self.level, pair=k, genes=[float(v) for v in x])
                    return Proposal(x, meta)
            if not all(engine.finished for engine in self.engines):
                return None
            self._close_level()
            if not self.finished:
                self._next_level()
        return None

    def tell(self, candidate: Candidate, result: EvalResult | None) -> None:
        pair, point = int(candidate.meta["pair"]), int(candidate.meta["point"])
        if result is None:
            self.engines[pair].tell(point, None)
            return
        minimised = self.objectives.minimised(result.objectives)
        values = minimised if self.pair_goal == "min" else self.objectives.natural(minimised)
        self.engines[pair].tell(point, self._group_objectives(values, pair))
        self.record(candidate.genome, minimised)

    def record(self, genome: np.ndarray, minimised: np.ndarray) -> None:
        """Best = the preference-weighted best evaluated merge, not the plain mean."""
        super().record(genome, self.preference * len(minimised) * minimised)

    def stats(self) -> dict[str, float]:
        return {"level": self.level, "groups": len(self.groups), "pairs": len(self.pairs)}

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "level": self.level,
            "group_vectors": np.array([v for v, _ in self.groups]),
            "group_tasks": [t for _, t in self.groups],
            "pairs": [list(p) for p in self.pairs],
            "engines": [e.state_dict() for e in self.engines],
            "choices": self.choices,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.seed = int(state["seed"])
        self.level = int(state["level"])
        self.groups = [
            (np.asarray(v), [int(t) for t in ts]) for v, ts in zip(state["group_vectors"], state["group_tasks"])
        ]
        self.pairs = [(int(a), int(b)) for a, b in state["pairs"]]
        self.engines = [
            MapRounds(self.pair_options, np.zeros(2), np.ones(2), self._pair_signs(), self.seed + 1000 * self.level + k)
            for k in range(len(self.pairs))
        ]
        for engine, engine_state in zip(self.engines, state["engines"]):
            engine.load_state_dict(engine_state)
        self.choices = list(state["choices"])


@STRATEGIES.register(
    "nested_map", NestedMapOptions, "nested MAP: 2-task MAPs per pair, merged by preference, recursively", {"box"}
)
def build_nested_map(options: NestedMapOptions, space: BoxSpace, seed: int) -> NestedMapSearch:
    return NestedMapSearch(options, space, seed)
