"""Search spaces: what a genome is, how it becomes model weights, and how genomes recombine."""

from evomerge.registry import Registry
from evomerge.space.base import BoxSpace, Space, VariationSpace

SPACES: Registry = Registry("space")

from evomerge.space import merge_genes, recipe, slerp_line, weights  # noqa: E402,F401  (registers the built-ins)

__all__ = ["SPACES", "BoxSpace", "Space", "VariationSpace"]
