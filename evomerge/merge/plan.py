"""A fixed merge read from YAML (`evomerge merge PLAN.yaml --out DIR`): method, base, models.

method: {name: ties, density: 0.2}     # any registered merge method and its options
base: checkpoints/base                  # optional; task-vector methods need it
models: [checkpoints/math, checkpoints/code]
allow_pickle: false                     # read .bin/.pt only through torch.load(weights_only=True)
max_shard_size: 5GB
conventions: mergekit                   # optional: mergekit 0.1.5's conventions for the methods that differ
dtype: float32                          # optional: read (and write) floating tensors in this dtype
out_dtype: bfloat16                     # optional: write them in this dtype
fishers: [fisher/math.safetensors, ...] # the `fisher` method's Fisher files, one per model, or instead:
fisher_estimate: {spec: spec.yaml, examples: 512, subsets: [math, code]}   # computed (cached) by `evomerge fisher`

A mergekit config (it names `merge_method`) is read as the plan it translates to (`evomerge.merge.mergekit`).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from evomerge.errors import SpecError
from evomerge.merge.base import MERGE_METHODS, Conventions
from evomerge.merge.mergekit import from_mergekit, is_mergekit_config
from evomerge.merge.streaming import merge_checkpoints
from evomerge.registry import Component
from evomerge.schema import parse, require
from evomerge.weights.blocks import block_map, check_block_options
from evomerge.weights.checkpoint import Checkpoint
from evomerge.yaml_io import dump_plain_yaml, read_yaml_mapping

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*$", re.IGNORECASE)


def parse_size(text: str, path: str = "max_shard_size") -> int:
    match = _SIZE.match(text)
    if not match:
        raise SpecError(path, f"got {text!r}, expected a size such as 500MB or 5GB")
    return int(float(match.group(1)) * 1024 ** " KMGT".index(match.group(2).upper() or " "))


@dataclass
class FisherEstimate:
    """Fisher files computed from a search spec's evaluator, one per model, as `evomerge fisher` computes them (and
    through the same cache); `subsets` name the part of the search split each model was trained for."""

    spec: str
    examples: int | None = None
    seed: int = 0
    subsets: list[str] | None = None

    def check(self, path: str) -> None:
        if self.examples is not None:
            require(self.examples >= 1, f"{path}.examples", f"got {self.examples}, must be >= 1")


@dataclass
class _RawPlan:
    method: Any
    models: list[str]
    base: str | None = None
    allow_pickle: bool = False
    max_shard_size: str = "5GB"
    blocks: dict[str, dict[str, Any]] = field(default_factory=dict)
    block_by: Literal["layer", "tensor"] = "layer"
    regex: str | None = None
    layer_granularity: int = 1
    filters: list[str] = field(default_factory=list)
    conventions: Conventions | None = None
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    out_dtype: Literal["float32", "float16", "bfloat16"] | None = None
    fishers: list[str] | None = None
    fisher_estimate: FisherEstimate | None = None

    def check(self, path: str) -> None:
        require(len(self.models) >= 1, "models", "needs at least one model path")
        check_block_options(path, self.block_by, self.layer_granularity, self.filters)
        require(self.fishers is None or self.fisher_estimate is None, "fishers", "give fishers or fisher_estimate")
        subsets = None if self.fisher_estimate is None else self.fisher_estimate.subsets
        for name, values in (("fishers", self.fishers), ("fisher_estimate.subsets", subsets)):
            if values is not None:
                require(len(values) == len(self.models), name, f"got {len(values)}, need one per model")


@dataclass
class MergePlan:
    method: Component
    models: list[Path]
    base: Path | None = None
    allow_pickle: bool = False
    max_shard_bytes: int = 5 * 2**30
    block_methods: dict[str, Component] = field(default_factory=dict)
    block_by: str = "layer"
    regex: str | None = None
    layer_granularity: int = 1
    filters: list[str] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)
    dtype: torch.dtype | None = None
    out_dtype: torch.dtype | None = None
    extra_files: dict[str, str] = field(default_factory=dict)
    fishers: list[Path] | None = None
    fisher_estimate: FisherEstimate | None = None

    @classmethod
    def load(cls, path: str | Path, allow_pickle: bool = False) -> MergePlan:
        """An evomerge plan, or a mergekit config (detected by its `merge_method`) translated into one."""
        data = read_yaml_mapping(path, "merge plan")
        extra = {}
        if is_mergekit_config(data):
            extra["mergekit.yaml"] = Path(path).read_text()
            data = from_mergekit(data, allow_pickle)
        raw = parse(_RawPlan, data)
        method = MERGE_METHODS.resolve(_with_conventions(raw.method, raw.conventions), "method")
        block_methods = {
            block: MERGE_METHODS.resolve(
                _with_conventions(_block_override(method, override), raw.conventions), f"blocks.{block}"
            )
            for block, override in raw.blocks.items()
        }
        uses_fisher = "fisher" in {method.name, *(m.name for m in block_methods.values())}
        given = raw.fishers is not None or raw.fisher_estimate is not None
        if uses_fisher and not given:
            raise SpecError(
                "fishers",
                "method 'fisher' needs Fisher files: fishers: [one per model] or fisher_estimate: {spec: SPEC.yaml}",
            )
        if given and not uses_fisher:
            raise SpecError(
                "fishers" if raw.fishers is not None else "fisher_estimate", "only method 'fisher' uses them"
            )
        return cls(
            method=method,
            block_methods=block_methods,
            block_by=raw.block_by,
            regex=raw.regex,
            layer_granularity=raw.layer_granularity,
            filters=raw.filters,
            models=[Path(m) for m in raw.models],
            base=None if raw.base is None else Path(raw.base),
            allow_pickle=raw.allow_pickle,
            max_shard_bytes=parse_size(raw.max_shard_size),
            source=data,
            dtype=None if raw.dtype is None else getattr(torch, raw.dtype),
            out_dtype=None if raw.out_dtype is None else getattr(torch, raw.out_dtype),
            extra_files=extra,
            fishers=None if raw.fishers is None else [Path(f) for f in raw.fishers],
            fisher_estimate=raw.fisher_estimate,
        )

    def run(self, out: str | Path) -> Path:
        models = [Checkpoint.open(p, self.allow_pickle) for p in self.models]
        base = None if self.base is None else Checkpoint.open(self.base, self.allow_pickle)
        plan_text = dump_plain_yaml(self.source)
        names = (base or models[0]).names()
        blocks = block_map(names, self.block_by, self.regex, self.layer_granularity, self.filters)
        return merge_checkpoints(
            self.method,
            models,
            out,
            base=base,
            max_shard_bytes=self.max_shard_bytes,
            metadata={"evomerge_method": self.method.name},
            extra_files={"merge_plan.yaml": plan_text, **self.extra_files},
            block_methods=self.block_methods,
            blocks=blocks,
            dtype=self.dtype,
            out_dtype=self.out_dtype,
            fishers=self.fisher_files(),
        )

    def fisher_files(self) -> list[Checkpoint] | None:
        """The plan's Fisher files, estimated first (or found in the cache) when it names a spec to estimate them."""
        paths = self.fishers
        if self.fisher_estimate is not None:
            from evomerge.fisher import estimate_fishers
            from evomerge.spec import load_spec

            est = self.fisher_estimate
            evaluator = load_spec(est.spec).evaluator
            paths = [f.path for f in estimate_fishers(evaluator, self.models, est.examples, est.seed, est.subsets)]
        return None if paths is None else [Checkpoint.open(p) for p in paths]


def _with_conventions(method: Any, conventions: str | None) -> Any:
    """A method block with the plan's `conventions` added, for the methods that have that option."""
    block = {"name": method} if isinstance(method, str) else method
    if conventions is None or not isinstance(block, dict) or "conventions" in block or "name" not in block:
        return method
    options = MERGE_METHODS.entry(block["name"], "method.name").options
    if dataclasses.is_dataclass(options) and "conventions" in {f.name for f in dataclasses.fields(options)}:
        return {**block, "conventions": conventions}
    return method


def _block_override(method: Component, override: Any) -> Any:
    """A block's method: the global one with some options changed, or (naming another method) its own."""
    if isinstance(override, dict) and override.get("name", method.name) == method.name:
        return {**method.to_plain(), **override}
    return override
