"""Exact values for M2N2's pieces on hand-made score matrices, and archive invariants."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge.evaluate.base import EvalResult
from evomerge.search.base import Candidate, sample_index
from evomerge.search.m2n2 import (
    M2N2,
    M2N2Options,
    competition_fitness,
    match_scores,
    replacement_index,
    resource_weights,
)
from evomerge.space.weights import WeightSpace
from evomerge.weights import Layout

S = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]], dtype=np.float32)


def test_competition_fitness_shares_each_example():
    # z = [2, 1, 1, 1]: the first example is shared by two individuals, the rest are solved once.
    np.testing.assert_allclose(competition_fitness(S, alpha=1.0), [1.5, 1.5, 1.0])
    np.testing.assert_allclose(competition_fitness(S, alpha=2.0), [1.25, 1.25, 1.0])
    # alpha = 0 is the GA: plain number of solved examples
    np.testing.assert_allclose(competition_fitness(S, alpha=0.0), [2, 2, 1])


def test_unsolved_example_counts_as_capacity_one():
    np.testing.assert_allclose(competition_fitness(np.array([[1, 0], [0, 0]], dtype=np.float32)), [1.0, 0.0])


def test_replacement_drops_lowest_fitness_among_archive_and_child():
    # child [0,1,1,1]: z = [2,2,2,2], fitness [1, 1, 0.5, 1.5] -> row 2 goes
    assert replacement_index(np.vstack([S, [[0, 1, 1, 1]]])) == 2
    # a child that solves nothing is itself the lowest: index P means "archive unchanged"
    assert replacement_index(np.vstack([S, np.zeros((1, 4))])) == 3
    # duplicate of row 0 ties with row 0 (both 0.8333); the archive member goes first
    assert replacement_index(np.vstack([S, S[:1]])) == 0


def test_matchmaker_prefers_what_parent_one_lacks():
    np.testing.assert_allclose(match_scores(S * resource_weights(S, 1.0), first=0), [0.0, 1.0, 1.0])
    # parent 2 (row 2) solves only example 3; row 0 covers examples 0 and 1 it lacks
    np.testing.assert_allclose(match_scores(S * resource_weights(S, 1.0), first=2), [1.5, 1.5, 0.0])


def test_sample_index_follows_weights():
    rng = np.random.default_rng(0)
    weights = np.array([0.375, 0.375, 0.25, 0.0])
    draws = np.bincount([sample_index(rng, weights) for _ in range(40000)], minlength=4) / 40000
    np.testing.assert_allclose(draws, weights, atol=0.01)
    assert draws[3] == 0.0


def test_sample_index_uniform_when_all_zero():
    rng = np.random.default_rng(1)
    draws = np.bincount([sample_index(rng, np.zeros(4)) for _ in range(8000)], minlength=4) / 8000
    np.testing.assert_allclose(draws, 0.25, atol=0.03)


def _space(dim: int = 6, n_seeds: int = 2) -> WeightSpace:
    rng = np.random.default_rng(0)
    return WeightSpace(Layout(("w",), ((dim,),)), [rng.standard_normal(dim).astype(np.float32) for _ in range(n_seeds)])


def _result(scores: np.ndarray) -> EvalResult:
    return EvalResult({"accuracy": float(scores.mean())}, scores.astype(np.float32))


def test_initial_individuals_fill_archive_then_children_compete():
    strategy = M2N2(M2N2Options(population=3), _space(), seed=0)
    asked = [strategy.ask() for _ in range(2)]
    assert [p.meta for p in asked] == [{"init": 0}, {"init": 1}]
    for i, p in enumerate(asked):
        strategy.tell(Candidate(i, p.genome, p.meta), _result(S[i]))
    assert strategy.size == 2
    child = strategy.ask()
    assert set(child.meta) == {"parents", "split", "w"}
    strategy.tell(Candidate(2, child.genome, child.meta), _result(S[2]))
    assert strategy.size == 3 and list(strategy.ids) == [0, 1, 2]
    # full archive: a child solving nothing does not get in
    child = strategy.ask()
    strategy.tell(Candidate(3, child.genome, child.meta), _result(np.zeros(4)))
    assert list(strategy.ids) == [0, 1, 2]
    # a child better than row 2 replaces it
    child = strategy.ask()
    strategy.tell(Candidate(4, child.genome, child.meta), _result(np.array([0, 1, 1, 1])))
    assert list(strategy.ids) == [0, 1, 4]
    np.testing.assert_array_equal(strategy.genomes[2], child.genome)


def test_failed_result_leaves_archive_untouched():
    strategy = M2N2(M2N2Options(population=3), _space(), seed=0)
    p = strategy.ask()
    strategy.tell(Candidate(0, p.genome, p.meta), None)
    assert strategy.size == 0


def test_without_crossover_child_is_mutated_parent():
    strategy = M2N2(M2N2Options(population=2, crossover=False, mutation_std=0.0), _space(n_seeds=1), seed=0)
    p = strategy.ask()
    strategy.tell(Candidate(0, p.genome, p.meta), _result(S[0]))
    child = strategy.ask()
    assert child.meta == {"parents": [0]}
    np.testing.assert_array_equal(child.genome, p.genome)


@settings(max_examples=40, deadline=None)
@given(
    population=st.integers(2, 6),
    rows=st.lists(st.lists(st.integers(0, 1), min_size=5, max_size=5), min_size=1, max_size=30),
    alpha=st.sampled_from([0.0, 0.5, 1.0, 2.0]),
)
def test_archive_invariants(population: int, rows: list[list[int]], alpha: float):
    """Size never exceeds P, ids are unique, and a rejected child was the least fit of P + 1."""
    strategy = M2N2(M2N2Options(population=population, alpha=alpha), _space(n_seeds=2), seed=0)
    for cid, row in enumerate(rows):
        proposal = strategy.ask()
        scores = np.array(row, dtype=np.float32)
        before = strategy.scores[: strategy.size].copy() if strategy.scores is not None else None
        ids_before = strategy.ids[: strategy.size].copy()
        full = strategy.size == population
        strategy.tell(Candidate(cid, proposal.genome, proposal.meta), _result(scores))
        assert strategy.size <= population
        ids = strategy.ids[: strategy.size]
        assert len(set(ids.tolist())) == len(ids)
        if full:
            fitness = competition_fitness(np.vstack([before, scores[None]]), alpha)
            changed = np.flatnonzero(ids != ids_before)
            if cid not in ids:
                assert len(changed) == 0
                assert fitness[-1] == pytest.approx(fitness.min())
            else:
                assert len(changed) == 1
                assert fitness[changed[0]] == pytest.approx(fitness.min())
                np.testing.assert_array_equal(strategy.scores[changed[0]], scores)
        else:
            assert ids[-1] == cid
