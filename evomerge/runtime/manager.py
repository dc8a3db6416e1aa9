"""The driver loop: ask, evaluate, tell, journal, snapshot.

Resume = load the last snapshot, then run the same loop while the journal still holds results for
the ids being asked: those results are told instead of re-evaluated. Strategies are
deterministic given their state, so a resumed run ends identical to an uninterrupted one.
"""

from __future__ import annotations

import signal
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from evomerge.errors import EvomergeError, RunDirError
from evomerge.evaluate.base import EvalResult
from evomerge.runtime.executor import Executor, Outcome
from evomerge.runtime.progress import Progress
from evomerge.search.base import Candidate, Strategy
from evomerge.space.base import Space
from evomerge.spec import SearchSpec
from evomerge.store import Journal, RunDir, decode_scores, encode_scores, load_state, read_journal, save_state


@dataclass
class DriverState:
    """Everything the driver needs besides the strategy to continue a run exactly."""

    evaluated: int = 0
    next_id: int = 0
    failures: int = 0
    wall_seconds: float = 0.0
    eval_seconds: float = 0.0
    test_seconds: float = 0.0
    strategy_seconds: float = 0.0  # inside ask and tell: selection, crossover, mutation, archive update
    curve: list[dict[str, float]] = field(default_factory=list)
    last_test: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def _entry_result(entry: dict[str, Any]) -> EvalResult | None:
    if entry["status"] != "ok":
        return None
    scores = entry.get("per_example")
    return EvalResult(entry["objectives"], None if scores is None else decode_scores(scores))


