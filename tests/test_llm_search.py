"""Searches over tiny Llamas end to end: M2N2 over per-layer recipes and MAP over merge knobs, through the CLI
in-process and through Ray, with the causal_lm evaluator writing each candidate into its resident model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.cli import main
from evomerge.store import decode_scores, read_journal
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
    # the plan rebuilds the exported model exactly, lm_head included (its block, `head`, spans two ranges of the
    # files' name order: lm_head first, model.norm last)
    assert main(["merge", str(tmp_path / "best" / "merge_plan.yaml"), "--out", str(tmp_path / "again")]) == 0
    exported = load_file(str(tmp_path / "best" / "model.safetensors"))
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert sorted(exported) == sorted(again) and "lm_head.weight" in exported
    for name, tensor in exported.items():
        assert torch.equal(tensor, again[name]), name


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


def _anchored(spec: dict) -> dict:
    """The code dataset's fitness on 3 anchor examples of its 6 search examples (texts that differ, so that scores
    do; the other 6 are its test split)."""
    code = _jsonl(
        Path(spec["output"]).parent / "code-distinct.jsonl",
        [{"text": f"{t}# {k}\n"} for k in range(6) for t in TEXTS[0::2]],
    )
    spec["evaluator"]["datasets"][0] = {"name": "code", "search": code, "subset": 3, "subset_by": "anchors"}
    return spec


def _expected_record(spec: dict, folders: dict[str, Path]) -> dict:
    """The choice made from the seeds' scores, computed here from the seed folders."""
    from safetensors.torch import load_file

    from evomerge.evaluate import EVALUATORS

    evaluator = EVALUATORS.build(EVALUATORS.resolve(spec["evaluator"], "evaluator"))
    scores = [evaluator.full_scores(load_file(str(folders[k] / "model.safetensors"))) for k in ("a", "b")]
    return json.loads(json.dumps(evaluator.choose_subset(np.stack(scores))))


def test_anchor_subset_is_chosen_once_per_run_and_read_on_resume(models, tmp_path, capsys):  # noqa: F811
    spec = _anchored(llm_spec(tmp_path, models, "llm-anchors", {"name": "recipe", "blocks": "layer"}, M2N2, 8))
    path = write_spec(tmp_path / "s.yaml", spec)
    assert main(["run", str(path), "--quiet"]) == 0
    run = tmp_path / "runs" / "llm-anchors"
    record = json.loads((run / "subset.json").read_text())
    assert record == _expected_record(spec, models) and len(record["code"]["examples"]) == 3
    summary, entries = finished(tmp_path, "llm-anchors")
    assert summary["failures"] == 0
    assert {len(decode_scores(e["per_example"])) for e in entries} == {3 + 3}  # and prose's 3
    assert "search_full_loglik_code" in summary["test"]

    (run / "subset.json").write_text(json.dumps({"code": {"examples": [0], "weights": [6.0]}}))
    assert main(["resume", str(run), "--budget", "10", "--quiet"]) == 2  # the record is read, not made again
    assert "subset.json: the run's subset record does not fit dataset 'code'" in capsys.readouterr().err
    (run / "subset.json").write_text(json.dumps(record))
    assert main(["resume", str(run), "--budget", "10", "--quiet"]) == 0
    assert finished(tmp_path, "llm-anchors")[0]["evaluations"] == 10


def test_anchor_subset_through_ray_is_chosen_by_one_worker(models, tmp_path, local_ray):  # noqa: F811
    """Two workers start together: one scores the seeds and records the anchors, the other reads them."""
    spec = _anchored(llm_spec(tmp_path, models, "llm-ray-anchors", {"name": "recipe", "blocks": "layer"}, M2N2, 8))
    spec["runtime"]["executor"] = {"name": "ray", "address": "auto", "workers": 2, "cpus_per_worker": 0.5}
    assert main(["run", str(write_spec(tmp_path / "s.yaml", spec)), "--quiet"]) == 0
    summary, entries = finished(tmp_path, "llm-ray-anchors")
    assert summary["failures"] == 0 and len(summary["workers"]) == 2
    record = json.loads((tmp_path / "runs" / "llm-ray-anchors" / "subset.json").read_text())
    assert record == _expected_record(spec, models)
    assert {len(decode_scores(e["per_example"])) for e in entries} == {3 + 3}
