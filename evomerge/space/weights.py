"""The whole flat parameter vector as the genome: M2N2 on weights, from scratch or from seeds."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from evomerge.errors import SpecError
from evomerge.merge import split_point_slerp
from evomerge.space import SPACES
from evomerge.weights import Layout
from evomerge.weights.seed_models import SeedModels, write_tensors

# Every individual is a whole float32 copy of the model: an M2N2 archive of 20 plus its working copies holds
# about 23. At this limit that is 200 MB per individual and about 4.6 GB in all; larger models are merged as
# recipes or merge genes, whose individuals are kilobytes.
MAX_PARAMETERS = 50_000_000


def check_size(layout: Layout) -> None:
    """Refuse, before any seed model is built, a model too large to keep as flat vectors."""
    if layout.size > MAX_PARAMETERS:
        gb = layout.size * 4 / 1e9
        raise SpecError(
            "space",
            f"'weights' keeps every individual as one flat float32 vector; this model has {layout.size:,} "
            f"parameters ({gb:.1f} GB per individual, about {23 * gb:.0f} GB for an M2N2 archive of 20), above "
            f"the limit of {MAX_PARAMETERS:,}: use space 'recipe' (per-block coefficients over the seed models) "
            "or 'merge' (merge operators and their knobs as genes)",
        )


class WeightSpace:
    """Genome = float32 vector of every parameter, in layout order."""

    def __init__(self, layout: Layout, seeds: SeedModels | list[np.ndarray]):
        self.layout = layout
        self.dim = layout.size
        self.n_splits = layout.size
        self.seeds = [seeds.flat(k) for k in range(len(seeds))] if isinstance(seeds, SeedModels) else list(seeds)

    def initial(self) -> list[np.ndarray]:
        return [s.copy() for s in self.seeds]

    def decode(self, genome: np.ndarray) -> dict[str, torch.Tensor]:
        """Views of the genome itself: nothing is copied."""
        return self.layout.views(genome)

    def tensors(self, genome: np.ndarray) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self.decode(genome).items())

    def write(self, genome: np.ndarray, out: dict[str, torch.Tensor]) -> None:
        write_tensors(self.tensors(genome), out)

    def new_buffers(self) -> None:
        """None: `decode` returns views of the genome, there is nothing to reuse."""
        return None

    def crossover(self, x: np.ndarray, y: np.ndarray, split: int, w: float) -> np.ndarray:
        return split_point_slerp(x, y, split, w)

    def mutate(self, genome: np.ndarray, std: float, generator: torch.Generator) -> np.ndarray:
        noise = torch.randn(genome.shape[0], generator=generator).numpy()
        noise *= std
        noise += genome
        return noise


@SPACES.register("weights", summary="every parameter of the model as one flat vector", tags={"variation"})
def build_weight_space(options: object, layout: Layout, seeds: SeedModels) -> WeightSpace:
    check_size(layout)
    return WeightSpace(layout, seeds)
