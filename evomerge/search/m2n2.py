"""M2N2: Model Merging of Natural Niches (Abrantes, Lange, Tang, GECCO 2025).

Steady state: every result is told at once and may replace the archive's least fit member.
Fitness is shared per example (competition), the second parent is chosen for what the first one
lacks (attraction), and crossover is SLERP with a random split point. Every switch the paper
ablates is an option; GA is the same loop with alpha = 0 and no matchmaker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.evaluate.base import EvalResult
from evomerge.schema import require
from evomerge.search import STRATEGIES
from evomerge.search.base import Candidate, Proposal, sample_index
from evomerge.search.variation import EvolutionaryStrategy
from evomerge.space.base import VariationSpace


def resource_weights(scores: np.ndarray, alpha: float) -> np.ndarray:
    """1 / z_j with z_j = (Σ_i S_ij)^α, an empty column counting as 1."""
    z = scores.sum(axis=0)
    z[z == 0] = 1.0
    if alpha != 1.0:
        z = z**alpha
    return 1.0 / z


def competition_fitness(scores: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """f_i = Σ_j S_ij / z_j: an example solved by few is worth more to each of them."""
    return scores @ resource_weights(scores, alpha)


def replacement_index(table: np.ndarray, alpha: float = 1.0) -> int:
    """Row of `table` (the archive's P rows, then the child's) with the lowest fitness; P means the child.

    All P + 1 fitness values come from one pass, so a child equal to a member ties with it exactly,
    and ties go to the lowest index: the member is dropped before an equally fit child (the
    reference's argmin), which is what lets neutral variants drift through the archive.
    """
    return int(np.argmin(competition_fitness(table, alpha)))


def match_scores(shared: np.ndarray, first: int) -> np.ndarray:
    """Σ_j max(0, F_kj − F_first,j) on the shared-fitness matrix F: how much of what `first` misses each covers."""
    return np.maximum(shared - shared[first], 0.0).sum(axis=1)


@dataclass
class M2N2Options:
    population: int = 20
    alpha: float = 1.0
    matchmaker: bool = True
    crossover: bool = True
    split_point: bool = True
    mutation_std: float = 0.01
    objective: str = "accuracy"

    def check(self, path: str) -> None:
        require(self.population >= 2, f"{path}.population", f"got {self.population}, must be >= 2")
        require(self.alpha >= 0, f"{path}.alpha", f"got {self.alpha}, must be >= 0")
        require(self.mutation_std >= 0, f"{path}.mutation_std", f"got {self.mutation_std}, must be >= 0")


@dataclass
class GAOptions:
    """M2N2's ablation "GA": raw-score fitness (alpha = 0), both parents by fitness."""

    population: int = 20
    crossover: bool = True
    split_point: bool = True
    mutation_std: float = 0.01
    objective: str = "accuracy"

    def check(self, path: str) -> None:
        M2N2Options(self.population, 0.0, False, mutation_std=self.mutation_std).check(path)


class M2N2(EvolutionaryStrategy):
    def __init__(self, options: M2N2Options, space: VariationSpace, seed: int):
        super().__init__(options, space, seed)
        self.options = options
        capacity, n_params = options.population, space.dim
        self.genomes = np.zeros((capacity, n_params), dtype=np.float32)
        # (capacity + 1, n_examples), allocated on the first result: the archive's scores, then a row for
        # the child, so a replacement scores all P + 1 in one pass (equal rows get bit-equal fitness)
        self._table: np.ndarray | None = None
        self.values = np.zeros(capacity)
        self.ids = np.full(capacity, -1, dtype=np.int64)
        self.size = 0
        self.replacements = 0
        self._shared: tuple[np.ndarray, np.ndarray] | None = None  # cached (shared matrix, fitness)

    @property
    def scores(self) -> np.ndarray | None:
        return None if self._table is None else self._table[:-1]

    def _allocate(self, n_examples: int) -> None:
        self._table = np.zeros((self.options.population + 1, n_examples), dtype=np.float32)

    def shared_fitness(self) -> tuple[np.ndarray, np.ndarray]:
        """(S_ij / z_j, f_i) over the archive, recomputed only after the archive changes."""
        if self._shared is None:
            scores = self.scores[: self.size]
            shared = scores * resource_weights(scores, self.options.alpha)
            self._shared = shared, shared.sum(axis=1)
        return self._shared

    # ask -----------------------------------------------------------------------------------
    def ask(self) -> Proposal | None:
        initial = self.ask_initial()
        if initial is not None:
            return initial
        if self.size == 0:
            return None
        shared, fitness = self.shared_fitness()
        first = sample_index(self.rng, fitness)
        if self.options.matchmaker:
            matches = match_scores(shared, first)
            # all zero when `first` solves everything any other member solves; the reference then draws
            # from NaN weights (JAX returns index 0), we fall back to fitness (see README, M2N2 vs the paper)
            second = sample_index(self.rng, matches if matches.any() else fitness)
        else:
            second = sample_index(self.rng, fitness)
        return self.breed((int(self.ids[first]), self.genomes[first]), (int(self.ids[second]), self.genomes[second]))

    # tell ----------------------------------------------------------------------------------
    def tell(self, candidate: Candidate, result: EvalResult | None) -> None:
        if result is None:
            self.retry_initial(candidate)
            return
        if result.per_example is None:
            raise EvomergeError("M2N2 needs per-example scores, and the evaluator returned none")
        if self.options.objective not in result.objectives:
            raise EvomergeError(
                f"strategy.objective {self.options.objective!r} is not among the evaluator's objectives "
                f"({', '.join(result.objectives)})"
            )
        if self._table is None:
            self._allocate(result.per_example.shape[0])
        # As in the reference, the archive starts as P empty slots with zero scores and every result, the
        # initial models' too, goes through the same update: an empty slot is taken unless a member that
        # solves nothing comes before it. Filled slots stay a prefix, since argmin takes the first minimum.
        table = self._table
        table[-1] = result.per_example
        slot = replacement_index(table, self.options.alpha)
        if slot == self.options.population:
            return
        if slot < self.size:
            self.replacements += 1
        else:
            self.size += 1
        self.genomes[slot] = candidate.genome
        table[slot] = result.per_example
        self._shared = None
        self.values[slot] = result.objectives[self.options.objective]
        self.ids[slot] = candidate.id

    # reporting -----------------------------------------------------------------------------
    def best(self) -> tuple[np.ndarray, float] | None:
        if self.size == 0:
            return None
        i = int(np.argmax(self.values[: self.size]))
        return self.genomes[i], float(self.values[i])

    def stats(self) -> dict[str, float]:
        if self.size == 0:
            return {"archive_size": 0}
        genomes = self.genomes[: self.size].astype(np.float64)
        scores = self.scores[: self.size]
        gram = genomes @ genomes.T
        sq = np.diag(gram)
        dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * gram, 0.0))
        pairs = self.size * (self.size - 1)
        disagreement = (scores[:, None, :] != scores[None, :, :]).mean(axis=2)
        return {
            "archive_size": self.size,
            "archive_mean": float(self.values[: self.size].mean()),
            "coverage": float((scores.sum(axis=0) > 0).mean()),
            "mean_distance": float(dist.sum() / pairs) if pairs else 0.0,
            "mean_disagreement": float(disagreement.sum() / pairs) if pairs else 0.0,
            "replacements": self.replacements,
        }

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            genomes=self.genomes[: self.size].copy(),
            scores=None if self.scores is None else self.scores[: self.size].copy(),
            values=self.values[: self.size].copy(),
            ids=self.ids[: self.size].copy(),
            replacements=self.replacements,
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.size = len(state["ids"])
        self.genomes[: self.size] = state["genomes"]
        if state["scores"] is not None:
            self._allocate(state["scores"].shape[1])
            self._table[: self.size] = state["scores"]
        self._shared = None
        self.values[: self.size] = state["values"]
        self.ids[: self.size] = state["ids"]
        self.replacements = int(state["replacements"])


@STRATEGIES.register("m2n2", M2N2Options, "M2N2: competition, attraction, split-point crossover", {"variation"})
def build_m2n2(options: M2N2Options, space: VariationSpace, seed: int) -> M2N2:
    return M2N2(options, space, seed)


@STRATEGIES.register("ga", GAOptions, "genetic algorithm (M2N2 with alpha 0, no matchmaker)", {"variation"})
def build_ga(options: GAOptions, space: VariationSpace, seed: int) -> M2N2:
    m2n2 = M2N2Options(
        population=options.population,
        alpha=0.0,
        matchmaker=False,
        crossover=options.crossover,
        split_point=options.split_point,
        mutation_std=options.mutation_std,
        objective=options.objective,
    )
    return M2N2(m2n2, space, seed)
