"""A fixed merge read from YAML (`evomerge merge PLAN.yaml --out DIR`): method, base, models.

method: {name: ties, density: 0.2}     # any registered merge method and its options
base: checkpoints/base                  # optional; task-vector methods need it
models: [checkpoints/math, checkpoints/code]
allow_pickle: false                     # read .bin/.pt only through torch.load(weights_only=True)
max_shard_size: 5GB
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from evomerge.errors import SpecError
from evomerge.merge.base import MERGE_METHODS
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

    def check(self, path: str) -> None:
        require(len(self.models) >= 1, "models", "needs at least one model path")
        check_block_options(path, self.block_by, self.layer_granularity, self.filters)


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

    @classmethod
    def load(cls, path: str | Path) -> MergePlan:
        data = read_yaml_mapping(path, "merge plan")
        raw = parse(_RawPlan, data)
        method = MERGE_METHODS.resolve(raw.method, "method")
        block_methods = {
            block: MERGE_METHODS.resolve(_block_override(method, override), f"blocks.{block}")
            for block, override in raw.blocks.items()
        }
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
            extra_files={"merge_plan.yaml": plan_text},
            block_methods=self.block_methods,
            blocks=blocks,
        )


def _block_override(method: Component, override: Any) -> Any:
    """A block's method: the global one with some options changed, or (naming another method) its own."""
    if isinstance(override, dict) and override.get("name", method.name) == method.name:
        return {**method.to_plain(), **override}
    return override
