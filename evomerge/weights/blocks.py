"""Blocks: named groups of tensors that share one gene (a coefficient, a density, a split boundary).

By default a tensor's block is its layer, read from the common naming schemes (`layers.N`,
`layer.N`, `h.N`, `blocks.N`, `block.N`); tensors outside any layer form the blocks `embed` (input
embeddings, known by name) and `head` (the rest: final norm, output head, pooler, classifier). A user
regex with one group overrides the layer names. Names, not the order a file lists them in, decide:
safetensors sorts names, so `lm_head` comes before `model.layers` there, and the search and a merge
plan read the same model in different orders.
Groups of layers and filters by tensor name (attention, MLP, norms) make coarser or finer blocks.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from evomerge.errors import EvomergeError

LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
# `embed_tokens`, `embeddings`, `embed_in`, GPT-2's `wte` and `wpe`; not GPT-NeoX's output head `embed_out`
EMBED_PATTERN = re.compile(r"embed(?!_out)|(?:^|\.)(?:wte|wpe)(?:\.|$)")


def layer_index(name: str, pattern: re.Pattern[str] = LAYER_PATTERN) -> int | None:
    match = pattern.search(name)
    return None if match is None else int(match.group(1))


@dataclass(frozen=True)
class BlockMap:
    """Block of each tensor (in tensor order), the blocks in depth order, and each tensor's layer."""

    tensor_blocks: dict[str, str]
    blocks: tuple[str, ...]
    layers: dict[str, int]  # tensor -> its layer index (tensors inside layers only); for depth schedules (LiNeS)
    n_layers: int

    @classmethod
    def by_layer(
        cls, names: list[str], regex: str | None = None, granularity: int = 1, filters: Sequence[str] = ()
    ) -> BlockMap:
        pattern = LAYER_PATTERN if regex is None else _compile(regex)
        return cls.from_layers(names, {name: layer_index(name, pattern) for name in names}, None, granularity, filters)

    @classmethod
    def from_layers(
        cls,
        names: list[str],
        layers_of: dict[str, int | None],
        n_layers: int | None = None,
        granularity: int = 1,
        filters: Sequence[str] = (),
    ) -> BlockMap:
        """Blocks from each tensor's layer index (None outside layers).

        `granularity` consecutive layers form one block (`layers.0-3`; `layer.N` when 1), and `filters`
        split each such block by tensor name (`layer.2.self_attn`, `layer.2.mlp`, `layer.2.other`: the
        first filter a name contains), as mergekit-evolve's genome has it. The one layer-counting rule: a
        model has largest index + 1 layers (a selection of layers keeps the model's depth), unless told.
        """
        if granularity < 1:
            raise EvomergeError(f"layer_granularity must be >= 1, got {granularity}")
        found = sorted({i for i in layers_of.values() if i is not None})
        depth = n_layers if n_layers is not None else (found[-1] + 1 if found else 0)

        def group(index: int) -> str:
            if granularity == 1:
                return f"layer.{index}"
            start = index // granularity * granularity
            return f"layers.{start}-{min(start + granularity, max(depth, found[-1] + 1)) - 1}"

        def block_of(name: str, index: int) -> str:
            if not filters:
                return group(index)
            part = next((f for f in filters if f in name), "other")
            return f"{group(index)}.{part}"

        def outside(name: str) -> str:
            """By name, so that every order of the same names gives the same blocks; a model without layers has
            nothing after them, so no head."""
            return "head" if found and EMBED_PATTERN.search(name) is None else "embed"

        tensor_blocks = {n: outside(n) if layers_of[n] is None else block_of(n, layers_of[n]) for n in names}
        parts = [*filters, "other"] if filters else [None]
        inner = [g if part is None else f"{g}.{part}" for g in dict.fromkeys(group(i) for i in found) for part in parts]
        used = set(tensor_blocks.values())
        order = [b for b in ["embed", *inner, "head"] if b in used]
        layers = {name: index for name, index in layers_of.items() if index is not None}
        return cls(tensor_blocks, tuple(order), layers, depth)

    @classmethod
    def per_tensor(cls, names: list[str]) -> BlockMap:
        return cls({n: n for n in names}, tuple(names), {}, 0)

    def index(self, name: str) -> int:
        return self.blocks.index(self.tensor_blocks[name])


def _compile(regex: str) -> re.Pattern[str]:
    try:
        pattern = re.compile(regex)
    except re.error as err:
        raise EvomergeError(f"blocks.regex {regex!r} is not a valid regular expression: {err}") from err
    if pattern.groups != 1:
        raise EvomergeError(f"blocks.regex {regex!r} must have exactly one group (the layer index)")
    return pattern


def block_map(
    names: list[str], by: str, regex: str | None = None, granularity: int = 1, filters: Sequence[str] = ()
) -> BlockMap:
    """The blocks a space or a merge plan asks for: by layer (grouped and filtered) or one per tensor."""
    return BlockMap.by_layer(names, regex, granularity, filters) if by == "layer" else BlockMap.per_tensor(names)


def check_block_options(path: str, by: str, granularity: int, filters: Sequence[str]) -> None:
    """Granularity and filters are refused where blocks are not layers, and filters must be distinct names."""
    from evomerge.schema import require

    at = f"{path}." if path else ""
    require(granularity >= 1, f"{at}layer_granularity", f"got {granularity}, must be >= 1")
    if by != "layer":
        require(granularity == 1, f"{at}layer_granularity", f"groups layers, so it needs blocks by layer, not {by!r}")
        require(not filters, f"{at}filters", f"split layer blocks, so they need blocks by layer, not {by!r}")
    require(len(set(filters)) == len(filters) and all(filters), f"{at}filters", f"got {filters}, need distinct names")
    require("other" not in filters, f"{at}filters", "'other' is the block of the tensors no filter matches")
