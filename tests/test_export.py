"""`evomerge export`: the exported model re-evaluates to the objectives journaled for it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from evomerge.cli import main
from evomerge.evaluate.classification import ClassificationEvaluator, ClassificationOptions
from evomerge.store import read_journal
from tests.conftest import assert_export_reapplies, tiny_spec, write_spec


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("export")
    spec = tiny_spec(tmp, name="recipe", budget=150)
    spec["models"] = {"init": "specialists", "specialists": [[0], [1, 2]], "train_steps": 20, "train_lr": 0.01}
    spec["space"] = {"name": "recipe", "blocks": "chunks", "chunks": 8}
    spec["strategy"] = {"name": "m2n2", "population": 6, "mutation_std": 0.0}
    assert main(["run", str(write_spec(tmp / "spec.yaml", spec)), "--quiet"]) == 0
    return tmp / "runs" / "recipe"


def reevaluate(folder: Path) -> float:
    evaluator = ClassificationEvaluator(ClassificationOptions(dataset="wine", hidden=[8], device="cpu"))
    return evaluator.evaluate(load_file(str(folder / "model.safetensors"))).objectives["accuracy"]


def test_export_best_reproduces_its_objectives(recipe_run: Path, capsys):
    assert main(["export", str(recipe_run)]) == 0
    out = recipe_run / "export" / "best"
    recipe = json.loads((out / "recipe.json").read_text())
    assert len(recipe["genome"]) == 8 * 2 and len(recipe["blocks"]) == 8
    summary = json.loads((recipe_run / "summary.json").read_text())
    assert recipe["objectives"]["accuracy"] == summary["best_train"]
    assert reevaluate(out) == pytest.approx(summary["best_train"])


def test_export_by_id_and_unknown_id(recipe_run: Path, capsys, tmp_path: Path):
    entries, _ = read_journal(recipe_run / "journal.jsonl")
    ok = [e for e in entries if e["status"] == "ok"]
    # the last admitted member is certainly still in the archive: take the best one told last
    from evomerge.store import load_state

    ids = [int(i) for i in load_state(recipe_run / "snapshot.safetensors")["strategy"]["ids"]]
    member = ids[-1]
    assert main(["export", str(recipe_run), "--id", str(member), "--out", str(tmp_path / "m")]) == 0
    entry = next(e for e in ok if e["id"] == member)
    assert reevaluate(tmp_path / "m") == pytest.approx(entry["objectives"]["accuracy"])
    gone = next(e["id"] for e in ok if e["id"] not in ids)
    assert main(["export", str(recipe_run), "--id", str(gone)]) == 2
    assert "not in the archive" in capsys.readouterr().err
    assert main(["export", str(recipe_run), "--id", str(member), "--out", str(tmp_path / "m")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_recipe_with_tensor_blocks_exports_a_reapplicable_plan(tmp_path: Path):
    spec = tiny_spec(tmp_path, name="recipe-tensor", budget=40)
    spec["models"] = {"init": "specialists", "specialists": [[0], [1, 2]], "train_steps": 5}
    spec["space"] = {"name": "recipe", "blocks": "tensor"}
    spec["strategy"] = {"name": "m2n2", "population": 6, "mutation_std": 0.0}
    assert_export_reapplies(spec, tmp_path, tolerance=1e-6)


def test_chunk_recipes_have_no_plan(recipe_run: Path, tmp_path: Path):
    assert main(["export", str(recipe_run), "--out", str(tmp_path / "e")]) == 0
    assert (tmp_path / "e" / "recipe.json").exists() and not (tmp_path / "e" / "merge_plan.yaml").exists()
