"""The Ray executor: long-lived evaluator actors fed small genomes, with our own pool over `ray.wait`.

Each actor builds its evaluator once and loads the seed models from the run directory's files
(never through object refs), so only genomes (kilobytes) cross the network per candidate.

One fault policy covers every task the pool runs, candidate evaluations and test passes alike.
Ray's errors are sorted into four kinds (`classify`):

- transient (an actor briefly unreachable, a lost result object): the task is retried on any
  worker, without blame, up to `MAX_TRANSIENT` times; an unreachable worker gets no tasks until
  its health check (which runs beside its evaluations) answers or shows it dead;
- worker death (the process crashed, was killed or ran out of memory): the worker is replaced, its
  other tasks are resubmitted, and the task it was running is blamed; a task that killed
  `MAX_KILLS` workers on nodes that are still alive is poisoned;
- node death: like a worker death, but nobody is blamed;
- fatal (the cluster itself failed): the pool raises `ExecutorFailure` and the driver stops
  cleanly with a snapshot, so `evomerge resume` continues.

An exception inside the evaluator is not a fault: it fails that candidate only. Deadlines run
from the moment a worker starts a task (an actor runs its tasks one at a time, in order), never
from when it was queued. Workers start in parallel; a replacement starts in the background and
joins when Ray finds room for it, so a node that comes back is used again.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.evaluate.base import EvalResult, EvaluatorFacts
from evomerge.runtime.executor import CandidateEvaluation, ExecutorFailure, Outcome
from evomerge.search.base import Candidate
from evomerge.seeds import seed_paths
from evomerge.spec import ExecutorSpec

MAX_KILLS = 2  # a task that kills this many workers (on nodes still alive) is poisoned
MAX_OVERRUNS = 2  # a task that overruns its deadline this many times fails
MAX_TRANSIENT = 5  # a task that meets this many transient errors fails
MAX_START_ATTEMPTS = 3  # a worker slot whose actor fails to start this many times in a row is retired
NODE_POLL_S = 5.0  # how often the cluster's nodes are checked, to announce losses and returns


class Fault(Enum):
    TRANSIENT = "transient"
    WORKER = "worker death"
    NODE = "node death"
    TASK = "task error"
    FATAL = "fatal"


def classify(err: BaseException) -> Fault:
    """Which kind of fault a Ray error is (see the module docstring for what each kind gets)."""
    import ray.exceptions as rx

    if isinstance(err, (rx.ActorUnavailableError, rx.ObjectLostError, rx.ObjectStoreFullError, rx.RpcError)):
        return Fault.TRANSIENT
    if isinstance(err, (rx.GetTimeoutError, rx.PendingCallsLimitExceeded)):
        return Fault.TRANSIENT
    if isinstance(err, (rx.NodeDiedError, rx.LocalRayletDiedError)):
        return Fault.NODE
    if isinstance(err, rx.ActorDiedError) and "because its node has died" in str(err):
        return Fault.NODE
    if isinstance(err, (rx.RayActorError, rx.WorkerCrashedError, rx.OutOfMemoryError)):
        return Fault.WORKER
    if isinstance(err, (rx.RayTaskError, rx.UnserializableException)):
        return Fault.TASK
    return Fault.FATAL


def cause_line(err: BaseException, limit: int = 200) -> str:
    """The last non-empty line of an error (for a Ray error, the exception that was raised), cut after the
    sentence that reaches `limit` characters: Ray's own advice that follows is in its logs."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[-1] if lines else ""
    if len(text) > limit:
        end = text.find(". ", limit // 2)
        text = text[: end + 1] if 0 < end < 2 * limit else text[:limit] + "…"
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class EvaluatorWorker:
    """Runs inside a Ray actor: the evaluator and the space over the run's seed files, built once."""

    def __init__(self, spec_plain: dict[str, Any], seeds_dir: str, threads: int, gpu_fraction: float = 0.0):
        import torch

        from evomerge.runtime.driver import evaluation_parts
        from evomerge.runtime.threads import limit_threads
        from evomerge.spec import spec_from_dict

        limit_threads(threads)
        if 0 < gpu_fraction < 1 and torch.cuda.is_available():
            torch.cuda.set_per_process_memory_fraction(gpu_fraction)  # a GPU share comes with its memory share
        self.evaluation = CandidateEvaluation(*evaluation_parts(spec_from_dict(spec_plain), Path(seeds_dir)))

    def ready(self) -> tuple[str, int]:
        """The health check a new worker answers once its evaluator is built: (node id, process id)."""
        import ray

        return ray.get_runtime_context().get_node_id(), os.getpid()

    def describe(self) -> EvaluatorFacts:
        """What the driver, which holds no evaluator, checks its strategy against."""
        return self.evaluation.facts

    def evaluate(self, candidate_id: int, genome: np.ndarray) -> tuple[dict[str, Any] | None, str | None, float]:
        candidate = Candidate(candidate_id, genome, {})
        outcome = self.evaluation.evaluate(candidate)
        if outcome.result is None:
            return None, outcome.error, outcome.seconds
        r = outcome.result
        return {"objectives": r.objectives, "per_example": r.per_example, "info": r.info}, None, outcome.seconds

    def test(self, genome: np.ndarray) -> tuple[dict[str, float] | None, str | None, float]:
        start = time.perf_counter()
        try:
            metrics = self.evaluation.test(genome)
        except Exception as err:  # noqa: BLE001 - a failing test pass costs its metrics, not the run
            return None, f"{type(err).__name__}: {err}", time.perf_counter() - start
        return metrics, None, time.perf_counter() - start


@dataclass
class Task:
    """A candidate to evaluate (or a genome to test) with what the fault policy has counted against it."""

    kind: str  # "evaluate" | "test"
    candidate: Candidate
    kills: list[str] = field(default_factory=list)  # nodes of the workers that died running it
    overruns: int = 0
    transients: int = 0


@dataclass
class WorkerSlot:
    index: int
    actor: Any = None
    node: str = "?"
    pid: int = 0
    state: str = "starting"  # starting | live | checking (unreachable, health check out) | retired
    ready_ref: Any = None
    starting_since: float = 0.0
    start_failures: int = 0
    waiting_noted: bool = False
    suspect: Task | None = None  # the task that met the worker unreachable, blamed if the worker proves dead
    fifo: deque = field(default_factory=deque)  # refs of its tasks, in the order it runs them
    evaluations: int = 0
    failures: int = 0
    busy_seconds: float = 0.0
    replaced: int = 0

    @property
    def in_flight(self) -> int:
        return len(self.fifo)


@dataclass
class Running:
    task: Task
    worker: WorkerSlot
    started: float | None  # when the worker began it; None while it waits behind the worker's earlier tasks


def _no_room(timeout: float, options: ExecutorSpec) -> ExecutorFailure:
    return ExecutorFailure(
        f"no evaluator worker found room in the Ray cluster within {timeout:g} s "
        f"({options.workers} workers of {options.cpus_per_worker:g} CPUs and {options.gpus_per_worker:g} GPUs each)"
    )


_GCS_PING = "/ray.rpc.NodeInfoGcsService/GetClusterId"  # the first call every Ray client makes to a cluster


def _outward_address() -> str:
    """This machine's address as Ray picks it for a loopback host: the interface a UDP socket would leave by
    (connecting a UDP socket sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("8.8.8.8", 80))
            return probe.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def _probe(address: str, timeout: float = 5.0) -> bool:
    """Ask the address's GCS for its cluster id: fail in seconds, naming the cause, where `ray.init` would
    retry for a minute or hang; returns whether the cluster requires token authentication.

    Ray connects to a loopback host as this machine's address, so that address is asked as well.
    """
    import grpc

    host, _, port_text = address.rpartition(":")
    if not host or not port_text.isdigit():
        raise EvomergeError(f"--ray {address!r}: expected HOST:PORT, 'local' or 'auto'")
    rewritten = host in ("127.0.0.1", "localhost") and sys.platform.startswith("linux")  # as Ray does on Linux
    hosts = [host] + ([_outward_address()] if rewritten else [])
    needs_token = False
    for target in dict.fromkeys(hosts):
        via = f" (Ray connects to {host} as {target})" if target != host else ""
        channel = grpc.insecure_channel(f"{target}:{port_text}")
        try:
            channel.unary_unary(_GCS_PING)(b"", timeout=timeout)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNAUTHENTICATED:
                needs_token = True
            elif "HTTP/2" not in (err.details() or "") and err.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            ):  # nothing answers; a server that does not speak HTTP/2 is not a Ray cluster either
                raise EvomergeError(f"cannot reach a Ray cluster at {address!r}{via}: {err.details()}") from None
            else:
                raise EvomergeError(
                    f"{address!r}{via} answers, but not as a Ray cluster ({err.details()}): give the address "
                    "`ray start --head` printed (its GCS port, 6379 by default)"
                ) from None
        finally:
            channel.close()
    return needs_token


def _token_available() -> bool:
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return True
    return (Path.home() / ".ray" / "auth_token").is_file()


def _use_token(address: str) -> None:
    """Token authentication for a cluster that requires it; Ray reads the mode once, when it is imported."""
    if os.environ.get("RAY_AUTH_MODE") == "token":
        return
    if os.environ.get("RAY_AUTH_MODE") or not _token_available():
        raise EvomergeError(
            f"the Ray cluster at {address!r} requires token authentication: set RAY_AUTH_MODE=token and put its "
            "token in ~/.ray/auth_token or RAY_AUTH_TOKEN (`ray get-auth-token` on the head prints it)"
        )
    if "ray" in sys.modules:
        raise EvomergeError(
            f"the Ray cluster at {address!r} requires token authentication: set RAY_AUTH_MODE=token before Ray "
            "is imported in this process"
        )
    os.environ["RAY_AUTH_MODE"] = "token"


def connect(address: str, dashboard: bool = False, runtime_env: dict[str, Any] | None = None) -> None:
    """Start (`local`) or join (`auto`, an address) a Ray cluster, with errors that name the cause.

    `runtime_env` is the job's Ray runtime environment: `py_modules` or `working_dir` ship a plugin
    evaluator's code to every node (Ray uploads local folders only at this point, not per actor).

    `local` always starts a new Ray here, even where RAY_ADDRESS is set or another cluster runs.
    Joining a cluster that requires token authentication (the default of `ray start` since Ray 2.60)
    turns it on for this process when a token is at hand (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token), as Ray itself does only for `auto`.
    """
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        if runtime_env:
            raise EvomergeError(
                "runtime.executor.runtime_env: Ray was already started in this process, so its runtime environment "
                "is set there (ray.init(runtime_env=...)), not in the spec"
            )
        return
    if address not in ("local", "auto") and not address.startswith("ray://") and _probe(address):
        _use_token(address)
    import ray

    try:
        if address == "local":
            ray.init(address="local", include_dashboard=dashboard, log_to_driver=False, runtime_env=runtime_env)
        else:
            ray.init(address=address, log_to_driver=False, runtime_env=runtime_env)
    except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as err:
        raise EvomergeError(f"cannot reach a Ray cluster at {address!r}: {cause_line(err)}") from err


def seeds_bytes(seeds_dir: Path) -> int:
    """The seed models' size on disk, 0 where the driver cannot see them (a worker then says what is missing)."""
    try:
        return sum(p.stat().st_size for p in seed_paths(Path(seeds_dir)) if p.is_file())
    except EvomergeError:
        return 0


def start_timeout(options: ExecutorSpec, seeds_dir: Path) -> float:
    """How long a worker may take to start: the spec's, or 120 s plus 30 s per GiB of seed models to load."""
    if options.start_timeout_s is not None:
        return options.start_timeout_s
    return 120.0 + 30.0 * seeds_bytes(seeds_dir) / 2**30


def _stderr(message: str) -> None:
    print(f"evomerge: {message}", file=sys.stderr, flush=True)


class RayExecutor:
    def __init__(
        self,
        spec_plain: dict[str, Any],
        seeds_dir: Path,
        options: ExecutorSpec,
        threads: int = 1,
        wait_s: float = 1.0,
        notify: Callable[[str], None] = _stderr,
    ):
        """`options` is the spec's `runtime.executor`; `threads` torch threads per worker; `wait_s` the
        longest single `ray.wait` (deadlines are checked between waits); `notify` takes one-line notices
        (a worker replaced, a node lost or back)."""
        self.options = options
        self.wait_s = wait_s
        self.notify = notify
        self.start_timeout_s = start_timeout(options, seeds_dir)
        connect(options.address, options.dashboard, options.runtime_env)  # before Ray is imported: auth mode
        import ray

        available = ray.cluster_resources()
        if options.gpus_per_worker and available.get("GPU", 0) < options.gpus_per_worker * options.workers:
            raise EvomergeError(
                f"executor asks for {options.gpus_per_worker * options.workers:g} GPUs, "
                f"the Ray cluster has {available.get('GPU', 0):g}"
            )
        placement: dict[str, Any] = {"accelerator_type": options.accelerator_type} if options.accelerator_type else {}
        self._actor_class = ray.remote(
            num_cpus=options.cpus_per_worker,
            num_gpus=options.gpus_per_worker,
            max_restarts=0,
            concurrency_groups={"health": 1},  # evaluations stay one at a time, in order, in the default group
            **placement,
        )(EvaluatorWorker)
        self._args = (spec_plain, str(seeds_dir), threads, options.gpus_per_worker)
        self.running: dict[Any, Running] = {}
        self.queue: deque[Task] = deque()
        self.ready: list[Outcome] = []
        self.tests_done: dict[int, tuple[dict[str, float], float]] = {}
        self._test_ids = 0
        self._nodes: dict[str, str] = {}  # alive node id -> its address, as last seen
        self._nodes_checked = 0.0
        self._idle_since: float | None = None  # since when no worker is live (with work waiting)
        self.workers = [WorkerSlot(i) for i in range(options.workers)]
        try:
            self._start_all()
        except BaseException:
            self.close()
            raise
        self._poll_nodes(announce=False)

    # workers ----------------------------------------------------------------------------------
    def _launch(self, slot: WorkerSlot) -> None:
        slot.actor = self._actor_class.remote(*self._args)
        slot.ready_ref = self.health_check(slot)
        slot.state, slot.starting_since, slot.waiting_noted, slot.suspect = "starting", time.monotonic(), False, None
        self._idle_since = None  # a new worker gets its whole start timeout before the pool gives up

    @staticmethod
    def health_check(slot: WorkerSlot) -> Any:
        """`ready` runs in its own concurrency group: it answers while the worker evaluates, not after its queue."""
        return slot.actor.ready.options(concurrency_group="health").remote()

    def _start_all(self) -> None:
        """Start every worker at once; go on as soon as all answer, or some do when the time is up.

        A worker that fails to build its evaluator stops the run with the cause (a wrong spec, a
        plugin missing on a node); one that finds no room yet keeps waiting in the background.
        """
        import ray

        for slot in self.workers:
            self._launch(slot)
        deadline = time.monotonic() + self.start_timeout_s
        while any(s.state == "starting" for s in self.workers) and time.monotonic() < deadline:
            refs = [s.ready_ref for s in self.workers if s.state == "starting"]
            done, _ = ray.wait(refs, num_returns=1, timeout=min(self.wait_s * 5, max(0.0, deadline - time.monotonic())))
            for ref in done:
                slot = next(s for s in self.workers if s.ready_ref is ref)
                try:
                    slot.node, slot.pid = ray.get(ref, timeout=0)
                except ray.exceptions.RayError as err:
                    if classify(err) is Fault.NODE:  # its node went away under it: start it elsewhere
                        self._launch(slot)
                        continue
                    raise ExecutorFailure(f"evaluator worker {slot.index} failed to start: {cause_line(err)}") from err
                slot.state, slot.ready_ref = "live", None
        if not any(s.state == "live" for s in self.workers):
            raise _no_room(self.start_timeout_s, self.options)
        for slot in self.workers:
            if slot.state == "starting":
                slot.waiting_noted = True
                self.notify(f"evaluator worker {slot.index} is still waiting for room in the Ray cluster; going on")

    def _started(self, slot: WorkerSlot, ref: Any) -> None:
        """A worker's health check came back: live, or a failed start (retried, then the slot retired), or,
        for a worker that was unreachable, dead after all."""
        import ray

        if ref is not slot.ready_ref:
            return  # the check of an actor replaced since (its death was handled meanwhile)
        slot.ready_ref = None
        try:
            slot.node, slot.pid = ray.get(ref, timeout=0)
        except ray.exceptions.RayError as err:
            if slot.state == "checking":
                self._worker_died(slot, err, node_died=classify(err) is Fault.NODE)
                return
            slot.start_failures += classify(err) is not Fault.NODE  # a node lost under a starting worker is no strike
            ray.kill(slot.actor, no_restart=True)
            if slot.start_failures < MAX_START_ATTEMPTS:
                self._launch(slot)
                return
            slot.state = "retired"
            self.notify(
                f"evaluator worker {slot.index} retired: it failed to start {slot.start_failures} times, "
                f"last with {cause_line(err)}"
            )
            if all(s.state == "retired" for s in self.workers):
                raise ExecutorFailure(f"no evaluator worker can start: {cause_line(err)}") from err
            return
        if slot.state == "checking":
            self.notify(f"evaluator worker {slot.index} answers again")
        slot.state, slot.start_failures = "live", 0
        if slot.waiting_noted:
            self.notify(f"evaluator worker {slot.index} started on node {self._nodes.get(slot.node, slot.node[:8])}")

    def _replace(self, slot: WorkerSlot, why: str) -> list[Running]:
        """Kill the slot's actor and start another in the background; returns the tasks it held."""
        import ray

        held = [self.running.pop(ref) for ref in slot.fifo if ref in self.running]
        slot.fifo.clear()
        ray.kill(slot.actor, no_restart=True)
        slot.replaced += 1
        self.notify(f"evaluator worker {slot.index} {why}; starting a replacement")
        self._launch(slot)
        return held

    def _check_starting(self) -> None:
        now = time.monotonic()
        for slot in self.workers:
            if slot.state == "checking" and now - slot.starting_since > self.start_timeout_s:
                for entry in reversed(self._replace(slot, "stayed unreachable")):
                    self.queue.appendleft(entry.task)
            if slot.state == "starting" and not slot.waiting_noted and now - slot.starting_since > self.start_timeout_s:
                slot.waiting_noted = True
                self.notify(
                    f"evaluator worker {slot.index} has waited {now - slot.starting_since:.0f} s for room in the "
                    "Ray cluster; it joins when a node has room again"
                )
        if any(s.state in ("live", "checking") for s in self.workers) or not (self.queue or self.running):
            self._idle_since = None
            return
        self._idle_since = self._idle_since or now
        if now - self._idle_since > self.start_timeout_s:
            raise ExecutorFailure(
                f"no evaluator worker has been alive for {now - self._idle_since:.0f} s "
                f"(the Ray cluster has no room for {self.options.cpus_per_worker:g} CPUs and "
                f"{self.options.gpus_per_worker:g} GPUs per worker)"
            )

    def _poll_nodes(self, announce: bool = True) -> None:
        """Announce lost and returning nodes in evomerge's own words, not only in Ray's log lines."""
        import ray

        self._nodes_checked = time.monotonic()
        try:
            alive = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes() if n["Alive"]}
        except ray.exceptions.RayError:
            return
        if announce:
            for node in self._nodes.keys() - alive.keys():
                held = [s.index for s in self.workers if s.node == node]
                self.notify(
                    f"Ray node {self._nodes[node]} ({node[:8]}) was lost"
                    + (f" with evaluator workers {held}; their candidates are resubmitted" if held else "")
                )
            for node in alive.keys() - self._nodes.keys():
                self.notify(f"Ray node {alive[node]} ({node[:8]}) joined the cluster")
        self._nodes = alive

    @property
    def capacity(self) -> int:
        return sum(s.state != "retired" for s in self.workers) * self.options.in_flight_per_worker

    # Executor protocol ------------------------------------------------------------------------
    def in_flight(self) -> int:
        return len(self.running) + sum(t.kind == "evaluate" for t in self.queue) + len(self.ready)

    def submit(self, candidate: Candidate) -> None:
        self.queue.append(Task("evaluate", candidate))
        self._dispatch()

    def _dispatch(self) -> None:
        while self.queue:
            live = [s for s in self.workers if s.state == "live"]
            if not live:
                return
            slot = min(live, key=lambda s: s.in_flight)
            if slot.in_flight >= self.options.in_flight_per_worker:
                return
            task = self.queue.popleft()
            method = slot.actor.evaluate if task.kind == "evaluate" else slot.actor.test
            args = (task.candidate.id, task.candidate.genome) if task.kind == "evaluate" else (task.candidate.genome,)
            ref = method.remote(*args)
            self.running[ref] = Running(task, slot, time.monotonic() if not slot.fifo else None)
            slot.fifo.append(ref)

    def collect(self) -> list[Outcome]:
        while not self.ready and (self.running or self.queue):
            self._step()
        outcomes, self.ready = self.ready, []
        return outcomes

    def evaluator_facts(self) -> EvaluatorFacts:
        """The evaluator's facts, from a live worker (the driver builds no evaluator of its own)."""
        import ray

        slot = next(s for s in self.workers if s.state == "live")
        try:
            return ray.get(slot.actor.describe.options(concurrency_group="health").remote(), timeout=60)
        except ray.exceptions.RayError as err:
            raise ExecutorFailure(
                f"evaluator worker {slot.index} did not describe its evaluator: {cause_line(err)}"
            ) from err

    def test(self, genome: np.ndarray) -> dict[str, float]:
        """A test pass on a worker, under the same fault policy as evaluations; {} if it cannot be done."""
        self._test_ids -= 1
        test_id = self._test_ids  # negative: never a candidate's id
        self.queue.appendleft(Task("test", Candidate(test_id, np.asarray(genome), {})))
        self._dispatch()
        while test_id not in self.tests_done:
            self._step()
        metrics, _ = self.tests_done.pop(test_id)
        return metrics

    def _step(self) -> None:
        """Wait for one result or worker start (at most `wait_s`), then apply the fault policy."""
        import ray

        starting = {s.ready_ref: s for s in self.workers if s.state in ("starting", "checking")}
        refs = list(self.running) + list(starting)
        if refs:
            done, _ = ray.wait(refs, num_returns=1, timeout=self.wait_s)
            if done:
                more, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                done = list(dict.fromkeys(done + more))
        else:
            time.sleep(self.wait_s)  # every worker retired or gone: _check_starting decides
            done = []
        for ref in done:
            if ref in starting:
                self._started(starting[ref], ref)
            elif ref in self.running:
                self._finish(ref)
        self._enforce_deadlines()
        if time.monotonic() - self._nodes_checked > NODE_POLL_S:
            self._poll_nodes()
        self._check_starting()
        self._dispatch()

    def _leave_fifo(self, entry: Running, ref: Any) -> None:
        """Take a finished task off its worker; the worker starts its next one now."""
        fifo = entry.worker.fifo
        fifo.remove(ref)
        if fifo and self.running[fifo[0]].started is None:
            self.running[fifo[0]].started = time.monotonic()

    def _finish(self, ref: Any) -> None:
        import ray

        entry = self.running[ref]
        try:
            value = ray.get(ref, timeout=0)
        except ray.exceptions.RayError as err:
            self._fault(ref, err)
            return
        self._leave_fifo(entry, ref)
        del self.running[ref]
        self._deliver(entry.task, entry.worker, *value)

    def _deliver(self, task: Task, slot: WorkerSlot, payload: Any, error: str | None, seconds: float) -> None:
        slot.busy_seconds += seconds
        if task.kind == "test":
            if error is not None:
                self.notify(f"test pass failed, the curve point has no test metrics: {error}")
            self.tests_done[task.candidate.id] = (payload or {}, seconds)
            return
        slot.evaluations += 1
        if payload is None:
            slot.failures += 1
            self.ready.append(Outcome(task.candidate, None, error, seconds))
            return
        result = EvalResult(payload["objectives"], payload["per_example"], payload["info"])
        self.ready.append(Outcome(task.candidate, result, None, seconds))

    def _fail(self, task: Task, message: str, seconds: float = 0.0) -> None:
        if task.kind == "test":
            self.notify(f"test pass given up, the curve point has no test metrics: {message}")
            self.tests_done[task.candidate.id] = ({}, seconds)
        else:
            self.ready.append(Outcome(task.candidate, None, message, seconds))

    def _check(self, slot: WorkerSlot, task: Task, err: BaseException) -> None:
        """An unreachable worker gets no more tasks until a health check answers (or shows it dead); the task
        that met the outage is its suspect, should the worker turn out dead."""
        if slot.state != "live":
            return
        slot.state, slot.starting_since, slot.suspect = "checking", time.monotonic(), task
        slot.ready_ref = self.health_check(slot)
        self.notify(f"evaluator worker {slot.index} is unreachable ({cause_line(err, 120)}); checking it")

    def _fault(self, ref: Any, err: BaseException) -> None:
        import ray

        entry = self.running[ref]
        kind = classify(err)
        if kind is Fault.FATAL:
            raise ExecutorFailure(f"the Ray cluster failed: {cause_line(err)}") from err
        if kind in (Fault.TRANSIENT, Fault.TASK):
            self._leave_fifo(entry, ref)
            del self.running[ref]
            task = entry.task
            if isinstance(err, ray.exceptions.ActorUnavailableError):
                self._check(entry.worker, task, err)  # the worker is checked; the task goes elsewhere
            task.transients += kind is Fault.TRANSIENT
            if kind is Fault.TASK:
                self._fail(task, cause_line(err))
            elif task.transients >= MAX_TRANSIENT:
                self._fail(task, f"gave up after {task.transients} transient Ray errors, the last {cause_line(err)}")
            else:
                self.queue.appendleft(task)
            return
        self._worker_died(entry.worker, err, node_died=kind is Fault.NODE)

    def _worker_died(self, slot: WorkerSlot, err: BaseException, node_died: bool) -> None:
        """Collect what the dead worker finished, resubmit the rest, and blame the task it was running."""
        import ray

        refs = list(slot.fifo)
        # a task that finished just before the death may still be in transit: let each resolve
        resolved, _ = ray.wait(refs, num_returns=len(refs), timeout=2.0)
        culprit: Task | None = None
        for ref in refs:
            if ref in resolved:
                try:
                    value = ray.get(ref, timeout=0)
                except ray.exceptions.RayError:
                    pass
                else:
                    entry = self.running.pop(ref)
                    slot.fifo.remove(ref)
                    self._deliver(entry.task, slot, *value)
                    continue
            if culprit is None:
                culprit = self.running[ref].task  # the oldest unfinished task is the one it was running
        slot.failures += 1
        suspect = slot.suspect
        if suspect is not None:  # the call that met the outage (already resubmitted) was the one running
            culprit = None
            if not node_died:
                suspect.kills.append(slot.node)
        held = [r.task for r in self._replace(slot, f"died ({cause_line(err)})")]
        innocents = [t for t in held if t is not culprit]
        if culprit is not None and not node_died:
            culprit.kills.append(slot.node)
            if len(self._kills_on_live_nodes(culprit)) >= MAX_KILLS:
                message = f"poisoned: killed its evaluator worker {len(culprit.kills)} times ({type(err).__name__})"
                self._fail(culprit, message)
                culprit = None
        for task in reversed(innocents + ([culprit] if culprit is not None else [])):
            self.queue.appendleft(task)  # resubmitted first, in their original order

    def _kills_on_live_nodes(self, task: Task) -> list[str]:
        """The task's kills that count: a worker on a node that has since died was not its victim."""
        self._poll_nodes()
        return [node for node in task.kills if node in self._nodes]

    def _enforce_deadlines(self) -> None:
        """Replace a worker whose running task is past its deadline; the task is retried once, then fails."""
        now = time.monotonic()
        for slot in self.workers:
            if slot.state != "live" or not slot.fifo:
                continue
            entry = self.running[slot.fifo[0]]
            if entry.started is None or now - entry.started <= self.options.deadline_s:
                continue
            held = [r.task for r in self._replace(slot, f"ran past the {self.options.deadline_s:g} s deadline")]
            task = entry.task
            task.overruns += 1
            for other in reversed(held[1:]):
                self.queue.appendleft(other)
            if task.overruns >= MAX_OVERRUNS:
                self._fail(
                    task,
                    f"deadline: ran past {self.options.deadline_s:g} s {task.overruns} times",
                    self.options.deadline_s,
                )
            else:
                self.queue.append(task)

    def busy(self) -> tuple[int, int]:
        """(workers with work in flight, workers alive), for the progress display."""
        live = [s for s in self.workers if s.state == "live"]
        return sum(s.in_flight > 0 for s in live), len(live)

    def worker_stats(self) -> list[dict[str, Any]]:
        return [
            {
                "worker": s.index,
                "node": s.node,
                "evaluations": s.evaluations,
                "failures": s.failures,
                "busy_seconds": round(s.busy_seconds, 3),
                "replaced": s.replaced,
                "state": s.state,
                "lost": s.state != "live",
            }
            for s in self.workers
        ]

    def close(self) -> None:
        import ray

        for slot in self.workers:
            if slot.actor is not None:
                ray.kill(slot.actor, no_restart=True)
        self.running.clear()
        self.queue.clear()
