"""The journal's durability: fsync policy, and a snapshot that detects and repairs a journal left behind."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from evomerge.cli import main
from evomerge.store import Journal, load_state, read_journal
from evomerge.store.journal import format_line
from tests.conftest import tiny_spec, write_spec


def counting_fsync(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


def test_fsync_every_line_when_the_interval_is_zero(tmp_path: Path, monkeypatch):
    calls = counting_fsync(monkeypatch)
    journal = Journal(tmp_path / "j.jsonl", fsync_seconds=0)
    for i in range(3):
        journal.append({"id": i})
    assert len(calls) == 3
    journal.close()


def test_a_line_is_durable_within_the_interval(tmp_path: Path, monkeypatch):
    calls = counting_fsync(monkeypatch)
    journal = Journal(tmp_path / "j.jsonl", fsync_seconds=0.05)
    for i in range(50):
        journal.append({"id": i})  # a burst: a handful of fsyncs, not one per line
    time.sleep(0.3)
    burst = len(calls)
    assert 1 <= burst < 10
    journal.append({"id": 50})
    time.sleep(0.3)
    assert len(calls) == burst + 1  # the lone late line was synced without another append
    journal.close()
    assert [e["id"] for e in read_journal(tmp_path / "j.jsonl")[0]] == list(range(51))


def test_the_mark_follows_appends_across_reopening(tmp_path: Path):
    path = tmp_path / "j.jsonl"
    journal = Journal(path)
    journal.append({"id": 0})
    journal.close()
    reopened = Journal(path)
    reopened.append({"id": 1})
    mark = reopened.mark
    reopened.close()
    import zlib

    data = path.read_bytes()
    assert (mark.entries, mark.size, mark.crc32) == (2, len(data), zlib.crc32(data))


def run_dir(tmp_path: Path, budget: int = 60) -> Path:
    spec = tiny_spec(tmp_path, budget=budget)
    spec["runtime"] = {"snapshot_every": 25, "log_every": 20, "progress": False}
    assert main(["run", str(write_spec(tmp_path / "spec.yaml", spec)), "--quiet"]) == 0
    return tmp_path / "runs" / "tiny"


def test_a_journal_behind_its_snapshot_is_repaired(tmp_path: Path, capsys):
    run = run_dir(tmp_path)
    entries, _ = read_journal(run / "journal.jsonl")
    snapshot = load_state(run / "snapshot.safetensors")
    assert snapshot["journal"]["entries"] == len(entries) == 60
    assert len(snapshot["journal_tail"]) == 10  # the lines since the snapshot at 50
    # a power cut on a disk that lost the last lines although the snapshot survived
    (run / "journal.jsonl").write_text("".join(format_line(e) for e in entries[:53]))
    assert main(["resume", str(run), "--budget", "80", "--quiet"]) == 0
    repaired, _ = read_journal(run / "journal.jsonl")
    assert repaired[:60] == entries and len(repaired) == 80


def test_a_changed_journal_is_refused_and_the_run_left_as_it_was(tmp_path: Path, capsys):
    run = run_dir(tmp_path)
    entries, _ = read_journal(run / "journal.jsonl")
    entries[10]["objectives"]["accuracy"] = 1.0  # a valid line, but not the result the snapshot saw
    (run / "journal.jsonl").write_text("".join(format_line(e) for e in entries))
    before = (run / "run.json").read_text()
    capsys.readouterr()
    assert main(["resume", str(run), "--budget", "80", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "journal.jsonl: its first 60 results differ from the ones the snapshot was taken after" in err
    assert (run / "run.json").read_text() == before
    assert len(read_journal(run / "journal.jsonl")[0]) == 60


def test_a_journal_too_far_behind_is_refused(tmp_path: Path, capsys):
    run = run_dir(tmp_path)
    entries, _ = read_journal(run / "journal.jsonl")
    (run / "journal.jsonl").write_text("".join(format_line(e) for e in entries[:20]))
    capsys.readouterr()
    assert main(["resume", str(run), "--budget", "80", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "holds 20 results but the snapshot was taken after 60, and it keeps only the last 10" in err


@pytest.mark.parametrize("value", [-1, "soon"])
def test_journal_fsync_option_is_checked(tmp_path: Path, capsys, value):
    spec = tiny_spec(tmp_path)
    spec["runtime"] = {"journal_fsync_s": value}
    assert main(["run", str(write_spec(tmp_path / "spec.yaml", spec)), "--quiet"]) == 2
    assert "runtime.journal_fsync_s" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
