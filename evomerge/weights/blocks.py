"""Blocks: named groups of tensors that share one gene (a coefficient, a density, a split boundary).

By default a tensor's block is its layer, read from the common naming schemes (`layers.N`,
`layer.N`, `h.N`, `blocks.N`, `block.N`); tensors outside any layer form the blocks `embed`
(before the first layer) and `head` (after the last). A user regex with one group overrides this.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from evomerge.errors import EvomergeError

LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


def layer_index(name: str, pattern: re.Pattern[str] = LAYER_PATTERN) -> int | None:
    match = pattern.search(name)
    return None if match is None else int(match.group(1))


@dataclass(frozen=True)
class BlockMap:
    """Block of each tensor (in tensor order) and the blocks in depth order."""

    tensor_blocks: dict[str, str]
    blocks: tuple[str, ...]
    depth: dict[str, int]  # layer blocks -> layer index; used by depth schedules such as LiNeS
    n_layers: int

    @classmethod
    def by_layer(cls, names: list[str], regex: str | None = None) -> BlockMap:
        pattern = LAYER_PATTERN if regex is None else _compile(regex)
        return cls.from_layers(names, {name: layer_index(name, pattern) for name in names})

    @classmethod
    def from_layers(cls, names: list[str], layers_of: dict[str, int | None], n_layers: int | None = None) -> BlockMap:
        """Blocks from each tensor's layer index (None outside layers). The one layer-counting rule: a model
        has max index + 1 layers (so a selection of layers keeps the model's depth), unless told otherwise."""
        layers = sorted({i for i in layers_of.values() if i is not None})
        seen_layer = False
        tensor_blocks: dict[str, str] = {}
        for name in names:
            index = layers_of[name]
            if index is None:
                tensor_blocks[name] = "head" if seen_layer else "embed"
            else:
                seen_layer = True
                tensor_blocks[name] = f"layer.{index}"
        order = (["embed"] if "embed" in tensor_blocks.values() else []) + [f"layer.{i}" for i in layers]
        order += ["head"] if "head" in tensor_blocks.values() else []
        depth = n_layers if n_layers is not None else (layers[-1] + 1 if layers else 0)
        return cls(tensor_blocks, tuple(order), {f"layer.{i}": i for i in layers}, depth)

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
