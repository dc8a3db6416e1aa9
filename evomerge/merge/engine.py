"""The one per-block merge loop: in-memory state dicts, checkpoints streamed from disk and the `merge`
space's candidates all go through `MergeEngine`.

It walks the tensors in order, gives each the merger of its block (a method may differ per block),
its layer and the model's layer count from one `BlockMap` (one layer-counting rule everywhere),
and first runs the `prepare` pass of every method whose statistics span the whole model (TIES with
`scope: model`, whole-model SLERP). A block's method with model-wide options computes them over the
whole model with that block's options.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from evomerge.errors import EvomergeError
from evomerge.merge.base import (
    Component,
    Kernel,
    MergeContext,
    Merger,
    TensorGroup,
    as_merger,
    check_same_layout,
    label_of,
    layer_index_from_name,
    sum_scratch,
    weighted_sum_into,
)
from evomerge.weights.blocks import BlockMap

Reader = Callable[[str], TensorGroup]  # a tensor name -> the base's tensor (or None) and the models'


HEAD_SUFFIXES = ("lm_head.weight", "embed_out.weight")  # output projections that models tie to their embeddings
EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")


def find_tied(names: Sequence[str], read: Reader) -> dict[str, str]:
    """Output heads equal to the input embedding in every model (tied embeddings, saved under both names):
    head name -> embedding name. They are merged once, so the result stays tied (DARE's masks, for one,
    depend on the tensor's name)."""
    embeds = [n for n in names if n.endswith(EMBED_SUFFIXES)]
    tied: dict[str, str] = {}
    for head in (n for n in names if n.endswith(HEAD_SUFFIXES)):
        h = read(head)
        for embed in embeds:
            e = read(embed)
            pairs = [(h.base, e.base)] if h.base is not None and e.base is not None else []
            pairs += list(zip(h.tensors, e.tensors))
            if all(a.shape == b.shape and torch.equal(a, b) for a, b in pairs):
                tied[head] = embed
                break
    return tied


def _options_key(merger: Merger) -> tuple[str, str]:
    """Two mergers with the same method and options compute the same model-wide statistics."""
    return merger.method, repr(merger.options)


class MergeEngine:
    def __init__(
        self,
        method: Any,
        names: Sequence[str],
        blocks: BlockMap | None = None,
        block_methods: Mapping[str, Any] | None = None,
        tied: Mapping[str, str] | None = None,
    ):
        """`method` is any form `as_merger` takes; `block_methods` replace it on the named blocks of `blocks`
        (default: blocks by layer); `tied` maps a tensor to the one it is tied to (see `find_tied`), whose merge
        it takes, under that tensor's block."""
        self.names = list(names)
        self.tied = dict(tied or {})
        self.blocks = blocks or BlockMap.by_layer(self.names)
        self.default = as_merger(method)
        self.per_block: dict[str, Merger] = {}
        for block, chosen in (block_methods or {}).items():
            if block not in self.blocks.blocks:
                raise EvomergeError(
                    f"blocks.{block}: no such block; the model's blocks: {', '.join(self.blocks.blocks)}"
                )
            self.per_block[block] = as_merger(chosen, f"blocks.{block}")

    def merger_of(self, name: str) -> Merger:
        return self.per_block.get(self.blocks.tensor_blocks[name], self.default)

    def used_mergers(self) -> list[Merger]:
        overridden = {self.blocks.tensor_blocks[n] for n in self.names} <= self.per_block.keys()
        return ([] if overridden else [self.default]) + list(self.per_block.values())

    def check_models(self, has_base: bool, count: int) -> None:
        """Errors that depend only on what was given (a base, the model count), before any tensor is read."""
        for merger in [self.default, *self.per_block.values()]:
            merger.check_models(has_base, count)

    def context(self, name: str, stats: Any = None, fisher: Sequence[Tensor] | None = None) -> MergeContext:
        return MergeContext(self.blocks.layers.get(name), self.blocks.n_layers or None, fisher, stats)

    def merged(
        self,
        read: Reader,
        fishers: Callable[[str], Sequence[Tensor]] | None = None,
        out: Mapping[str, Tensor] | None = None,
    ) -> Iterator[tuple[str, Tensor]]:
        """(name, merged tensor) in tensor order; `read` is called twice per tensor when a method needs a
        model-wide pass (streaming callers re-read from disk rather than keep the model in memory).

        With `out` (a candidate's buffers), each tensor is written there, in its dtype, and yielded from there; a
        method that is a weighted sum of its inputs is summed straight into it, with no float32 copies."""
        own = [name for name in self.names if name not in self.tied]  # a tied tensor counts once
        stats: dict[tuple[str, str], Any] = {}
        for merger in self.used_mergers():
            key = _options_key(merger)
            if merger.needs_prepare and key not in stats:
                stats[key] = merger.prepare(read(name) for name in own)
        scratch: list[Tensor] = []  # weighted_sum_into's buffer, made on the first weighted sum

        def merge(name: str) -> Tensor:
            group = read(name)
            merger = self.merger_of(name)
            context = self.context(name, stats.get(_options_key(merger)), None if fishers is None else fishers(name))
            weights = None if out is None else merger.linear_weights(name, group.base, group.tensors, context)
            if weights is not None:
                if not scratch:
                    scratch.append(sum_scratch(out[name].device))
                inputs = group.tensors if group.base is None else [group.base, *group.tensors]
                return weighted_sum_into(out[name], inputs, weights, scratch[0])
            merged = merger(name, group.base, group.tensors, context)
            return merged if out is None else out[name].copy_(merged)

        shared: dict[str, Tensor] = {}  # merged tensors another one is tied to
        sources = set(self.tied.values())
        for name in self.names:
            source = self.tied.get(name)
            if source is not None:
                if source not in shared:
                    shared[source] = merge(source)
                yield name, shared[source].clone() if out is None else out[name].copy_(shared[source])
            elif name in shared:
                yield name, shared.pop(name)
            else:
                merged = merge(name)
                if name in sources:
                    shared[name] = merged
                yield name, merged


def merge_state_dicts(
    method: Merger | Component | Mapping[str, Any] | str | Kernel,
    base_sd: Mapping[str, Tensor] | None,
    sds: Sequence[Mapping[str, Tensor]],
    *,
    fishers: Sequence[Mapping[str, Tensor]] | None = None,
    layer_of: Callable[[str], int | None] | Mapping[str, int] = layer_index_from_name,
    num_layers: int | None = None,
) -> dict[str, Tensor]:
    """Merge in-memory state dicts tensor by tensor, in the order of the base (or the first model).

    Everything that can be checked without reading values (method options, base, counts, names, shapes) is
    checked before the first tensor is merged. `layer_of` and `num_layers` feed depth schedules (LiNeS);
    `num_layers` defaults to one more than the largest layer index found.
    """
    merger = as_merger(method)
    merger.check_models(base_sd is not None, len(sds))
    ref_label, reference = ("the base model", base_sd) if base_sd is not None else ("models[0]", sds[0])
    check_same_layout(reference, ref_label, [(label_of(i), sd) for i, sd in enumerate(sds)])
    if fishers is not None:
        if len(fishers) != len(sds):
            raise EvomergeError(f"method {merger.method!r}: got {len(fishers)} Fisher dicts for {len(sds)} models")
        check_same_layout(reference, ref_label, [(f"fishers[{i}]", f) for i, f in enumerate(fishers)])
    lookup = layer_of.get if isinstance(layer_of, Mapping) else layer_of
    names = list(reference)
    engine = MergeEngine(merger, names, BlockMap.from_layers(names, {n: lookup(n) for n in names}, num_layers))

    def read(name: str) -> TensorGroup:
        return TensorGroup(name, None if base_sd is None else base_sd[name], [sd[name] for sd in sds])

    engine.tied = find_tied(names, read)
    per_model_fisher = None if fishers is None else (lambda name: [f[name] for f in fishers])
    return dict(engine.merged(read, per_model_fisher))
