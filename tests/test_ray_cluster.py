"""A two-node Ray cluster on this machine that evomerge joins by address; a node is removed mid-search."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from evomerge.store import read_journal
from tests.conftest import write_spec

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
    deadline = time.monotonic() + 120
    while not (journal.exists() and sum(1 for _ in open(journal)) >= 60):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.1)
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
