"""Every strategy: deterministic for a seed, and a state_dict round-trip through a snapshot file
continues exactly as the original (what resume relies on)."""

from __future__ import annotations

import numpy as np
import pytest

from evomerge.evaluate.base import EvalResult
from evomerge.registry import Component
from evomerge.search import STRATEGIES
from evomerge.search.base import Candidate
from evomerge.search.cma_es import CMAESOptions
from evomerge.search.grid import GridOptions, grid_points
from evomerge.search.m2n2 import GAOptions, M2N2Options
from evomerge.search.map_elites import MapElitesOptions
from evomerge.space.slerp_line import SlerpLineSpace
from evomerge.space.weights import WeightSpace
from evomerge.store import load_state, save_state
from evomerge.weights import Layout

DIM = 12
LAYOUT = Layout(("w",), ((DIM,),))
SEEDS = [np.random.default_rng(k).standard_normal(DIM).astype(np.float32) for k in range(2)]
TARGET = np.random.default_rng(9).standard_normal((5, DIM))


def evaluate(genome: np.ndarray) -> EvalResult:
    """A deterministic stand-in task: 5 'examples', solved when a projection is positive."""
    hits = (TARGET @ genome > 0).astype(np.float32)
    return EvalResult(
        {
            "accuracy": float(hits.mean()),
            "accuracy_odd": float(hits[1::2].mean()),
            "accuracy_even": float(hits[::2].mean()),
        },
        hits,
    )


CASES = {
    "m2n2": (M2N2Options(population=4, mutation_std=0.1), "weights"),
    "ga": (GAOptions(population=4, mutation_std=0.1), "weights"),
    "cma_es": (CMAESOptions(population=4, sigma0=0.3), "weights"),
    "map_elites": (MapElitesOptions(bins=[3, 3], mutation_std=0.1), "weights"),
    "grid": (GridOptions(points=50), "slerp"),
}


def build(name: str, seed: int = 0):
    options, space_kind = CASES[name]
    space = WeightSpace(LAYOUT, SEEDS) if space_kind == "weights" else SlerpLineSpace(LAYOUT, SEEDS)
    return STRATEGIES.build(Component(name, options), space=space, seed=seed), space


def step(strategy, space, cid: int) -> np.ndarray:
    proposal = strategy.ask()
    genome = proposal.genome
    weights = space.decode(genome)["w"].numpy()
    strategy.tell(Candidate(cid, genome, proposal.meta), evaluate(weights))
    return genome


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_seed_same_search(name: str):
    a, space_a = build(name)
    b, space_b = build(name)
    for cid in range(30):
        np.testing.assert_array_equal(step(a, space_a, cid), step(b, space_b, cid))


@pytest.mark.parametrize("name", sorted(CASES))
def test_state_round_trip_continues_identically(name: str, tmp_path):
    original, space = build(name)
    for cid in range(13):  # mid-generation for CMA-ES (population 4)
        step(original, space, cid)
    save_state(tmp_path / "s.safetensors", original.state_dict())
    restored, space_r = build(name, seed=123)  # a different seed: everything must come from the state
    restored.load_state_dict(load_state(tmp_path / "s.safetensors"))
    for cid in range(13, 40):
        np.testing.assert_array_equal(step(original, space, cid), step(restored, space_r, cid))
    best_o, best_r = original.best(), restored.best()
    np.testing.assert_array_equal(best_o[0], best_r[0])
    assert best_o[1] == best_r[1]


HARD = np.random.default_rng(5).standard_normal((40, DIM))  # 40 examples: the seeds solve 19 and 21 of them


def evaluate_hard(weights: np.ndarray) -> EvalResult:
    hits = (HARD @ weights > 0).astype(np.float32)
    halves = {"accuracy_odd": float(hits[1::2].mean()), "accuracy_even": float(hits[::2].mean())}
    return EvalResult({"accuracy": float(hits.mean()), **halves}, hits)


@pytest.mark.parametrize("name", sorted(CASES))
def test_search_beats_its_seed_models(name: str):
    strategy, space = build(name)
    seeds_best = max(evaluate_hard(s).objectives["accuracy"] for s in SEEDS)
    assert seeds_best == pytest.approx(0.525)
    for cid in range(60):
        if strategy.finished:
            break
        proposal = strategy.ask()
        weights = space.decode(proposal.genome)["w"].numpy()
        strategy.tell(Candidate(cid, proposal.genome, proposal.meta), evaluate_hard(weights))
    assert strategy.best()[1] >= seeds_best + 0.04  # at least two more examples solved than either seed


