"""A two-node Ray cluster on this machine that evomerge joins by address; a node is removed mid-search."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from evomerge.store import read_journal
from tests.conftest import wait_for_journal, write_spec

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    extra = c.add_node(num_cpus=2)
    c.wait_for_nodes()
    yield c, extra
    c.shutdown()


def test_search_survives_losing_a_node(tmp_path, cluster):
    c, extra = cluster
    spec = {
        "name": "node-loss",
        "budget": 400,
        "output": str(tmp_path / "runs"),
        "evaluator": {"name": "faulty", "dataset": "digits", "hidden": [64], "device": "cpu", "sleep_on": {}},
        "strategy": {"name": "m2n2", "population": 8},
        "runtime": {
            "progress": False,
            "threads": 1,
            "executor": {"name": "ray", "workers": 3, "cpus_per_worker": 0.5, "in_flight_per_worker": 2},
        },
    }
    # slow every candidate a little so the search is still running when the node goes
    spec["evaluator"]["sleep_on"] = {i: 0.02 for i in range(400)}
    path = write_spec(tmp_path / "spec.yaml", spec)
    env = {**os.environ, "RAY_ADDRESS": c.address}
    proc = subprocess.Popen(
        [sys.executable, "-m", "evomerge", "run", str(path), "--quiet", "--ray", c.address],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    journal = tmp_path / "runs" / "node-loss" / "journal.jsonl"
    wait_for_journal(proc, journal, 60)
    c.remove_node(extra)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    summary = json.loads((tmp_path / "runs" / "node-loss" / "summary.json").read_text())
    entries, _ = read_journal(journal)
    assert summary["status"] == "finished" and summary["evaluations"] == 400
    assert sorted(e["id"] for e in entries) == list(range(400))
    assert summary["failures"] == 0  # the lost node's candidates were resubmitted, nobody blamed
    alive = [w for w in summary["workers"] if not w["lost"]]
    assert alive and len({w["node"] for w in alive}) == 1  # the rest of the search ran on the head node


def _run_on(c, tmp_path, name: str, budget: int, executor: dict, start_timeout_s: float | None = None):
    spec = {
        "name": name,
        "budget": budget,
        "output": str(tmp_path / "runs"),
        "evaluator": {"name": "faulty", "dataset": "wine", "hidden": [8], "device": "cpu"},
        "strategy": {"name": "m2n2", "population": 8},
        "runtime": {"progress": False, "threads": 1, "snapshot_every": 50, "executor": {"name": "ray", **executor}},
    }
    spec["evaluator"]["sleep_on"] = {i: 0.05 for i in range(budget)}
    if start_timeout_s is not None:
        spec["runtime"]["executor"]["start_timeout_s"] = start_timeout_s
    path = write_spec(tmp_path / f"{name}.yaml", spec)
    return subprocess.Popen(
        [sys.executable, "-m", "evomerge", "run", str(path), "--quiet", "--ray", c.address],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_node_that_comes_back_is_used_again(tmp_path, cluster):
    """Workers of 1 CPU: one fits the head, two the extra node. When that node goes, its workers wait
    for room instead of being retired, and start on the node that joins in its place."""
    c, _ = cluster
    node = c.add_node(num_cpus=2)
    c.wait_for_nodes()
    proc = _run_on(c, tmp_path, "comeback", 600, {"workers": 3, "cpus_per_worker": 1.0, "in_flight_per_worker": 1})
    journal = tmp_path / "runs" / "comeback" / "journal.jsonl"
    wait_for_journal(proc, journal, 60)
    c.remove_node(node)
    time.sleep(3)
    back = c.add_node(num_cpus=2)
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        c.remove_node(back)
    assert proc.returncode == 0, err
    summary = json.loads((tmp_path / "runs" / "comeback" / "summary.json").read_text())
    assert summary["evaluations"] == 600 and summary["failures"] == 0
    assert [w["state"] for w in summary["workers"]] == ["live"] * 3
    assert len({w["node"] for w in summary["workers"]}) == 2  # the head and the node that came back
    assert "was lost" in err and "joined the cluster" in err


def _kill_node(c, node) -> None:
    """Remove a node and SIGKILL the worker processes it leaves behind (Ray's test cluster keeps them)."""
    import psutil

    socket_name = node._raylet_socket_name
    workers = [p for p in psutil.process_iter(["cmdline"]) if any(socket_name in a for a in p.info["cmdline"] or [])]
    c.remove_node(node, allow_graceful=False)
    for process in workers:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def test_no_worker_left_stops_the_run_resumable(tmp_path, cluster):
    """The worker needs 3 CPUs, which only the node added here has; when it goes, nothing can run anywhere: the
    run stops after the start timeout with a snapshot and the resume command, and resumes in-process."""
    c, _ = cluster
    node = c.add_node(num_cpus=3)
    c.wait_for_nodes()
    proc = _run_on(c, tmp_path, "stranded", 600, {"workers": 1, "cpus_per_worker": 3.0}, start_timeout_s=5)
    run = tmp_path / "runs" / "stranded"
    wait_for_journal(proc, run / "journal.jsonl", 60)
    _kill_node(c, node)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("evomerge: error: no evaluator worker has been alive for") and last.endswith(
        f"continue with: evomerge resume {run}"
    )
    done = len(read_journal(run / "journal.jsonl")[0])
    assert json.loads((run / "run.json").read_text())["status"] == "failed"
    resumed = subprocess.run(
        [sys.executable, "-m", "evomerge", "resume", str(run), "--quiet", "--in-process"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    entries, _ = read_journal(run / "journal.jsonl")
    assert len(entries) == 600 > done and sorted(e["id"] for e in entries) == list(range(600))


def test_ray_local_starts_its_own_even_where_ray_address_is_set(tmp_path, cluster):
    c, _ = cluster
    path = tmp_path / "local.yaml"
    spec = {
        "name": "own",
        "budget": 30,
        "output": str(tmp_path / "runs"),
        "evaluator": {"name": "classification", "dataset": "wine", "hidden": [8], "device": "cpu"},
        "strategy": {"name": "m2n2", "population": 4},
        "runtime": {"progress": False, "executor": {"name": "ray", "workers": 1, "cpus_per_worker": 0.5}},
    }
    write_spec(path, spec)
    result = subprocess.run(
        [sys.executable, "-m", "evomerge", "run", str(path), "--quiet", "--ray", "local"],
        env={**os.environ, "RAY_ADDRESS": c.address},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "runs" / "own" / "summary.json").read_text())
    cluster_nodes = {node.node_id for node in c.list_all_nodes()}
    assert summary["workers"][0]["node"] not in cluster_nodes
