"""Space protocols: strategies see genomes (numpy vectors), never models."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class Space(Protocol):
    dim: int

    def initial(self) -> list[np.ndarray]:
        """Genomes that start the search (random inits or the seed models)."""
        ...

    def decode(self, genome: np.ndarray) -> dict[str, torch.Tensor]:
        """The model weights a genome stands for, as named tensors."""
        ...


@runtime_checkable
class VariationSpace(Space, Protocol):
    """A space whose genomes can be recombined and mutated (M2N2, GA, MAP-Elites)."""

    n_splits: int  # split positions crossover draws from; n_splits itself means "no split"

    def crossover(self, x: np.ndarray, y: np.ndarray, split: int, w: float) -> np.ndarray: ...

    def mutate(self, genome: np.ndarray, std: float, generator: torch.Generator) -> np.ndarray: ...


@runtime_checkable
class BoxSpace(Space, Protocol):
    """A space of genomes inside [low, high] bounds (grid sweeps, surrogate searches)."""

    low: np.ndarray
    high: np.ndarray
