"""The Pareto strategies (MAP, NSGA, nested MAP, random) on toy problems, without an evaluator:
rounds and batch sizes, failures, results told out of order and in parts, state round trips."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import pytest
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.algorithms.moo.nsga3 import NSGA3

from evomerge.errors import EvomergeError, SpecError
from evomerge.evaluate.base import EvalResult
from evomerge.pareto import hypervolume, non_dominated
from evomerge.pareto.design import vertices_and_sobol
from evomerge.pareto.surrogate import quadratic_features
from evomerge.registry import Component
from evomerge.schema import parse
from evomerge.search import STRATEGIES
from evomerge.search.base import Candidate
from evomerge.search.map import MapOptions, MapSearch
from evomerge.search.nested_map import NestedMapOptions, NestedMapSearch
from evomerge.search.nsga import NsgaOptions, NsgaSearch
from evomerge.search.random_search import RandomOptions, RandomSearch
from evomerge.store import load_state, save_state


def box(d: int, low: float = 0.0, high: float = 1.0) -> SimpleNamespace:
    return SimpleNamespace(low=np.full(d, low), high=np.full(d, high), dim=d)


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


# two conflicting objectives, each exactly a sigmoid of a quadratic in 2 genes
BETA_A = np.array([1.0, 2.0, -3.0, -1.0, 0.5, 0.0])
BETA_B = np.array([1.0, -3.0, 2.0, 0.0, 0.5, -1.0])
TWO = {"a": "max", "b": "max"}


def toy_values(X: np.ndarray) -> np.ndarray:
    phi = quadratic_features(X)
    return np.stack([sigmoid(phi @ BETA_A), sigmoid(phi @ BETA_B)], axis=1)


def toy(x: np.ndarray) -> EvalResult:
    a, b = toy_values(x)[0]
    return EvalResult({"a": float(a), "b": float(b), "unused": 0.0})


def zdt1(x: np.ndarray) -> EvalResult:
    """ZDT1 in 3 genes (both minimised); its front is f2 = 1 - sqrt(f1) at x1 = x2 = 0."""
    g = 1 + 9 * (x[1] + x[2]) / 2
    return EvalResult({"f1": float(x[0]), "f2": float(g * (1 - np.sqrt(x[0] / g)))})


class Loop:
    """A hand-driven evaluation loop: ask, keep candidates pending, tell them back in any order."""

    def __init__(self, strategy, evaluate: Callable[[np.ndarray], EvalResult]):
        self.strategy = strategy
        self.evaluate = evaluate
        self.next_id = 0
        self.pending: dict[int, Candidate] = {}
        self.asked: list[Candidate] = []
        self.told = 0

    def ask(self) -> Candidate | None:
        proposal = self.strategy.ask()
        if proposal is None:
            return None
        candidate = Candidate(self.next_id, proposal.genome, proposal.meta)
        self.next_id += 1
        self.pending[candidate.id] = candidate
        self.asked.append(candidate)
        return candidate

    def ask_all(self) -> list[Candidate]:
        """Ask until the strategy has nothing more to hand out before results come back."""
        out = []
        while (candidate := self.ask()) is not None:
            out.append(candidate)
        return out

    def tell(self, cid: int, fail: bool = False) -> None:
        candidate = self.pending.pop(cid)
        self.strategy.tell(candidate, None if fail else self.evaluate(candidate.genome))
        self.told += 1

    def tell_all(self, order: str = "forward", failing: set[int] = frozenset()) -> None:
        ids = sorted(self.pending, reverse=order == "reversed")
        for cid in ids:
            self.tell(cid, fail=cid in failing)

    def run_rounds(self, order: str = "forward", limit: int = 500) -> None:
        """Whole rounds until the strategy finishes."""
        while not self.strategy.finished and self.told < limit:
            asked = self.ask_all()
            assert asked or self.strategy.finished, "nothing to ask, nothing pending, yet not finished"
            self.tell_all(order)


def build_map(seed: int = 0, d: int = 2, **options) -> MapSearch:
    return STRATEGIES.build(Component("map", MapOptions(objectives=dict(TWO), **options)), space=box(d), seed=seed)


# MAP ------------------------------------------------------------------------------------------------


def test_map_design_then_predicted_front_of_an_exact_quadratic_problem():
    strategy = build_map(front_points=10)
    loop = Loop(strategy, toy)
    design = loop.ask_all()
    assert len(design) == (2 + 1) * (2 + 2) == 12  # (d+1)(d+2): twice the surrogate's parameters
    assert strategy.ask() is None  # the front is not planned before the design is fully told
    assert not strategy.finished
    assert [c.meta["phase"] for c in design] == ["design"] * 12
    assert [c.meta["point"] for c in design] == list(range(12))
    assert all("predicted" not in c.meta for c in design)
    genomes = np.array([c.genome for c in design])
    np.testing.assert_array_equal(genomes, vertices_and_sobol(np.zeros(2), np.ones(2), 12, 0))
    np.testing.assert_array_equal(np.array([c.meta["genes"] for c in design]), np.array([c.genome for c in design]))
    loop.tell_all()

    front = loop.ask_all()
    assert len(front) == 10
    assert {c.meta["phase"] for c in front} == {"front"} and {c.meta["round"] for c in front} == {1}
    assert [c.meta["point"] for c in front] == list(range(12, 22))
    predicted = np.array([[c.meta["predicted"]["a"], c.meta["predicted"]["b"]] for c in front])
    real = toy_values(np.array([c.genome for c in front]))
    np.testing.assert_allclose(predicted, real, atol=1e-4)  # the surrogates are exact up to fitting noise
    loop.tell_all()
    assert strategy.finished and strategy.ask() is None
    stats = strategy.stats()
    assert stats["points"] == 22 and stats["failed"] == 0 and stats["round"] == 1
    assert stats["cv_rmse_a"] < 1e-4 and stats["cv_rmse_b"] < 1e-4

    # the evaluated front points are (close to) Pareto-optimal: no point of a dense grid beats one by > 5e-3
    # (NSGA-II on the surrogates stops near, not on, the box's edges where this front lies)
    grid = np.stack(np.meshgrid(np.linspace(0, 1, 201), np.linspace(0, 1, 201)), axis=-1).reshape(-1, 2)
    G = toy_values(grid)
    for values in real:
        assert not np.any(np.all(G > values + 5e-3, axis=1))
    # they spread along the trade-off: both ends and the middle
    assert real[:, 0].max() - real[:, 0].min() > 0.5 and real[:, 1].max() - real[:, 1].min() > 0.5
    everything = toy_values(np.array([c.genome for c in loop.asked]))
    assert strategy.best()[1] == pytest.approx(everything.mean(axis=1).max())  # best mean objective


def test_map_failures_in_the_design_reduce_the_points():
    strategy = build_map(front_points=4)
    loop = Loop(strategy, toy)
    loop.ask_all()
    loop.tell_all(failing={0, 5, 11})
    front = loop.ask_all()  # 9 points still fit the 6-parameter quadratics
    assert len(strategy.engine.X) == 9 and strategy.engine.failed == 3
    assert strategy.stats()["failed"] == 3 and len(front) == 4
    loop.tell_all(failing={front[0].id})
    assert strategy.finished
    assert len(strategy.engine.X) == 12 and strategy.engine.failed == 4


def test_map_too_many_design_failures_is_a_clear_error():
    strategy = build_map(design_points=6)  # exactly the parameter count
    loop = Loop(strategy, toy)
    assert len(loop.ask_all()) == 6
    loop.tell_all(failing={3})
    with pytest.raises(EvomergeError) as err:
        strategy.ask()
    message = str(err.value)
    assert "over 2 genes has 6 parameters and needs at least 6 successful evaluations" in message
    assert "got 5 (1 evaluations failed: fix what makes them fail" in message
    assert "raise strategy.design_points to at least 7" in message


@pytest.mark.parametrize("d, need", [(2, 6), (3, 10)])
def test_map_design_smaller_than_the_quadratic_is_a_spec_error(d: int, need: int):
    with pytest.raises(SpecError) as err:
        build_map(d=d, design_points=need - 1)
    assert err.value.path == "strategy.design_points"
    assert f"got {need - 1}" in err.value.message
    assert f"{need} parameters, so the design needs at least {need} points (default {2 * need})" in err.value.message
    build_map(d=d, design_points=need)  # the minimum is accepted


def test_map_options_are_validated_with_field_paths():
    with pytest.raises(SpecError, match=r"^strategy.batches: acquisition 'residual' needs at least one batch size"):
        STRATEGIES.resolve({"name": "map", "objectives": TWO, "acquisition": "residual"}, "strategy")
    with pytest.raises(SpecError, match=r"^strategy.links.c: not an objective; objectives: a, b"):
        STRATEGIES.resolve({"name": "map", "objectives": TWO, "links": {"c": "sigmoid"}}, "strategy")
    with pytest.raises(SpecError, match=r"^strategy.objectives.b: got 'up'"):
        STRATEGIES.resolve({"name": "map", "objectives": {"a": "max", "b": "up"}}, "strategy")


@pytest.mark.parametrize("acquisition", ["residual", "hypervolume"])
def test_map_acquisition_batches_and_every_fit_uses_every_point(acquisition: str):
    strategy = build_map(acquisition=acquisition, batches=[3, 4], front_points=5)
    engine = strategy.engine
    fitted_on: list[int] = []
    fit = engine.fit

    def recording_fit():
        fitted_on.append(len(engine.X))
        fit()

    engine.fit = recording_fit
    loop = Loop(strategy, toy)
    loop.run_rounds(order="reversed")  # every round told back in reverse: order within a round is free
    assert strategy.finished
    phases = Counter((c.meta["round"], c.meta["phase"]) for c in loop.asked)
    assert phases == {(0, "design"): 12, (1, "acquire"): 3, (2, "acquire"): 4, (3, "front"): 5}
    assert fitted_on == [12, 15, 19]  # each plan refits on everything told so far
    assert len(engine.X) == 24 and len(engine.Y) == 24
    # X holds exactly the asked genomes, in the order they were told
    assert sorted(map(tuple, engine.X)) == sorted(tuple(c.genome) for c in loop.asked)
    assert all(np.all((c.genome >= 0) & (c.genome <= 1)) for c in loop.asked)
    for c in loop.asked:
        if c.meta["phase"] != "design":
            predicted = [c.meta["predicted"]["a"], c.meta["predicted"]["b"]]
            np.testing.assert_allclose(predicted, toy_values(c.genome)[0], atol=1e-3)


def test_map_residual_acquisition_points_are_new():
    strategy = build_map(acquisition="residual", batches=[6], front_points=3, seed=3)
    loop = Loop(strategy, toy)
    loop.run_rounds()
    acquired = np.array([c.genome for c in loop.asked if c.meta["phase"] == "acquire"])
    design = np.array([c.genome for c in loop.asked if c.meta["phase"] == "design"])
    assert len(acquired) == 6
    assert np.min(np.linalg.norm(acquired[:, None] - design[None], axis=2)) > 1e-6


def test_map_hypervolume_acquisition_adds_to_the_real_front():
    strategy = build_map(acquisition="hypervolume", batches=[4], front_points=4)
    loop = Loop(strategy, toy)
    loop.run_rounds()
    values = {c.id: toy_values(c.genome)[0] for c in loop.asked}
    design = np.array([-values[c.id] for c in loop.asked if c.meta["phase"] == "design"])
    acquired = np.array([-values[c.id] for c in loop.asked if c.meta["phase"] == "acquire"])
    reference = np.zeros(2)
    assert hypervolume(np.vstack([design, acquired]), reference) > hypervolume(design, reference) + 1e-3


def test_map_told_out_of_order_within_a_round_covers_the_same_design():
    forward, backward = Loop(build_map(front_points=6), toy), Loop(build_map(front_points=6), toy)
    forward.run_rounds("forward")
    backward.run_rounds("reversed")
    assert forward.strategy.finished and backward.strategy.finished
    assert len(forward.asked) == len(backward.asked) == 18
    design = [c.genome for c in forward.asked[:12]]
    np.testing.assert_array_equal(design, [c.genome for c in backward.asked[:12]])
    np.testing.assert_array_equal(forward.strategy.engine.X[:12], backward.strategy.engine.X[:12])  # point order
    # the fits see the same set of points, so the planned fronts agree closely
    a = toy_values(np.array([c.genome for c in forward.asked[12:]]))
    b = toy_values(np.array([c.genome for c in backward.asked[12:]]))
    assert hypervolume(-a, np.zeros(2)) == pytest.approx(hypervolume(-b, np.zeros(2)), abs=1e-3)


# state round trips ------------------------------------------------------------------------------------


def _continue_identically(original: Loop, restored: Loop, steps: int, fail_every: int = 0) -> None:
    """Drive both loops through the same asks and tells (pending ones first, newest first)."""
    assert sorted(original.pending) == sorted(restored.pending)
    for cid in sorted(original.pending, reverse=True):
        fail = bool(fail_every) and cid % fail_every == 0
        original.tell(cid, fail)
        restored.tell(cid, fail)
    for _ in range(steps):
        a, b = original.ask(), restored.ask()
        if a is None:
            assert b is None
            if not original.pending:
                return
            cid = min(original.pending)
            original.tell(cid)
            restored.tell(cid)
            continue
        assert b is not None
        np.testing.assert_array_equal(a.genome, b.genome)
        assert a.meta == b.meta
        if len(original.pending) >= 3:  # keep a few in flight and tell the oldest
            cid = min(original.pending)
            fail = bool(fail_every) and cid % fail_every == 0
            original.tell(cid, fail)
            restored.tell(cid, fail)


def _restore(loop: Loop, fresh, tmp_path) -> Loop:
    save_state(tmp_path / "state.safetensors", loop.strategy.state_dict())
    fresh.load_state_dict(load_state(tmp_path / "state.safetensors"))
    twin = Loop(fresh, loop.evaluate)
    twin.next_id = loop.next_id
    twin.pending = dict(loop.pending)
    return twin


@pytest.mark.parametrize("rounds_done, phase", [(0, "design"), (1, "acquire"), (2, "front")])
def test_map_state_round_trip_mid_round(tmp_path, rounds_done: int, phase: str):
    options = {"acquisition": "residual", "batches": [3], "front_points": 6}
    loop = Loop(build_map(**options), toy)
    for _ in range(rounds_done):
        loop.ask_all()
        loop.tell_all()
    asked = [loop.ask() for _ in range(2)]  # part of the round handed out, one of them told
    assert {c.meta["phase"] for c in asked} == {phase}
    loop.tell(asked[1].id)
    assert len(loop.pending) == 1 and len(loop.strategy.engine.queue) >= 1
    restored = _restore(loop, build_map(**options), tmp_path)
    _continue_identically(loop, restored, steps=40)
    assert loop.strategy.finished and restored.strategy.finished
    np.testing.assert_array_equal(loop.strategy.engine.X, restored.strategy.engine.X)
    assert len(loop.asked) == 12 + 3 + 6 and restored.asked
    assert [c.meta for c in restored.asked] == [c.meta for c in loop.asked[-len(restored.asked) :]]
    assert loop.strategy.best()[1] == restored.strategy.best()[1]


def test_map_stats_survive_a_mid_round_round_trip(tmp_path):
    loop = Loop(build_map(front_points=6), toy)
    loop.ask_all()
    loop.tell_all()
    front = loop.ask_all()
    loop.tell(front[0].id)  # told after the fit that planned the front
    restored = _restore(loop, build_map(front_points=6), tmp_path)
    assert restored.strategy.stats() == loop.strategy.stats()
    _continue_identically(loop, restored, steps=10)
    assert loop.strategy.finished and restored.strategy.finished
    assert restored.strategy.stats() == loop.strategy.stats()


@pytest.mark.parametrize("name", ["map", "nsga"])
def test_pareto_state_round_trip_does_not_depend_on_the_new_seed(tmp_path, name: str):
    """tests/test_strategies.py holds the other strategies to this: everything must come from the state."""
    if name == "map":
        make, evaluate = (lambda seed: build_map(seed=seed, front_points=6)), toy
    else:
        make, evaluate = (lambda seed: build_nsga(seed=seed, pop_size=8)), zdt1
    loop = Loop(make(0), evaluate)
    for _ in range(5):
        loop.ask()
    for cid in range(4):
        loop.tell(cid)
    restored = _restore(loop, make(123), tmp_path)
    _continue_identically(loop, restored, steps=30)


def test_nsga_state_round_trip_mid_batch(tmp_path):
    make = lambda: NsgaSearch(NsgaOptions(objectives={"f1": "min", "f2": "min"}, pop_size=8, tell_every=3), box(3), 7)  # noqa: E731
    loop = Loop(make(), zdt1)
    for _ in range(13):  # batch 0 (8) and part of batch 1
        loop.ask()
    for cid in [4, 2, 9, 0, 1]:  # out of order, partial: some wait for pymoo, some are in flight
        loop.tell(cid, fail=cid == 9)
    state = loop.strategy.state_dict()
    assert state["waiting"] and state["queue"] and loop.pending
    restored = _restore(loop, make(), tmp_path)
    calls, calls_restored = pymoo_calls(loop.strategy), pymoo_calls(restored.strategy)
    _continue_identically(loop, restored, steps=60, fail_every=11)
    assert calls == calls_restored and [c[0] for c in calls].count("tell") >= 10
    assert_same_nsga(loop.strategy, restored.strategy)


def test_nested_map_state_round_trip_mid_level(tmp_path):
    names = [f"accuracy_t{i}" for i in range(4)]
    goals = dict.fromkeys(names, "max")
    options = NestedMapOptions(objectives=goals, preference=[2, 1, 1, 1], pop_size=30, generations=30)
    make = lambda: NestedMapSearch(options, box(4), 5)  # noqa: E731
    loop = Loop(make(), four_tasks(names))
    assert len(loop.ask_all()) == 24  # level 0: both pairs' designs
    loop.tell_all("reversed")
    front = loop.ask_all()
    assert {(c.meta["level"], c.meta["phase"]) for c in front} == {(0, "front")}
    for c in front[:-3]:  # three front points still in flight at the snapshot
        loop.tell(c.id)
    restored = _restore(loop, make(), tmp_path)
    _continue_identically(loop, restored, steps=80)
    assert loop.strategy.finished and restored.strategy.finished
    assert loop.strategy.choices == restored.strategy.choices
    np.testing.assert_array_equal(loop.strategy.groups[0][0], restored.strategy.groups[0][0])


# NSGA --------------------------------------------------------------------------------------------------


def build_nsga(seed: int = 0, objectives: dict | None = None, d: int = 3, **options) -> NsgaSearch:
    goals = objectives or {"f1": "min", "f2": "min"}
    return STRATEGIES.build(Component("nsga", NsgaOptions(objectives=goals, **options)), space=box(d), seed=seed)


def pymoo_calls(strategy: NsgaSearch) -> list[list]:
    """Record the strategy's calls into pymoo from now on: ["ask"], ["tell", refs, minimised values]."""
    calls: list[list] = []
    ask, tell = strategy._pymoo_ask, strategy._pymoo_tell

    def logged_ask() -> None:
        calls.append(["ask"])
        ask()

    def logged_tell() -> None:
        calls.append(["tell", [ref for ref, _ in strategy.waiting], [values for _, values in strategy.waiting]])
        tell()

    strategy._pymoo_ask, strategy._pymoo_tell = logged_ask, logged_tell
    return calls


