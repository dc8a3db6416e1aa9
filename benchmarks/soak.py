"""Soak benchmark: a long M2N2 run on a two-node local Ray cluster while a chaos loop kills things.

The cluster: a head node on 127.0.0.2 and a second node on 127.0.0.3, each a `ray start --block`
of its own (separate temp dirs, ports in a free block away from Ray's defaults, small --num-cpus),
joined by address with token authentication (RAY_AUTH_MODE=token and a fresh RAY_AUTH_TOKEN for
every process of ours: `ray start --head` turns token mode on by itself when ~/.ray/auth_token
exists, a joining `ray start` only with RAY_AUTH_MODE set, so both get it explicitly and the
user's token file is never read or written). `ray start --block` tears its node down when its
raylet dies or when it gets SIGTERM, so a node is stopped by stopping that one process; every
process we start carries a SOAK_TAG environment variable (inherited by raylets and their workers),
and at the end any process still carrying it is killed. Other Ray clusters on the machine are
never touched (no `ray stop`).

The search: the built-in `faulty` evaluator (wine, hidden [8], cpu) with no faults configured,
wrapped by `CountingEvaluator` below, which only appends each evaluated candidate id to a
per-process file; so every failure in the journal is the pool's fault, and the files count the
evaluations the workers really ran, SIGKILLs of drivers and workers notwithstanding (the summary's
per-worker counts die with the driver). Workers import it as `soak:counting_evaluator` because
this folder is on the PYTHONPATH of both nodes (workers inherit their raylet's environment) and of
the driver; nothing is installed. M2N2 (population 10), `runtime.threads: 1`, a snapshot every
500 evaluations, 4 Ray workers of 0.5 CPU with 2 candidates in flight each; one mode with
`deterministic: true`, one without.

The driver is `evomerge run SPEC --quiet --ray ADDRESS` in a subprocess. Once it has journaled a
result, a chaos loop waits exponential intervals (mean `--mean-interval`, by default scaled to the
budget) and then does one of: SIGKILL a random evaluator worker (a `ray::EvaluatorWorker` child
of one of our raylets); SIGKILL the second node's raylet and start the node again after 1-5 s;
SIGKILL the driver and run `evomerge resume RUN --quiet --ray ADDRESS` at once (time to resume:
from the resume's start to its first new journal line). Faults wait until the driver has journaled
a result since its last start, so each one hits a running search. A driver that exits on its own
with an error (an evomerge failure) is recorded and resumed; one that journals nothing for
`--stall-s` is recorded as stalled, killed and resumed.

Checks, per mode: the journal is copied every 0.2 s while the run goes; lost = lines seen then
and missing from the final journal; applied twice = repeated ids in the final journal; wrongly
failed = any failed entry (poisoned, deadline, other), since nothing is faulty; redone = (ids the
workers' counters recorded - distinct ids journaled) / distinct ids journaled; wall time is the
whole soak of the mode (resumes included), evaluations/s the journaled ones over it; in
deterministic mode, the final snapshot's
strategy state and the journal (ids, status, objectives, per-example scores, meta, asked, in
order) against an uninterrupted run of the same spec on the same Ray pool, without chaos. Not
against an in-process run, as first planned: a deterministic pool asks up to workers x in-flight
candidates ahead of the results it applies (the in-process executor asks one), and M2N2's asks
depend on the archive, so the two differ from the first journal line's `asked` on (measured:
different archives with no fault at all). For the same reason a pool whose capacity changes (a
worker slot retired) changes the search.

Disk full: a run whose output root is a 2 MB tmpfs (asynchronous Ray pool on the same cluster,
budget 20,000, 10,000 with --quick: at about 360 bytes a journal line, the tmpfs fills after about
5,000), its exit status and error line, then the tmpfs enlarged to 64 MB and `evomerge resume`:
whether it finishes, with every id journaled once.

    python benchmarks/soak.py            # 100,000 evaluations per mode: about 40 minutes on 2 cores (estimated)
    python benchmarks/soak.py --quick    # 10,000 per mode, about 4 minutes; writes soak_quick.json

Needs root for the tmpfs (`--no-disk-full` skips it). Results: benchmarks/results/soak.json
(soak_quick.json with --quick) and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from _results import save_result

from evomerge.evaluate.base import EvalResult
from evomerge.evaluate.faulty import FaultyEvaluator, FaultyOptions

BENCH = Path(__file__).resolve().parent
HEAD_IP, NODE_IP = "127.0.0.2", "127.0.0.3"
KINDS = ("worker", "raylet", "driver")


# The evaluator -------------------------------------------------------------------------------------
@dataclass
class CountingOptions(FaultyOptions):
    count_dir: str = ""  # one file per process, one candidate id per line


class CountingEvaluator(FaultyEvaluator):
    """The faulty evaluator (no faults configured) that appends each evaluated id to a file."""

    def __init__(self, options: CountingOptions):
        super().__init__(options)
        self.count_dir = options.count_dir
        self._fd: int | None = None

    def evaluate(self, params: Any) -> EvalResult:
        result = super().evaluate(params)
        if self.count_dir:
            if self._fd is None:
                os.makedirs(self.count_dir, exist_ok=True)
                name = f"{socket.gethostname()}-{os.getpid()}.ids"
                self._fd = os.open(os.path.join(self.count_dir, name), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.write(self._fd, f"{self.candidate_id}\n".encode())  # one write: survives a SIGKILL right after
        return result


def counting_evaluator(options: CountingOptions) -> CountingEvaluator:
    return CountingEvaluator(options)


counting_evaluator.options = CountingOptions  # evomerge validates the spec's options against it


def count_evaluations(count_dir: Path) -> Counter:
    ids: Counter = Counter()
    for path in count_dir.glob("*.ids") if count_dir.exists() else []:
        ids.update(int(line) for line in path.read_text().split())
    return ids


# Processes (from /proc: Linux only, like the tmpfs) --------------------------------------------------
def processes() -> list[tuple[int, int, str]]:
    """(pid, parent pid, command name) of every process."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        out.append((int(entry.name), int(stat[stat.rindex(")") + 2 :].split()[1]), comm))
    return out


