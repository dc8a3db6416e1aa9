"""MAP-Elites baseline: one elite per cell of a grid over behaviour descriptors.

The paper's setting is a 10 × 10 grid over (accuracy on odd digits, accuracy on even digits) with
overall accuracy as quality, parents drawn ∝ quality and M2N2's crossover and mutation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.evaluate.base import EvalResult
from evomerge.schema import require
from evomerge.search import STRATEGIES
from evomerge.search.base import Candidate, Proposal, sample_index
from evomerge.search.variation import EvolutionaryStrategy
from evomerge.space.base import VariationSpace


@dataclass
class MapElitesOptions:
    bins: list[int] = field(default_factory=lambda: [10, 10])
    descriptors: list[str] = field(default_factory=lambda: ["accuracy_odd", "accuracy_even"])
    low: list[float] = field(default_factory=lambda: [0.0, 0.0])
    high: list[float] = field(default_factory=lambda: [1.0, 1.0])
    quality: str = "accuracy"
    crossover: bool = True
    split_point: bool = True
    mutation_std: float = 0.01

    def check(self, path: str) -> None:
        n = len(self.descriptors)
        require(n >= 1, f"{path}.descriptors", "needs at least one objective name")
        for name in ("bins", "low", "high"):
            got = len(getattr(self, name))
            require(got == n, f"{path}.{name}", f"has {got} entries, descriptors has {n}")
        for i, b in enumerate(self.bins):
            require(b >= 1, f"{path}.bins[{i}]", f"got {b}, must be >= 1")
        for i, (lo, hi) in enumerate(zip(self.low, self.high)):
            require(lo < hi, f"{path}.high[{i}]", f"got {hi}, must be > low[{i}] = {lo}")
        require(self.mutation_std >= 0, f"{path}.mutation_std", f"got {self.mutation_std}, must be >= 0")


class MapElites(EvolutionaryStrategy):
    def __init__(self, options: MapElitesOptions, space: VariationSpace, seed: int):
        super().__init__(options, space, seed)
        self.options = options
        n_cells = int(np.prod(options.bins))
        self.genomes = np.zeros((n_cells, space.dim), dtype=np.float32)
        self.quality = np.zeros(n_cells)
        self.ids = np.full(n_cells, -1, dtype=np.int64)
        self.occupied = np.zeros(n_cells, dtype=bool)

    def cell_of(self, objectives: dict[str, float]) -> int:
        opts = self.options
        index = []
        for name, bins, lo, hi in zip(opts.descriptors, opts.bins, opts.low, opts.high):
            if name not in objectives:
                raise EvomergeError(
                    f"strategy.descriptors: objective {name!r} is not among the evaluator's ({', '.join(objectives)})"
                )
            index.append(min(bins - 1, max(0, int(np.floor((objectives[name] - lo) / (hi - lo) * bins)))))
        return int(np.ravel_multi_index(index, opts.bins))

    def ask(self) -> Proposal | None:
        initial = self.ask_initial()
        if initial is not None:
            return initial
        cells = np.flatnonzero(self.occupied)
        if len(cells) == 0:
            return None
        weights = self.quality[cells].copy()
        first = sample_index(self.rng, weights)
        if len(cells) > 1 and (np.delete(weights, first) > 0).any():
            weights[first] = 0.0  # two distinct parents, as in the paper's baseline
        second = sample_index(self.rng, weights)
        a, b = cells[first], cells[second]
        return self.breed((int(self.ids[a]), self.genomes[a]), (int(self.ids[b]), self.genomes[b]))

    def tell(self, candidate: Candidate, result: EvalResult | None) -> None:
        if result is None:
            self.retry_initial(candidate)
            return
        if self.options.quality not in result.objectives:
            raise EvomergeError(f"strategy.quality: objective {self.options.quality!r} is not among the evaluator's")
        cell = self.cell_of(result.objectives)
        quality = result.objectives[self.options.quality]
        if not self.occupied[cell] or quality > self.quality[cell]:
            self.occupied[cell] = True
            self.quality[cell] = quality
            self.genomes[cell] = candidate.genome
            self.ids[cell] = candidate.id

    def best(self) -> tuple[np.ndarray, float] | None:
        if not self.occupied.any():
            return None
        cell = int(np.argmax(np.where(self.occupied, self.quality, -np.inf)))
        return self.genomes[cell], float(self.quality[cell])

    def stats(self) -> dict[str, float]:
        filled = int(self.occupied.sum())
        return {
            "archive_size": filled,
            "coverage": filled / len(self.occupied),
            "archive_mean": float(self.quality[self.occupied].mean()) if filled else 0.0,
        }

    def state_dict(self) -> dict[str, Any]:
        cells = np.flatnonzero(self.occupied)
        state = super().state_dict()
        state.update(
            cells=cells,
            genomes=self.genomes[cells].copy(),
            quality=self.quality[cells].copy(),
            ids=self.ids[cells].copy(),
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        cells = np.asarray(state["cells"], dtype=np.int64)
        self.occupied[:] = False
        self.occupied[cells] = True
        self.genomes[cells] = state["genomes"]
        self.quality[cells] = state["quality"]
        self.ids[cells] = state["ids"]


@STRATEGIES.register("map_elites", MapElitesOptions, "MAP-Elites over evaluator objectives", {"variation"})
def build_map_elites(options: MapElitesOptions, space: VariationSpace, seed: int) -> MapElites:
    return MapElites(options, space, seed)
