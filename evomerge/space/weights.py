"""The whole flat parameter vector as the genome: M2N2 on weights, from scratch or from seeds."""

from __future__ import annotations

import numpy as np
import torch

from evomerge.merge import split_point_slerp
from evomerge.space import SPACES
from evomerge.weights import Layout


class WeightSpace:
    """Genome = float32 vector of every parameter, in layout order."""

    def __init__(self, layout: Layout, seeds: list[np.ndarray]):
        self.layout = layout
        self.dim = layout.size
        self.n_splits = layout.size
        self.seeds = seeds

    def initial(self) -> list[np.ndarray]:
        return [s.copy() for s in self.seeds]

    def decode(self, genome: np.ndarray) -> dict[str, torch.Tensor]:
        return self.layout.views(genome)

    def crossover(self, x: np.ndarray, y: np.ndarray, split: int, w: float) -> np.ndarray:
        return split_point_slerp(x, y, split, w)

    def mutate(self, genome: np.ndarray, std: float, generator: torch.Generator) -> np.ndarray:
        noise = torch.randn(genome.shape[0], generator=generator).numpy()
        noise *= std
        noise += genome
        return noise


@SPACES.register("weights", summary="every parameter of the model as one flat vector", tags={"variation"})
def build_weight_space(options: object, layout: Layout, seeds: list[np.ndarray]) -> WeightSpace:
    return WeightSpace(layout, seeds)
