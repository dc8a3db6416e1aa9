"""Exact resume whatever order results were applied in and whatever executor continues the run.

`ShuffledPool` runs the in-process evaluator behind a pool's interface: several candidates in
flight, results handed back in a random order, as Ray's asynchronous mode does (tests/test_ray_faults.py
runs the same checks on real actors). A crash is an exception out of `collect`: the driver dies with
its periodic snapshot and journal on disk, as after SIGKILL.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from evomerge.runtime.driver import build_manager
from evomerge.runtime.executor import InProcessExecutor, Outcome
from evomerge.search.base import Candidate
from evomerge.spec import spec_from_dict
from evomerge.store import RunDir, load_state, read_journal
from tests.conftest import tiny_spec

BUDGET = 150


class DriverDied(Exception):
    pass


class ShuffledPool:
    def __init__(self, inner: InProcessExecutor, capacity: int, seed: int, crash_after: int | None):
        self.inner, self.capacity, self.rng, self.crash_after = inner, capacity, random.Random(seed), crash_after
        self.queue: list[Candidate] = []
        self.delivered = 0

    def submit(self, candidate: Candidate) -> None:
        self.queue.append(candidate)

    def in_flight(self) -> int:
        return len(self.queue)

    def collect(self) -> list[Outcome]:
        if self.crash_after is not None and self.delivered >= self.crash_after:
            raise DriverDied
        self.rng.shuffle(self.queue)
        count = self.rng.randint(1, len(self.queue))
        done, self.queue = self.queue[:count], self.queue[count:]
        self.delivered += count
        return [self.inner.evaluation.evaluate(c) for c in done]

    def test(self, genome: np.ndarray) -> dict[str, float]:
        return self.inner.test(genome)

    def close(self) -> None:
        self.queue.clear()


def make_spec(tmp_path: Path, strategy: dict):
    return spec_from_dict(tiny_spec(tmp_path, name=strategy["name"], budget=BUDGET, strategy=strategy))


def drive(run: RunDir, spec, pool: int | None, deterministic: bool, seed: int = 0, crash_after: int | None = None):
    """Run `run` (resuming it when it has a journal) on a shuffled pool of `pool` slots, or in-process."""
    fresh = not run.journal_path.exists()
    manager = build_manager(run, spec, BUDGET, fresh_seeds=fresh, progress=False)
    if pool is not None:
        manager.executor = ShuffledPool(manager.executor, pool, seed, crash_after)
        manager.deterministic = deterministic
    if not fresh:
        manager.restore()
    try:
        return manager.loop()
    except DriverDied:
        return "died"


def journal(run: RunDir) -> list[tuple]:
    return [(e["id"], e["status"], e.get("objectives"), e.get("meta")) for e in read_journal(run.journal_path)[0]]


def replayed(run: RunDir, spec, tmp_path: Path) -> dict:
    """The strategy's state rebuilt from the journal alone."""
    copy = RunDir(tmp_path / "replay" / run.path.name)
    shutil.copytree(run.path, copy.path)
    copy.snapshot_path.unlink()
    manager = build_manager(copy, spec, BUDGET, fresh_seeds=False, progress=False)
    manager.restore()
    return manager.strategy.state_dict()


def assert_same_state(a, b, where: str = "strategy") -> None:
    """Equal to the last bit: archives, distributions and random generator states."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a.keys() - {"_funhist_values"}:  # cmaes allocates that buffer with np.empty: garbage
            assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=where)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


STRATEGIES = [
    {"name": "m2n2", "population": 6, "mutation_std": 0.05},
    {"name": "ga", "population": 6, "mutation_std": 0.05},
    {"name": "cma_es", "population": 6},
    {"name": "map_elites", "mutation_std": 0.05},
]


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s["name"])
def test_arrival_order_run_moves_between_executors_and_resumes_exactly(tmp_path: Path, strategy: dict):
    spec = make_spec(tmp_path, strategy)
    run = RunDir.create(spec, tmp_path / "runs")
    try:
        assert drive(run, spec, pool=4, deterministic=False, seed=1, crash_after=50) == "died"
        first = journal(run)
        assert len(first) >= 50 and [e[0] for e in first] != sorted(e[0] for e in first)  # applied out of order
        assert drive(run, spec, pool=1, deterministic=True, crash_after=40) == "died"  # in-process order
        second = journal(run)
        assert second[: len(first)] == first and len(second) >= len(first) + 40
        assert drive(run, spec, pool=None, deterministic=True) == "finished"
    finally:
        run.held_lock.release()
    final = journal(run)
    assert final[: len(second)] == second  # nothing journaled was lost or redone
    assert sorted(e[0] for e in final) == list(range(BUDGET))  # every candidate applied exactly once
    assert_same_state(load_state(run.snapshot_path)["strategy"], replayed(run, spec, tmp_path))


@pytest.mark.parametrize("strategy", STRATEGIES[:2], ids=lambda s: s["name"])
def test_deterministic_pool_resumed_equals_uninterrupted(tmp_path: Path, strategy: dict):
    spec = make_spec(tmp_path, strategy)
    runs = {}
    for name, crash in (("whole", None), ("resumed", 70)):
        run = RunDir.create(spec, tmp_path / name)
        try:
            status = drive(run, spec, pool=3, deterministic=True, seed=2, crash_after=crash)
            if crash is not None:
                assert status == "died"
                status = drive(run, spec, pool=3, deterministic=True, seed=3)  # other arrival order, same result
            assert status == "finished"
        finally:
            run.held_lock.release()
        runs[name] = run
    assert journal(runs["whole"]) == journal(runs["resumed"])
    a, b = (load_state(r.snapshot_path)["strategy"] for r in runs.values())
    assert_same_state(a, b)