class SearchManager:
    def __init__(
        self,
        run: RunDir,
        spec: SearchSpec,
        strategy: Strategy,
        executor: Executor,
        space: Space,
        budget: int,
        progress: bool = True,
        deterministic: bool = True,
    ):
        self.run = run
        self.space = space
        self.spec = spec
        self.strategy = strategy
        self.executor = executor
        self.budget = budget
        self.state = DriverState()
        self.replay: dict[int, dict[str, Any]] = {}
        self.deterministic = deterministic
        self._order: deque[int] = deque()  # launched, not yet applied, in launch order
        self._launched: dict[int, Candidate] = {}
        self._held: dict[int, tuple[Outcome, bool]] = {}  # results waiting to be applied (from journal?)
        self._resubmit: list[Candidate] = []
        self._stop = False
        self._progress = Progress(budget, enabled=progress and spec.runtime.progress)

    # resume ---------------------------------------------------------------------------------
    def restore(self) -> None:
        """Load the last snapshot; candidates in flight then are resubmitted, journaled results replayed."""
        inflight_ids: set[int] = set()
        if self.run.snapshot_path.exists():
            snapshot = load_state(self.run.snapshot_path)
            self.strategy.load_state_dict(snapshot["strategy"])
            self.state = DriverState(**snapshot["driver"])
            for c in snapshot.get("inflight", []):
                self._resubmit.append(Candidate(int(c["id"]), np.asarray(c["genome"]), c["meta"]))
                inflight_ids.add(int(c["id"]))
        entries, _ = read_journal(self.run.journal_path)
        self.replay = {e["id"]: e for e in entries if e["id"] >= self.state.next_id or e["id"] in inflight_ids}

    # loop -----------------------------------------------------------------------------------
    def loop(self) -> str:
        """Run until the budget is spent, the strategy is done, or a stop is requested."""
        journal = Journal(self.run.journal_path)
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in previous:
            signal.signal(sig, self._request_stop)
        start = time.perf_counter()
        wall_before = self.state.wall_seconds
        status = "finished"
        try:
            for candidate in sorted(self._resubmit, key=lambda c: c.id):
                self._launch(candidate, check_meta=False)
            self._resubmit.clear()
            while self.state.evaluated < self.budget:
                if self._stop:
                    status = "interrupted"
                    break
                self._fill()
                if not self._order:
                    if self.strategy.finished:
                        break
                    raise EvomergeError(
                        "the strategy has nothing to ask and nothing is being evaluated (did every initial model fail?)"
                    )
                if not self._ready_to_apply():
                    for outcome in self.executor.collect():
                        self._hold(outcome)
                for outcome, from_journal in self._take_ready():
                    self._apply(outcome, journal, from_journal)
                    self.state.wall_seconds = wall_before + time.perf_counter() - start
                    self._after_result()
        finally:
            self.state.wall_seconds = wall_before + time.perf_counter() - start
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            journal.close()
            self._progress.close()
        if status == "finished":
            self._log_point()  # an interrupted run adds no point, so resuming it reproduces the curve
        self.snapshot()
        return status

    def _request_stop(self, signum: int, frame: object) -> None:
        if self._stop:
            raise KeyboardInterrupt
        self._stop = True

    def _fill(self) -> None:
        """Ask until `capacity` candidates are outstanding (or the budget is all asked)."""
        while len(self._order) < self.executor.capacity and self.state.next_id < self.budget:
            start = time.perf_counter()
            proposal = self.strategy.ask()
            self.state.strategy_seconds += time.perf_counter() - start
            if proposal is None:
                return
            candidate = Candidate(self.state.next_id, proposal.genome, proposal.meta)
            self.state.next_id += 1
            self._launch(candidate, check_meta=True)

    def _launch(self, candidate: Candidate, check_meta: bool) -> None:
        """Submit, or take the journal's result for it (a resumed run re-asks what it had evaluated)."""
        self._order.append(candidate.id)
        self._launched[candidate.id] = candidate
        entry = self.replay.pop(candidate.id, None)
        if entry is None:
            self.executor.submit(candidate)
            return
        if check_meta and entry.get("meta") != candidate.meta:
            raise RunDirError(
                f"journal entry {candidate.id} was made by {entry.get('meta')}, but the resumed search asks "
                f"{candidate.meta}; the run cannot be continued deterministically"
            )
        outcome = Outcome(candidate, _entry_result(entry), entry.get("error"), entry.get("seconds", 0.0))
        self._held[candidate.id] = (outcome, True)

    def _hold(self, outcome: Outcome) -> None:
        """Keep a result until it is applied; a second result for the same candidate is dropped."""
        cid = outcome.candidate.id
        if cid in self._launched and cid not in self._held:
            self._held[cid] = (outcome, False)

    def _ready_to_apply(self) -> bool:
        if self.deterministic:
            return self._order[0] in self._held
        return bool(self._held)

    def _take_ready(self) -> list[tuple[Outcome, bool]]:
        """Deterministic: only the oldest outstanding result, so asks and tells interleave the same way
        however results arrive. Otherwise every result that has arrived, as it arrived."""
        ids = [self._order[0]] if self.deterministic else [i for i in self._order if i in self._held]
        ready = []
        for cid in ids:
            if cid in self._held:
                ready.append(self._held.pop(cid))
                self._order.remove(cid)
                self._launched.pop(cid, None)
        return ready

    def _apply(self, outcome: Outcome, journal: Journal, from_journal: bool) -> None:
        candidate, result = outcome.candidate, outcome.result
        start = time.perf_counter()
        self.strategy.tell(candidate, result)
        self.state.strategy_seconds += time.perf_counter() - start
        self.state.evaluated += 1
        self.state.eval_seconds += outcome.seconds
        if result is None:
            self.state.failures += 1
        if from_journal:
            return
        entry: dict[str, Any] = {"id": candidate.id, "status": "ok" if result is not None else "failed"}
        if result is not None:
            entry["objectives"] = result.objectives
            if result.per_example is not None:
                entry["per_example"] = encode_scores(result.per_example)
        else:
            entry["error"] = outcome.error
        entry["meta"] = candidate.meta
        entry["seconds"] = round(outcome.seconds, 6)
        journal.append(entry)

    def _after_result(self) -> None:
        runtime, done = self.spec.runtime, self.state.evaluated
        if done % runtime.log_every == 0 or done == 1:
            self._log_point()
        if done % runtime.snapshot_every == 0:
            self.snapshot()
        best = self.strategy.best()
        elapsed = max(self.state.wall_seconds, 1e-9)
        busy = getattr(self.executor, "busy", None)
        extra = "workers busy {}/{}".format(*busy()) if busy is not None else ""
        self._progress.update(
            done,
            done / elapsed,
            None if best is None else best[1],
            self.state.last_test.get("accuracy"),
            self.state.failures,
            extra,
        )

    def _log_point(self) -> None:
        """A curve point: the best individual's held-out metrics and the strategy's statistics."""
        best = self.strategy.best()
        if best is None:
            return
        if self.state.curve and self.state.curve[-1]["evaluations"] == self.state.evaluated:
            return
        start = time.perf_counter()
        self.state.last_test = self.executor.test(best[0])
        self.state.test_seconds += time.perf_counter() - start
        point = {
            "evaluations": self.state.evaluated,
            "wall_seconds": round(self.state.wall_seconds, 3),
            "best_train": best[1],
        }
        point.update({f"test_{k}": v for k, v in self.state.last_test.items()})
        point.update(self.strategy.stats())
        self.state.curve.append(point)

    def snapshot(self) -> None:
        """Strategy, driver counters, and the candidates in flight (resubmitted on resume)."""
        inflight = [{"id": c.id, "genome": c.genome, "meta": c.meta} for c in self._launched.values()]
        state = {"strategy": self.strategy.state_dict(), "driver": self.state.to_dict(), "inflight": inflight}
        save_state(self.run.snapshot_path, state)

    # results --------------------------------------------------------------------------------
    def summary(self, status: str) -> dict[str, Any]:
        s = self.state
        wall = max(s.wall_seconds, 1e-9)
        best = self.strategy.best()
        return {
            "name": self.spec.name,
            "status": status,
            "strategy": self.spec.strategy.name,
            "evaluations": s.evaluated,
            "budget": self.budget,
            "failures": s.failures,
            "best_train": None if best is None else best[1],
            "test": s.last_test,
            "wall_seconds": round(s.wall_seconds, 3),
            "evaluations_per_second": round(s.evaluated / wall, 2),
            "evaluator_share": round(s.eval_seconds / wall, 4),
            "test_share": round(s.test_seconds / wall, 4),
            "strategy_share": round(s.strategy_seconds / wall, 4),
            # the driver's own time: journal, snapshots, progress, bookkeeping
            "overhead_share": round(max(0.0, 1 - (s.eval_seconds + s.test_seconds + s.strategy_seconds) / wall), 4),
            "final_stats": self.strategy.stats(),
        }

    def best_genome(self) -> np.ndarray | None:
        best = self.strategy.best()
        return None if best is None else best[0]
