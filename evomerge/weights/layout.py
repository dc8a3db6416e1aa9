"""The map between a flat parameter vector and named tensors.

A flat float32 vector is the genome of weight-space searches; `Layout.views` turns it into named
tensors without copying, so decoding a candidate costs microseconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from evomerge.errors import ShapeMismatchError


@dataclass(frozen=True)
class Layout:
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def size(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def offsets(self) -> list[tuple[int, int]]:
        out, start = [], 0
        for shape in self.shapes:
            out.append((start, start + math.prod(shape)))
            start += math.prod(shape)
        return out

    def views(self, flat: np.ndarray) -> dict[str, torch.Tensor]:
        if flat.shape != (self.size,):
            raise ShapeMismatchError(f"flat parameter vector has shape {flat.shape}, the model needs ({self.size},)")
        base = torch.from_numpy(flat)
        return {name: base[a:b].view(shape) for name, shape, (a, b) in zip(self.names, self.shapes, self.offsets())}

    def flatten(self, tensors: dict[str, torch.Tensor], source: str = "model") -> np.ndarray:
        """Concatenate named tensors in layout order, naming the first tensor that does not fit."""
        for name, shape in zip(self.names, self.shapes):
            if name not in tensors:
                raise ShapeMismatchError(f"{source} has no tensor {name!r} (expected shape {shape})")
            got = tuple(tensors[name].shape)
            if got != shape:
                raise ShapeMismatchError(f"{source}: tensor {name!r} has shape {got}, expected {shape}")
        extra = sorted(set(tensors) - set(self.names))
        if extra:
            raise ShapeMismatchError(f"{source} has tensor {extra[0]!r} that the model does not have")
        return np.concatenate([tensors[n].detach().to(torch.float32).reshape(-1).numpy() for n in self.names]).astype(
            np.float32, copy=False
        )
