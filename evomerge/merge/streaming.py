"""Merging checkpoints on disk tensor by tensor: N models are never all in memory.

Peak memory is the N + 1 input tensors and the output of the largest tensor; methods with
model-wide statistics (whole-model TIES thresholds, whole-model SLERP angle) read the inputs twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from evomerge.errors import EvomergeError
from evomerge.merge.base import Component, MergeContext, TensorGroup, as_merger
from evomerge.weights.blocks import BlockMap
from evomerge.weights.checkpoint import Checkpoint, check_compatible, write_checkpoint


def merge_checkpoints(
    method: Component | dict[str, Any] | str,
    models: list[Checkpoint],
    out: str | Path,
    base: Checkpoint | None = None,
    max_shard_bytes: int = 5 * 2**30,
    metadata: dict[str, str] | None = None,
    extra_files: dict[str, str] | None = None,
    block_methods: dict[str, Component] | None = None,
    blocks: BlockMap | None = None,
) -> Path:
    """Validate everything that needs no tensor data, then stream the merge into `out`.

    `block_methods` replace `method` on the named blocks of `blocks` (default: blocks by layer).
    """
    merger = as_merger(method)
    reference = base if base is not None else models[0]
    names = reference.names()
    blocks = blocks or BlockMap.by_layer(names)
    per_block = {b: as_merger(c, f"blocks.{b}") for b, c in (block_methods or {}).items()}
    for block, block_merger in per_block.items():
        if block not in blocks.blocks:
            raise EvomergeError(f"blocks.{block}: no such block; the model's blocks: {', '.join(blocks.blocks)}")
        if block_merger.needs_prepare:
            raise EvomergeError(f"blocks.{block}: model-wide options (scope: model) cannot differ per block")
    for m in [merger, *per_block.values()]:
        m.check_models(base is not None, len(models))
    check_compatible([reference, *[m for m in models if m is not reference]])

    def groups() -> Iterator[TensorGroup]:
        for name in names:
            yield TensorGroup(name, None if base is None else base.read(name), [m.read(name) for m in models])

    stats = merger.prepare(groups()) if merger.needs_prepare else None

    def merged() -> Iterator[tuple[str, torch.Tensor]]:
        for group in groups():
            layer = blocks.depth.get(blocks.tensor_blocks[group.name])
            context = MergeContext(layer=layer, num_layers=blocks.n_layers or None, model_stats=stats)
            chosen = per_block.get(blocks.tensor_blocks[group.name], merger)
            yield group.name, chosen(group.name, group.base, group.tensors, context)

    entries = [(n, reference.shape(n), reference.dtype(n)) for n in names]
    copy = reference.config_files() or next((m.config_files() for m in models if m.config_files()), [])
    return write_checkpoint(out, entries, merged(), max_shard_bytes, copy, extra_files, metadata)