def test_cma_es_tells_a_generation_only_when_complete():
    strategy, space = build("cma_es")
    proposals = [strategy.ask() for _ in range(4)]
    assert strategy.ask() is None  # the generation is out; nothing more until it comes back
    for cid, p in reversed(list(enumerate(proposals))):  # results arrive out of order
        strategy.tell(Candidate(cid, p.genome, p.meta), evaluate(p.genome))
    assert strategy.cma.generation == 1
    assert strategy.ask() is not None


@pytest.mark.parametrize("maximize", [True, False])
def test_cma_es_failed_member_ranks_last(maximize: bool):
    """Even when results worse than every earlier one arrive after the failure."""
    options, _ = CASES["cma_es"]
    space = WeightSpace(LAYOUT, SEEDS)
    strategy = STRATEGIES.build(
        Component("cma_es", CMAESOptions(**{**vars(options), "maximize": maximize})), space=space, seed=0
    )
    told = []
    real_tell = strategy.cma.tell
    strategy.cma.tell = lambda solutions: (told.extend(solutions), real_tell(solutions))
    proposals = [strategy.ask() for _ in range(4)]
    values = {0: 0.2, 2: 0.9, 3: 0.5}  # the failure (member 1) is told second
    for cid, p in enumerate(proposals):
        result = EvalResult({"accuracy": values[cid]}) if cid in values else None
        strategy.tell(Candidate(cid, p.genome, p.meta), result)
    assert strategy.cma.generation == 1
    losses = [loss for _, loss in told]
    assert len(losses) == 4 and losses[1] > max(losses[:1] + losses[2:])
    assert losses[1] == max(losses[:1] + losses[2:]) + 1.0


def test_map_elites_keeps_one_elite_per_cell():
    strategy, space = build("map_elites")
    for cid in range(80):
        step(strategy, space, cid)
    cells = np.flatnonzero(strategy.occupied)
    for cell in cells:
        result = evaluate(strategy.genomes[cell])
        assert strategy.cell_of(result.objectives) == cell
        assert strategy.quality[cell] == result.objectives["accuracy"]


def test_grid_sweeps_every_point_then_finishes():
    strategy, space = build("grid")
    genomes = [step(strategy, space, cid) for cid in range(50)]
    assert strategy.finished and strategy.ask() is None
    np.testing.assert_allclose(np.ravel(genomes), np.linspace(0, 1, 50), atol=1e-7)
    assert grid_points(np.zeros(2), np.ones(2), 9).shape == (9, 2)


def test_cma_es_state_with_a_failed_member_round_trips():
    strategy, space = build("cma_es")
    proposals = [strategy.ask() for _ in range(4)]
    strategy.tell(Candidate(1, proposals[1].genome, proposals[1].meta), None)
    restored, _ = build("cma_es")
    restored.load_state_dict(strategy.state_dict())
    assert restored.told == {1: None} and restored.worst_loss is None
    for cid in (0, 2, 3):
        for s in (strategy, restored):
            s.tell(Candidate(cid, proposals[cid].genome, proposals[cid].meta), EvalResult({"accuracy": 0.1 * cid}))
    np.testing.assert_array_equal(strategy.ask().genome, restored.ask().genome)


@pytest.mark.parametrize("name", ["ga", "m2n2", "map_elites"])
def test_failed_initial_models_are_asked_again_up_to_three_times_across_a_snapshot(name: str, tmp_path):
    strategy, space = build(name)
    for cid in range(2):  # both initial models fail
        proposal = strategy.ask()
        strategy.tell(Candidate(cid, proposal.genome, proposal.meta), None)
    save_state(tmp_path / "s.safetensors", strategy.state_dict())
    restored, _ = build(name, seed=123)
    restored.load_state_dict(load_state(tmp_path / "s.safetensors"))
    for s in (strategy, restored):
        metas = []
        for cid in range(2, 6):  # attempts 2 and 3 of each, then nothing is left to ask
            proposal = s.ask()
            np.testing.assert_array_equal(proposal.genome, space.initial()[proposal.meta["init"]])
            metas.append(proposal.meta)
            s.tell(Candidate(cid, proposal.genome, proposal.meta), None)
        assert metas == [{"init": k, "attempt": a} for a in (2, 3) for k in (0, 1)]
        assert s.ask() is None and s.best() is None


@pytest.mark.parametrize("name", ["ga", "m2n2", "map_elites"])
def test_a_retried_initial_model_comes_before_any_child(name: str):
    strategy, space = build(name)
    first, second = strategy.ask(), strategy.ask()
    strategy.tell(Candidate(0, first.genome, first.meta), None)
    strategy.tell(Candidate(1, second.genome, second.meta), evaluate(space.decode(second.genome)["w"].numpy()))
    again = strategy.ask()
    assert again.meta == {"init": 0, "attempt": 2}
    strategy.tell(Candidate(2, again.genome, again.meta), evaluate(space.decode(again.genome)["w"].numpy()))
    assert "parents" in strategy.ask().meta
