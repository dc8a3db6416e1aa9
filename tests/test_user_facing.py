"""What a user meets at the command line: one clear line and exit 2 for bad input, nothing lost."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from evomerge.cli import main
from tests.conftest import tiny_spec, write_spec


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("evomerge: error: "), err
    return err.strip()


def test_a_yaml_syntax_error_names_the_file_line_and_column(tmp_path: Path, capsys):
    spec = tmp_path / "broken.yaml"
    spec.write_text("name: x\nbudget: [1\n  strategy: m2n2\n")
    assert main(["run", str(spec)]) == 2
    assert one_error_line(capsys) == f"evomerge: error: {spec}:3:11: not valid YAML: expected ',' or ']', but got ':'"
    assert not (tmp_path / "runs").exists()


def test_a_merge_plan_with_a_yaml_error_gets_one_line(tmp_path: Path, capsys):
    plan = tmp_path / "plan.yaml"
    plan.write_text("method: ties\nmodels: [a, b\n")
    assert main(["merge", str(plan), "--out", str(tmp_path / "out")]) == 2
    assert f"{plan}:3:1: not valid YAML" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def checkpoints(tmp_path: Path) -> list[Path]:
    torch.manual_seed(0)
    paths = []
    for name in ("base", "a", "b"):
        path = tmp_path / f"{name}.safetensors"
        save_file({"layers.0.weight": torch.randn(4, 3), "lm_head.weight": torch.randn(2, 4)}, str(path))
        paths.append(path)
    return paths


def test_a_block_override_naming_another_method_does_not_inherit_the_global_options(tmp_path: Path):
    """The README's example: a TIES plan whose head is merged linearly."""
    base, a, b = checkpoints(tmp_path)
    plan = {
        "method": {"name": "ties", "density": 0.5, "scale": 1.0},
        "base": str(base),
        "models": [str(a), str(b)],
        "blocks": {"head": {"name": "linear"}, "layer.0": {"density": 1.0}},
    }
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    assert main(["merge", str(tmp_path / "plan.yaml"), "--out", str(tmp_path / "out")]) == 0
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    linear = (load_file(str(a))["lm_head.weight"] + load_file(str(b))["lm_head.weight"]) / 2
    torch.testing.assert_close(merged["lm_head.weight"], linear)
    # density 1 keeps every entry: TIES is then sign election plus a disjoint mean of the task vectors
    base_w = load_file(str(base))["layers.0.weight"]
    deltas = torch.stack([load_file(str(p))["layers.0.weight"] - base_w for p in (a, b)])
    sign = torch.sign(deltas.sum(0))
    agree = (torch.sign(deltas) == sign) & (deltas != 0)
    expected = base_w + (deltas * agree).sum(0) / agree.sum(0).clamp(min=1)
    torch.testing.assert_close(merged["layers.0.weight"], expected)


def test_an_exported_merge_plan_works_from_any_folder(tmp_path: Path, monkeypatch):
    """Export from a relative run path, then merge from elsewhere: the plan holds absolute paths, no anchors."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    spec = tiny_spec(Path("."), name="plan-paths", budget=12)
    spec["output"] = "runs"
    spec["models"] = {"init": "specialists", "specialists": [[0], [1, 2]], "shared_init": True, "train_steps": 5}
    spec["space"] = {"name": "merge", "methods": ["task_arithmetic"], "genes": {"weights": {"per": "model"}}}
    spec["strategy"] = {"name": "cma_es", "population": 4, "sigma0": 0.3}
    assert main(["run", str(write_spec(work / "spec.yaml", spec)), "--quiet"]) == 0
    assert main(["export", "runs/plan-paths"]) == 0
    text = (work / "runs" / "plan-paths" / "export" / "best" / "merge_plan.yaml").read_text()
    assert "&id" not in text and "*id" not in text
    plan = yaml.safe_load(text)
    assert all(Path(p).is_absolute() for p in plan["models"] + ([plan["base"]] if plan.get("base") else []))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["merge", str(work / "runs/plan-paths/export/best/merge_plan.yaml"), "--out", "again"]) == 0
    a = load_file(str(work / "runs/plan-paths/export/best/model.safetensors"))
    b = load_file(str(elsewhere / "again" / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_report_with_an_unknown_metric_is_refused(tmp_path: Path, capsys):
    spec = write_spec(tmp_path / "spec.yaml", tiny_spec(tmp_path, budget=20))
    assert main(["run", str(spec), "--quiet"]) == 0
    spec2 = write_spec(tmp_path / "spec2.yaml", tiny_spec(tmp_path, name="tiny2", budget=20))
    assert main(["run", str(spec2), "--quiet"]) == 0
    capsys.readouterr()
    runs = [str(tmp_path / "runs" / "tiny"), str(tmp_path / "runs" / "tiny2")]
    out = tmp_path / "cmp.png"
    assert main(["report", *runs, "--metric", "test_acuracy", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("evomerge: error: --metric: no run has a 'test_acuracy' column in curve.csv; columns: ")
    assert "test_accuracy" in err and not out.exists()


@pytest.mark.parametrize(
    "budget, message",
    [
        ("20", "already finished its 20 evaluations; pass --budget above 20 to extend it"),
        ("10", "already finished its 20 evaluations; pass --budget above 20 to extend it"),
    ],
)
def test_resume_budget_messages_count_what_was_done(tmp_path: Path, capsys, budget: str, message: str):
    spec = write_spec(tmp_path / "spec.yaml", tiny_spec(tmp_path, budget=20))
    assert main(["run", str(spec), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["resume", str(tmp_path / "runs" / "tiny"), "--budget", budget]) == 2
    assert message in one_error_line(capsys)


def test_resume_below_what_an_unfinished_run_journaled(tmp_path: Path, capsys):
    spec = write_spec(tmp_path / "spec.yaml", tiny_spec(tmp_path, budget=30))
    assert main(["run", str(spec), "--quiet"]) == 0
    info = tmp_path / "runs" / "tiny" / "run.json"
    info.write_text(info.read_text().replace('"finished"', '"running"'))  # as after SIGKILL
    capsys.readouterr()
    assert main(["resume", str(tmp_path / "runs" / "tiny"), "--budget", "12"]) == 2
    assert "--budget 12 is below the 30 evaluations" in one_error_line(capsys)


def test_cma_es_over_one_gene_is_refused_before_the_run(tmp_path: Path, capsys):
    spec = tiny_spec(tmp_path, name="one-gene", budget=12)
    spec["models"] = {"init": "specialists", "specialists": [[0], [1, 2]], "shared_init": True, "train_steps": 5}
    spec["space"] = {"name": "merge", "methods": ["task_arithmetic"]}
    spec["strategy"] = {"name": "cma_es", "population": 4}
    assert main(["run", str(write_spec(tmp_path / "spec.yaml", spec)), "--quiet"]) == 2
    assert "strategy: cma_es needs a space of at least 2 genes, this one has 1" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "one-gene").exists()
