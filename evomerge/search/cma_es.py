"""CMA-ES baseline through the maintained `cmaes` package (separable, as pycma runs at this size).

At the paper's 19,210 parameters a full covariance is out of reach (pycma itself stays diagonal
for the first 100·n/√λ generations), so the separable variant is the faithful one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from cmaes import SepCMA

from evomerge.errors import SpecError
from evomerge.evaluate.base import EvalResult
from evomerge.schema import require
from evomerge.search import STRATEGIES
from evomerge.search.base import Candidate, Proposal, Strategy
from evomerge.space.base import BoxSpace, Space


@dataclass
class CMAESOptions:
    population: int = 20
    sigma0: float = 0.01
    objective: str = "accuracy"
    maximize: bool = True

    def check(self, path: str) -> None:
        require(self.population >= 2, f"{path}.population", f"got {self.population}, must be >= 2")
        require(self.sigma0 > 0, f"{path}.sigma0", f"got {self.sigma0}, must be > 0")


def _object_state(obj: object) -> dict[str, Any]:
    """The optimizer's attributes as arrays and JSON scalars (never pickled)."""
    state: dict[str, Any] = {}
    for key, value in vars(obj).items():
        if isinstance(value, np.random.RandomState):
            name, keys, pos, has_gauss, cached = value.get_state()
            state[key] = {"name": name, "keys": keys, "pos": pos, "has_gauss": has_gauss, "cached": cached}
        elif isinstance(value, np.generic):
            state[key] = value.item()
        else:
            state[key] = value
    return state


def _restore_object_state(obj: object, state: dict[str, Any]) -> None:
    for key, value in state.items():
        current = getattr(obj, key)
        if isinstance(current, np.random.RandomState):
            current.set_state(
                (
                    value["name"],
                    np.asarray(value["keys"], dtype=np.uint32),
                    value["pos"],
                    value["has_gauss"],
                    value["cached"],
                )
            )
        else:  # arrays are copied: a restored optimizer never shares (and mutates) the state it came from
            setattr(obj, key, value.copy() if isinstance(value, np.ndarray) else value)


class CMAES(Strategy):
    """Generational: λ proposals are asked, and the update waits for all λ results."""

    def __init__(self, options: CMAESOptions, space: Space, seed: int):
        super().__init__(seed)
        self.options = options
        self.space = space
        inits = space.initial()
        bounds = np.stack([space.low, space.high], axis=1).astype(np.float64) if isinstance(space, BoxSpace) else None
        mean = inits[0].astype(np.float64) if inits or bounds is None else bounds.mean(axis=1)
        if mean.shape[0] < 2:
            raise SpecError(
                "strategy",
                f"cma_es needs a space of at least 2 genes, this one has {mean.shape[0]}; "
                "use random or grid for one gene",
            )
        self.cma = SepCMA(mean=mean, sigma=options.sigma0, bounds=bounds, population_size=options.population, seed=seed)
        self.generation_x: list[np.ndarray] = []
        self.told: dict[int, float | None] = {}  # member -> loss; None: failed
        self.best_genome: np.ndarray | None = None
        self.best_value = -np.inf
        self.worst_loss: float | None = None  # the worst loss seen in any generation

    def ask(self) -> Proposal | None:
        if len(self.generation_x) >= self.options.population:
            return None
        x = self.cma.ask()
        self.generation_x.append(x)
        member = len(self.generation_x) - 1
        return Proposal(x.astype(np.float32), {"generation": int(self.cma.generation), "member": member})

    def tell(self, candidate: Candidate, result: EvalResult | None) -> None:
        sign = 1.0 if self.options.maximize else -1.0
        if result is not None:
            value = result.objectives[self.options.objective]
            loss = -sign * value
            self.worst_loss = loss if self.worst_loss is None else max(self.worst_loss, loss)
            if sign * value > sign * self.best_value or self.best_genome is None:
                self.best_value, self.best_genome = value, candidate.genome.copy()
        else:
            loss = None  # ranked last once the whole generation is in, whatever arrives after it
        self.told[int(candidate.meta["member"])] = loss
        if len(self.told) == self.options.population:
            seen = [v for v in [self.worst_loss, *self.told.values()] if v is not None]
            failed = max(seen, default=0.0) + 1.0
            losses = [failed if self.told[k] is None else self.told[k] for k in range(self.options.population)]
            self.cma.tell(list(zip(self.generation_x, losses)))
            self.generation_x, self.told = [], {}

    def best(self) -> tuple[np.ndarray, float] | None:
        return None if self.best_genome is None else (self.best_genome, float(self.best_value))

    def stats(self) -> dict[str, float]:
        return {"sigma": float(self.cma._sigma), "generation": int(self.cma.generation)}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            cma=_object_state(self.cma),
            generation_x=np.array(self.generation_x) if self.generation_x else None,
            told={str(k): v for k, v in self.told.items()},
            best_genome=self.best_genome,
            best_value=float(self.best_value),
            worst_loss=self.worst_loss,
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        _restore_object_state(self.cma, state["cma"])
        gx = state["generation_x"]
        self.generation_x = [] if gx is None else list(np.asarray(gx))
        self.told = {int(k): None if v is None else float(v) for k, v in state["told"].items()}
        self.best_genome = state["best_genome"]
        self.best_value = float(state["best_value"])
        self.worst_loss = None if state["worst_loss"] is None else float(state["worst_loss"])


@STRATEGIES.register("cma_es", CMAESOptions, "separable CMA-ES (cmaes.SepCMA)")
def build_cma_es(options: CMAESOptions, space: Space, seed: int) -> CMAES:
    return CMAES(options, space, seed)