def assert_same_nsga(a: NsgaSearch, b: NsgaSearch) -> None:
    """Everything pymoo and the hand-out bookkeeping will read next is equal."""
    keys = set(a.algorithm.pop[0].data)  # n_gen, rank and crowding (NSGA-II) or niche (NSGA-III)
    assert keys == set(b.algorithm.pop[0].data) and "rank" in keys
    for key in ("X", "F", *keys):
        np.testing.assert_array_equal(a.algorithm.pop.get(key), b.algorithm.pop.get(key))
    if isinstance(a.algorithm, NSGA3):  # its survival's normalisation remembers points across generations
        for key, value in vars(a.algorithm.survival.norm).items():
            np.testing.assert_array_equal(value, getattr(b.algorithm.survival.norm, key))
    assert a.algorithm.random_state.bit_generator.state == b.algorithm.random_state.bit_generator.state
    assert (a.queue, a.waiting, a.outstanding, a.asked) == (b.queue, b.waiting, b.outstanding, b.asked)
    assert a.stats() == b.stats() and a.best()[1] == b.best()[1]
    np.testing.assert_array_equal(a.best()[0], b.best()[0])


def test_nsga_partial_out_of_order_tells_and_failures():
    strategy = build_nsga(pop_size=10, tell_every=4)
    calls = pymoo_calls(strategy)
    loop = Loop(strategy, zdt1)
    first = [loop.ask() for _ in range(10)]  # the initial population, batch 0
    assert [(c.meta["batch"], c.meta["index"]) for c in first] == [(0, i) for i in range(10)]
    for cid in (2, 1, 0):  # three results, reversed: fewer than tell_every, so pymoo waits
        loop.tell(cid)
    assert calls == [["ask"]] and len(strategy.waiting) == 3
    more = [loop.ask() for _ in range(6)]  # the queue ran dry: pymoo is told what waits and asked again
    assert [c[0] for c in calls] == ["ask", "tell", "ask"]
    assert calls[1][1] == [[0, 2], [0, 1], [0, 0]]
    assert {c.meta["batch"] for c in more} == {1}
    # the rest of batch 0 and some of batch 1, with failures, later and out of order
    failing = {5, 8, 12}
    for cid in [9, 5, 12, 3, 8, 11, 4, 6, 7, 10]:
        loop.tell(cid, fail=cid in failing)
    told_refs = [tuple(ref) for c in calls if c[0] == "tell" for ref in c[1]]
    waiting_refs = [tuple(ref) for ref, _ in strategy.waiting]
    failed_refs = {(loop.asked[c].meta["batch"], loop.asked[c].meta["index"]) for c in failing}
    assert not failed_refs & set(told_refs + waiting_refs)  # failures never reach pymoo
    told_values = [v for c in calls if c[0] == "tell" for v in c[2]] + [v for _, v in strategy.waiting]
    assert len(told_refs) + len(waiting_refs) == 13 - len(failing) == len(told_values)
    assert len(set(told_refs)) == len(told_refs)
    assert all(len(c[1]) == 4 for c in calls[3:] if c[0] == "tell")  # tell_every from then on
    failed_genomes = np.array([loop.asked[c].genome for c in failing])
    population = strategy.algorithm.pop.get("X")
    assert not np.any(np.all(np.isclose(population[:, None, :], failed_genomes[None]), axis=2))
    # told values are the minimised objectives
    for row, cid in zip(told_values, [2, 1, 0, 9, 3, 11, 4, 6, 7, 10]):
        r = zdt1(loop.asked[cid].genome).objectives
        np.testing.assert_allclose(row, [r["f1"], r["f2"]])
    assert strategy.stats()["told"] == len(told_refs)
    assert len(loop.pending) == 3  # ids 13, 14, 15 in flight
    # outstanding counts a batch's members neither told nor failed: in flight or still queued
    assert {b: n for b, n in strategy.outstanding.items() if n} == {1: 3 + len(strategy.queue)}
    assert len(strategy.queue) == 4
    # batch 0 is settled; its population is kept only while results of it wait for pymoo
    assert (0 in strategy.batches) == any(ref[0] == 0 for ref, _ in strategy.waiting)


