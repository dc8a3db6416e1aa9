"""Driver faults and bad input with the Ray executor: SIGKILL of the driver, unreachable clusters,
too many GPUs, seed models missing on a worker's node."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from evomerge.cli import main
from evomerge.store import load_state, read_journal
from tests.conftest import wait_for_journal, write_spec

pytest.importorskip("ray")
BUDGET = 1200


def ray_spec(tmp_path: Path, name: str, **executor) -> Path:
    spec = {
        "name": name,
        "budget": BUDGET,
        "output": str(tmp_path / "runs"),
        "evaluator": {"name": "classification", "dataset": "digits", "hidden": [32], "device": "cpu"},
        "strategy": {"name": "m2n2", "population": 8},
        "runtime": {
            "progress": False,
            "threads": 1,
            "snapshot_every": 150,
            "log_every": 200,
            "executor": {"name": "ray", "workers": 2, "cpus_per_worker": 0.5, "deterministic": True, **executor},
        },
    }
    return write_spec(tmp_path / f"{name}.yaml", spec)


def evomerge(*args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "evomerge", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def final_state(run: Path) -> dict:
    entries, _ = read_journal(run / "journal.jsonl")
    state = load_state(run / "snapshot.safetensors")["strategy"]
    return {
        "journal": sorted((e["id"], e["status"], e.get("objectives"), e.get("meta")) for e in entries),
        "genomes": state["genomes"],
        "ids": state["ids"],
        "summary": {
            k: json.loads((run / "summary.json").read_text())[k] for k in ("evaluations", "best_train", "test")
        },
    }


def test_sigkill_of_the_driver_then_resume_equals_uninterrupted(tmp_path):
    reference = evomerge("run", str(ray_spec(tmp_path, "reference")), "--quiet")
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err

    killed = evomerge("run", str(ray_spec(tmp_path, "killed")), "--quiet")
    journal = tmp_path / "runs" / "killed" / "journal.jsonl"
    wait_for_journal(killed, journal, 500)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    before, _ = read_journal(journal)
    snapshot = load_state(tmp_path / "runs" / "killed" / "snapshot.safetensors")
    assert snapshot["inflight"]  # the snapshot knew what was being evaluated

    resumed = evomerge("resume", str(tmp_path / "runs" / "killed"), "--quiet")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    a, b = final_state(tmp_path / "runs" / "reference"), final_state(tmp_path / "runs" / "killed")
    assert len(a["journal"]) == BUDGET and a["journal"] == b["journal"]
    kept = {e["id"]: e for e in read_journal(journal)[0]}
    assert all(kept[e["id"]]["objectives"] == e.get("objectives") for e in before)  # nothing journaled was lost
    np.testing.assert_array_equal(a["genomes"], b["genomes"])
    np.testing.assert_array_equal(a["ids"], b["ids"])
    assert a["summary"] == b["summary"]


def test_unreachable_address_is_refused_quickly(tmp_path, capsys):
    start = time.monotonic()
    assert main(["run", str(ray_spec(tmp_path, "nowhere")), "--quiet", "--ray", "127.0.0.1:1"]) == 2
    assert "cannot reach a Ray cluster at '127.0.0.1:1'" in capsys.readouterr().err
    assert time.monotonic() - start < 30
    assert not (tmp_path / "runs" / "nowhere").exists()


def test_more_gpus_than_the_cluster_has(tmp_path, capsys):
    import ray

    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    try:
        assert main(["run", str(ray_spec(tmp_path, "gpus", address="auto", gpus_per_worker=1.0)), "--quiet"]) == 2
        assert "asks for 2 GPUs, the Ray cluster has 0" in capsys.readouterr().err
    finally:
        ray.shutdown()


def test_seed_models_missing_on_a_worker_node(tmp_path):
    import ray

    from evomerge.errors import EvomergeError
    from evomerge.runtime.ray_pool import RayExecutor
    from evomerge.spec import ExecutorSpec, load_spec

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never a cluster found here
    try:
        spec = load_spec(ray_spec(tmp_path, "no-seeds"))
        with pytest.raises(EvomergeError, match="failed to start.*seed models folder .*missing"):
            RayExecutor(spec.to_plain(), tmp_path / "not-here", ExecutorSpec(name="ray", address="auto", workers=1))
    finally:
        ray.shutdown()


def test_asynchronous_ray_run_killed_then_resumed_in_process_exactly(tmp_path):
    """Results applied in arrival order on real actors, the driver SIGKILLed, the run moved to this
    process: nothing journaled is lost or applied twice, and the final archive is the journal's."""
    from evomerge.runtime.driver import build_manager
    from evomerge.spec import load_spec
    from evomerge.store import RunDir
    from tests.test_exact_resume import assert_same_state

    path = ray_spec(tmp_path, "async", deterministic=False, in_flight_per_worker=3)
    killed = evomerge("run", str(path), "--quiet")
    run = tmp_path / "runs" / "async"
    wait_for_journal(killed, run / "journal.jsonl", 500)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    before, _ = read_journal(run / "journal.jsonl")
    assert [e["id"] for e in before] != sorted(e["id"] for e in before)  # applied as they arrived

    resumed = evomerge("resume", str(run), "--quiet", "--in-process")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    after, _ = read_journal(run / "journal.jsonl")
    assert after[: len(before)] == before and sorted(e["id"] for e in after) == list(range(BUDGET))

    replay = tmp_path / "replay" / "async"
    shutil.copytree(run, replay)
    (replay / "snapshot.safetensors").unlink()
    manager = build_manager(RunDir(replay), load_spec(replay / "spec.yaml"), BUDGET, False, False)
    manager.restore()  # the whole journal, told in its order, rebuilds the run's final archive
    assert_same_state(manager.strategy.state_dict(), load_state(run / "snapshot.safetensors")["strategy"])
