"""Searches over tiny Llamas end to end: M2N2 over per-layer recipes and MAP over merge knobs, through the CLI
in-process and through Ray, with the causal_lm evaluator writing each candidate into its resident model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from evomerge.cli import main
from evomerge.store import read_journal
from tests.conftest import write_spec
from tests.test_causal_lm import TEXTS, _jsonl, models  # noqa: F401  (the fixture of tiny Llama folders)


def llm_spec(tmp_path: Path, folders: dict[str, Path], name: str, space: dict, strategy: dict, budget: int) -> dict:
    code = _jsonl(tmp_path / "code.jsonl", [{"text": t} for t in TEXTS[0::2] * 3])
    prose = _jsonl(tmp_path / "prose.jsonl", [{"text": t} for t in TEXTS[1::2] * 3])
    return {
        "name": name,
        "budget": budget,
        "output": str(tmp_path / "runs"),
        "evaluator": {
            "name": "causal_lm",
            "model": str(folders["a"]),
            "device": "cpu",
            "datasets": [{"name": "code", "search": code}, {"name": "prose", "search": prose}],
        },
        "models": {"init": "files", "paths": [str(folders["a"]), str(folders["b"])]},
        "space": space,
        "strategy": strategy,
        "runtime": {"progress": False, "threads": 1},
    }


def finished(tmp_path: Path, name: str) -> tuple[dict, list[dict]]:
    run = tmp_path / "runs" / name
    return json.loads((run / "summary.json").read_text()), read_journal(run / "journal.jsonl")[0]


M2N2 = {"name": "m2n2", "population": 4, "objective": "loglik_code", "mutation_std": 0.0}
MAP = {"name": "map", "objectives": {"loglik_code": "max", "loglik_prose": "max"}}
MERGE = {
    "name": "merge",
    "methods": ["linear"],
    "base": None,
    "genes": {"weights": {"low": 0, "high": 1, "per": "model"}},
}


def test_m2n2_over_layer_recipes_of_tiny_llamas(models, tmp_path):  # noqa: F811
    spec = llm_spec(tmp_path, models, "llm-m2n2", {"name": "recipe", "blocks": "layer"}, M2N2, 16)
    assert main(["run", str(write_spec(tmp_path / "s.yaml", spec)), "--quiet"]) == 0
    summary, entries = finished(tmp_path, "llm-m2n2")
    assert summary["evaluations"] == 16 and summary["failures"] == 0
    assert all(e["objectives"]["loglik_code"] < 0 for e in entries)
    seeds_best = max(e["objectives"]["loglik_code"] for e in entries[:2])
    assert summary["best_train"] >= seeds_best  # the archive keeps the seeds at least
    splits = {e["meta"].get("split") for e in entries if "split" in e["meta"]}
    assert splits  # crossovers happened; recipe splits sit on block (layer) boundaries by construction
    assert main(["export", str(tmp_path / "runs" / "llm-m2n2"), "--out", str(tmp_path / "best")]) == 0
    assert (tmp_path / "best" / "merge_plan.yaml").is_file()


def test_map_front_over_linear_weights_of_tiny_llamas(models, tmp_path):  # noqa: F811
    spec = llm_spec(tmp_path, models, "llm-map", MERGE, MAP, 14)
    assert main(["run", str(write_spec(tmp_path / "s.yaml", spec)), "--quiet"]) == 0
    summary, entries = finished(tmp_path, "llm-map")
    assert summary["evaluations"] == 14 and summary["failures"] == 0
    front = (tmp_path / "runs" / "llm-map" / "front.csv").read_text().splitlines()
    assert len(front) >= 2 and "loglik_code" in front[0]


@pytest.fixture
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_m2n2_over_tiny_llamas_through_ray(models, tmp_path, local_ray):  # noqa: F811
    spec = llm_spec(tmp_path, models, "llm-ray", {"name": "recipe", "blocks": "layer"}, M2N2, 16)
    spec["runtime"]["executor"] = {"name": "ray", "address": "auto", "workers": 2, "cpus_per_worker": 0.5}
    assert main(["run", str(write_spec(tmp_path / "s.yaml", spec)), "--quiet"]) == 0
    summary, entries = finished(tmp_path, "llm-ray")
    assert summary["evaluations"] == 16 and summary["failures"] == 0
    assert len(summary["workers"]) == 2
    assert yaml.safe_load((tmp_path / "runs" / "llm-ray" / "spec.yaml").read_text())["evaluator"]["name"] == "causal_lm"