def test_nsga_asked_ahead_of_any_result_samples_more_initial_points():
    """More candidates in flight than the population: pymoo cannot breed before a tell, so the extra
    asks are fresh initial samples (distinct points), and everything is told back fine later."""
    strategy = build_nsga(pop_size=4, tell_every=2)
    calls = pymoo_calls(strategy)
    loop = Loop(strategy, zdt1)
    asked = [loop.ask() for _ in range(10)]
    assert [c.meta["batch"] for c in asked] == [0] * 4 + [1] * 4 + [2] * 2
    assert calls == [["ask"]] * 3
    assert len(np.unique(np.round([c.genome for c in asked], 12), axis=0)) == 10
    loop.tell_all("reversed")
    assert [c[0] for c in calls].count("tell") == 5 and not strategy.waiting
    for _ in range(20):
        loop.ask()
        loop.tell_all()
    assert strategy.stats()["told"] == 30 and len(strategy.algorithm.pop) == 4


def test_nsga_restored_before_any_result_continues_exactly(tmp_path):
    """Three initial batches out and nothing told: pymoo is not initialised yet, and resumes so."""
    loop = Loop(build_nsga(pop_size=4, tell_every=2), zdt1)
    for _ in range(10):
        loop.ask()
    state = loop.strategy.state_dict()
    assert state["population"] is None and sorted(state["batches"]) == ["0", "1", "2"]
    restored = _restore(loop, build_nsga(seed=9, pop_size=4, tell_every=2), tmp_path)
    _continue_identically(loop, restored, steps=40)
    assert_same_nsga(loop.strategy, restored.strategy)


