"""Individuals as recipes: a per-block coefficient matrix over the seed models.

An individual is Σ_k C[b, k] θ_k on block b. M2N2's crossover of two such individuals is again
one, exactly: SLERP needs only the whole vectors' dot product and norms, and
⟨x, y⟩ = Σ_b C_x[b]ᵀ G_b C_y[b] with G_b the Gram matrix of the seeds on block b. Split points
fall on block boundaries (drawn uniformly over parameters, then moved to the start of their
block). So an archive of merged models costs B × K numbers per individual, whatever the model size.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from evomerge.errors import SpecError
from evomerge.merge import slerp_coefficients
from evomerge.merge.base import sum_scratch, weighted_sum_into
from evomerge.schema import require
from evomerge.space import SPACES
from evomerge.space.base import WritesIntoBuffers
from evomerge.weights import Layout
from evomerge.weights.blocks import block_map, check_block_options
from evomerge.weights.seed_models import SeedModels, as_seed_models


@dataclass
class RecipeOptions:
    blocks: Literal["layer", "tensor", "chunks"] = "tensor"
    chunks: int = 64
    regex: str | None = None
    layer_granularity: int = 1  # consecutive layers per block (blocks: layer)

    def check(self, path: str) -> None:
        require(self.chunks >= 1, f"{path}.chunks", f"got {self.chunks}, must be >= 1")
        check_block_options(path, self.blocks, self.layer_granularity, [])


def named_blocks(layout: Layout, options: RecipeOptions) -> list[tuple[str, int, int]]:
    """(block name, start, end) of contiguous ranges of the flat vector, covering it in order."""
    if options.blocks == "chunks":
        edges = np.linspace(0, layout.size, min(options.chunks, layout.size) + 1).round().astype(int)
        return [(f"chunk.{k}", int(a), int(b)) for k, (a, b) in enumerate(zip(edges[:-1], edges[1:])) if b > a]
    names = list(layout.names)
    owner = block_map(names, options.blocks, options.regex, options.layer_granularity).tensor_blocks
    out: list[tuple[str, int, int]] = []
    for name, (start, end) in zip(names, layout.offsets()):
        if out and out[-1][0] == owner[name]:
            out[-1] = (owner[name], out[-1][1], end)
        else:
            out.append((owner[name], start, end))
    return out


def block_ranges(layout: Layout, options: RecipeOptions) -> list[tuple[int, int]]:
    return [(a, b) for _, a, b in named_blocks(layout, options)]


GRAM_CHUNK = 1 << 20  # elements of the seed stack cast to float64 at a time
READ_CHUNK = 1 << 24  # elements of each seed taken at a time when writing a tensor


def block_gram(block: torch.Tensor | np.ndarray) -> np.ndarray:
    """The seeds' Gram matrix on one slice (K × n), accumulated in float64 a column chunk at a time: the same
    angles as M2N2's float64 crossover of the full weights, without a float64 copy of the stack."""
    stack = torch.as_tensor(block)
    width = max(1, GRAM_CHUNK // max(1, stack.shape[0]))
    gram = torch.zeros(stack.shape[0], stack.shape[0], dtype=torch.float64)
    for start in range(0, stack.shape[1], width):
        chunk = stack[:, start : start + width].double()
        gram += (chunk @ chunk.T).cpu()
    return gram.numpy()


Piece = tuple[int, int, int]  # (block, start, end) within one tensor's flattened elements


def tensor_pieces(layout: Layout, ranges: list[tuple[int, int]]) -> dict[str, list[Piece]]:
    """Each tensor's parts by block: one piece per tensor for `tensor` and `layer` blocks; chunks may cut one."""
    pieces: dict[str, list[Piece]] = {}
    block = 0
    for name, (a, b) in zip(layout.names, layout.offsets()):
        pieces[name] = []
        while block < len(ranges) and ranges[block][1] <= a:
            block += 1
        b_index = block
        while b_index < len(ranges) and ranges[b_index][0] < b:
            lo, hi = max(a, ranges[b_index][0]), min(b, ranges[b_index][1])
            pieces[name].append((b_index, lo - a, hi - a))
            b_index += 1
    return pieces


class RecipeSpace(WritesIntoBuffers):
    def __init__(
        self,
        layout: Layout,
        seeds: SeedModels | list[np.ndarray],
        ranges: list[tuple[int, int]],
        block_names: list[str] | None = None,
        block_by: str | None = None,
    ):
        self.layout = layout
        self.seeds = as_seed_models(seeds, layout)
        self.block_names, self.block_by = block_names, block_by
        self.ranges = ranges
        self.n_blocks, self.n_seeds = len(ranges), len(self.seeds)
        self.dim = self.n_blocks * self.n_seeds
        self.n_splits = layout.size
        self.starts = np.array([a for a, _ in ranges])
        self.pieces = tensor_pieces(layout, ranges)
        self._gram: np.ndarray | None = None
        self._scratch: torch.Tensor | None = None

    @property
    def gram(self) -> np.ndarray:
        """(B, K, K) per-block Gram matrices, computed on the first crossover by one pass over the seeds, a slice
        at a time (from files, only that slice is read), so the driver never holds whole tensors."""
        if self._gram is None:
            gram = np.zeros((self.n_blocks, self.n_seeds, self.n_seeds))
            width = max(1, GRAM_CHUNK // self.n_seeds)
            for name in self.layout.names:
                for block, lo, hi in self.pieces[name]:
                    for start in range(lo, hi, width):
                        end = min(hi, start + width)
                        gram[block] += block_gram(
                            torch.stack([self.seeds.slice(k, name, start, end) for k in range(self.n_seeds)])
                        )
            self._gram = gram
        return self._gram

    def coefficients(self, genome: np.ndarray) -> np.ndarray:
        return np.asarray(genome, dtype=np.float64).reshape(self.n_blocks, self.n_seeds)

    def initial(self) -> list[np.ndarray]:
        """Each seed model itself: coefficient 1 on seed k in every block."""
        return [np.tile(np.eye(self.n_seeds)[k], self.n_blocks).astype(np.float32) for k in range(self.n_seeds)]

    def write(self, genome: np.ndarray, out: dict[str, torch.Tensor]) -> None:
        """Each tensor Σ_k C[b, k] θ_k, computed in float32 straight into `out` (see `weighted_sum_into`)."""
        coefficients = self.coefficients(genome).astype(np.float32)
        for name in self.layout.names:
            self._write_tensor(name, coefficients, out[name])

    def tensors(self, genome: np.ndarray) -> Iterator[tuple[str, torch.Tensor]]:
        """One tensor at a time, in the seeds' dtype (to write a model to a file)."""
        coefficients = self.coefficients(genome).astype(np.float32)
        device = self.seeds.device or torch.device("cpu")
        for name, shape in zip(self.layout.names, self.layout.shapes):
            out = torch.empty(shape, dtype=self.seeds.dtypes[name], device=device)
            self._write_tensor(name, coefficients, out)
            yield name, out

    def _write_tensor(self, name: str, coefficients: np.ndarray, out: torch.Tensor) -> None:
        if self._scratch is None or self._scratch.device != out.device:
            self._scratch = sum_scratch(out.device)
        target = out.view(-1)
        for block, lo, hi in self.pieces[name]:
            for start in range(lo, hi, READ_CHUNK):  # seeds left in files are read a slice at a time
                end = min(hi, start + READ_CHUNK)
                sources = [self.seeds.slice(k, name, start, end).to(out.device) for k in range(self.n_seeds)]
                weighted_sum_into(target[start:end], sources, coefficients[block].tolist(), self._scratch)

    def boundary(self, split: int) -> int:
        """The block whose start is at or before parameter index `split` (n_blocks past the end)."""
        if split >= self.layout.size:
            return self.n_blocks
        return int(np.searchsorted(self.starts, split, side="right") - 1)

    def crossover(self, x: np.ndarray, y: np.ndarray, split: int, w: float) -> np.ndarray:
        cx, cy = self.coefficients(x), self.coefficients(y)
        dot = float(np.einsum("bk,bkl,bl->", cx, self.gram, cy))
        norm_x = float(np.sqrt(max(np.einsum("bk,bkl,bl->", cx, self.gram, cx), 0.0)))
        norm_y = float(np.sqrt(max(np.einsum("bk,bkl,bl->", cy, self.gram, cy), 0.0)))
        a1, b1 = slerp_coefficients(w, dot, norm_x, norm_y)
        a2, b2 = slerp_coefficients(1.0 - w, dot, norm_x, norm_y)
        cut = self.boundary(split)
        child = np.empty_like(cx)
        child[:cut] = a1 * cx[:cut] + b1 * cy[:cut]
        child[cut:] = a2 * cx[cut:] + b2 * cy[cut:]
        return child.ravel().astype(np.float32)

    def to_plan(self, genome: np.ndarray, seed_paths: list[str]) -> dict[str, Any] | None:
        """The recipe as a merge plan: per block, a `linear` merge with the block's coefficients.

        Only for blocks made of whole tensors (`tensor` or `layer`); chunks cut through tensors.
        """
        if self.block_by is None or self.block_names is None:
            return None
        rows = [{"weights": [float(c) for c in row]} for row in self.coefficients(genome)]
        per_block, block_by = dict(zip(self.block_names, rows)), self.block_by
        if len(per_block) < len(rows):  # a block in two ranges (`lm_head` sorts before the layers): one per tensor
            per_block, block_by = {name: rows[pieces[0][0]] for name, pieces in self.pieces.items()}, "tensor"
        return {
            "method": {"name": "linear", **rows[0]},
            "models": list(seed_paths),
            "blocks": per_block,
            "block_by": block_by,
        }

    def mutate(self, genome: np.ndarray, std: float, generator: torch.Generator) -> np.ndarray:
        """Noise on the coefficients (weights themselves cannot be mutated and stay a recipe)."""
        noise = torch.randn(genome.shape[0], generator=generator).numpy() * std
        return (genome + noise).astype(np.float32)


@SPACES.register(
    "recipe", RecipeOptions, "per-block coefficients over the seed models (kilobyte archives)", tags={"variation"}
)
def build_recipe_space(options: RecipeOptions, layout: Layout, seeds: SeedModels) -> RecipeSpace:
    if len(seeds) < 2:
        raise SpecError(
            "space.name", f"'recipe' merges seed models and needs at least 2, models.init gives {len(seeds)}"
        )
    blocks = named_blocks(layout, options)
    names = None if options.blocks == "chunks" else [name for name, _, _ in blocks]
    by = None if options.blocks == "chunks" else options.blocks
    return RecipeSpace(layout, seeds, [(a, b) for _, a, b in blocks], names, by)
