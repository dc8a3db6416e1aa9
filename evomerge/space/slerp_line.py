"""One gene t in [0, 1]: the SLERP of the first two seed models (the paper's brute-force baseline)."""

from __future__ import annotations

import numpy as np
import torch

from evomerge.errors import SpecError
from evomerge.merge import slerp_coefficients, slerp_stats
from evomerge.space import SPACES
from evomerge.weights import Layout


class SlerpLineSpace:
    def __init__(self, layout: Layout, a: np.ndarray, b: np.ndarray):
        self.layout = layout
        self.a, self.b = a, b
        self.dim = 1
        self.low, self.high = np.zeros(1), np.ones(1)
        self._stats = slerp_stats(a, b)

    def initial(self) -> list[np.ndarray]:
        return []

    def weights_at(self, t: float) -> np.ndarray:
        ca, cb = slerp_coefficients(t, *self._stats)
        return (ca * self.a + cb * self.b).astype(np.float32)

    def decode(self, genome: np.ndarray) -> dict[str, torch.Tensor]:
        return self.layout.views(self.weights_at(float(genome[0])))


@SPACES.register("slerp", summary="the SLERP weight t between the first two seed models", tags={"box"})
def build_slerp_space(options: object, layout: Layout, seeds: list[np.ndarray]) -> SlerpLineSpace:
    if len(seeds) < 2:
        raise SpecError("space.name", f"'slerp' needs two seed models, models.init gives {len(seeds)}")
    return SlerpLineSpace(layout, seeds[0], seeds[1])