def test_nsga_front_beats_random_search_at_the_same_budget():
    budget, reference = 600, np.array([1.1, 1.1])

    def front_hypervolume(strategy) -> float:
        loop = Loop(strategy, zdt1)
        for _ in range(budget // 10):  # ten in flight at a time, told newest first
            for _ in range(10):
                loop.ask()
            loop.tell_all("reversed")
        F = np.array([[zdt1(c.genome).objectives[k] for k in ("f1", "f2")] for c in loop.asked])
        return hypervolume(F, reference)

    nsga = front_hypervolume(build_nsga(seed=0, pop_size=20))
    random = front_hypervolume(RandomSearch(RandomOptions(objectives={"f1": "min", "f2": "min"}), box(3), 0))
    best = 0.1 + 2 / 3 + 0.1 * 1.1  # the true front f2 = 1 - sqrt(f1) against (1.1, 1.1): 0.8767
    assert nsga > random + 0.15, (nsga, random)
    assert 0.75 < nsga <= best + 1e-9


@pytest.mark.parametrize("m, algorithm", [(2, NSGA2), (3, NSGA2), (4, NSGA3), (5, NSGA3)])
def test_nsga_three_beyond_three_objectives(m: int, algorithm: type):
    goals = {f"f{i}": "min" for i in range(m)}
    strategy = build_nsga(objectives=goals, d=m, pop_size=12)
    assert type(strategy.algorithm) is algorithm
    if algorithm is NSGA3:
        directions = strategy.algorithm.ref_dirs
        assert directions.shape[1] == m and np.allclose(directions.sum(axis=1), 1.0)
    loop = Loop(strategy, lambda x: EvalResult({f"f{i}": float(x[i] + 0.1 * x.sum()) for i in range(m)}))
    for _ in range(30):
        loop.ask()
    loop.tell_all("reversed")
    assert strategy.stats()["told"] >= 24 and strategy.stats()["told"] + len(strategy.waiting) == 30
    assert non_dominated(strategy.algorithm.pop.get("F")).sum() == strategy.stats()["front_size"] >= 1


def dtlz2(m: int) -> Callable[[np.ndarray], EvalResult]:
    """DTLZ2 with m objectives (all minimised) over m + 2 genes: a curved front, NSGA-III's usual test."""

    def evaluate(x: np.ndarray) -> EvalResult:
        g = float(np.sum((x[m - 1 :] - 0.5) ** 2))
        angles = x[: m - 1] * np.pi / 2
        f = [
            (1 + g) * np.prod(np.cos(angles[: m - 1 - i])) * (np.sin(angles[m - 1 - i]) if i else 1.0) for i in range(m)
        ]
        return EvalResult({f"f{i}": float(v) for i, v in enumerate(f)})

    return evaluate


def drive_out_of_order(loop: Loop, evaluations: int, seed: int, in_flight: int = 12) -> None:
    """Ask until `evaluations` were told in all, keeping up to `in_flight` out and telling a random one
    of them each time (every 13th fails): pymoo gets partial batches, out of order."""
    rng = np.random.default_rng(seed)
    while loop.told < evaluations:
        loop.ask()
        if len(loop.pending) >= in_flight:
            cid = sorted(loop.pending)[int(rng.integers(len(loop.pending)))]
            loop.tell(cid, fail=cid % 13 == 0)


def snapshot_sizes(path) -> tuple[int, int]:
    """(JSON header, array body) bytes of a safetensors snapshot."""
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    return header, len(data) - 8 - header


@pytest.mark.parametrize("m, algorithm", [(2, NSGA2), (4, NSGA3)])
def test_nsga_state_does_not_grow_and_a_late_restore_continues_exactly(tmp_path, m: int, algorithm: type):
    def make(seed: int) -> NsgaSearch:
        return build_nsga(seed, {f"f{i}": "min" for i in range(m)}, d=m + 2, pop_size=20, tell_every=7)

    loop = Loop(make(3), dtlz2(m))
    assert type(loop.strategy.algorithm) is algorithm
    sizes = {}
    for evaluations in (200, 2000):
        drive_out_of_order(loop, evaluations, seed=evaluations)
        save_state(tmp_path / f"{evaluations}.safetensors", loop.strategy.state_dict())
        sizes[evaluations] = snapshot_sizes(tmp_path / f"{evaluations}.safetensors")
    (header_200, body_200), (header_2000, body_2000) = sizes[200], sizes[2000]
    assert loop.strategy.stats()["generations"] > 50 and loop.strategy.batches and loop.strategy.waiting
    assert abs(header_2000 - header_200) < 0.1 * header_200 and header_2000 < 20_000, sizes
    assert abs(body_2000 - body_200) < 0.1 * body_200 and body_2000 < 40_000, sizes

    restored = Loop(make(99), loop.evaluate)  # another seed: everything comes from the state
    restored.strategy.load_state_dict(load_state(tmp_path / "2000.safetensors"))
    restored.pending, restored.next_id, restored.told = dict(loop.pending), loop.next_id, loop.told
    assert_same_nsga(loop.strategy, restored.strategy)
    start = len(loop.asked)
    drive_out_of_order(loop, 2300, seed=7)
    drive_out_of_order(restored, 2300, seed=7)
    assert len(restored.asked) == len(loop.asked) - start >= 300
    assert [c.meta for c in restored.asked] == [c.meta for c in loop.asked[start:]]  # the genes are in the meta
    assert_same_nsga(loop.strategy, restored.strategy)


@pytest.mark.parametrize("m", [2, 4])
def test_nsga_restored_between_generations_breeds_from_the_restored_population(tmp_path, m: int):
    """A snapshot right after pymoo's survival, nothing waiting: the next ask mates the restored population
    at once (NSGA-II's tournaments read its rank and crowding) and NSGA-III's next survival starts from the
    restored normalisation."""

    def make(seed: int) -> NsgaSearch:
        return build_nsga(seed, {f"f{i}": "min" for i in range(m)}, d=m + 2, pop_size=8, tell_every=8)

    loop = Loop(make(0), dtlz2(m))
    for _ in range(6):  # whole generations, each told at once
        loop.ask()
        for _ in range(len(loop.strategy.queue)):
            loop.ask()
        loop.tell_all("reversed")
    assert not loop.strategy.queue and not loop.strategy.waiting and not loop.pending
    restored = _restore(loop, make(1), tmp_path)
    _continue_identically(loop, restored, steps=60)
    assert len(restored.asked) == 60


def test_pareto_best_is_the_best_mean_objective():
    strategy = build_nsga(objectives={"a": "max", "b": "min"}, d=2, pop_size=4)
    loop = Loop(strategy, lambda x: EvalResult({"a": float(x[0]), "b": float(x[1])}))
    for _ in range(8):
        loop.ask()
    loop.tell_all()
    scores = [(c.genome[0] - c.genome[1]) / 2 for c in loop.asked]  # mean of (a, -b)
    genome, value = strategy.best()
    assert value == pytest.approx(max(scores))
    np.testing.assert_array_equal(genome, loop.asked[int(np.argmax(scores))].genome)


# nested MAP -------------------------------------------------------------------------------------------


def four_tasks(names: list[str]) -> Callable[[np.ndarray], EvalResult]:
    """Each task wants its own coefficient high and the others low."""

    def evaluate(x: np.ndarray) -> EvalResult:
        x = np.asarray(x, dtype=np.float64)
        accuracy = sigmoid(-1 + 4 * x - 1.5 * (x.sum() - x))
        return EvalResult({n: float(v) for n, v in zip(names, accuracy)})

    return evaluate


NESTED_BASE = {"name": "nested_map", "objectives": {f"accuracy_t{i}": "max" for i in range(4)}}


@pytest.mark.parametrize(
    "preference, path, message",
    [
        ([1, 2], "strategy.preference", "got 2 weights; needs one per objective (4: accuracy_t0, accuracy_t1"),
        ([1, -1, 1, 1], "strategy.preference[1]", "got -1.0; weights must be >= 0"),
        ([0, 0, 0, 0], "strategy.preference", "the weights must not all be zero"),
        ([1, "a", 1, 1], "strategy.preference", "got [1, 'a', 1, 1], expected list of float | null"),
    ],
)
def test_nested_map_preference_errors_name_the_field(preference, path: str, message: str):
    with pytest.raises(SpecError) as err:
        STRATEGIES.resolve({**NESTED_BASE, "preference": preference}, "strategy")
    assert err.value.path == path
    assert message in err.value.message


def test_nested_map_needs_three_objectives_and_one_gene_per_objective():
    with pytest.raises(SpecError, match=r"strategy.objectives: needs at least 3 objectives"):
        STRATEGIES.resolve({"name": "nested_map", "objectives": TWO}, "strategy")
    with pytest.raises(SpecError, match=r"strategy.design_points: got 5; a 2-gene quadratic needs >= 6"):
        STRATEGIES.resolve({**NESTED_BASE, "design_points": 5}, "strategy")
    options = STRATEGIES.resolve(NESTED_BASE, "strategy")
    with pytest.raises(SpecError) as err:
        STRATEGIES.build(options, space=box(3), seed=0)
    assert err.value.path == "strategy.objectives"
    assert "the space has 3 genes but 4 objectives" in err.value.message


@pytest.mark.parametrize("tasks, levels, pairs", [(4, 2, 3), (5, 3, 4), (3, 2, 2)])
def test_nested_map_finishes_after_its_levels(tasks: int, levels: int, pairs: int):
    names = [f"accuracy_t{i}" for i in range(tasks)]
    options = NestedMapOptions(objectives=dict.fromkeys(names, "max"), pop_size=40, generations=40)
    strategy = NestedMapSearch(options, box(tasks), 0)
    loop = Loop(strategy, four_tasks(names))
    loop.run_rounds()
    assert strategy.finished and strategy.ask() is None
    assert levels == math.ceil(math.log2(tasks)) and strategy.level == levels - 1
    assert len(strategy.choices) == pairs == tasks - 1
    assert loop.told == pairs * (options.design_points + options.front_points)
    per_pair = Counter((c.meta["level"], c.meta["pair"]) for c in loop.asked)
    assert set(per_pair.values()) == {20} and len(per_pair) == pairs
    assert sorted(sum(strategy.choices[-1]["groups"], [])) == list(range(tasks))
    assert all(np.all((c.genome >= 0) & (c.genome <= 1)) for c in loop.asked)


def test_nested_map_pair_engines_see_accuracies_and_fit_sigmoid_links():
    """Pairs are told natural accuracies (in [0, 1]), so `auto` links choose sigmoid, as plain MAP's do."""
    names = [f"accuracy_t{i}" for i in range(4)]
    strategy = NestedMapSearch(NestedMapOptions(objectives=dict.fromkeys(names, "max")), box(4), 0)
    loop = Loop(strategy, four_tasks(names))
    while strategy.level == 0 and not all(e.surrogates for e in strategy.engines):
        if not loop.ask_all():
            break
        loop.tell_all()
    engine = strategy.engines[0]
    assert engine.Y.min() >= 0 and engine.Y.max() <= 1
    assert [s.link for s in engine.surrogates] == ["sigmoid", "sigmoid"]


def test_nested_map_skewed_preference_favours_the_preferred_task():
    names = [f"accuracy_t{i}" for i in range(4)]
    evaluate = four_tasks(names)
    final = {}
    for label, preference in {"even": None, "t2": [1, 1, 20, 1]}.items():
        options = NestedMapOptions(objectives=dict.fromkeys(names, "max"), preference=preference)
        strategy = NestedMapSearch(options, box(4), 0)
        loop = Loop(strategy, evaluate)
        loop.run_rounds()
        assert strategy.finished
        final[label] = np.array([evaluate(strategy.groups[0][0]).objectives[n] for n in names])
        if preference:
            assert strategy.choices[0]["groups"][0] == [2]  # the preferred task is paired first, as group a
    t2 = final["t2"]
    assert int(np.argmax(t2)) == 2 and t2[2] > 0.9
    assert t2[2] > final["even"][2] + 0.3
    assert np.all(np.delete(t2, 2) < 0.2)


# random --------------------------------------------------------------------------------------------------


def test_random_search_stays_in_the_box_and_ignores_failures():
    strategy = RandomSearch(RandomOptions(objectives={"f1": "min"}), box(3, -2.0, 0.5), 4)
    loop = Loop(strategy, lambda x: EvalResult({"f1": float(x[0])}))
    for _ in range(50):
        loop.ask()
    loop.tell_all(failing=set(range(0, 50, 2)))
    genomes = np.array([c.genome for c in loop.asked])
    assert genomes.min() >= -2.0 and genomes.max() <= 0.5 and len(np.unique(genomes, axis=0)) == 50
    best = min(range(1, 50, 2), key=lambda i: genomes[i, 0])
    np.testing.assert_array_equal(strategy.best()[0], genomes[best])


def test_map_asks_the_same_whatever_order_a_round_is_told_in():
    """Rows are kept in point order, so the fit, and with it every later proposal, ignores arrival order."""
    runs = []
    for order in (lambda ids: ids, lambda ids: ids[::-1], lambda ids: ids[3:] + ids[:3]):
        loop = Loop(build_map(front_points=6), toy)
        design = [c.id for c in loop.ask_all()]
        for cid in order(design):
            loop.tell(cid)
        runs.append([c.genome.tolist() for c in loop.ask_all()])
    assert runs[0] == runs[1] == runs[2] and len(runs[0]) == 6


def test_plain_map_refuses_batches_without_an_acquisition():
    with pytest.raises(SpecError, match=r"strategy\.batches: batches need an acquisition"):
        parse(MapOptions, {"batches": [3]}, "strategy")


def test_nested_map_objectives_must_follow_the_evaluators_task_order():
    names = ["accuracy_large", "accuracy_small", "accuracy_middle"]
    strategy = NestedMapSearch(NestedMapOptions(objectives=dict.fromkeys(names, "max")), box(3), 0)
    strategy.check_evaluator(SimpleNamespace(tasks=["large", "small", "middle"]))  # same order: fine
    with pytest.raises(SpecError, match=r"objectives\.accuracy_large: objective 0 must be a metric of task 0"):
        strategy.check_evaluator(SimpleNamespace(tasks=["small", "middle", "large"]))


def test_nested_map_needs_weights_that_start_at_zero():
    from evomerge.evaluate.classification import mlp_layout
    from evomerge.space.merge_genes import MergeGenesOptions, MergeGenesSpace

    layout = mlp_layout([3, 2])
    seeds = [np.full(layout.size, k, dtype=np.float32) for k in range(4)]  # seed 0 is the base: 3 weights

    def merge_space(low: float) -> MergeGenesSpace:
        genes = {"weights": {"low": low, "high": 1.0, "per": "model"}}
        options = parse(MergeGenesOptions, {"methods": ["linear"], "genes": genes}, "space")
        return MergeGenesSpace(options, layout, seeds)

    options = NestedMapOptions(objectives=dict.fromkeys(["a", "b", "c"], "max"))
    with pytest.raises(SpecError, match=r"space\.genes: nested MAP needs exactly one gene, weights: \{low: 0"):
        NestedMapSearch(options, merge_space(0.2), 0)
    assert NestedMapSearch(options, merge_space(0.0), 0).ask() is not None
