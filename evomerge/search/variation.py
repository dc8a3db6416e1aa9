"""The part M2N2, GA and MAP-Elites share: seeding the archive, then children by crossover + mutation."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from evomerge.search.base import Candidate, Proposal, Strategy
from evomerge.space.base import VariationSpace

INIT_ATTEMPTS = 3  # evaluations an initial model gets in all before the search goes on without it


class VariationOptions(Protocol):
    crossover: bool
    split_point: bool
    mutation_std: float


class EvolutionaryStrategy(Strategy):
    """Asks the space's initial genomes first, then children of parents chosen by the subclass.

    An initial model whose evaluation fails is asked again (as a new candidate, up to INIT_ATTEMPTS in
    all), so that a transient fault does not lose a seed model, or, when every one fails, the whole run.
    """

    def __init__(self, options: VariationOptions, space: VariationSpace, seed: int):
        super().__init__(seed)
        self.space = space
        self.inits = space.initial()
        self.next_init = 0
        self.init_retries: list[tuple[int, int]] = []  # (initial model, attempt) to ask again, oldest first
        self._variation = options

    def ask_initial(self) -> Proposal | None:
        if self.next_init < len(self.inits):
            self.next_init += 1
            return Proposal(self.inits[self.next_init - 1], {"init": self.next_init - 1})
        if self.init_retries:
            init, attempt = self.init_retries.pop(0)
            return Proposal(self.inits[init], {"init": init, "attempt": attempt})
        return None

    def retry_initial(self, candidate: Candidate) -> None:
        """Called with each failed candidate: an initial model with attempts left is queued to be asked again."""
        init = candidate.meta.get("init")
        attempt = int(candidate.meta.get("attempt", 1)) + 1  # the first ask carries no attempt number
        if init is not None and attempt <= INIT_ATTEMPTS:
            self.init_retries.append((int(init), attempt))

    def breed(self, first: tuple[int, np.ndarray], second: tuple[int, np.ndarray]) -> Proposal:
        """Split-point SLERP of the parents (split past the end without split point), then noise.

        The split is drawn uniformly over the space's split positions (parameters, for both spaces).
        """
        opts = self._variation
        if opts.crossover:
            split = int(self.rng.integers(self.space.n_splits)) if opts.split_point else self.space.n_splits
            w = float(self.rng.random())
            child = self.space.crossover(first[1], second[1], split, w)
            meta: dict[str, Any] = {"parents": [first[0], second[0]], "split": split, "w": w}
        else:
            child = first[1].copy()
            meta = {"parents": [first[0]]}
        if opts.mutation_std > 0:
            child = self.space.mutate(child, opts.mutation_std, self.noise)
        return Proposal(child, meta)

    def state_dict(self) -> dict[str, Any]:
        retries = [list(r) for r in self.init_retries]
        return {**super().state_dict(), "next_init": self.next_init, "init_retries": retries}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.next_init = int(state["next_init"])
        # snapshots from before retries existed have none
        self.init_retries = [(int(i), int(a)) for i, a in state.get("init_retries", [])]
