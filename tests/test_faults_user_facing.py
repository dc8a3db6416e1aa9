"""Faults a user meets: a cluster that is gone, injected crashes, failing initial models, a full disk.

Each test feeds the fault and checks the one-line message, the exit status, and that the run can
go on with nothing lost.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from evomerge.cli import main
from evomerge.evaluate.base import RunBound
from evomerge.evaluate.faulty import FaultyEvaluator, FaultyOptions
from evomerge.store import load_state, read_journal
from tests.conftest import tiny_spec, write_spec


def faulty_spec(tmp_path: Path, name: str, budget: int, **faults) -> dict:
    spec = tiny_spec(tmp_path, name=name, budget=budget)
    spec["evaluator"] = {"name": "faulty", "dataset": "wine", "hidden": [8], "device": "cpu", **faults}
    spec["runtime"]["snapshot_every"] = 10
    return spec


def evomerge(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "evomerge", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def journaled(run: Path) -> list[tuple]:
    entries, _ = read_journal(run / "journal.jsonl")
    return [(e["id"], e["status"], e.get("objectives"), e.get("meta"), e.get("per_example")) for e in entries]


def last_error_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


# 1 and 2: exit_once_on is per run; --in-process resumes a run whose cluster is gone -----------------
def test_each_run_injects_its_exit_once_fault_and_resumes_in_process_without_its_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    spec = write_spec(tmp_path / "spec.yaml", faulty_spec(tmp_path, "first", budget=40, exit_once_on=[15]))
    runs = tmp_path / "runs"
    # the same spec twice: each run crashes at candidate 15, once
    procs = {name: evomerge("run", str(spec), "--name", name, "--quiet") for name in ("first", "second")}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 3, err  # the evaluator's os._exit(3) took the driver down
        assert len(read_journal(runs / name / "journal.jsonl")[0]) == 15
        assert (runs / name / "faults" / "exit-15").exists()

    # the first run "was on" a Ray cluster that no longer exists; runtime is not part of a run's identity
    spec_file = runs / "first" / "spec.yaml"
    stored = yaml.safe_load(spec_file.read_text())
    stored["runtime"]["executor"].update(name="ray", address="127.0.0.1:1")
    spec_file.write_text(yaml.safe_dump(stored, sort_keys=False))
    monkeypatch.setitem(sys.modules, "ray", None)  # any `import ray` now fails
    assert main(["resume", str(runs / "first"), "--in-process", "--quiet"]) == 0
    assert yaml.safe_load(spec_file.read_text())["runtime"]["executor"]["name"] == "ray"  # the flag is not saved

    assert main(["resume", str(runs / "second"), "--quiet"]) == 0  # its spec says in-process
    first, second = journaled(runs / "first"), journaled(runs / "second")
    assert len(first) == 40 and [e[0] for e in first] == list(range(40))  # candidate 15 evaluated again, once
    assert first == second


def test_in_process_cannot_be_combined_with_ray_flags(tmp_path: Path, capsys):
    for flags, clash in (
        (["--ray", "local"], "argument --ray: not allowed with argument --in-process"),
        (["--workers", "2"], "argument --in-process: not allowed with argument --workers"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["resume", str(tmp_path), "--in-process", *flags])
        assert exit_info.value.code == 2
        assert clash in capsys.readouterr().err


def test_exit_once_markers_are_kept_per_run_unless_a_folder_is_given(tmp_path: Path):
    def bound(run: str, marker_dir: str | None = None) -> FaultyEvaluator:
        evaluator = FaultyEvaluator(FaultyOptions(dataset="wine", hidden=[8], device="cpu", marker_dir=marker_dir))
        assert isinstance(evaluator, RunBound)
        evaluator.bind_run(tmp_path / run)
        return evaluator

    first, second = bound("a"), bound("b")
    assert first.first_time("exit", 7) and not first.first_time("exit", 7)
    assert second.first_time("exit", 7)  # a run of its own: its fault fires too
    assert (tmp_path / "a" / "faults" / "exit-7").exists() and (tmp_path / "b" / "faults" / "exit-7").exists()
    shared = [bound(run, str(tmp_path / "markers")) for run in ("a", "b")]
    assert shared[0].first_time("exit", 7) and not shared[1].first_time("exit", 7)  # an explicit folder is shared


# 3: failing initial models are asked again; when they never succeed the error names why ---------------
def test_an_initial_model_that_fails_once_is_asked_again_and_the_run_finishes(tmp_path: Path):
    spec = write_spec(tmp_path / "spec.yaml", faulty_spec(tmp_path, "retry", budget=30, raise_on=[0]))
    assert main(["run", str(spec), "--quiet"]) == 0
    entries, _ = read_journal(tmp_path / "runs" / "retry" / "journal.jsonl")
    assert entries[0]["meta"] == {"init": 0} and entries[0]["error"].endswith("injected failure for candidate 0")
    assert (entries[2]["meta"], entries[2]["status"]) == ({"init": 0, "attempt": 2}, "ok")
    summary = json.loads((tmp_path / "runs" / "retry" / "summary.json").read_text())
    assert (summary["status"], summary["evaluations"], summary["failures"]) == ("finished", 30, 1)
    assert entries[3]["meta"]["parents"] == [2, 1]  # both seed models made it into the archive


def test_initial_models_that_always_fail_stop_the_run_naming_the_cause(tmp_path: Path, capsys):
    spec = faulty_spec(tmp_path, "doomed", budget=30, raise_on=list(range(6)))  # 2 initial models x 3 attempts
    spec["runtime"]["snapshot_every"] = 6  # the last snapshot holds every failure: a resume replays none
    spec_path = write_spec(tmp_path / "spec.yaml", spec)
    run = tmp_path / "runs" / "doomed"
    expected = (
        "evomerge: error: the m2n2 search has nothing to ask and nothing is being evaluated after 6 evaluations "
        "(6 failed; the last failure: RuntimeError: injected failure for candidate 5)"
    )
    assert main(["run", str(spec_path), "--quiet"]) == 2
    assert last_error_line(capsys) == expected
    metas = [e["meta"] for e in read_journal(run / "journal.jsonl")[0]]
    assert metas == [{"init": k % 2, **({"attempt": k // 2 + 1} if k >= 2 else {})} for k in range(6)]
    assert main(["resume", str(run), "--quiet"]) == 2
    assert last_error_line(capsys) == expected


def test_a_resume_replays_retried_initial_models_exactly(tmp_path: Path):
    """No snapshot (as after a SIGKILL before the first one): the resume rebuilds everything from the journal."""
    spec = faulty_spec(tmp_path, "replayed", budget=24, raise_on=[0, 1, 3])
    spec["runtime"]["snapshot_every"] = 1000
    reference = faulty_spec(tmp_path, "reference", budget=40, raise_on=[0, 1, 3])
    assert main(["run", str(write_spec(tmp_path / "a.yaml", spec)), "--quiet"]) == 0
    assert main(["run", str(write_spec(tmp_path / "b.yaml", reference)), "--quiet"]) == 0
    run = tmp_path / "runs" / "replayed"
    (run / "snapshot.safetensors").unlink()
    assert main(["resume", str(run), "--budget", "40", "--quiet"]) == 0
    assert journaled(run) == journaled(tmp_path / "runs" / "reference")


# 4: a full disk ---------------------------------------------------------------------------------------
class SmallDisk:
    """A tmpfs of a given size at `path` (root only), to fill up for real."""

    def __init__(self, path: Path):
        self.path = path
        self.mounted = False

    def mount(self, size_kib: int) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(self.path)], capture_output=True, text=True
        )
        if done.returncode != 0:
            pytest.skip(f"mounting a tmpfs is not permitted here (needs root): {done.stderr.strip()}")
        self.mounted = True

    def resize(self, size_kib: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size_kib}k", str(self.path)], check=True)

    def unmount(self) -> None:
        """Unmount; lazily when a file is still open there (a failing test), so no mount outlives the test."""
        if self.mounted:
            if subprocess.run(["umount", str(self.path)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "--lazy", str(self.path)], check=True)
            self.mounted = False


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    if shutil.which("mount") is None:
        pytest.skip("no mount command to make a small disk with")
    disk = SmallDisk(tmp_path / "disk")
    try:
        yield disk
    finally:
        disk.unmount()


def kib_used(folder: Path, glob: str = "**/*") -> int:
    """KiB a tmpfs gives these files: whole 4 KiB pages."""
    return sum(4 * math.ceil(p.stat().st_size / 4096) for p in folder.glob(glob) if p.is_file())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    assert main(["run", str(write_spec(tmp / "spec.yaml", tiny_spec(tmp, budget=400))), "--quiet"]) == 0
    return tmp / "runs" / "tiny"


@pytest.mark.parametrize(
    "snapshot_every, size_kib, full_file",
    [
        (1000, 64, "journal.jsonl"),  # no snapshot before the end: the journal fills the disk
        (25, 100, "snapshot.safetensors"),  # a snapshot's temporary copy does
        (25, None, "diversity.png"),  # room for everything but the last plot
    ],
    ids=["journal", "snapshot", "plots"],
)
def test_a_full_disk_stops_the_run_with_one_line_and_resume_finishes_it(
    tmp_path: Path,
    capsys,
    small_disk: SmallDisk,
    uninterrupted: Path,
    snapshot_every: int,
    size_kib: int | None,
    full_file: str,
):
    spec = tiny_spec(tmp_path, budget=400)
    spec["output"] = str(small_disk.path)
    spec["runtime"]["snapshot_every"] = snapshot_every
    spec_path = write_spec(tmp_path / "spec.yaml", spec)
    run = small_disk.path / "tiny"
    if size_kib is None:
        size_kib = kib_used(uninterrupted) - kib_used(uninterrupted, "plots/diversity.png") // 2
    small_disk.mount(size_kib)

    assert main(["run", str(spec_path), "--quiet"]) == 2
    line = last_error_line(capsys)
    done = len(read_journal(run / "journal.jsonl")[0])
    assert line.startswith("evomerge: error: ") and full_file in line
    assert line.endswith(
        f": no space left on device; the run stopped with {done:,} of 400 evaluations saved; free space, then "
        f"continue with: evomerge resume {run}"
    )
    assert (0 < done < 400) if full_file != "diversity.png" else done == 400
    # resumable as left: no torn journal line, no temporary or half-written file, a snapshot that loads
    assert read_journal(run / "journal.jsonl")[1] == (run / "journal.jsonl").stat().st_size
    assert not [p for p in run.rglob("*") if p.name.endswith((".tmp", ".partial"))]
    if (run / "snapshot.safetensors").exists():
        assert load_state(run / "snapshot.safetensors")["driver"]["evaluated"] <= done

    small_disk.resize(4096)
    assert main(["resume", str(run), "--quiet"]) == 0
    assert json.loads((run / "summary.json").read_text())["evaluations"] == 400
    assert journaled(run) == journaled(uninterrupted)  # the same 400 results as an uninterrupted run


def test_an_export_to_a_full_disk_leaves_nothing_and_says_so(tmp_path: Path, capsys, small_disk: SmallDisk):
    small_disk.mount(1024)
    spec = tiny_spec(tmp_path, budget=30)
    spec["output"] = str(small_disk.path)
    assert main(["run", str(write_spec(tmp_path / "spec.yaml", spec)), "--quiet"]) == 0
    run = small_disk.path / "tiny"
    ballast = small_disk.path / "ballast"
    with open(ballast, "wb", buffering=0) as f, pytest.raises(OSError):
        while True:
            f.write(b"\0" * 4096)
    capsys.readouterr()
    assert main(["export", str(run)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"evomerge: error: {run}/export/best: no space left on device; nothing was exported; free space and export "
        "again\n"
    )
    assert not (run / "export" / "best").exists() and not (run / "export" / "best.partial").exists()
    ballast.unlink()
    assert main(["export", str(run)]) == 0
    assert (run / "export" / "best" / "model.safetensors").exists()
