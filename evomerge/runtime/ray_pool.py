"""The Ray executor: long-lived evaluator actors fed small genomes, with our own pool over `ray.wait`.

Each actor builds its evaluator once and loads the seed models from the run directory's files
(never through object refs), so only genomes (kilobytes) cross the network per candidate. The
driver owns retries: an evaluator exception is an ordinary failed outcome; a dead worker is
replaced and its candidate resubmitted; a candidate that has killed two workers is poisoned; a
candidate past its deadline is cancelled and resubmitted once, then failed.
"""

from __future__ import annotations

import socket
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.evaluate.base import EvalResult
from evomerge.runtime.executor import Outcome
from evomerge.search.base import Candidate
from evomerge.spec import ExecutorSpec

MAX_KILLS = 2  # a candidate that kills this many workers is poisoned
MAX_OVERRUNS = 2  # a candidate that overruns its deadline this many times fails


class EvaluatorWorker:
    """Runs inside a Ray actor: the evaluator and the space over the run's seed files, built once."""

    def __init__(self, spec_plain: dict[str, Any], seeds_dir: str, threads: int, gpu_fraction: float = 0.0):
        import torch

        from evomerge.runtime.driver import build_evaluator_and_space
        from evomerge.runtime.threads import limit_threads
        from evomerge.spec import spec_from_dict

        limit_threads(threads)
        if 0 < gpu_fraction < 1 and torch.cuda.is_available():
            torch.cuda.set_per_process_memory_fraction(gpu_fraction)  # a GPU share comes with its memory share
        self.evaluator, self.space = build_evaluator_and_space(spec_from_dict(spec_plain), Path(seeds_dir))
        self.n_examples = getattr(self.evaluator, "n_examples", None)

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def evaluate(self, candidate_id: int, genome: np.ndarray) -> tuple[dict[str, Any] | None, str | None, float]:
        from evomerge.runtime.executor import evaluate_candidate

        outcome = evaluate_candidate(self.evaluator, self.space, Candidate(candidate_id, genome, {}), self.n_examples)
        if outcome.result is None:
            return None, outcome.error, outcome.seconds
        r = outcome.result
        return {"objectives": r.objectives, "per_example": r.per_example, "info": r.info}, None, outcome.seconds

    def test(self, genome: np.ndarray) -> dict[str, float]:
        test = getattr(self.evaluator, "test", None)
        return {} if test is None else {k: float(v) for k, v in test(self.space.decode(genome)).items()}


@dataclass
class WorkerSlot:
    index: int
    actor: Any
    node: str = "?"
    in_flight: int = 0
    evaluations: int = 0
    failures: int = 0
    busy_seconds: float = 0.0
    replaced: int = 0
    lost: bool = False  # no room for a replacement (its node is gone): the pool goes on without it


@dataclass
class Pending:
    candidate: Candidate
    worker: WorkerSlot
    submitted: float
    kills: int = 0
    overruns: int = 0


def _no_room(index: int, timeout: float, options: ExecutorSpec) -> EvomergeError:
    return EvomergeError(
        f"evaluator worker {index} found no room in the Ray cluster within {timeout:g} s "
        f"({options.cpus_per_worker:g} CPUs, {options.gpus_per_worker:g} GPUs each)"
    )


def _probe(address: str, timeout: float = 5.0) -> None:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except (OSError, ValueError) as err:
        raise EvomergeError(f"cannot reach a Ray cluster at {address!r}: {err}") from err


