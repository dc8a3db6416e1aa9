"""Shared fixtures: an isolated specialist cache and small specs that run in well under a second."""

from __future__ import annotations

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
