"""Merge hyper-parameters as genes: the operator and its knobs, globally, per model, per block or both.

A genome is a point in the unit cube. One gene picks the operator when several are listed; every
other gene is one value of a knob (`weights`, `scale`, `density`, `drop_rate`, `t`, …) mapped to
its range. The decoded model is the chosen operator applied tensor by tensor to the seed models,
with each tensor getting the knob values of its block. With `smooth`, per-block genes are anchors
over the layer groups and each layer gets the value interpolated at its depth (mergekit-evolve's
`smooth`), so neighbouring layers never jump from one group's value to the next.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from evomerge.errors import SpecError
from evomerge.merge.base import MERGE_METHODS, TensorGroup
from evomerge.merge.engine import MergeEngine, find_tied
from evomerge.registry import Component
from evomerge.schema import option_names, require
from evomerge.space import SPACES
from evomerge.space.base import WritesIntoBuffers
from evomerge.weights import Layout
from evomerge.weights.blocks import BlockMap, block_map, check_block_options
from evomerge.weights.checkpoint import Checkpoint
from evomerge.weights.seed_models import SeedModels, as_seed_models

Per = Literal["global", "model", "block", "model_block"]
PER_MODEL_KNOBS = ("weights", "density", "drop_rate")  # knobs that may hold one value per model


@dataclass
class GeneSpec:
    low: float = 0.0
    high: float = 1.0
    per: Per = "global"

    def check(self, path: str) -> None:
        require(self.low < self.high, f"{path}.high", f"got {self.high}, must be > low = {self.low}")


@dataclass
class MergeGenesOptions:
    methods: list[str] = field(default_factory=lambda: ["task_arithmetic"])
    base: int | None = 0
    blocks: Literal["layer", "tensor"] = "layer"
    regex: str | None = None
    layer_granularity: int = 1  # consecutive layers per block
    filters: list[str] = field(default_factory=list)  # split each layer block by tensor name, e.g. [self_attn, mlp]
    genes: dict[str, GeneSpec] = field(default_factory=lambda: {"scale": GeneSpec(0.0, 1.5)})
    fixed: dict[str, Any] = field(default_factory=dict)
    smooth: bool = False  # per-block genes: anchors over the layer groups, interpolated at each layer's depth
    fishers: list[str] = field(default_factory=list)  # method fisher: one Fisher file per merged seed model

    def check(self, path: str) -> None:
        require(len(self.methods) >= 1, f"{path}.methods", "needs at least one merge method")
        check_block_options(path, self.blocks, self.layer_granularity, self.filters)
        if self.smooth:
            require(
                self.blocks == "layer",
                f"{path}.smooth",
                f"interpolates across layers, so it needs blocks by layer, not {self.blocks!r}",
            )
            require(
                any(gene.per in ("block", "model_block") for gene in self.genes.values()),
                f"{path}.smooth",
                "interpolates per-block genes across layers, but no gene has per: block or model_block",
            )
        if "fisher" in self.methods:
            require(
                bool(self.fishers),
                f"{path}.fishers",
                "method 'fisher' needs one Fisher file per merged seed model (the seeds other than base), e.g. "
                "made by `evomerge fisher`",
            )
        else:
            require(not self.fishers, f"{path}.fishers", "only method 'fisher' uses them; list it in methods")
        for i, fisher in enumerate(self.fishers):
            require(Path(fisher).is_file(), f"{path}.fishers[{i}]", f"{fisher!r} is not a file")
        fields_of = {}
        for i, name in enumerate(self.methods):
            entry = MERGE_METHODS.entry(name, f"{path}.methods[{i}]")
            fields_of[name] = option_names(entry.options)
        for section in ("genes", "fixed"):
            for knob in getattr(self, section):
                owners = [m for m in self.methods if knob in fields_of[m]]
                allowed = sorted(set().union(*fields_of.values()) - {"method", "fixed"})
                require(
                    bool(owners),
                    f"{path}.{section}.{knob}",
                    f"no listed method has an option {knob!r}; their options: {', '.join(allowed)}",
                )
        for knob, gene in self.genes.items():
            if knob not in PER_MODEL_KNOBS:
                require(
                    gene.per in ("global", "block"),
                    f"{path}.genes.{knob}.per",
                    f"got {gene.per!r}; {knob!r} is one value per tensor, allowed: 'global', 'block'",
                )


class MergeGenesSpace(WritesIntoBuffers):
    """A box space: strategies see [0, 1]^dim; `decode` runs the merge the genes describe."""

    def __init__(self, options: MergeGenesOptions, layout: Layout, seeds: SeedModels | list[np.ndarray]):
        self.options = options
        self.layout = layout
        self.seeds = as_seed_models(seeds, layout)
        base_index = options.base
        if base_index is not None and not 0 <= base_index < len(self.seeds):
            raise SpecError("space.base", f"got {base_index}, the run has {len(self.seeds)} seed models")
        self.base_index = base_index
        self.model_indices = [i for i in range(len(self.seeds)) if i != base_index]
        names = list(layout.names)
        self.blockmap = block_map(names, options.blocks, options.regex, options.layer_granularity, options.filters)
        # the blocks the merge runs over: the genes' blocks, or with smooth every layer (split by the same filters)
        self.merge_blocks = block_map(names, "layer", options.regex, 1, options.filters) if options.smooth else None
        self.mix = self._interpolation()
        n_blocks, n_models = len(self.blockmap.blocks), len(self.model_indices)
        counts = {"global": 1, "model": n_models, "block": n_blocks, "model_block": n_models * n_blocks}
        self.choose_method = len(options.methods) > 1
        offset = int(self.choose_method)
        self.gene_slices: dict[str, slice] = {}
        for knob, gene in options.genes.items():
            self.gene_slices[knob] = slice(offset, offset + counts[gene.per])
            offset += counts[gene.per]
        self.dim = offset
        self.low, self.high = np.zeros(self.dim), np.ones(self.dim)
        self.fisher_files = self._check_fishers(options.fishers)

    @property
    def engine_blocks(self) -> BlockMap:
        return self.merge_blocks or self.blockmap

    def _interpolation(self) -> list[list[tuple[int, float]]]:
        """Per merge block, the gene blocks its values come from and their weights. Without smoothing, its own
        block. With it, a layer block's value is read off the gradient of its part's layer-group anchors (group g
        of K at depth g/(K-1)) at the layer's depth i/(L-1) (1 for a single layer), as mergekit reads a list of
        values over the layers; blocks outside the layers (`embed`, `head`) keep their own genes."""
        genes = self.blockmap
        if self.merge_blocks is None:
            return [[(b, 1.0)] for b in range(len(genes.blocks))]
        merge, n_layers = self.merge_blocks, self.merge_blocks.n_layers
        anchors: dict[str, set[int]] = {}  # a layer block's part ('' or '.mlp', ...) -> the gene blocks of that part
        place: dict[str, tuple[int, str] | int] = {}  # merge block -> (layer, part), or its own gene block
        for name, block in merge.tensor_blocks.items():
            layer = merge.layers.get(name)
            if layer is None:
                place[block] = genes.index(name)
            else:
                part = block.removeprefix(f"layer.{layer}")
                anchors.setdefault(part, set()).add(genes.index(name))
                place[block] = (layer, part)
        mix = []
        for block in merge.blocks:
            where = place[block]
            if isinstance(where, int):
                mix.append([(where, 1.0)])
                continue
            layer, part = where
            row = sorted(anchors[part])
            scaled = (layer / (n_layers - 1) if n_layers > 1 else 1.0) * (len(row) - 1)
            low = int(scaled)
            frac = scaled - low
            mix.append([(row[low], 1.0)] if frac == 0 else [(row[low], 1.0 - frac), (row[low + 1], frac)])
        return mix

    def _check_fishers(self, paths: list[str]) -> list[Checkpoint]:
        """The Fisher files, checked before the search: one per merged seed model, each with every merged tensor in
        the seeds' shape (a tied head is merged under its embedding's name, so it may be absent)."""
        if not paths:
            return []
        n = len(self.model_indices)
        require(
            len(paths) == n,
            "space.fishers",
            f"got {len(paths)} Fisher files for {n} merged seed models (the seeds other than base); need one each",
        )
        files = [Checkpoint.open(p) for p in paths]
        for i, fisher in enumerate(files):
            held = set(fisher.names())
            for name, shape in zip(self.layout.names, self.layout.shapes):
                if name in self.tied:
                    continue
                require(name in held, f"space.fishers[{i}]", f"{paths[i]!r} has no tensor {name!r}")
                require(
                    tuple(fisher.shape(name)) == tuple(shape),
                    f"space.fishers[{i}]",
                    f"tensor {name!r} has shape {tuple(fisher.shape(name))} in {paths[i]!r}, the seeds' is {shape}",
                )
        return files

    @cached_property
    def _fisher_tensors(self) -> list[dict[str, torch.Tensor]]:
        """Resident seeds get their Fisher tensors resident too (read once, float32, on their device)."""
        device = self.seeds.device
        names = [n for n in self.layout.names if n not in self.tied]
        return [{n: f.read(n).to(device=device, dtype=torch.float32) for n in names} for f in self.fisher_files]

    def fishers(self, name: str) -> list[torch.Tensor]:
        """Each merged model's Fisher tensor `name`, from memory where the seeds are resident, else from the files."""
        if self.seeds.device is None:
            return [f.read(name) for f in self.fisher_files]
        return [tensors[name] for tensors in self._fisher_tensors]

    @cached_property
    def tied(self) -> dict[str, str]:
        """Found when the first candidate is merged (reading the heads and embeddings), not in a driver that never
        merges."""
        return find_tied(list(self.layout.names), self.read)

    def initial(self) -> list[np.ndarray]:
        return [np.full(self.dim, 0.5, dtype=np.float32)]

    def method_of(self, genome: np.ndarray) -> str:
        if not self.choose_method:
            return self.options.methods[0]
        methods = self.options.methods
        return methods[min(len(methods) - 1, int(float(genome[0]) * len(methods)))]

    def knobs(self, genome: np.ndarray, block: int, method: str | None = None) -> dict[str, Any]:
        """The option values merge block `block` (of `engine_blocks`) gets: genes mapped to their ranges (with
        smooth, interpolated at its layer), plus the fixed options, keeping only those the method has (a `density`
        gene means nothing to task arithmetic)."""
        values: dict[str, Any] = dict(self.options.fixed)
        n_models, n_blocks = len(self.model_indices), len(self.blockmap.blocks)

        def at(per_block: np.ndarray) -> float:
            return float(sum(weight * per_block[gene_block] for gene_block, weight in self.mix[block]))

        for knob, gene in self.options.genes.items():
            raw = np.clip(np.asarray(genome[self.gene_slices[knob]], dtype=np.float64), 0.0, 1.0)
            mapped = gene.low + raw * (gene.high - gene.low)
            if gene.per == "global":
                value: Any = float(mapped[0])
            elif gene.per == "block":
                value = at(mapped)
            elif gene.per == "model":
                value = [float(v) for v in mapped]
            else:
                value = [at(row) for row in mapped.reshape(n_models, n_blocks)]
            if knob == "weights" and not isinstance(value, list):
                value = [value] * n_models
            values[knob] = value
        fields = option_names(MERGE_METHODS.entry(method or self.method_of(genome), "space").options)
        return {k: v for k, v in values.items() if k in fields}

    def merge_component(self, genome: np.ndarray, block: int) -> Component:
        method = self.method_of(genome)
        return MERGE_METHODS.resolve({"name": method, **self.knobs(genome, block, method)}, "space")

    def to_plan(self, genome: np.ndarray, seed_paths: list[str]) -> dict[str, Any]:
        """A merge plan (`evomerge merge`) that applies this genome's merge to the seed checkpoints."""
        base_index = self.options.base
        blocks = self.engine_blocks.blocks
        per_block = {block: self.knobs(genome, i) for i, block in enumerate(blocks)}
        method = self.method_of(genome)
        plan: dict[str, Any] = {
            "method": {"name": method, **per_block[blocks[0]]},
            "models": [p for i, p in enumerate(seed_paths) if i != base_index],
            "blocks": per_block,
            "block_by": self.options.blocks,
        }
        if base_index is not None:
            plan["base"] = seed_paths[base_index]
        if self.merge_blocks is None and self.options.layer_granularity != 1:  # a smoothed plan has a block per layer
            plan["layer_granularity"] = self.options.layer_granularity
        for key in ("regex", "filters"):
            if getattr(self.options, key) not in (None, []):
                plan[key] = getattr(self.options, key)
        if method == "fisher":
            plan["fishers"] = [str(Path(p).resolve()) for p in self.options.fishers]
        return plan

    def engine(self, genome: np.ndarray) -> MergeEngine:
        blocks = self.engine_blocks
        per_block = {name: self.merge_component(genome, b) for b, name in enumerate(blocks.blocks)}
        return MergeEngine(per_block[blocks.blocks[0]], list(self.layout.names), blocks, per_block, self.tied)

    def tensors(self, genome: np.ndarray) -> Iterator[tuple[str, torch.Tensor]]:
        return self.engine(genome).merged(self.read, self._fisher_reader())

    def write(self, genome: np.ndarray, out: dict[str, torch.Tensor]) -> None:
        for _ in self.engine(genome).merged(self.read, self._fisher_reader(), out=out):
            pass

    def _fisher_reader(self) -> Callable[[str], list[torch.Tensor]] | None:
        return self.fishers if self.fisher_files else None

    def read(self, name: str) -> TensorGroup:
        base = None if self.base_index is None else self.seeds.tensor(self.base_index, name)
        return TensorGroup(name, base, [self.seeds.tensor(k, name) for k in self.model_indices])


@SPACES.register("merge", MergeGenesOptions, "merge operator and its knobs as genes in [0, 1]^d", tags={"box"})
def build_merge_genes_space(options: MergeGenesOptions, layout: Layout, seeds: SeedModels) -> MergeGenesSpace:
    return MergeGenesSpace(options, layout, seeds)
