"""One gene t in [0, 1]: the SLERP of the first two seed models (the paper's brute-force baseline)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from evomerge.errors import SpecError
from evomerge.merge import slerp_coefficients
from evomerge.merge.methods import slerp_model_stats
from evomerge.space import SPACES
from evomerge.weights import Layout
from evomerge.weights.seed_models import SeedModels, as_seed_models, write_tensors


class SlerpLineSpace:
    def __init__(self, layout: Layout, seeds: SeedModels | list[np.ndarray]):
        self.layout = layout
        self.seeds = as_seed_models(seeds, layout)
        self.dim = 1
        self.low, self.high = np.zeros(1), np.ones(1)
        pairs = ((self.seeds.tensor(0, n), self.seeds.tensor(1, n)) for n in layout.names)
        self._stats = slerp_model_stats(pairs)  # one angle over the whole models, accumulated in float64

    def initial(self) -> list[np.ndarray]:
        return []

    def tensors(self, genome: np.ndarray) -> Iterator[tuple[str, torch.Tensor]]:
        ca, cb = slerp_coefficients(float(genome[0]), *self._stats)
        with torch.no_grad():
            for name in self.layout.names:
                a, b = self.seeds.tensor(0, name), self.seeds.tensor(1, name)
                yield name, a.to(torch.float32, copy=True).mul_(ca).add_(b, alpha=cb)

    def write(self, genome: np.ndarray, out: dict[str, torch.Tensor]) -> None:
        write_tensors(self.tensors(genome), out)

    def new_buffers(self) -> dict[str, torch.Tensor]:
        return self.seeds.allocate()

    def decode(self, genome: np.ndarray) -> dict[str, torch.Tensor]:
        out = self.new_buffers()
        self.write(genome, out)
        return out


@SPACES.register("slerp", summary="the SLERP weight t between the first two seed models", tags={"box"})
def build_slerp_space(options: object, layout: Layout, seeds: SeedModels) -> SlerpLineSpace:
    if len(seeds) < 2:
        raise SpecError("space.name", f"'slerp' needs two seed models, models.init gives {len(seeds)}")
    return SlerpLineSpace(layout, seeds)