def children(pid: int, name: str | None = None) -> list[int]:
    return [p for p, parent, comm in processes() if parent == pid and (name is None or comm == name)]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def kill(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except OSError:
        return False


# The cluster ---------------------------------------------------------------------------------------
def free_port_block(size: int = 16) -> int:
    """A base port in 20000-29999 (below Linux's ephemeral range, away from Ray's defaults) with `size` free."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 29000, 500)
        try:
            for port in range(base, base + size):
                with socket.socket() as s:
                    s.bind(("0.0.0.0", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free block of ports found in 20000-29999")


def tag_env(tag: str, token: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    path = os.pathsep.join([str(BENCH), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "PYTHONPATH": path, "SOAK_TAG": tag}


class Node:
    """One `ray start --block`: stopping it (SIGTERM) or losing its raylet takes the whole node down."""

    def __init__(self, name: str, args: list[str], temp_dir: Path, env: dict[str, str], log: Path):
        self.name, self.args, self.temp_dir, self.env, self.log = name, args, temp_dir, env, log
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> float:
        """Start the node and wait until `ray start` says so; returns the seconds it took."""
        began = time.monotonic()
        offset = self.log.stat().st_size if self.log.exists() else 0
        ray_cli = Path(sys.executable).with_name("ray")
        cmd = [str(ray_cli), "start", "--block", "--temp-dir", str(self.temp_dir), *self.args]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        while time.monotonic() - began < timeout:
            with open(self.log, "rb") as f:
                f.seek(offset)
                if b"Ray runtime started" in f.read():
                    return time.monotonic() - began
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        tail = self.log.read_text(errors="replace")[offset:][-2000:]
        raise RuntimeError(f"ray node {self.name} did not start (exit {self.proc.poll()}):\n{tail}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def raylet(self) -> int | None:
        if not self.alive():
            return None
        found = children(self.proc.pid, "raylet")
        return found[0] if found else None

    def workers(self) -> list[int]:
        """The evaluator actors' processes on this node (children of its raylet)."""
        raylet = self.raylet()
        if raylet is None:
            return []
        return [pid for pid in children(raylet) if cmdline(pid).startswith("ray::EvaluatorWorker")]

    def stop(self, timeout: float = 45.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()  # drains, then stops every process of the node
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


class Cluster:
    def __init__(self, root: Path, head_cpus: float, node_cpus: float):
        self.tag = f"soak-{secrets.token_hex(6)}"
        self.env = tag_env(self.tag, secrets.token_hex(32))
        base = free_port_block()
        self.address = f"{HEAD_IP}:{base}"
        common = ["--disable-usage-stats", "--object-store-memory", str(100 * 2**20)]
        head = [
            "--head",
            "--node-ip-address",
            HEAD_IP,
            "--port",
            str(base),
            "--num-cpus",
            f"{head_cpus:g}",
            "--include-dashboard",
            "false",
            "--dashboard-host",
            HEAD_IP,
            "--dashboard-port",
            str(base + 1),
            "--ray-client-server-port",
            str(base + 2),
            *self._ports(base + 3, base + 100),
            *common,
        ]
        node = [
            "--address",
            self.address,
            "--node-ip-address",
            NODE_IP,
            "--num-cpus",
            f"{node_cpus:g}",
            *self._ports(base + 9, base + 300),
            *common,
        ]
        (root / "logs").mkdir(parents=True, exist_ok=True)
        self.head = Node("head", head, root / "h", self.env, root / "logs" / "head.log")
        self.node = Node("node2", node, root / "w", self.env, root / "logs" / "node2.log")
        self.restarting = threading.Event()
        self.stopping = False
        self.restarter: threading.Thread | None = None
        self.node_restarts: list[float] = []

    @staticmethod
    def _ports(first: int, workers: int) -> list[str]:
        names = ["node-manager", "object-manager", "dashboard-agent-listen", "dashboard-agent-grpc"]
        names += ["runtime-env-agent", "metrics-export"]
        ports = [x for i, name in enumerate(names) for x in (f"--{name}-port", str(first + i))]
        return [*ports, "--min-worker-port", str(workers), "--max-worker-port", str(workers + 199)]

    def start(self) -> float:
        began = time.monotonic()
        self.head.start()
        self.node.start()
        return time.monotonic() - began

    def kill_raylet(self, pause: float) -> bool:
        """SIGKILL the second node's raylet; a thread starts the node again after `pause` seconds."""
        raylet = self.node.raylet()
        if raylet is None or self.restarting.is_set():
            return False
        self.restarting.set()
        kill(raylet)

        def restart() -> None:
            try:
                self.node.proc.wait(60)  # `ray start --block` notices and cleans up the node
                time.sleep(pause)
                if not self.stopping:
                    self.node_restarts.append(round(self.node.start(), 2))
            except Exception as err:  # noqa: BLE001 - reported, the soak goes on with one node
                print(f"soak: restarting node2 failed: {err}", file=sys.stderr)
            finally:
                self.restarting.clear()

        self.restarter = threading.Thread(target=restart, daemon=True)
        self.restarter.start()
        return True

    def wait_ready(self, timeout: float = 180.0) -> None:
        end = time.monotonic() + timeout
        while self.restarting.is_set() and time.monotonic() < end:
            time.sleep(0.2)
        if not self.node.alive():
            self.node.start()

    def stop(self) -> None:
        self.stopping = True
        if self.restarter is not None:
            self.restarter.join(180)
        for node in (self.node, self.head):
            try:
                node.stop()
            except Exception as err:  # noqa: BLE001 - go on to the next node and the sweep
                print(f"soak: stopping {node.name}: {err}", file=sys.stderr)
        kill_tagged(self.tag)


def kill_tagged(tag: str) -> int:
    """SIGKILL every process (but this one) whose environment carries SOAK_TAG=tag: only what we started."""
    mine = [pid for pid, _, _ in processes() if pid != os.getpid() and environ(pid).get("SOAK_TAG") == tag]
    return sum(kill(pid) for pid in mine)


# The run -------------------------------------------------------------------------------------------
def soak_spec(name: str, budget: int, output: Path, count_dir: Path, executor: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "budget": budget,
        "seed": 0,
        "output": str(output),
        "evaluator": {
            "name": "soak:counting_evaluator",
            "dataset": "wine",
            "hidden": [8],
            "device": "cpu",
            "count_dir": str(count_dir),
        },
        "strategy": {"name": "m2n2", "population": 10},
        "runtime": {"threads": 1, "snapshot_every": 500, "log_every": 500, "progress": False, "executor": executor},
    }


def ray_executor(address: str, deterministic: bool) -> dict[str, Any]:
    return {
        "name": "ray",
        "address": address,
        "workers": 4,
        "cpus_per_worker": 0.5,
        "in_flight_per_worker": 2,
        "deterministic": deterministic,
    }


def journal_lines(path: Path) -> list[tuple[int, str, dict[str, Any]]]:
    """(id, crc, entry) of the journal's good lines, up to the first torn or corrupt one."""
    from evomerge.store.journal import parse_line

    out = []
    if not path.exists():
        return out
    with open(path, "rb") as f:
        for raw in f:
            line = raw.decode("utf-8", errors="replace")
            entry = parse_line(line)
            if entry is None:
                break
            out.append((entry["id"], line[10:18], entry))
    return out


class JournalWatch:
    """Copies the journal's complete lines as they appear (by id and CRC), to check later that none is lost."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.partial = b""
        self.count = 0  # good lines in the file as last read
        self.seen: set[tuple[int, str]] = set()
        self.truncations = 0

    def poll(self) -> int:
        from evomerge.store.journal import parse_line

        if not self.path.exists():
            return 0
        size = self.path.stat().st_size
        if size < self.offset:  # cut back (a torn line dropped on resume): read it again from the start
            self.truncations += 1
            self.offset, self.partial, self.count = 0, b"", 0
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        new = 0
        for raw in lines:
            line = raw.decode("utf-8", errors="replace") + "\n"
            entry = parse_line(line)
            if entry is None:
                continue
            self.count += 1
            key = (entry["id"], line[10:18])
            if key not in self.seen:
                self.seen.add(key)
                new += 1
        return new


class Driver:
    def __init__(self, args: list[str], env: dict[str, str], log: Path):
        self.log = log
        self.started = time.time()
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "evomerge", *args],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def connected_after(self) -> float | None:
        """Seconds from the start to Ray's "Connected to Ray cluster" log line (its timestamp, local time)."""
        for line in self.log.read_text(errors="replace").splitlines():
            if "Connected to Ray cluster" in line:
                try:
                    stamp = dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                except ValueError:
                    return None
                return round(stamp - self.started, 3)
        return None

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def run_info(run: Path) -> dict[str, Any]:
    try:
        return json.loads((run / "run.json").read_text())
    except (OSError, ValueError):
        return {}


@dataclass
class Chaos:
    rng: random.Random
    mean_interval: float
    weights: tuple[float, float, float]
    stall_s: float
    max_wall: float


def soak_mode(mode: str, budget: int, cluster: Cluster, work: Path, chaos: Chaos) -> dict[str, Any]:
    """One soak run under chaos; returns its measurements (checks against the reference come later)."""
    deterministic = mode == "deterministic"
    name = f"soak-{mode}"
    runs, counts = work / "runs", work / f"counts-{mode}"
    spec = soak_spec(name, budget, runs, counts, ray_executor(cluster.address, deterministic))
    spec_path = work / f"{name}.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    run = runs / name
    watch = JournalWatch(run / "journal.jsonl")
    faults: Counter = Counter()
    skipped: Counter = Counter()
    resume_s: list[float] = []
    connect_s: list[float | None] = []  # of each resume: from its start to Ray's "Connected" line
    crashes: list[dict[str, Any]] = []
    stalls: list[dict[str, Any]] = []
    lifetimes = 0

    def launch(args: list[str]) -> Driver:
        nonlocal lifetimes
        lifetimes += 1
        return Driver(args, cluster.env, work / "logs" / f"{name}-driver-{lifetimes}.log")

    cluster.wait_ready()
    restarts_before = len(cluster.node_restarts)
    began = time.monotonic()
    driver = launch(["run", str(spec_path), "--quiet", "--ray", cluster.address])
    resuming: float | None = None  # when the current driver (a resume) started, until its first new line
    lines_at_start = 0
    settled = False
    next_fault = float("inf")
    last_progress = began
    outcome = "finished"
    while True:
        time.sleep(0.2)
        now = time.monotonic()
        if watch.poll():
            last_progress = now
        if not settled and watch.count > lines_at_start:
            settled = True
            if resuming is not None:
                resume_s.append(round(now - resuming, 3))
                connect_s.append(driver.connected_after())
                resuming = None
            next_fault = now + chaos.rng.expovariate(1 / chaos.mean_interval)
        rc = driver.proc.poll()
        restart = False
        if rc is not None:
            watch.poll()
            info = run_info(run)
            if info.get("status") == "finished" and watch.count >= budget:
                break  # exit 0, or killed by us after it wrote its final status
            crashes.append(
                {
                    "kind": "crash",
                    "lifetime": lifetimes,
                    "exit": rc,
                    "status": info.get("status"),
                    "error": info.get("error"),
                    "journaled": watch.count,
                    "log_tail": driver.tail(),
                }
            )
            print(f"soak {mode}: driver {lifetimes} exited {rc} ({info.get('error')})", file=sys.stderr)
            restart = True
        elif now - last_progress > chaos.stall_s:
            stalls.append({"kind": "stall", "lifetime": lifetimes, "journaled": watch.count, "log_tail": driver.tail()})
            print(f"soak {mode}: driver {lifetimes} journaled nothing for {chaos.stall_s:g} s", file=sys.stderr)
            driver.kill()
            restart = True
        elif settled and now >= next_fault:
            kind = chaos.rng.choices(KINDS, weights=chaos.weights)[0]
            done = False
            if kind == "worker":
                pids = cluster.head.workers() + cluster.node.workers()
                done = bool(pids) and kill(chaos.rng.choice(pids))
            elif kind == "raylet":
                done = cluster.kill_raylet(chaos.rng.uniform(1.0, 5.0))
            else:
                driver.kill()
                done = restart = True
            faults[kind] += done
            skipped[kind] += not done
            next_fault = now + chaos.rng.expovariate(1 / chaos.mean_interval)
        if now - began > chaos.max_wall:
            driver.kill()
            outcome = f"gave up after {chaos.max_wall:g} s"
            break
        if restart:
            if len(crashes) + len(stalls) > 10:
                outcome = "gave up: more than 10 driver crashes or stalls"
                break
            watch.poll()
            lines_at_start, settled, next_fault = watch.count, False, float("inf")
            resuming = time.monotonic()
            if (run / "run.json").exists():
                driver = launch(["resume", str(run), "--quiet", "--ray", cluster.address])
            else:  # the run failed before it created its directory: start it again
                driver = launch(["run", str(spec_path), "--quiet", "--ray", cluster.address])
            last_progress = resuming
    wall = time.monotonic() - began
    watch.poll()
    final = journal_lines(run / "journal.jsonl")
    ids = Counter(i for i, _, _ in final)
    failed = [e for _, _, e in final if e["status"] != "ok"]
    kinds = Counter(str(e.get("error", "")).split(":")[0] if e.get("error") else "?" for e in failed)
    executed = count_evaluations(counts)
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    return {
        "mode": mode,
        "budget": budget,
        "outcome": outcome,
        "journaled": len(final),
        "distinct_ids": len(ids),
        "missing_ids": budget - len(set(ids) & set(range(budget))),
        "faults": {k: faults[k] for k in KINDS},
        "faults_skipped": {k: skipped[k] for k in KINDS if skipped[k]},
        "driver_lifetimes": lifetimes,
        "lost": len(watch.seen - {(i, crc) for i, crc, _ in final}),
        "journal_truncations_seen": watch.truncations,
        "applied_twice": sum(n - 1 for n in ids.values() if n > 1),
        "wrongly_failed": len(failed),
        "wrongly_failed_by_kind": dict(kinds),
        "failed_examples": [{"id": e["id"], "error": e.get("error")} for e in failed[:5]],
        "evaluations_run": sum(executed.values()),
        "ids_run_more_than_once": sum(n > 1 for n in executed.values()),
        "redone_share": round((sum(executed.values()) - len(ids)) / max(len(ids), 1), 4),
        "resume_s": resume_s,
        "resume_connected_s": connect_s,
        "node_restart_s": cluster.node_restarts[restarts_before:],
        "crashes": crashes,
        "stalls": stalls,
        "wall_seconds": round(wall, 2),
        "evaluations_per_second": round(len(final) / wall, 1),
        "final_status": run_info(run).get("status"),
        "final_workers": summary.get("workers"),
        "spec": spec,
        "run": str(run),
    }


def evomerge_to_end(
    command: str, target: Path, cluster_env: dict[str, str], address: str
) -> subprocess.CompletedProcess:
    """`evomerge run SPEC` or `evomerge resume RUN` on the cluster, waited for, its output kept."""
    cmd = [sys.executable, "-m", "evomerge", command, str(target), "--quiet", "--ray", address]
    return subprocess.run(cmd, env=cluster_env, capture_output=True, text=True, timeout=1800)


# Deterministic mode against an uninterrupted run ---------------------------------------------------
def reference_run(spec: dict[str, Any], work: Path, env: dict[str, str], address: str) -> Path:
    """The same spec run once more on the same pool, with no chaos."""
    ref = {**spec, "name": spec["name"] + "-reference"}
    ref["evaluator"] = {**spec["evaluator"], "count_dir": str(work / "counts-reference")}
    path = work / f"{ref['name']}.yaml"
    path.write_text(yaml.safe_dump(ref, sort_keys=False))
    done = evomerge_to_end("run", path, env, address)
    if done.returncode != 0:
        raise RuntimeError(f"the uninterrupted reference run failed:\n{done.stderr[-3000:]}")
    return Path(ref["output"]) / ref["name"]


def first_difference(a: Any, b: Any, path: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return f"{path or '.'}: keys {sorted(set(a) ^ set(b))} differ"
        for key in sorted(a):
            diff = first_difference(a[key], b[key], f"{path}.{key}")
            if diff:
                return diff
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            diff = first_difference(x, y, f"{path}[{i}]")
            if diff:
                return diff
        return None
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        x, y = np.asarray(a), np.asarray(b)
        if x.shape != y.shape or x.dtype != y.dtype or not np.array_equal(x, y, equal_nan=x.dtype.kind == "f"):
            return f"{path}: arrays differ (shape {x.shape} vs {y.shape})"
        return None
    return None if a == b or (a != a and b != b) else f"{path}: {a!r} != {b!r}"


def compare_with_reference(run: Path, reference: Path, counts: Path) -> dict[str, Any]:
    from evomerge.store import load_state

    def journal(path: Path) -> list[dict[str, Any]]:
        return [{k: v for k, v in e.items() if k not in ("seconds", "clock")} for _, _, e in journal_lines(path)]

    a, b = journal(run / "journal.jsonl"), journal(reference / "journal.jsonl")
    journal_diff = None
    for i, (x, y) in enumerate(zip(a, b)):
        diff = first_difference(x, y, f"journal line {i + 1} (id {x.get('id')})")
        if diff:
            journal_diff = diff
            break
    if journal_diff is None and len(a) != len(b):
        journal_diff = f"journal lengths {len(a)} vs {len(b)}"
    state_diff = first_difference(
        load_state(run / "snapshot.safetensors")["strategy"],
        load_state(reference / "snapshot.safetensors")["strategy"],
        "strategy",
    )
    return {
        "archive_identical": state_diff is None,
        "journal_identical": journal_diff is None,
        "first_difference": state_diff or journal_diff,
        "reference_evaluations_run": sum(count_evaluations(counts).values()),
    }


# Disk full -----------------------------------------------------------------------------------------
def disk_full(cluster: Cluster, work: Path, budget: int, size: str = "2m") -> dict[str, Any]:
    mount = work / "tmpfs"
    mount.mkdir()
    out: dict[str, Any] = {"tmpfs": size, "budget": budget}
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
    if mounted.returncode != 0:
        return {**out, "skipped": f"mount failed: {mounted.stderr.decode().strip()}"}
    try:
        spec = soak_spec("disk-full", budget, mount, work / "counts-disk-full", ray_executor(cluster.address, False))
        spec_path = work / "disk-full.yaml"
        spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
        run = mount / "disk-full"
        cluster.wait_ready()
        began = time.monotonic()
        first = evomerge_to_end("run", spec_path, cluster.env, cluster.address)
        err = [line for line in first.stderr.splitlines() if line.strip()]
        out["run"] = {
            "exit": first.returncode,
            "seconds": round(time.monotonic() - began, 1),
            "error_line": next((line for line in err if line.startswith("evomerge: error")), err[-1] if err else ""),
            "traceback": any(line.startswith("Traceback") for line in err),
            "stderr_tail": err[-15:],
            "status": run_info(run).get("status"),
            "run_json_error": run_info(run).get("error"),
            "journaled": len(journal_lines(run / "journal.jsonl")),
            "journal_bytes": (run / "journal.jsonl").stat().st_size if (run / "journal.jsonl").exists() else None,
            "snapshot": (run / "snapshot.safetensors").exists(),
            "stray_temp_files": sorted(p.name for p in run.glob(".*tmp*")) if run.exists() else [],
        }
        subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)
        began = time.monotonic()
        second = evomerge_to_end("resume", run, cluster.env, cluster.address)
        final = journal_lines(run / "journal.jsonl")
        ids = Counter(i for i, _, _ in final)
        err = [line for line in second.stderr.splitlines() if line.strip()]
        out["resume"] = {
            "exit": second.returncode,
            "seconds": round(time.monotonic() - began, 1),
            "status": run_info(run).get("status"),
            "journaled": len(final),
            "every_id_once": sorted(ids) == list(range(budget)) and max(ids.values(), default=0) == 1,
            "failed": sum(e["status"] != "ok" for _, _, e in final),
            "stderr_tail": err[-15:],
        }
        out["resumable"] = second.returncode == 0 and out["resume"]["status"] == "finished"
        out["clear_error"] = first.returncode != 0 and not out["run"]["traceback"]
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)
    return out


# Report --------------------------------------------------------------------------------------------
def table(rows: list[dict[str, Any]]) -> str:
    head = [
        "mode",
        "evaluations",
        "faults: worker / raylet / driver",
        "lost",
        "applied twice",
        "wrongly failed",
        "redone",
        "resume s (median / max)",
        "archive identical",
        "driver crashes / stalls",
        "wall s",
        "evals/s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        f = r["faults"]
        resume = f"{statistics.median(r['resume_s']):.1f} / {max(r['resume_s']):.1f}" if r["resume_s"] else "-"
        same = r.get("archive_identical")
        identical = "-" if same is None else ("yes" if same and r.get("journal_identical") else "no")
        cells = [
            r["mode"],
            f"{r['journaled']:,} / {r['budget']:,}",
            f"{f['worker']} / {f['raylet']} / {f['driver']}",
            str(r["lost"]),
            str(r["applied_twice"]),
            str(r["wrongly_failed"]) + (f" ({', '.join(r['wrongly_failed_by_kind'])})" if r["wrongly_failed"] else ""),
            f"{100 * r['redone_share']:.2f}%",
            resume,
            identical,
            f"{len(r['crashes'])} / {len(r['stalls'])}",
            f"{r['wall_seconds']:.0f}",
            f"{r['evaluations_per_second']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def disk_table(d: dict[str, Any]) -> str:
    if "skipped" in d or "run" not in d:
        return f"disk full: skipped ({d.get('skipped', d.get('error'))})"
    r, s = d["run"], d["resume"]
    return "\n".join(
        [
            "| disk full (tmpfs) | exit | error line | journaled | resume exit | resumed to | every id once |",
            "|---|---|---|---|---|---|---|",
            f"| {d['tmpfs']}, then 64m | {r['exit']} | `{r['error_line'][:150]}` | {r['journaled']:,} "
            f"| {s['exit']} | {s['journaled']:,} / {d['budget']:,} ({s['status']}) | {s['every_id_once']} |",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=100_000, help="evaluations per mode (default 100,000)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 10,000 evaluations per mode")
    parser.add_argument("--seed", type=int, default=0, help="seed of the chaos schedule (default 0)")
    parser.add_argument(
        "--mean-interval", type=float, help="mean seconds between faults (default: budget / 25,000, at least 2)"
    )
    parser.add_argument("--weights", default="5,2,3", help="relative odds of worker,raylet,driver kills (5,2,3)")
    parser.add_argument("--modes", default="deterministic,asynchronous", help="modes to run, comma-separated")
    parser.add_argument("--stall-s", type=float, default=180.0, help="no journal line for this long is a stall")
    parser.add_argument("--disk-full-budget", type=int, help="budget of the disk-full run (20,000; --quick 10,000)")
    parser.add_argument("--no-disk-full", action="store_true", help="skip the disk-full run (needs root)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (run directories, logs)")
    args = parser.parse_args()
    budget = 10_000 if args.quick else args.budget
    mean = args.mean_interval or max(2.0, budget / 25_000)
    weights = tuple(float(x) for x in args.weights.split(","))
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if set(modes) - {"deterministic", "asynchronous"}:
        parser.error(f"--modes: got {args.modes!r}; valid: deterministic, asynchronous")
    chaos = Chaos(random.Random(args.seed), mean, weights, args.stall_s, max_wall=max(600.0, budget / 10))

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below on SIGTERM too
    work = Path(tempfile.mkdtemp(prefix="soak-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    cluster = Cluster(work, head_cpus=1, node_cpus=2)
    rows: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    try:
        extra["cluster_start_s"] = round(cluster.start(), 2)
        print(f"soak: cluster up at {cluster.address} in {extra['cluster_start_s']} s; work folder {work}")
        for mode in modes:
            row = soak_mode(mode, budget, cluster, work, chaos)
            if mode == "deterministic" and row["final_status"] == "finished":
                cluster.wait_ready()
                reference = reference_run(row["spec"], work, cluster.env, cluster.address)
                row.update(compare_with_reference(Path(row["run"]), reference, work / "counts-reference"))
            rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)
        if not args.no_disk_full:
            try:
                disk_budget = args.disk_full_budget or (10_000 if args.quick else 20_000)
                extra["disk_full"] = disk_full(cluster, work, disk_budget)
            except Exception as err:  # noqa: BLE001 - reported with the rest
                extra["disk_full"] = {"error": f"{type(err).__name__}: {err}"}
    finally:
        cluster.stop()
        if args.keep:
            print(f"soak: kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    text = table(rows)
    if "disk_full" in extra:
        text += "\n\n" + disk_table(extra["disk_full"])
    print(text)
    for row in rows:
        for crash in row["crashes"] + row["stalls"]:
            print(f"\n{row['mode']}: driver {crash['lifetime']}, {crash['kind']}:\n{crash['log_tail']}")
    for row in rows:
        row.pop("spec")
        row.pop("run")
    name = "soak_quick" if args.quick else "soak"
    save_result(name, text, rows, chaos={"seed": args.seed, "mean_interval_s": mean, "weights": weights}, **extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
