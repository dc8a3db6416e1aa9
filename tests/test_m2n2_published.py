"""M2N2 as the paper's reference code runs it, one behaviour per test.

The reference (SakanaAI/natural_niches) is restated here in a few lines of numpy where a test needs
it: an archive of P empty slots with zero scores, every result (the two inits too) inserted by the
same argmin update, parents drawn from the shared-fitness matrix. evomerge's M2N2 must make the
same choices on the same inputs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from evomerge.evaluate.base import EvalResult
from evomerge.merge import slerp, slerp_stats, split_point_slerp
from evomerge.search.base import Candidate
from evomerge.search.m2n2 import M2N2, GAOptions, M2N2Options, build_ga, competition_fitness, resource_weights
from evomerge.space.weights import WeightSpace
from evomerge.weights import Layout


def reference_update(archive_scores: np.ndarray, child: np.ndarray, alpha: float) -> int:
    """The reference's update_archive: argmin of the shared fitness over the P slots (empty ones all
    zero) and the child; the slot to overwrite, or P when the child is the worst. Fitness values are
    pinned exactly elsewhere; this restates the slot logic, so it computes them the same way."""
    return int(np.argmin(competition_fitness(np.concatenate([archive_scores, child[None]], axis=0), alpha)))


def _space(dim: int = 8) -> WeightSpace:
    rng = np.random.default_rng(0)
    return WeightSpace(Layout(("w",), ((dim,),)), [rng.standard_normal(dim).astype(np.float32) for _ in range(2)])


def _new(options: M2N2Options | GAOptions, dim: int = 8, seed: int = 0) -> M2N2:
    """A strategy whose two initial asks are spent, so the next ask breeds."""
    strategy = (
        build_ga(options, _space(dim), seed) if isinstance(options, GAOptions) else M2N2(options, _space(dim), seed)
    )
    strategy.ask(), strategy.ask()
    return strategy


def _tell(strategy: M2N2, cid: int, genome: np.ndarray, scores: np.ndarray) -> None:
    scores = np.asarray(scores, dtype=np.float32)
    strategy.tell(Candidate(cid, genome, {}), EvalResult({"accuracy": float(scores.mean())}, scores))


@pytest.mark.parametrize("alpha", [0.0, 1.0, 2.0])
def test_archive_follows_the_references_zero_slot_update(alpha: float):
    """Slots, replacements and rejections equal the reference's on rows full of ties and empty children."""
    population, n = 5, 7
    rng = np.random.default_rng(3)
    strategy = _new(M2N2Options(population=population, alpha=alpha))
    reference = np.zeros((population, n), dtype=np.float32)
    reference_ids = np.full(population, -1)
    pool = (rng.random((6, n)) < 0.5).astype(np.float32)  # few distinct rows, so duplicates and ties abound
    for cid in range(400):
        row = pool[rng.integers(len(pool))] if cid % 9 else np.zeros(n, dtype=np.float32)
        slot = reference_update(reference, row, alpha)
        if slot < population:
            reference[slot], reference_ids[slot] = row, cid
        _tell(strategy, cid, np.zeros(8, dtype=np.float32), row)
        filled = reference_ids >= 0
        np.testing.assert_array_equal(strategy.ids[: strategy.size], reference_ids[filled])
        np.testing.assert_array_equal(strategy.scores[: strategy.size], reference[filled])


def test_duplicate_child_replaces_its_equal_when_they_are_the_least_fit():
    """The child equal to the worst member ties with it, and the member goes (neutral drift)."""
    strategy = _new(M2N2Options(population=3))
    rows = np.array([[1, 1, 1, 0], [1, 1, 0, 1], [1, 0, 0, 0]], dtype=np.float32)
    for cid, row in enumerate(rows):
        _tell(strategy, cid, np.full(8, cid, dtype=np.float32), row)
    _tell(strategy, 7, np.full(8, 7, dtype=np.float32), rows[2])
    assert list(strategy.ids) == [0, 1, 7]
    assert strategy.replacements == 1


def _draw_frequencies(strategy: M2N2, draws: int) -> np.ndarray:
    """How often each (first, second) archive pair is asked, as a P × P matrix of frequencies."""
    slot_of = {int(cid): k for k, cid in enumerate(strategy.ids[: strategy.size])}
    counts = np.zeros((strategy.size, strategy.size))
    for _ in range(draws):
        first, second = strategy.ask().meta["parents"]
        counts[slot_of[first], slot_of[second]] += 1
    return counts / draws


