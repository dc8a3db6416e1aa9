"""Recipes: a child made from two recipes equals the child made from their materialised weights."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge.evaluate.classification import mlp_layout
from evomerge.merge import split_point_slerp
from evomerge.space.recipe import RecipeOptions, RecipeSpace, block_ranges

LAYOUT = mlp_layout([64, 32, 10])  # layers.0.weight, layers.0.bias, layers.1.weight, layers.1.bias
SEEDS = [np.random.default_rng(k).standard_normal(LAYOUT.size).astype(np.float32) for k in range(3)]


def flat(space, genome: np.ndarray) -> np.ndarray:
    return space.layout.flatten(space.decode(genome))


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (RecipeOptions(blocks="layer"), [(0, 2080), (2080, 2410)]),
        (RecipeOptions(blocks="tensor"), [(0, 2048), (2048, 2080), (2080, 2400), (2400, 2410)]),
        (RecipeOptions(blocks="chunks", chunks=4), [(0, 602), (602, 1205), (1205, 1808), (1808, 2410)]),
    ],
)
def test_block_ranges_cover_the_vector(options: RecipeOptions, expected):
    assert block_ranges(LAYOUT, options) == expected


def test_initial_recipes_are_the_seeds():
    space = RecipeSpace(LAYOUT, SEEDS, block_ranges(LAYOUT, RecipeOptions()))
    for genome, seed in zip(space.initial(), SEEDS):
        np.testing.assert_array_equal(flat(space, genome), seed)
    assert space.initial()[0].nbytes == 4 * 4 * 3  # blocks x seeds float32: bytes, not a model


@settings(max_examples=40, deadline=None)
@given(
    blocks=st.sampled_from(["layer", "tensor", "chunks"]),
    split=st.integers(0, LAYOUT.size),
    w=st.floats(0, 1),
    seed=st.integers(0, 1000),
)
def test_recipe_crossover_equals_weight_crossover(blocks: str, split: int, w: float, seed: int):
    space = RecipeSpace(LAYOUT, SEEDS, block_ranges(LAYOUT, RecipeOptions(blocks=blocks, chunks=7)))
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1.5, space.dim).astype(np.float32)
    y = rng.uniform(-1, 1.5, space.dim).astype(np.float32)
    child = flat(space, space.crossover(x, y, split, w))
    cut = space.boundary(split)
    flat_split = space.ranges[cut][0] if cut < space.n_blocks else LAYOUT.size
    direct = split_point_slerp(flat(space, x), flat(space, y), flat_split, w)
    np.testing.assert_allclose(child, direct, rtol=2e-4, atol=2e-4)


def test_boundary_moves_split_to_block_start():
    space = RecipeSpace(LAYOUT, SEEDS, block_ranges(LAYOUT, RecipeOptions(blocks="tensor")))
    assert [space.boundary(s) for s in (0, 2047, 2048, 2079, 2080, 2409, 2410)] == [0, 0, 1, 1, 2, 3, 4]


def test_recipe_and_weights_crossover_agree_on_ten_million_parameters():
    """Both spaces take SLERP's angle in float64 (blockwise Gram matrices for recipes), so M2N2's crossover of
    two seed models is the same child in either, at the scale where float32 angles drift."""
    from evomerge.space.recipe import RecipeSpace
    from evomerge.space.weights import WeightSpace
    from evomerge.weights import Layout

    layout = Layout(("a", "b", "c"), ((2_000, 2_000), (3_000, 1_000), (3_000_000,)))
    assert layout.size == 10_000_000
    rng = np.random.default_rng(0)
    base = rng.standard_normal(layout.size, dtype=np.float32)
    seeds = [base + 0.05 * rng.standard_normal(layout.size, dtype=np.float32) for _ in range(3)]
    offsets = layout.offsets()
    recipe = RecipeSpace(layout, seeds, offsets)
    weights = WeightSpace(layout, seeds)
    x, y = recipe.initial()[0], recipe.initial()[1]
    split, w = offsets[1][0], 0.37  # on the boundary of tensor b
    child = flat(recipe, recipe.crossover(x, y, split, w))
    expected = weights.crossover(seeds[0], seeds[1], split, w)
    np.testing.assert_allclose(child, expected, rtol=0, atol=2e-6)
    # and a SLERP merge's model-wide angle, summed tensor by tensor, is that same float64 angle
    from evomerge.merge import slerp_model_stats, slerp_stats

    a, b = layout.views(seeds[0]), layout.views(seeds[1])
    np.testing.assert_allclose(
        slerp_model_stats((a[n], b[n]) for n in layout.names), slerp_stats(*seeds[:2]), rtol=1e-12
    )