def connect(address: str, dashboard: bool = False) -> None:
    """Start (`local`) or join (`auto`, an address) a Ray cluster, with errors that name the cause."""
    import ray

    if ray.is_initialized():
        return
    if address not in ("local", "auto") and not address.startswith("ray://"):
        _probe(address)  # ray.init retries an unreachable GCS for minutes; fail in seconds instead
    try:
        if address == "local":
            ray.init(include_dashboard=dashboard, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise EvomergeError(f"cannot reach a Ray cluster at {address!r}: {err}") from err


class RayExecutor:
    def __init__(
        self, spec_plain: dict[str, Any], seeds_dir: Path, options: ExecutorSpec, threads: int = 1, wait_s: float = 1.0
    ):
        """`options` is the spec's `runtime.executor`; `threads` torch threads per worker; `wait_s` the
        longest single `ray.wait` (deadlines are checked between waits)."""
        import ray

        self.options = options
        self.wait_s = wait_s
        connect(options.address, dashboard=options.dashboard)
        available = ray.cluster_resources()
        if options.gpus_per_worker and available.get("GPU", 0) < options.gpus_per_worker * options.workers:
            raise EvomergeError(
                f"executor asks for {options.gpus_per_worker * options.workers:g} GPUs, "
                f"the Ray cluster has {available.get('GPU', 0):g}"
            )
        placement = {"accelerator_type": options.accelerator_type} if options.accelerator_type else {}
        self._actor_class = ray.remote(
            num_cpus=options.cpus_per_worker, num_gpus=options.gpus_per_worker, max_restarts=0, **placement
        )(EvaluatorWorker)
        self._args = (spec_plain, str(seeds_dir), threads, options.gpus_per_worker)
        self.workers = [self._start(i) for i in range(options.workers)]
        self.pending: dict[Any, Pending] = {}
        self.queue: deque[tuple[Candidate, int, int]] = deque()
        self.ready: list[Outcome] = []

    def _start(self, index: int, timeout: float = 120.0) -> WorkerSlot:
        import ray

        actor = self._actor_class.remote(*self._args)
        try:
            node = ray.get(actor.node.remote(), timeout=timeout)
        except (ray.exceptions.RayActorError, ray.exceptions.RayError) as err:
            if isinstance(err, ray.exceptions.GetTimeoutError):
                ray.kill(actor, no_restart=True)
                raise _no_room(index, timeout, self.options) from err
            cause = [line.strip() for line in str(err).splitlines() if line.strip()][-1]  # the raised error itself
            raise EvomergeError(f"evaluator worker {index} failed to start: {cause}") from err

        return WorkerSlot(index, actor, node)

    @property
    def capacity(self) -> int:
        return sum(not w.lost for w in self.workers) * self.options.in_flight_per_worker

    def _replace(self, slot: WorkerSlot) -> None:
        """A fresh actor in the slot; without room for one the slot is retired (the last one may not be)."""
        import ray

        ray.kill(slot.actor, no_restart=True)
        slot.in_flight = 0
        try:
            if ray.available_resources().get("CPU", 0.0) < self.options.cpus_per_worker:
                raise EvomergeError(f"no CPU left in the Ray cluster for evaluator worker {slot.index}")
            fresh = self._start(slot.index, timeout=30.0)
        except EvomergeError:
            slot.lost = True
            if all(w.lost for w in self.workers):
                raise
            return
        slot.actor, slot.node, slot.replaced = fresh.actor, fresh.node, slot.replaced + 1

    # Executor protocol ------------------------------------------------------------------------
    def in_flight(self) -> int:
        return len(self.pending) + len(self.queue) + len(self.ready)

    def submit(self, candidate: Candidate, kills: int = 0, overruns: int = 0) -> None:
        self.queue.append((candidate, kills, overruns))
        self._dispatch()

    def _dispatch(self) -> None:
        while self.queue:
            slot = min((w for w in self.workers if not w.lost), key=lambda w: w.in_flight)
            if slot.in_flight >= self.options.in_flight_per_worker:
                return
            candidate, kills, overruns = self.queue.popleft()
            ref = slot.actor.evaluate.remote(candidate.id, candidate.genome)
            slot.in_flight += 1
            self.pending[ref] = Pending(candidate, slot, time.monotonic(), kills, overruns)

    def collect(self) -> list[Outcome]:
        import ray

        while not self.ready and self.pending:
            done, _ = ray.wait(list(self.pending), num_returns=1, timeout=self.wait_s)
            for ref in done:
                self._finish(ref)
            self._enforce_deadlines()
            self._dispatch()
        outcomes, self.ready = self.ready, []
        return outcomes

    def _finish(self, ref: Any) -> None:
        import ray

        entry = self.pending.pop(ref)
        slot = entry.worker
        slot.in_flight = max(0, slot.in_flight - 1)
        try:
            payload, error, seconds = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as err:
            self._worker_died(entry, err)
            return
        except ray.exceptions.TaskCancelledError:
            return  # a deadline overrun, already resubmitted
        slot.evaluations += 1
        slot.busy_seconds += seconds
        if payload is None:
            slot.failures += 1
            self.ready.append(Outcome(entry.candidate, None, error, seconds))
            return
        result = EvalResult(payload["objectives"], payload["per_example"], payload["info"])
        self.ready.append(Outcome(entry.candidate, result, None, seconds))

    def _worker_died(self, entry: Pending, err: Exception) -> None:
        """Requeue everything the dead worker held; blame only the task it was running.

        An actor runs its tasks one at a time in submission order, so the culprit is the oldest task
        without a result. Ray may fail a task that finished just before the death together with the
        dead actor's queue; that innocent task is then blamed once and retried, costing at most one
        extra worker replacement. With `in_flight_per_worker: 1` the blame is always exact.
        """
        import ray

        slot = entry.worker
        slot.failures += 1
        node_lost = slot.node not in {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        orphans = [entry]
        held = self._held_by(slot)
        # let every task of the dead actor resolve (a finished task's reply may still be in transit)
        resolved, _ = ray.wait([r for r, _ in held], num_returns=len(held), timeout=2.0) if held else ([], [])
        for ref, pending in held:
            if ref in resolved:
                try:
                    ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError):
                    pass
                else:
                    self._finish(ref)  # it finished before the crash: an ordinary result, not a suspect
                    continue
            self.pending.pop(ref)
            orphans.append(pending)
        self._replace(slot)
        if node_lost:  # a lost node is nobody's fault
            self._requeue_first(orphans)
            return
        culprit = min(orphans, key=lambda p: p.submitted)
        self._requeue_first([p for p in orphans if p is not culprit])
        kills = culprit.kills + 1
        if kills >= MAX_KILLS:
            message = f"poisoned: killed its evaluator worker {kills} times ({type(err).__name__})"
            self.ready.append(Outcome(culprit.candidate, None, message, 0.0))
        else:
            self.queue.appendleft((culprit.candidate, kills, culprit.overruns))

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        for ref, entry in list(self.pending.items()):
            if ref not in self.pending or now - entry.submitted <= self.options.deadline_s:
                continue  # requeued with an earlier overdue task of its worker, or still in time
            self.pending.pop(ref)
            others = [self.pending.pop(r) for r, _ in self._held_by(entry.worker)]
            self._replace(entry.worker)  # a running actor task cannot be cancelled by force: the actor is replaced
            overruns = entry.overruns + 1
            if overruns >= MAX_OVERRUNS:
                message = f"deadline: ran past {self.options.deadline_s:g} s {overruns} times"
                self.ready.append(Outcome(entry.candidate, None, message, self.options.deadline_s))
            else:
                self.queue.append((entry.candidate, entry.kills, overruns))
            self._requeue_first(others)

    def _held_by(self, slot: WorkerSlot) -> list[tuple[Any, Pending]]:
        return [(r, p) for r, p in self.pending.items() if p.worker is slot]

    def _requeue_first(self, entries: list[Pending]) -> None:
        """Put innocent tasks of a replaced worker back at the head of the queue, oldest first."""
        for entry in sorted(entries, key=lambda p: p.submitted, reverse=True):
            self.queue.appendleft((entry.candidate, entry.kills, entry.overruns))

    def test(self, genome: np.ndarray) -> dict[str, float]:
        import ray

        slot = min((w for w in self.workers if not w.lost), key=lambda w: w.in_flight)
        return ray.get(slot.actor.test.remote(genome), timeout=self.options.deadline_s)

    def busy(self) -> tuple[int, int]:
        """(workers with work in flight, workers alive), for the progress display."""
        alive = [w for w in self.workers if not w.lost]
        return sum(w.in_flight > 0 for w in alive), len(alive)

    def worker_stats(self) -> list[dict[str, Any]]:
        return [
            {
                "worker": w.index,
                "node": w.node,
                "evaluations": w.evaluations,
                "failures": w.failures,
                "busy_seconds": round(w.busy_seconds, 3),
                "replaced": w.replaced,
                "lost": w.lost,
            }
            for w in self.workers
        ]

    def close(self) -> None:
        import ray

        for w in self.workers:
            if not w.lost:
                ray.kill(w.actor, no_restart=True)
        self.pending.clear()
        self.queue.clear()
