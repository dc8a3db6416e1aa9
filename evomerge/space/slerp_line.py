"""One gene t in [0, 1]: the SLERP of the first two seed models (the paper's brute-force baseline)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from evomerge.errors import SpecError
from evomerge.merge import slerp_coefficients
from evomerge.merge.base import sum_scratch, weighted_sum_into
from evomerge.merge.methods import slerp_model_stats
from evomerge.space import SPACES
from evomerge.space.base import WritesIntoBuffers
from evomerge.weights import Layout
from evomerge.weights.seed_models import SeedModels, as_seed_models


class SlerpLineSpace(WritesIntoBuffers):
    def __init__(self, layout: Layout, seeds: SeedModels | list[np.ndarray]):
        self.layout = layout
        self.seeds = as_seed_models(seeds, layout)
        self.dim = 1
        self.low, self.high = np.zeros(1), np.ones(1)
        pairs = ((self.seeds.tensor(0, n), self.seeds.tensor(1, n)) for n in layout.names)
        self._stats = slerp_model_stats(pairs)  # one angle over the whole models, accumulated in float64
        self._scratch: torch.Tensor | None = None

    def initial(self) -> list[np.ndarray]:
        return []

    def write(self, genome: np.ndarray, out: dict[str, torch.Tensor]) -> None:
        for name in self.layout.names:
            self._write_tensor(genome, name, out[name])

    def tensors(self, genome: np.ndarray) -> Iterator[tuple[str, torch.Tensor]]:
        for name, shape in zip(self.layout.names, self.layout.shapes):
            out = torch.empty(shape, dtype=self.seeds.dtypes[name], device=self.seeds.device or "cpu")
            yield name, self._write_tensor(genome, name, out)

    def _write_tensor(self, genome: np.ndarray, name: str, out: torch.Tensor) -> torch.Tensor:
        ca, cb = slerp_coefficients(float(genome[0]), *self._stats)
        if self._scratch is None or self._scratch.device != out.device:
            self._scratch = sum_scratch(out.device)
        return weighted_sum_into(out, [self.seeds.tensor(0, name), self.seeds.tensor(1, name)], [ca, cb], self._scratch)


@SPACES.register("slerp", summary="the SLERP weight t between the first two seed models", tags={"box"})
def build_slerp_space(options: object, layout: Layout, seeds: SeedModels) -> SlerpLineSpace:
    if len(seeds) < 2:
        raise SpecError("space.name", f"'slerp' needs two seed models, models.init gives {len(seeds)}")
    return SlerpLineSpace(layout, seeds)
