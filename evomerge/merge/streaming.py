"""Merging checkpoints on disk tensor by tensor: N models are never all in memory.

Peak memory is the N + 1 input tensors and the output of the largest tensor; methods with
model-wide statistics (whole-model TIES thresholds, whole-model SLERP angle) read the inputs twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from evomerge.errors import EvomergeError, ShapeMismatchError
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
    dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
    fishers: list[Checkpoint] | None = None,
) -> Path:
    """Validate everything that needs no tensor data, then stream the merge into `out`.

    `block_methods` replace `method` on the named blocks of `blocks` (default: blocks by layer); a block's
    method with model-wide options (`scope: model`) computes them over the whole model with its own options.
    Floating-point tensors are read in `dtype` and written in `out_dtype` (defaults: the input's, then `dtype`), as
    mergekit's `dtype` and `out_dtype` have it; the arithmetic itself is float32. `fishers` (one per model, read
    tensor by tensor too) are the diagonal Fisher files the `fisher` method weighs the models with.
    """
    reference = base if base is not None else models[0]
    names = reference.names()
    engine = MergeEngine(method, names, blocks or BlockMap.by_layer(names), block_methods)
    engine.check_models(base is not None, len(models))
    check_compatible([reference, *[m for m in models if m is not reference]])

    def cast(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor

    def read(name: str) -> TensorGroup:
        return TensorGroup(name, None if base is None else cast(base.read(name)), [cast(m.read(name)) for m in models])

    engine.tied = find_tied(names, read)
    if fishers is not None:
        check_fishers(fishers, reference, [n for n in names if n not in engine.tied], len(models))

    def stored(name: str) -> torch.dtype:
        kept = reference.dtype(name)
        return (out_dtype or dtype or kept) if kept.is_floating_point else kept

    entries = [(n, reference.shape(n), stored(n)) for n in names]
    per_model = None if fishers is None else (lambda name: [f.read(name) for f in fishers])
    tensors = ((n, t.to(stored(n))) for n, t in engine.merged(read, per_model))
    copy = reference.config_files() or next((m.config_files() for m in models if m.config_files()), [])
    return write_checkpoint(out, entries, tensors, max_shard_bytes, copy, extra_files, metadata)


def check_fishers(fishers: list[Checkpoint], reference: Checkpoint, names: list[str], n_models: int) -> None:
    """One Fisher file per model, each with every merged tensor in the models' shape (a tied head is merged under
    its embedding's name, so it may be absent), before anything is written."""
    if len(fishers) != n_models:
        raise EvomergeError(f"fishers: got {len(fishers)} Fisher files for {n_models} models, need one per model")
    for fisher in fishers:
        held = set(fisher.names())
        for name in names:
            if name not in held:
                raise ShapeMismatchError(f"Fisher file {fisher.path} has no tensor {name!r}")
            if fisher.shape(name) != reference.shape(name):
                raise ShapeMismatchError(
                    f"tensor {name!r} has shape {fisher.shape(name)} in Fisher file {fisher.path} "
                    f"and {reference.shape(name)} in {reference.path}"
                )
