"""End-to-end `evomerge run / resume / report / ls` on tiny budgets."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.cli import main
from evomerge.store import read_journal

ROOT = Path(__file__).resolve().parents[1]
ALL_SPECS = sorted((ROOT / "search_spaces").glob("*.yaml"))
SPECS = [p for p in ALL_SPECS if yaml.safe_load(p.read_text())["evaluator"]["name"] == "classification"]
FRONT_SPECS = [p for p in ALL_SPECS if p not in SPECS]  # the multi-task benchmark's multi-objective searches
PNG = b"\x89PNG\r\n\x1a\n"
# digits: 64 features, 10 classes; every shipped spec uses hidden [256]
DIGITS_SHAPES = {
    "layers.0.weight": (64, 256),
    "layers.0.bias": (256,),
    "layers.1.weight": (256, 10),
    "layers.1.bias": (10,),
}


@contextlib.contextmanager
def one_thread():
    """Tiny models run ~1000x faster on one torch thread on a busy machine; restore afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One specialist cache for the module, so the pretrained specs train their specialists once."""
    return tmp_path_factory.mktemp("evomerge-cache")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, cache_dir):
    monkeypatch.setenv("EVOMERGE_CACHE", str(cache_dir))
    with one_thread():
        yield


def wine_spec(name: str, budget: int = 40, strategy: dict | None = None, **overrides) -> dict:
    spec = {
        "name": name,
        "description": f"tiny test run {name}",
        "budget": budget,
        "seed": 0,
        "evaluator": {"name": "classification", "dataset": "wine", "hidden": [8], "device": "cpu"},
        "models": {"init": "random", "count": 2, "std": 0.1},
        "space": "weights",
        "strategy": strategy or {"name": "m2n2", "population": 6, "mutation_std": 0.05},
        "runtime": {"threads": 1, "log_every": 10},
    }
    spec.update(overrides)
    return spec


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def parse_table(text: str) -> list[dict[str, str]]:
    """The CLI's plain-text table (columns separated by two or more spaces) back into rows."""
    lines = [line for line in text.splitlines() if line.strip()]
    start = next(i for i, line in enumerate(lines) if line.startswith("run ") and "status" in line)
    header = re.split(r"\s{2,}", lines[start].strip())
    assert set(lines[start + 1].replace(" ", "")) == {"-"}
    rows = []
    for line in lines[start + 2 :]:
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) != len(header):
            break
        rows.append(dict(zip(header, cells, strict=True)))
    return rows


def run_cli(capsys, argv: list[str]) -> tuple[str, str]:
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out, err


def check_finished_run(run: Path, budget: int, strategy: str) -> dict:
    """Everything a finished run directory must hold."""
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert summary["name"] == run.name
    assert summary["strategy"] == strategy
    assert summary["evaluations"] == budget
    assert summary["budget"] == budget
    assert summary["failures"] == 0
    assert 0 < summary["best_train"] <= 1
    assert 0 <= summary["test"]["accuracy"] <= 1

    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished"
    assert info["evaluations"] == budget
    assert info["budget"] == budget

    entries, nbytes = read_journal(run / "journal.jsonl")
    assert nbytes == (run / "journal.jsonl").stat().st_size  # every line is valid
    assert len(entries) == budget
    assert [e["id"] for e in entries] == list(range(budget))
    assert all(e["status"] == "ok" and "accuracy" in e["objectives"] for e in entries)
    assert max(e["objectives"]["accuracy"] for e in entries) == pytest.approx(summary["best_train"])

    with open(run / "curve.csv", newline="") as f:
        curve = list(csv.DictReader(f))
    assert curve and {"evaluations", "best_train", "test_accuracy"} <= set(curve[0])
    assert int(float(curve[-1]["evaluations"])) == budget
    assert float(curve[-1]["best_train"]) == pytest.approx(summary["best_train"])

    assert (run / "plots" / "accuracy.png").read_bytes().startswith(PNG)
    assert (run / "best.safetensors").is_file()
    assert (run / "snapshot.safetensors").is_file()
    assert list((run / "seeds").glob("seed_*.safetensors"))
    return summary


# run every shipped spec -----------------------------------------------------------------------


