"""Space protocols: strategies see genomes (numpy vectors), never models."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class Space(Protocol):
    dim: int

    def initial(self) -> list[np.ndarray]:
        """Genomes that start the search (random inits or the seed models)."""
        ...

    def decode(self, genome: np.ndarray) -> dict[str, torch.Tensor]:
        """The model weights a genome stands for, as named tensors (newly allocated, or views of the genome)."""
        ...

    def tensors(self, genome: np.ndarray) -> Iterator[tuple[str, torch.Tensor]]:
        """The same weights a tensor at a time, in layout order, each valid until the next is asked for: how a
        model too large to hold twice is written to a file or into buffers."""
        ...

    def write(self, genome: np.ndarray, out: dict[str, torch.Tensor]) -> None:
        """Materialise into existing tensors (a worker's reused buffers, an evaluator's resident model), in their
        dtype and on their device."""
        ...

    def new_buffers(self) -> dict[str, torch.Tensor] | None:
        """Buffers to `write` every candidate into, in the seeds' dtype and on their device; None when `decode`
        costs nothing (views of the genome)."""
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


@runtime_checkable
class ExportsPlan(Protocol):
    """A space whose genomes are merges of the seed models: `evomerge export` writes the merge plan beside the
    weights (None where a genome has no plan), so the merge can be re-applied (`evomerge merge`, mergekit)."""

    def to_plan(self, genome: np.ndarray, seed_paths: list[str]) -> dict[str, Any] | None: ...


@runtime_checkable
class LayerBlocks(Protocol):
    """A space with genes per block of layers: `ranges` holds each block's layer range, recorded in an export's
    recipe."""

    ranges: list[tuple[int, int]]


class WritesIntoBuffers:
    """For spaces whose candidates are computed from seed models (`self.seeds`): a decoded model is fresh buffers
    in the seeds' dtype with the candidate written into them."""

    def new_buffers(self) -> dict[str, torch.Tensor]:
        return self.seeds.allocate()  # type: ignore[attr-defined]

    def decode(self, genome: np.ndarray) -> dict[str, torch.Tensor]:
        out = self.new_buffers()
        self.write(genome, out)  # type: ignore[attr-defined]
        return out
