"""The driver loop: ask, evaluate, tell, journal, snapshot.

The journal holds the results in the order they were applied, each with the number of candidates
asked before it. Resume loads the last snapshot and replays the journal's later entries exactly:
before each one it asks until that many candidates were asked, then tells the entry. Strategies
are deterministic given their state, so the replayed search is the one that stopped, whatever the
executor, worker count or result order was, and may continue on any executor.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from evomerge.errors import EvomergeError, RunDirError
from evomerge.evaluate.base import EvalResult
from evomerge.runtime.executor import Executor, ExecutorFailure, Outcome, ReportsWorkers
from evomerge.runtime.progress import Progress
from evomerge.search.base import Candidate, Strategy
from evomerge.space.base import Space
from evomerge.spec import SearchSpec
from evomerge.store import Journal, RunDir, decode_scores, encode_scores, load_state, read_journal, save_state
from evomerge.store.journal import check_journal

_CLOCKS = ("wall_seconds", "eval_seconds", "test_seconds", "strategy_seconds")


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
    last_error: str | None = None  # the latest failure's reason, for an error that stops the run (even resumed)

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
        self.deterministic = deterministic
        self._order: deque[int] = deque()  # asked, not yet applied, in ask order
        self._launched: dict[int, Candidate] = {}
        self._unsubmitted: list[Candidate] = []  # asked before a resume; submitted when the loop starts
        self._held: dict[int, Outcome] = {}  # results waiting to be applied
        self._stop = False
        self._replaying = False
        self._journal: Journal | None = None
        self._progress = Progress(budget, enabled=progress and spec.runtime.progress)
        self._worker_load = executor.busy if isinstance(executor, ReportsWorkers) else None  # checked once: slow

    @property
    def journal(self) -> Journal:
        if self._journal is None:
            self._journal = Journal(self.run.journal_path, self.spec.runtime.journal_fsync_s)
        return self._journal

    # resume ---------------------------------------------------------------------------------
    def restore(self) -> int:
        """Load the last snapshot and replay the journal after it; returns the number of results replayed."""
        self._replaying = True
        try:
            if self.run.snapshot_path.exists():
                snapshot = load_state(self.run.snapshot_path)
                self.strategy.load_state_dict(snapshot["strategy"])
                self.state = DriverState(**snapshot["driver"])
                for c in snapshot.get("inflight", []):
                    self._ask_as(Candidate(int(c["id"]), np.asarray(c["genome"]), c["meta"]))
                if "journal" in snapshot:
                    check_journal(self.run.journal_path, snapshot["journal"], snapshot.get("journal_tail", []))
            entries = read_journal(self.run.journal_path)[0][self.state.evaluated :]
            for entry in entries:
                self._replay(entry)
        finally:
            self._replaying = False
        return len(entries)

    def _replay(self, entry: dict[str, Any]) -> None:
        cid = entry["id"]
        asked = entry.get("asked", max(self.state.next_id, cid + 1))  # journals before 0.3 lack "asked"
        while self.state.next_id < asked:
            if self._ask() is None:
                raise RunDirError(
                    f"journal entry {cid}: the resumed search has nothing to ask where the run asked candidate "
                    f"{self.state.next_id}; the run cannot be continued exactly"
                )
        candidate = self._launched.get(cid)
        if candidate is None:
            raise RunDirError(
                f"journal entry {cid} is for a candidate the resumed search never asked (it asked up to "
                f"{self.state.next_id - 1}); the run cannot be continued exactly"
            )
        if entry.get("meta") != candidate.meta:
            raise RunDirError(
                f"journal entry {cid} was made by {entry.get('meta')}, but the resumed search asks "
                f"{candidate.meta}; the run cannot be continued exactly"
            )
        self._unsubmitted = [c for c in self._unsubmitted if c.id != cid]
        self._tell(Outcome(candidate, _entry_result(entry), entry.get("error"), entry.get("seconds", 0.0)))
        for name, value in zip(_CLOCKS, entry.get("clock", ())):
            setattr(self.state, name, value)
        self._after_result()

    # loop -----------------------------------------------------------------------------------
    def loop(self) -> str:
        """Run until the budget is spent, the strategy is done, or a stop is requested."""
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in previous:
            signal.signal(sig, self._request_stop)
        start = time.perf_counter()
        wall_before = self.state.wall_seconds
        status = "finished"
        try:
            for candidate in self._unsubmitted:
                self.executor.submit(candidate)
            self._unsubmitted.clear()
            while self.state.evaluated < self.budget:
                if self._stop:
                    status = "interrupted"
                    break
                self._fill()
                if not self._order:
                    if self.strategy.finished:
                        break
                    cause = f"; the last failure: {self.state.last_error}" if self.state.last_error else ""
                    raise EvomergeError(
                        f"the {self.spec.strategy.name} search has nothing to ask and nothing is being evaluated "
                        f"after {self.state.evaluated} evaluations ({self.state.failures} failed{cause})"
                    )
                if not self._ready_to_apply():
                    for outcome in self.executor.collect():
                        self._hold(outcome)
                for outcome in self._take_ready():
                    self.state.wall_seconds = wall_before + time.perf_counter() - start
                    self._tell(outcome)
                    self._journal_result(outcome)
                    self._after_result()
        except ExecutorFailure as err:  # stop cleanly: what was applied is journaled, the snapshot resubmits the rest
            self.state.wall_seconds = wall_before + time.perf_counter() - start
            self.snapshot()
            self.close_journal()
            raise ExecutorFailure(
                f"{err}; stopped after {self.state.evaluated:,} evaluations, continue with: "
                f"evomerge resume {self.run.path}"
            ) from err
        except BaseException:
            self._close_journal_after_error()
            raise
        finally:
            self.state.wall_seconds = wall_before + time.perf_counter() - start
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._progress.close()
        try:
            if status == "finished":  # an interrupted run adds no point, so resuming it reproduces the curve
                point_start = time.perf_counter()
                self._log_point()
                # the final test pass is the run's work too: workers' busy shares are of a wall clock that holds it
                self.state.wall_seconds += time.perf_counter() - point_start
            self.snapshot()
        except BaseException:
            self._close_journal_after_error()
            raise
        self.close_journal()
        return status

    def close_journal(self) -> None:
        journal, self._journal = self._journal, None
        if journal is not None:
            journal.close()

    def _close_journal_after_error(self) -> None:
        """Close the journal without hiding the error being raised (on a full disk its last sync may fail too)."""
        with contextlib.suppress(Exception):
            self.close_journal()

    def _request_stop(self, signum: int, frame: object) -> None:
        if self._stop:
            raise KeyboardInterrupt
        self._stop = True
        print("\nevomerge: stopping after the current evaluation (Ctrl-C again to stop at once)", file=sys.stderr)

    def _fill(self) -> None:
        """Ask until `capacity` candidates are outstanding (or the budget is all asked)."""
        while len(self._order) < self.executor.capacity and self.state.next_id < self.budget:
            candidate = self._ask()
            if candidate is None:
                return
            self.executor.submit(candidate)

    def _ask(self) -> Candidate | None:
        start = time.perf_counter()
        proposal = self.strategy.ask()
        self.state.strategy_seconds += time.perf_counter() - start
        if proposal is None:
            return None
        candidate = Candidate(self.state.next_id, proposal.genome, proposal.meta)
        self.state.next_id += 1
        self._ask_as(candidate)
        return candidate

    def _ask_as(self, candidate: Candidate) -> None:
        self._order.append(candidate.id)
        self._launched[candidate.id] = candidate
        if self._replaying:
            self._unsubmitted.append(candidate)

    def _hold(self, outcome: Outcome) -> None:
        """Keep a result until it is applied; a second result for the same candidate is dropped."""
        cid = outcome.candidate.id
        if cid in self._launched and cid not in self._held:
            self._held[cid] = outcome

    def _ready_to_apply(self) -> bool:
        if self.deterministic:
            return self._order[0] in self._held
        return bool(self._held)

    def _take_ready(self) -> list[Outcome]:
        """Deterministic: only the oldest outstanding result, so asks and tells interleave the same way
        however results arrive. Otherwise every result that has arrived, as it arrived."""
        ids = [self._order[0]] if self.deterministic else list(self._held)
        return [self._held.pop(cid) for cid in ids if cid in self._held]

    def _tell(self, outcome: Outcome) -> None:
        """Apply a result; until then its candidate counts as in flight (a snapshot resubmits it)."""
        self._order.remove(outcome.candidate.id)
        del self._launched[outcome.candidate.id]
        start = time.perf_counter()
        self.strategy.tell(outcome.candidate, outcome.result)
        self.state.strategy_seconds += time.perf_counter() - start
        self.state.evaluated += 1
        self.state.eval_seconds += outcome.seconds
        if outcome.result is None:
            self.state.failures += 1
            self.state.last_error = outcome.error

    def _journal_result(self, outcome: Outcome) -> None:
        """One line per applied result, in application order, with what replaying it needs."""
        candidate, result = outcome.candidate, outcome.result
        entry: dict[str, Any] = {"id": candidate.id, "status": "ok" if result is not None else "failed"}
        if result is not None:
            entry["objectives"] = result.objectives
            if result.per_example is not None:
                entry["per_example"] = encode_scores(result.per_example)
        else:
            entry["error"] = outcome.error
        entry["meta"] = candidate.meta
        entry["seconds"] = round(outcome.seconds, 6)
        entry["asked"] = self.state.next_id
        entry["clock"] = [round(getattr(self.state, name), 6) for name in _CLOCKS]
        self.journal.append(entry)

    def _after_result(self) -> None:
        runtime, done = self.spec.runtime, self.state.evaluated
        if done % runtime.log_every == 0 or done == 1:
            self._log_point()
        if self._replaying:  # a snapshot must match the journal's length; progress shows live work only
            return
        if done % runtime.snapshot_every == 0:
            self.snapshot()
        best = self.strategy.best()
        elapsed = max(self.state.wall_seconds, 1e-9)
        extra = "workers busy {}/{}".format(*self._worker_load()) if self._worker_load is not None else ""
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
        """Strategy, driver counters, the candidates in flight (resubmitted on resume), and the journal's
        length and checksum with the lines added since the last snapshot (to repair a journal left behind)."""
        journal = self.journal
        journal.sync()  # never a snapshot ahead of the durable journal
        inflight = [{"id": c.id, "genome": c.genome, "meta": c.meta} for c in self._launched.values()]
        state = {
            "strategy": self.strategy.state_dict(),
            "driver": self.state.to_dict(),
            "inflight": inflight,
            "journal": journal.mark.to_dict(),
            "journal_tail": journal.recent_lines(),
        }
        save_state(self.run.snapshot_path, state)
        journal.forget_recent()

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
            "strategy_finished": self.strategy.finished,
        }

    def best_genome(self) -> np.ndarray | None:
        best = self.strategy.best()
        return None if best is None else best[0]
