"""Shared fixtures: an isolated specialist cache and small specs that run in well under a second."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Specialists trained by tests go to a temporary cache, never the user's."""
    mp = pytest.MonkeyPatch()
    mp.setenv("EVOMERGE_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


def tiny_spec(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """An M2N2 search on the wine data with an 8-unit MLP; overrides replace top-level fields."""
    spec: dict[str, Any] = {
        "name": "tiny",
        "budget": 120,
        "seed": 0,
        "output": str(tmp_path / "runs"),
        "evaluator": {"name": "classification", "dataset": "wine", "hidden": [8], "device": "cpu"},
        "models": {"init": "random", "count": 2, "std": 0.1},
        "space": "weights",
        "strategy": {"name": "m2n2", "population": 6, "mutation_std": 0.05},
        "runtime": {"snapshot_every": 25, "log_every": 20, "progress": False},
    }
    spec.update(overrides)
    return spec


def write_spec(path: Path, spec: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def assert_export_reapplies(spec: dict[str, Any], tmp_path: Path, tolerance: float = 0.0) -> None:
    """Run `spec`, export its best individual, re-apply the exported merge_plan.yaml with
    `evomerge merge`, and check the rebuilt model equals the exported one."""
    import torch
    from safetensors.torch import load_file

    from evomerge.cli import main

    assert main(["run", str(write_spec(tmp_path / "spec.yaml", spec)), "--quiet"]) == 0
    run = Path(spec["output"]) / spec["name"]
    assert main(["export", str(run)]) == 0
    exported = run / "export" / "best"
    assert main(["merge", str(exported / "merge_plan.yaml"), "--out", str(tmp_path / "again")]) == 0
    a, b = load_file(str(exported / "model.safetensors")), load_file(str(tmp_path / "again" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=tolerance, atol=tolerance)


def wait_for_journal(proc: subprocess.Popen, journal: Path, lines: int, timeout: float = 180.0) -> None:
    """Wait until a running `evomerge` subprocess has journaled `lines` results (it must not exit first)."""
    deadline = time.monotonic() + timeout
    while not (journal.exists() and sum(1 for _ in open(journal, "rb")) >= lines):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{journal}: fewer than {lines} results after {timeout:g} s"
        time.sleep(0.05)