ROWS = np.array([[1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [0, 0, 0, 1, 1], [1, 1, 1, 0, 0]], dtype=np.float32)


def _filled(strategy: M2N2) -> M2N2:
    for cid, row in enumerate(ROWS):
        _tell(strategy, cid, np.full(strategy.space.dim, cid + 1, dtype=np.float32), row)
    return strategy


def test_first_parent_by_shared_fitness_second_by_what_the_first_lacks():
    strategy = _filled(_new(M2N2Options(population=4, mutation_std=0.0), seed=1))
    shared = ROWS * resource_weights(ROWS, 1.0)  # z = [3, 2, 2, 1, 1]
    fitness = shared.sum(axis=1)
    expected = np.zeros((4, 4))
    for p in range(4):
        match = np.maximum(shared - shared[p], 0.0).sum(axis=1)
        expected[p] = fitness[p] / fitness.sum() * match / match.sum()
    np.testing.assert_allclose(_draw_frequencies(strategy, 30000), expected, atol=0.012)


def test_ga_draws_both_parents_by_raw_score_with_replacement():
    strategy = _filled(_new(GAOptions(population=4, mutation_std=0.0), seed=2))
    counts = ROWS.sum(axis=1)
    p = counts / counts.sum()
    np.testing.assert_allclose(_draw_frequencies(strategy, 30000), np.outer(p, p), atol=0.012)


def test_split_point_and_weight_are_uniform_over_the_whole_vector():
    dim = 10
    strategy = _filled(_new(M2N2Options(population=4, mutation_std=0.0), dim, seed=3))
    metas = [strategy.ask().meta for _ in range(20000)]
    splits = np.bincount([m["split"] for m in metas], minlength=dim)
    assert len(splits) == dim  # split in [0, n): 0 (all 1 - w) is possible, n (all w) is not
    np.testing.assert_allclose(splits / len(metas), 1 / dim, atol=0.01)
    weights = np.array([m["w"] for m in metas])
    assert weights.min() >= 0.0 and weights.max() < 1.0
    np.testing.assert_allclose(np.histogram(weights, bins=5, range=(0, 1))[0] / len(metas), 0.2, atol=0.015)


def test_child_is_the_crossover_of_its_parents_then_mutation():
    """Mutation comes after crossover, on every child, with the configured std; none when it is 0."""
    for std in (0.0, 0.01):
        strategy = _filled(_new(M2N2Options(population=4, mutation_std=std), 4096, seed=4))
        strategy.genomes[:4] = np.random.default_rng(5).standard_normal((4, 4096)).astype(np.float32)
        slot_of = {int(cid): k for k, cid in enumerate(strategy.ids)}
        proposal = strategy.ask()
        first, second = (strategy.genomes[slot_of[p]] for p in proposal.meta["parents"])
        crossed = split_point_slerp(first, second, proposal.meta["split"], proposal.meta["w"])
        noise = proposal.genome - crossed
        if std == 0.0:
            np.testing.assert_array_equal(noise, 0.0)
        else:
            assert noise.std() == pytest.approx(std, rel=0.05)
            assert abs(noise.mean()) < 5 * std / math.sqrt(4096)


def _slerp_reference_f64(x: np.ndarray, y: np.ndarray, split: int, w: float) -> np.ndarray:
    """The reference's slerp_w_splitpoint, evaluated in float64 per coordinate."""
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    val = np.where(np.arange(len(x)) < split, w, 1.0 - w)
    omega = math.acos(np.clip(np.dot(x64 / np.linalg.norm(x64), y64 / np.linalg.norm(y64)), -1, 1))
    return (np.sin((1 - val) * omega) * x64 + np.sin(val * omega) * y64) / math.sin(omega)


def test_split_point_slerp_matches_the_references_formula():
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((2, 5000)).astype(np.float32)
    got = split_point_slerp(x, y, 1234, 0.3)
    np.testing.assert_allclose(got, _slerp_reference_f64(x, y, 1234, 0.3), rtol=0, atol=2e-6)
    assert got[:1234] @ got[:1234] != pytest.approx(got[1234:] @ got[1234:])  # two weights, one angle


def test_slerp_angle_accumulates_in_float64_over_long_vectors():
    """10^7 nearly parallel float32 coordinates: a float32 dot product would be off in the 4th digit."""
    n = 10_000_000
    rng = np.random.default_rng(7)
    x = (1.0 + 0.001 * rng.standard_normal(n)).astype(np.float32)
    y = (x + 1e-4 * rng.standard_normal(n)).astype(np.float32)
    dot, norm_x, norm_y = slerp_stats(x, y)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    assert dot == pytest.approx(float(x64 @ y64), rel=1e-12)
    assert norm_x == pytest.approx(math.sqrt(float(x64 @ x64)), rel=1e-12)
    assert norm_y == pytest.approx(math.sqrt(float(y64 @ y64)), rel=1e-12)


def test_matchmaker_falls_back_to_fitness_when_the_first_parent_covers_everyone():
    """All match scores zero (the reference would draw from NaN weights): the second parent is drawn
    by fitness, and the child is still made."""
    strategy = _new(M2N2Options(population=3, mutation_std=0.0), seed=8)
    for cid, row in enumerate([[1, 1, 1], [1, 1, 1], [1, 1, 1]]):
        _tell(strategy, cid, np.full(8, cid + 1, dtype=np.float32), np.array(row))
    seconds = {strategy.ask().meta["parents"][1] for _ in range(200)}
    assert seconds == {0, 1, 2}


def test_without_split_point_the_child_is_plain_slerp_at_w():
    """The reference's crossover_without_splitpoint: one weight w over the whole vector."""
    strategy = _filled(_new(M2N2Options(population=4, split_point=False, mutation_std=0.0), 64, seed=9))
    strategy.genomes[:4] = np.random.default_rng(10).standard_normal((4, 64)).astype(np.float32)
    slot_of = {int(cid): k for k, cid in enumerate(strategy.ids)}
    proposal = strategy.ask()
    first, second = (strategy.genomes[slot_of[p]] for p in proposal.meta["parents"])
    assert proposal.meta["split"] == 64
    np.testing.assert_allclose(proposal.genome, slerp(first, second, proposal.meta["w"]), rtol=0, atol=1e-6)
