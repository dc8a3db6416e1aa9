"""Kill the driver (SIGKILL, SIGINT) mid-run, resume, and compare with an uninterrupted run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from evomerge.store import load_state, read_journal
from tests.conftest import tiny_spec, write_spec

BUDGET = 6000


def digits_spec(tmp_path: Path, name: str) -> dict:
    spec = tiny_spec(tmp_path, name=name, budget=BUDGET)
    spec["evaluator"] = {"name": "classification", "dataset": "digits", "hidden": [32], "device": "cpu"}
    spec["strategy"] = {"name": "m2n2", "population": 10, "mutation_std": 0.01}
    spec["runtime"] = {"snapshot_every": 700, "log_every": 500, "progress": False, "threads": 1}
    return spec


def evomerge(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "evomerge", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
    )


def wait_for_lines(journal: Path, count: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if journal.exists() and sum(1 for _ in open(journal, "rb")) >= count:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError(f"journal never reached {count} lines")


def comparable(run: Path) -> dict:
    """Everything that must match between an interrupted-and-resumed run and an uninterrupted one."""
    summary = json.loads((run / "summary.json").read_text())
    state = load_state(run / "snapshot.safetensors")
    entries, _ = read_journal(run / "journal.jsonl")
    return {
        "summary": {k: summary[k] for k in ("evaluations", "failures", "best_train", "test", "final_stats")},
        "genomes": state["strategy"]["genomes"],
        "scores": state["strategy"]["scores"],
        "ids": state["strategy"]["ids"],
        "journal": [(e["id"], e["status"], e.get("objectives"), e.get("meta"), e.get("per_example")) for e in entries],
        "curve": [{k: v for k, v in p.items() if k != "wall_seconds"} for p in state["driver"]["curve"]],
    }


def assert_same(a: dict, b: dict) -> None:
    assert a["summary"] == b["summary"]
    for key in ("genomes", "scores", "ids"):
        np.testing.assert_array_equal(a[key], b[key])
    assert len(a["journal"]) == len(b["journal"]) == BUDGET
    assert a["journal"] == b["journal"]
    assert a["curve"] == b["curve"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("reference")
    spec = write_spec(tmp / "spec.yaml", digits_spec(tmp, "reference"))
    proc = evomerge("run", str(spec), "--quiet")
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    return comparable(tmp / "runs" / "reference")


def interrupted_run(tmp_path: Path, name: str, lines: int, sig: signal.Signals) -> tuple[Path, subprocess.Popen]:
    """Start a run in a subprocess and send it `sig` once its journal holds `lines` results."""
    spec = write_spec(tmp_path / "spec.yaml", digits_spec(tmp_path, name))
    run = tmp_path / "runs" / name
    proc = evomerge("run", str(spec), "--quiet")
    wait_for_lines(run / "journal.jsonl", lines, proc)
    proc.send_signal(sig)
    return run, proc


def resume_to_end(run: Path) -> None:
    resumed = evomerge("resume", str(run), "--quiet")
    _, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err


def test_sigkill_then_resume_equals_uninterrupted(tmp_path: Path, reference_run: dict):
    run, proc = interrupted_run(tmp_path, "killed", 2500, signal.SIGKILL)
    proc.wait()
    journaled, _ = read_journal(run / "journal.jsonl")
    assert len(journaled) >= 2500
    assert json.loads((run / "run.json").read_text())["status"] == "running"
    listing = subprocess.run([sys.executable, "-m", "evomerge", "ls", str(run.parent)], capture_output=True, text=True)
    assert "stopped (resume it)" in listing.stdout and f"{len(journaled):,}/{BUDGET:,}" in listing.stdout

    resume_to_end(run)
    after = comparable(run)
    # nothing journaled before the kill was lost or changed
    assert after["journal"][: len(journaled)] == [
        (e["id"], e["status"], e.get("objectives"), e.get("meta"), e.get("per_example")) for e in journaled
    ]
    assert_same(after, reference_run)
    # the driver's clocks were journaled too: the shares of wall time still add up after the kill
    summary = json.loads((run / "summary.json").read_text())
    shares = [summary[k] for k in ("evaluator_share", "strategy_share", "test_share", "overhead_share")]
    assert all(0 <= share <= 1 for share in shares) and sum(shares) == pytest.approx(1.0, abs=2e-3)
    assert summary["overhead_share"] > 0


def test_torn_journal_line_is_dropped_and_redone(tmp_path: Path, reference_run: dict):
    run, proc = interrupted_run(tmp_path, "torn", 1500, signal.SIGKILL)
    proc.wait()
    with open(run / "journal.jsonl", "ab") as f:
        f.write(b'{"crc32":"00000000","entry":{"id":99')  # what a crash mid-write leaves
    resume_to_end(run)
    assert_same(comparable(run), reference_run)


def test_sigint_stops_cleanly_and_resumes(tmp_path: Path, reference_run: dict):
    run, proc = interrupted_run(tmp_path, "interrupted", 2000, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err  # like a shell's Ctrl-C, so `run && export` stops
    assert "stopping after the current evaluation" in err
    assert f"continue with: evomerge resume {run}" in err
    info = json.loads((run / "run.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert info["status"] == "interrupted" and summary["status"] == "interrupted"
    assert 2000 <= summary["evaluations"] < BUDGET
    state = load_state(run / "snapshot.safetensors")
    assert state["driver"]["evaluated"] == summary["evaluations"]  # the stop wrote a final snapshot

    resume_to_end(run)
    assert_same(comparable(run), reference_run)


def test_resume_extends_a_finished_run(tmp_path: Path):
    spec = write_spec(tmp_path / "spec.yaml", tiny_spec(tmp_path, budget=60))
    assert subprocess.run([sys.executable, "-m", "evomerge", "run", str(spec), "--quiet"]).returncode == 0
    run = tmp_path / "runs" / "tiny"
    done = subprocess.run([sys.executable, "-m", "evomerge", "resume", str(run)], capture_output=True, text=True)
    assert done.returncode == 2 and "already finished" in done.stderr
    more = subprocess.run([sys.executable, "-m", "evomerge", "resume", str(run), "--budget", "100", "--quiet"])
    assert more.returncode == 0
    entries, _ = read_journal(run / "journal.jsonl")
    assert [e["id"] for e in entries] == list(range(100))
    assert json.loads((run / "summary.json").read_text())["evaluations"] == 100


def test_a_duplicate_result_is_applied_once(tmp_path: Path):
    """An executor that delivers one result twice (a retried task whose first try also finished)."""
    from evomerge.runtime.driver import build_manager
    from evomerge.spec import spec_from_dict
    from evomerge.store import RunDir

    spec = spec_from_dict(tiny_spec(tmp_path, name="dup", budget=40))
    run = RunDir.create(spec, tmp_path / "runs")
    try:
        manager = build_manager(run, spec, spec.budget, fresh_seeds=True, progress=False)
        inner = manager.executor.collect

        def twice():
            outcomes = inner()
            return outcomes + outcomes

        manager.executor.collect = twice
        told = []
        original_tell = manager.strategy.tell
        manager.strategy.tell = lambda c, r: (told.append(c.id), original_tell(c, r))
        assert manager.loop() == "finished"
    finally:
        run.held_lock.release()
    assert told == list(range(40))
    entries, _ = read_journal(run.journal_path)
    assert [e["id"] for e in entries] == list(range(40))
