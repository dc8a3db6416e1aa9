"""Merging checkpoints on disk tensor by tensor: N models are never all in memory.

Peak memory is the N + 1 input tensors and the output of the largest tensor; methods with
model-wide statistics (whole-model TIES thresholds, whole-model SLERP angle) read the inputs twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evomerge.merge.base import Component, TensorGroup
from evomerge.merge.engine import MergeEngine, find_tied
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

    `block_methods` replace `method` on the named blocks of `blocks` (default: blocks by layer); a block's
    method with model-wide options (`scope: model`) computes them over the whole model with its own options.
    """
    reference = base if base is not None else models[0]
    names = reference.names()
    engine = MergeEngine(method, names, blocks or BlockMap.by_layer(names), block_methods)
    engine.check_models(base is not None, len(models))
    check_compatible([reference, *[m for m in models if m is not reference]])

    def read(name: str) -> TensorGroup:
        return TensorGroup(name, None if base is None else base.read(name), [m.read(name) for m in models])

    engine.tied = find_tied(names, read)

    entries = [(n, reference.shape(n), reference.dtype(n)) for n in names]
    copy = reference.config_files() or next((m.config_files() for m in models if m.config_files()), [])
    return write_checkpoint(out, entries, engine.merged(read), max_shard_bytes, copy, extra_files, metadata)