@pytest.mark.parametrize("spec_path", SPECS, ids=[p.stem for p in SPECS])
def test_run_each_shipped_spec(spec_path, tmp_path, capsys):
    spec = yaml.safe_load(spec_path.read_text())
    out, err = run_cli(capsys, ["run", str(spec_path), "--budget", "40", "--quiet", "--output", str(tmp_path)])
    run = tmp_path / spec["name"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [spec["name"]]
    assert err.startswith(f"run {spec['name']}: {spec['strategy']['name']} on classification, budget 40 evaluations")
    check_finished_run(run, 40, spec["strategy"]["name"])
    best = load_file(str(run / "best.safetensors"))
    assert {k: tuple(v.shape) for k, v in best.items()} == DIGITS_SHAPES

    (row,) = parse_table(out)
    assert row["run"] == spec["name"]
    assert row["status"] == "finished"
    assert row["evals"] == "40/40"
    assert f"run directory: {run}" in out
    assert f"plot: {run / 'plots' / 'accuracy.png'}" in out

    resolved = yaml.safe_load((run / "spec.yaml").read_text())
    assert resolved["budget"] == 40
    assert resolved["output"] == str(tmp_path)
    assert resolved["strategy"]["name"] == spec["strategy"]["name"]
    assert resolved["models"]["init"] == spec["models"]["init"]
    if spec["strategy"]["name"] == "grid":  # a 10,000-point sweep, cut at the budget
        assert json.loads((run / "summary.json").read_text())["final_stats"] == {
            "points_done": 40,
            "points_total": spec["strategy"]["points"],
        }


@pytest.mark.parametrize("spec_path", FRONT_SPECS, ids=[p.stem for p in FRONT_SPECS])
def test_run_each_shipped_front_spec(spec_path, tmp_path, capsys):
    spec = yaml.safe_load(spec_path.read_text())
    out, err = run_cli(capsys, ["run", str(spec_path), "--budget", "40", "--quiet", "--output", str(tmp_path)])
    run = tmp_path / spec["name"]
    assert err.startswith(f"run {spec['name']}: {spec['strategy']['name']} on multitask, budget 40 evaluations")
    summary = json.loads((run / "summary.json").read_text())
    natural_size = {"map_mnist_2tasks": 22}.get(spec_path.stem, 40)  # the 2-task MAP ends after 12 + 10 points
    assert summary["status"] == "finished" and summary["evaluations"] == min(40, natural_size)
    assert summary["failures"] == 0 and summary["front"]["size"] >= 1
    objectives = list(spec["strategy"]["objectives"])
    with open(run / "front.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == summary["front"]["size"] and set(objectives) <= set(rows[0])
    assert (run / "plots" / "front.png").read_bytes().startswith(PNG)
    assert (run / "optuna.journal").is_file()
    best = load_file(str(run / "best.safetensors"))  # merged backbones: 784 -> 128 -> 64
    assert {k: tuple(v.shape) for k, v in best.items()} == {
        "layers.0.weight": (784, 128),
        "layers.0.bias": (128,),
        "layers.1.weight": (128, 64),
        "layers.1.bias": (64,),
    }
    out, _ = run_cli(capsys, ["front", str(run)])
    assert f"{spec['name']}: {len(rows)} front points of {summary['evaluations']} evaluated" in out


def test_shipped_specs_are_all_covered():
    assert len(SPECS) >= 12 and len(FRONT_SPECS) >= 5
    names = [yaml.safe_load(p.read_text())["name"] for p in ALL_SPECS]
    assert len(set(names)) == len(names)


# one full run as a real process ---------------------------------------------------------------


def test_full_run_in_subprocess(tmp_path):
    spec = write_spec(tmp_path / "sub.yaml", wine_spec("sub-run", 60))
    env = dict(os.environ, EVOMERGE_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "evomerge", "run", str(spec), "--quiet", "--output", str(tmp_path / "runs")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "run sub-run: m2n2 on classification, budget 60 evaluations, seed 0"
    run = tmp_path / "runs" / "sub-run"
    check_finished_run(run, 60, "m2n2")
    (row,) = parse_table(proc.stdout)
    assert row["run"] == "sub-run" and row["status"] == "finished" and row["evals"] == "60/60"
    assert not (tmp_path / "cache").exists()  # random init trains nothing


# overrides ------------------------------------------------------------------------------------


def test_seed_and_name_overrides_reach_run_dir_and_resolved_spec(tmp_path, capsys):
    spec = write_spec(tmp_path / "s.yaml", wine_spec("orig-name", 30))
    out_root = tmp_path / "runs"
    run_cli(capsys, ["run", str(spec), "--quiet", "--output", str(out_root)])
    overrides = ["--seed", "3", "--name", "custom", "--budget", "35"]
    _, err = run_cli(capsys, ["run", str(spec), *overrides, "--quiet", "--output", str(out_root)])
    assert err.startswith("run custom: m2n2 on classification, budget 35 evaluations, seed 3")
    assert sorted(p.name for p in out_root.iterdir()) == ["custom", "orig-name"]
    run = out_root / "custom"
    resolved = yaml.safe_load((run / "spec.yaml").read_text())
    assert resolved["name"] == "custom"
    assert resolved["seed"] == 3
    assert resolved["budget"] == 35
    assert resolved["output"] == str(out_root)
    assert json.loads((run / "run.json").read_text())["name"] == "custom"
    check_finished_run(run, 35, "m2n2")
    original = yaml.safe_load((out_root / "orig-name" / "spec.yaml").read_text())
    assert original["seed"] == 0 and original["name"] == "orig-name"
    # the seed is used: the random initial models differ
    seed0 = load_file(str(out_root / "orig-name" / "seeds" / "seed_0.safetensors"))
    seed3 = load_file(str(run / "seeds" / "seed_0.safetensors"))
    assert not torch.equal(seed0["layers.0.weight"], seed3["layers.0.weight"])


def test_threads_flag_sets_the_runs_threads_and_refuses_a_negative_count(tmp_path, capsys):
    spec = write_spec(tmp_path / "s.yaml", wine_spec("threads", 20))
    out_root = tmp_path / "runs"
    run_cli(capsys, ["run", str(spec), "--threads", "2", "--quiet", "--output", str(out_root)])
    assert yaml.safe_load((out_root / "threads" / "spec.yaml").read_text())["runtime"]["threads"] == 2
    assert torch.get_num_threads() == 2  # the driver evaluated in this process with the flag's threads
    assert main(["run", str(spec), "--threads", "-1", "--name", "refused", "--output", str(out_root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["evomerge: error: --threads: got -1, must be >= 0 (0 = torch default)"]
    assert not (out_root / "refused").exists()


def test_output_from_spec_is_used_without_flag(tmp_path, capsys):
    spec = write_spec(tmp_path / "s.yaml", wine_spec("in-spec-output", 30, output=str(tmp_path / "from-spec")))
    run_cli(capsys, ["run", str(spec), "--quiet"])
    check_finished_run(tmp_path / "from-spec" / "in-spec-output", 30, "m2n2")


def test_same_seed_gives_same_results(tmp_path, capsys):
    spec = write_spec(tmp_path / "s.yaml", wine_spec("det", 40))
    run_cli(capsys, ["run", str(spec), "--quiet", "--output", str(tmp_path / "a")])
    run_cli(capsys, ["run", str(spec), "--quiet", "--output", str(tmp_path / "b")])
    a, _ = read_journal(tmp_path / "a" / "det" / "journal.jsonl")
    b, _ = read_journal(tmp_path / "b" / "det" / "journal.jsonl")
    timing = ("seconds", "clock")
    strip = [{k: v for k, v in e.items() if k not in timing} for e in a]
    assert strip == [{k: v for k, v in e.items() if k not in timing} for e in b]


def test_resume_extends_a_finished_run(tmp_path, capsys):
    spec = write_spec(tmp_path / "s.yaml", wine_spec("extend", 30))
    run_cli(capsys, ["run", str(spec), "--quiet", "--output", str(tmp_path)])
    run = tmp_path / "extend"
    before = (run / "journal.jsonl").read_bytes()
    out, _ = run_cli(capsys, ["resume", str(run), "--budget", "50", "--quiet"])
    (row,) = parse_table(out)
    assert row["evals"] == "50/50"
    check_finished_run(run, 50, "m2n2")
    assert (run / "journal.jsonl").read_bytes().startswith(before)
    # run.json carries the extended budget; a plain resume now has nothing left to do
    assert main(["resume", str(run), "--quiet"]) == 2
    assert "already finished its 50 evaluations" in capsys.readouterr().err


# report and ls --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, cache_dir) -> list[Path]:
    """An M2N2 and a GA run on wine, shared by the report/ls tests (which only read them)."""
    root = tmp_path_factory.mktemp("report") / "runs"
    specs = [
        wine_spec("alpha-m2n2", 40),
        wine_spec("beta-ga", 40, {"name": "ga", "population": 6, "mutation_std": 0.05}),
    ]
    with pytest.MonkeyPatch.context() as mp, one_thread():
        mp.setenv("EVOMERGE_CACHE", str(cache_dir))
        for spec in specs:
            path = write_spec(root.parent / f"{spec['name']}.yaml", spec)
            assert main(["run", str(path), "--quiet", "--output", str(root)]) == 0
    return [root / spec["name"] for spec in specs]


def test_report_two_runs_prints_table_and_writes_comparison(two_runs, tmp_path, capsys):
    out_png = tmp_path / "plots" / "cmp.png"
    out, _ = run_cli(capsys, ["report", *map(str, two_runs), "--out", str(out_png)])
    rows = parse_table(out)
    assert [r["run"] for r in rows] == ["alpha-m2n2", "beta-ga"]
    assert [r["strategy"] for r in rows] == ["m2n2", "ga"]
    assert all(r["status"] == "finished" and r["evals"] == "40/40" for r in rows)
    for run, row in zip(two_runs, rows, strict=True):
        summary = json.loads((run / "summary.json").read_text())
        assert row["best train"] == f"{summary['best_train']:.4f}"
        assert f"plot: {run / 'plots' / 'accuracy.png'}" in out
    assert out_png.read_bytes().startswith(PNG)
    assert f"comparison: {out_png}" in out


def test_report_default_comparison_path_and_metric(two_runs, capsys):
    default = two_runs[0].parent / "comparison.png"
    default.unlink(missing_ok=True)
    out, _ = run_cli(capsys, ["report", *map(str, two_runs), "--metric", "best_train"])
    assert default.read_bytes().startswith(PNG)
    assert f"comparison: {default}" in out
    default.unlink()


def test_report_single_run_has_no_comparison(two_runs, tmp_path, capsys):
    out, _ = run_cli(capsys, ["report", str(two_runs[0]), "--out", str(tmp_path / "x.png")])
    assert [r["run"] for r in parse_table(out)] == ["alpha-m2n2"]
    assert "comparison:" not in out
    assert not (tmp_path / "x.png").exists()


def test_report_json(two_runs, capsys):
    out, _ = run_cli(capsys, ["report", *map(str, two_runs), "--json"])
    data = json.loads(out)
    assert sorted(data) == ["alpha-m2n2", "beta-ga"]
    for run in two_runs:
        assert data[run.name] == json.loads((run / "summary.json").read_text())
        assert data[run.name]["status"] == "finished"
        assert data[run.name]["evaluations"] == 40


def test_ls_lists_runs_with_status(two_runs, capsys):
    root = two_runs[0].parent
    out, _ = run_cli(capsys, ["ls", str(root)])
    rows = parse_table(out)
    assert [(r["run"], r["status"], r["strategy"]) for r in rows] == [
        ("alpha-m2n2", "finished", "m2n2"),
        ("beta-ga", "finished", "ga"),
    ]


def test_ls_ignores_non_runs_and_handles_empty_or_missing_roots(tmp_path, capsys):
    (tmp_path / "not-a-run").mkdir()
    (tmp_path / "stray.txt").write_text("x")
    out, _ = run_cli(capsys, ["ls", str(tmp_path)])
    assert out.strip() == f"no runs under {tmp_path}/"
    out, _ = run_cli(capsys, ["ls", str(tmp_path / "missing")])
    assert "no runs under" in out


# help -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ("run", ["SPEC", "--budget", "--seed", "--name", "--output", "--threads", "--quiet"]),
        ("resume", ["RUN", "--budget", "--quiet"]),
        ("report", ["RUN", "--out", "--metric", "--json"]),
        ("ls", ["ROOT"]),
    ],
)
def test_subcommand_help(command, options, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: evomerge {command} [-h]")
    usage = out.split("\n\n")[0]
    for option in options:
        assert re.search(rf"(^|[\s\[]){re.escape(option)}\b", usage), option  # in the usage line
        assert re.search(rf"^\s+{re.escape(option)}\b", out, re.MULTILINE), option  # and described


def test_top_level_help_and_missing_command(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("run", "resume", "report", "ls"):
        assert re.search(rf"^\s+{command}\s", out, re.MULTILINE), command
    assert "examples:" in out
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
