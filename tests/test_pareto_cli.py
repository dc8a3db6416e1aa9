"""End to end through `evomerge.cli.main` on the multi-task MNIST benchmark with tiny budgets:
MAP's run directory (front.csv, plots, summary, Optuna mirror), `evomerge front`, exporting a
front point, NaN objectives, an unknown objective, NSGA resume, `build-models`."""

from __future__ import annotations

import csv
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.cli import main
from evomerge.evaluate.multitask import MultiTaskEvaluator, MultiTaskOptions
from evomerge.pareto import Objectives, hypervolume, non_dominated
from evomerge.schema import parse
from evomerge.store import load_state, read_journal

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
TWO_TASKS = {"low": [0, 1, 2, 3, 4], "high": [5, 6, 7, 8, 9]}  # the default: models built once per session


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These models are tiny: one torch thread is much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mnist_spec(tmp_path: Path, name: str, strategy: dict, budget: int, evaluator: dict | None = None) -> dict:
    """search_spaces/map_mnist_2tasks.yaml on the CPU, into tmp_path, with another strategy and budget."""
    spec = yaml.safe_load((ROOT / "search_spaces" / "map_mnist_2tasks.yaml").read_text())
    assert spec["evaluator"]["tasks"] == TWO_TASKS
    spec.update(name=name, budget=budget, output=str(tmp_path / "runs"), strategy=strategy)
    spec["evaluator"] = evaluator or {**spec["evaluator"], "device": "cpu"}
    spec["runtime"] = {"log_every": 5, "snapshot_every": 4, "progress": False}
    return spec


def write(tmp_path: Path, spec: dict) -> str:
    path = tmp_path / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def journal(run: Path) -> list[dict]:
    entries, _ = read_journal(run / "journal.jsonl")
    return entries


class NanOn:
    """The multitask evaluator, with a NaN `accuracy_low` for chosen candidate ids (the executor sets
    `candidate_id`). Built-in `faulty` cannot do this: it wraps the classification evaluator only."""

    def __init__(self, nan_on: list[int], **options):
        self.inner = MultiTaskEvaluator(parse(MultiTaskOptions, options, "evaluator"))
        self.nan_on = set(nan_on)
        self.candidate_id: int | None = None
        self.n_examples = self.inner.n_examples

    def layout(self):
        return self.inner.layout()

    def metric_names(self) -> list[str]:
        return self.inner.metric_names()

    def seed_models(self):
        return self.inner.seed_models()

    def evaluate(self, params):
        result = self.inner.evaluate(params)
        if self.candidate_id in self.nan_on:
            result.objectives["accuracy_low"] = float("nan")
        return result

    def test(self, params):
        return self.inner.test(params)


# MAP end to end --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def map_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("map")
    spec = yaml.safe_load((ROOT / "search_spaces" / "map_mnist_2tasks.yaml").read_text())
    spec["evaluator"]["device"] = "cpu"
    spec["output"] = str(tmp / "runs")
    spec["runtime"]["progress"] = False
    assert main(["run", write(tmp, spec), "--quiet"]) == 0
    return tmp / "runs" / "map-mnist-2tasks"


NSGA = {"name": "nsga", "objectives": {"accuracy_low": "max", "accuracy_high": "max"}, "pop_size": 6}


@pytest.fixture(scope="module")
def nsga_run(tmp_path_factory) -> Path:
    """NSGA-II on the in-process executor, 20 evaluations in one go."""
    tmp = tmp_path_factory.mktemp("nsga")
    assert main(["run", write(tmp, mnist_spec(tmp, "whole", NSGA, budget=20)), "--quiet"]) == 0
    return tmp / "runs" / "whole"


def test_map_run_writes_its_front(map_run: Path):
    summary = json.loads((map_run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["evaluations"] == 22 and summary["failures"] == 0
    entries = journal(map_run)
    phases = [e["meta"]["phase"] for e in entries]
    assert phases == ["design"] * 12 + ["front"] * 10  # (d+1)(d+2) = 12 design points, then front_points

    rows = read_csv(map_run / "front.csv")
    header = list(rows[0])
    assert header[:7] == ["point", "id", "phase", "gene_0", "gene_1", "accuracy_low", "accuracy_high"]
    assert header[7:9] == ["predicted_accuracy_low", "predicted_accuracy_high"]
    assert {"test_accuracy_low", "test_accuracy_high", "test_distance"} <= set(header)
    assert [int(r["point"]) for r in rows] == list(range(len(rows)))
    for row in rows:
        entry = entries[int(row["id"])]
        assert row["phase"] == entry["meta"]["phase"]
        assert [float(row["gene_0"]), float(row["gene_1"])] == entry["meta"]["genes"]
        assert float(row["accuracy_low"]) == entry["objectives"]["accuracy_low"]
        assert 0.0 <= float(row["test_accuracy_low"]) <= 1.0
        if row["phase"] == "front":  # predicted by the surrogate, written as the journal's meta has it
            assert float(row["predicted_accuracy_low"]) == entry["meta"]["predicted"]["accuracy_low"]
        else:
            assert row["predicted_accuracy_low"] == row["predicted_accuracy_high"] == ""

    # the front is exactly the non-dominated set of every evaluation, best first on the first objective
    goals = Objectives({"accuracy_low": "max", "accuracy_high": "max"})
    F = np.array([goals.minimised(e["objectives"]) for e in entries])
    assert sorted(int(r["id"]) for r in rows) == np.flatnonzero(non_dominated(F)).tolist()
    front = np.array([[-float(r["accuracy_low"]), -float(r["accuracy_high"])] for r in rows])
    assert non_dominated(front).all()
    assert list(front[:, 0]) == sorted(front[:, 0])

    assert summary["front"]["size"] == len(rows)
    assert summary["front"]["reference"] == {"accuracy_low": 0.0, "accuracy_high": 0.0}
    assert summary["front"]["hypervolume"] == pytest.approx(hypervolume(front, np.zeros(2)), abs=1e-12)
    assert 0.5 < summary["front"]["hypervolume"] <= 1.0
    assert summary["front"]["dropped"] == []
    for plot in ("front.png", "predicted_vs_real.png"):
        assert (map_run / "plots" / plot).read_bytes()[:8] == PNG
        assert str(map_run / "plots" / plot) in summary["plots"]
    assert summary["optuna_journal"] == str(map_run / "optuna.journal")
    assert (map_run / "optuna.journal").stat().st_size > 0


def test_front_command_prints_the_table_and_hypervolume(map_run: Path, capsys):
    summary = json.loads((map_run / "summary.json").read_text())
    rows = read_csv(map_run / "front.csv")
    assert main(["front", str(map_run)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"map-mnist-2tasks: {len(rows)} front points of 22 evaluated"
    assert re.split(r"\s{2,}", lines[1].strip())[:6] == [
        "point",
        "id",
        "accuracy_low",
        "accuracy_high",
        "pred accuracy_low",
        "pred accuracy_high",
    ]
    body = [line.split() for line in lines[3 : 3 + len(rows)]]
    assert [b[:2] for b in body] == [[r["point"], r["id"]] for r in rows]
    assert [b[2] for b in body] == [f"{float(r['accuracy_low']):.4f}" for r in rows]
    hv = f"hypervolume {summary['front']['hypervolume']:.6f} (reference point: accuracy_low 0, accuracy_high 0)"
    assert hv in lines
    assert "dropped" not in out


def test_front_plot_redraws_the_files(map_run: Path, capsys):
    before = read_csv(map_run / "front.csv")
    (map_run / "plots" / "front.png").unlink()
    assert main(["front", str(map_run), "--plot"]) == 0
    assert (map_run / "plots" / "front.png").read_bytes()[:8] == PNG
    assert read_csv(map_run / "front.csv") == before  # held-out columns kept from the first write
    assert "front points of 22 evaluated" in capsys.readouterr().out


def check_front_from_other_metrics(run: Path, evaluated: int, capsys) -> None:
    assert main(["front", str(run), "--objectives", "accuracy_low:max,distance:min"]) == 0
    out = capsys.readouterr().out
    entries = journal(run)
    goals = Objectives({"accuracy_low": "max", "distance": "min"})
    F = np.array([goals.minimised(e["objectives"]) for e in entries])
    expected = np.flatnonzero(non_dominated(F))
    lines = out.splitlines()
    assert lines[0] == f"{run.name}: {len(expected)} front points of {evaluated} evaluated"
    assert re.split(r"\s{2,}", lines[1].strip())[:4] == ["point", "id", "accuracy_low", "distance"]
    printed = sorted(int(line.split()[1]) for line in lines[3 : 3 + len(expected)])
    assert printed == expected.tolist()
    worst_distance = max(e["objectives"]["distance"] for e in entries)
    reference = np.array([0.0, worst_distance])
    assert f"hypervolume {hypervolume(F[expected], reference):.6f} " in out
    assert f"(reference point: accuracy_low 0, distance {worst_distance:g})" in out


def test_front_with_the_objectives_named_on_the_command_line(nsga_run: Path, capsys):
    rows = read_csv(nsga_run / "front.csv")
    assert main(["front", str(nsga_run), "--objectives", "accuracy_high:max,accuracy_low:max"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"whole: {len(rows)} front points of 20 evaluated"
    assert re.split(r"\s{2,}", lines[1].strip())[:4] == ["point", "id", "accuracy_high", "accuracy_low"]
    body = [line.split() for line in lines[3 : 3 + len(rows)]]
    # the same points, now best first on accuracy_high; held-out values come from front.csv
    by_high = sorted(rows, key=lambda r: (-float(r["accuracy_high"]), -float(r["accuracy_low"])))
    assert [b[1] for b in body] == [r["id"] for r in by_high]
    assert [b[4] for b in body] == [f"{float(r['test_accuracy_high']):.4f}" for r in by_high]
    # a metric the evaluator never returned, or a bad goal: one clean line each
    assert main(["front", str(nsga_run), "--objectives", "accuracy_lw:max,distance:min"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--objectives.accuracy_lw: unknown objective 'accuracy_lw' (did you mean 'accuracy_low'?)" in err
    assert "the evaluator returns: accuracy_low, loss_low," in err
    assert main(["front", str(nsga_run), "--objectives", "accuracy_low:up"]) == 2
    assert "evomerge: error: --objectives.accuracy_low: got 'up', allowed: 'max', 'min'" in capsys.readouterr().err


def test_front_from_other_metrics(nsga_run: Path, capsys):
    check_front_from_other_metrics(nsga_run, 20, capsys)


def test_front_from_other_metrics_of_a_map_run(map_run: Path, capsys):
    check_front_from_other_metrics(map_run, 22, capsys)


def test_export_front_point_reproduces_its_objectives(map_run: Path, tmp_path: Path, capsys):
    rows = read_csv(map_run / "front.csv")
    k = len(rows) // 2
    assert main(["export", str(map_run), "--point", str(k)]) == 0
    out_dir = map_run / "export" / f"point-{k}"
    assert f"exported front point {k} to {out_dir}" in capsys.readouterr().out
    recipe = json.loads((out_dir / "recipe.json").read_text())
    assert recipe["front_point"] == k and recipe["individual"] == int(rows[k]["id"])
    assert recipe["genome"] == [float(rows[k]["gene_0"]), float(rows[k]["gene_1"])]

    tensors = load_file(str(out_dir / "model.safetensors"))
    evaluator = MultiTaskEvaluator(MultiTaskOptions(tasks=TWO_TASKS, device="cpu"))
    assert sorted(tensors) == sorted(evaluator.layout().names)
    search = evaluator.evaluate(tensors).objectives
    held_out = evaluator.test(tensors)
    for name in ("accuracy_low", "accuracy_high"):
        assert search[name] == pytest.approx(float(rows[k][name]), abs=1e-6)
        assert held_out[name] == pytest.approx(float(rows[k][f"test_{name}"]), abs=1e-6)
    assert search["distance"] == pytest.approx(recipe["objectives"]["distance"], abs=1e-6)

    assert main(["export", str(map_run), "--point", "999", "--out", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("evomerge: error: --point 999 is not on the front of")
    assert f"it has points 0..{len(rows) - 1}" in err
    assert not (tmp_path / "nowhere").exists()


# failures, bad specs --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory) -> Path:
    """MAP with 8 design points, of which 2 (ids 2, 5) and 1 front point (id 9) get a NaN objective."""
    tmp = tmp_path_factory.mktemp("nan")
    evaluator = {"name": f"{__name__}:NanOn", "nan_on": [2, 5, 9], "tasks": TWO_TASKS, "device": "cpu"}
    strategy = {"name": "map", "objectives": {"accuracy_low": "max", "accuracy_high": "max"}}
    strategy.update(design_points=8, front_points=3, pop_size=20, generations=20)
    spec = mnist_spec(tmp, "nan", strategy, budget=11, evaluator=evaluator)
    assert main(["run", write(tmp, spec), "--quiet"]) == 0
    return tmp / "runs" / "nan"


def test_nan_objectives_are_dropped_from_the_front(nan_run: Path, capsys):
    run = nan_run
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["evaluations"] == 11 and summary["failures"] == 3
    failed = [(e["id"], e["error"]) for e in journal(run) if e["status"] != "ok"]
    assert failed == [(i, "objective 'accuracy_low' is nan") for i in (2, 5, 9)]
    assert summary["front"]["dropped"] == [{"id": i, "error": "objective 'accuracy_low' is nan"} for i in (2, 5, 9)]
    assert summary["final_stats"]["failed"] == 3 and summary["final_stats"]["points"] == 8
    ids = {int(r["id"]) for r in read_csv(run / "front.csv")}
    assert ids and not ids & {2, 5, 9}
    capsys.readouterr()

    assert main(["front", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"{len(ids)} front points of 8 evaluated" in out
    assert "dropped 3 failed candidates (not on the front):" in out
    for i in (2, 5, 9):
        assert f"  id {i}: objective 'accuracy_low' is nan" in out


def test_summary_is_strict_json_when_cross_validation_had_no_point_to_hold_out(nan_run: Path):
    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    summary = json.loads((nan_run / "summary.json").read_text(), parse_constant=refuse)
    assert summary["final_stats"]["points"] == 8


def test_unknown_objective_fails_before_the_run_exists(tmp_path: Path, capsys):
    strategy = {"name": "map", "objectives": {"accuracy_lwo": "max", "accuracy_high": "max"}}
    spec = mnist_spec(tmp_path, "typo", strategy, budget=22)
    assert main(["run", write(tmp_path, spec), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("evomerge: error: strategy.objectives.accuracy_lwo: unknown objective 'accuracy_lwo'")
    assert "(did you mean 'accuracy_low'?)" in err
    available = MultiTaskEvaluator(MultiTaskOptions(tasks=TWO_TASKS, device="cpu")).metric_names()
    assert err.endswith("the evaluator returns: " + ", ".join(available))
    assert not (tmp_path / "runs" / "typo").exists()


# NSGA: resume continues exactly ------------------------------------------------------------------------


def comparable(run: Path) -> dict:
    state = load_state(run / "snapshot.safetensors")["strategy"]
    summary = json.loads((run / "summary.json").read_text())
    return {
        "journal": [(e["id"], e["status"], e.get("objectives"), e.get("meta")) for e in journal(run)],
        "pymoo": (state["asked"], state["told"], state["generation"], state["pymoo_rng"]),
        "population": (state["population"]["X"], state["population"]["F"]),
        "best": (state["best_value"], state["best_genome"]),
        "front": {k: summary["front"][k] for k in ("size", "hypervolume", "reference")},
        "front_csv": [{k: v for k, v in r.items()} for r in read_csv(run / "front.csv")],
    }


def test_nsga_stopped_mid_batch_and_resumed_equals_an_uninterrupted_run(nsga_run: Path, tmp_path: Path):
    spec = write(tmp_path, mnist_spec(tmp_path, "parts", NSGA, budget=20))
    assert main(["run", spec, "--quiet", "--budget", "10"]) == 0
    parts = tmp_path / "runs" / "parts"
    stopped = load_state(parts / "snapshot.safetensors")["strategy"]
    assert stopped["waiting"] and stopped["queue"]  # stopped mid-batch with a result not yet told to pymoo
    assert main(["resume", str(parts), "--quiet", "--budget", "20"]) == 0
    whole, resumed = comparable(nsga_run), comparable(parts)
    assert len(whole["journal"]) == 20
    assert resumed["journal"] == whole["journal"]
    assert resumed["pymoo"] == whole["pymoo"] and whole["pymoo"][1] >= 15  # batches asked, results told, …
    np.testing.assert_array_equal(resumed["population"], whole["population"])
    assert resumed["best"][0] == whole["best"][0]
    np.testing.assert_array_equal(resumed["best"][1], whole["best"][1])
    assert resumed["front"] == whole["front"] and resumed["front_csv"] == whole["front_csv"]
    assert {e[3]["batch"] for e in whole["journal"]} == {0, 1, 2, 3}  # 6 per batch: 20 = 6 + 6 + 6 + 2


# build-models ----------------------------------------------------------------------------------------


def test_build_models_prints_the_cache_and_the_fine_tuned_accuracies(tmp_path: Path, capsys):
    spec = mnist_spec(tmp_path, "models", {"name": "map"}, budget=1)
    assert main(["build-models", write(tmp_path, spec)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "3 seed models for models (evaluator)"
    match = re.fullmatch(r"  cached in (.+)", out[1])
    assert match, out
    folder = Path(match.group(1))
    assert folder.parent == Path(os.environ["EVOMERGE_CACHE"]) / "task_models"
    assert {p.name for p in folder.iterdir()} >= {"info.json", "base.safetensors", "task_low.safetensors"}
    info = json.loads((folder / "info.json").read_text())
    for line, task in zip(out[2:], ("low", "high")):
        accuracy = info["finetuned_accuracy"][task]
        expected = f"val accuracy {accuracy['val']:.4f}, test accuracy {accuracy['test']:.4f}"
        assert line == f"  fine-tuned on {task}: {expected}"
        assert accuracy["val"] > 0.8 and not math.isnan(accuracy["test"])
    assert len(out) == 4


def test_map_trades_accuracy_against_a_cost_term(tmp_path: Path, capsys):
    """A cost objective (distance from the base, minimised) with a softplus link next to an accuracy."""
    strategy = {
        "name": "map",
        "objectives": {"accuracy": "max", "distance": "min"},
        "links": {"distance": "softplus"},
        "front_points": 6,
    }
    assert main(["run", write(tmp_path, mnist_spec(tmp_path, "cost", strategy, 18)), "--quiet"]) == 0
    run = tmp_path / "runs" / "cost"
    rows = read_csv(run / "front.csv")
    accuracy = [float(r["accuracy"]) for r in rows]
    distance = [float(r["distance"]) for r in rows]
    assert len(rows) >= 3 and min(distance) < 1e-6  # (near) the base itself: all coefficients 0 cost nothing
    order = np.argsort(distance)
    assert np.all(np.diff(np.array(accuracy)[order]) > 0)  # along the front, more accuracy costs more distance
    stats = json.loads((run / "summary.json").read_text())["final_stats"]
    assert stats["cv_rmse_distance"] < 0.05  # ‖c1 τ1 + c2 τ2‖ / ‖θ0‖ is smooth in c: the surrogate fits it


def test_optuna_dashboard_reads_the_mirror(map_run: Path):
    """optuna-dashboard's own WSGI app (no server, no browser) lists the run's study and its trials."""
    dashboard = pytest.importorskip("optuna_dashboard")
    from wsgiref.util import setup_testing_defaults

    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    app = dashboard.wsgi(JournalStorage(JournalFileBackend(str(map_run / "optuna.journal"))))

    def get(path: str) -> dict:
        environ: dict = {"PATH_INFO": path, "QUERY_STRING": "after=0"}
        setup_testing_defaults(environ)
        status: list[str] = []
        body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
        assert status[0].startswith("200")
        return json.loads(body)

    (study,) = get("/api/studies")["study_summaries"]
    assert study["study_name"] == map_run.name and study["directions"] == ["maximize", "maximize"]
    trials = get(f"/api/studies/{study['study_id']}")["trials"]
    entries, _ = read_journal(map_run / "journal.jsonl")
    assert len(trials) == len(entries) == 22
    assert {p["name"] for p in trials[0]["params"]} == {"x0", "x1"}


def test_export_point_numbers_the_front_like_front_objectives(map_run: Path, tmp_path: Path, capsys):
    """`front --objectives` renumbers the points; `export --point K --objectives` follows the same numbering."""
    goals = "accuracy_high:max,accuracy_low:max"
    assert main(["front", str(map_run), "--objectives", goals]) == 0
    table = capsys.readouterr().out.splitlines()
    first = next(line for line in table if line.startswith("0 "))
    first_id = int(first.split()[1])
    out = tmp_path / "p0"
    assert main(["export", str(map_run), "--point", "0", "--objectives", goals, "--out", str(out)]) == 0
    assert json.loads((out / "recipe.json").read_text())["individual"] == first_id


def test_single_objective_random_run_finishes_with_its_plot(tmp_path: Path):
    strategy = {"name": "random", "objectives": {"accuracy": "max"}}
    assert main(["run", write(tmp_path, mnist_spec(tmp_path, "one", strategy, 6)), "--quiet"]) == 0
    run = tmp_path / "runs" / "one"
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    assert (run / "plots" / "front.png").read_bytes().startswith(b"\x89PNG")


def test_unknown_objective_of_the_classification_evaluator_is_refused_before_evaluating(tmp_path: Path, capsys):
    spec = {
        "name": "bad",
        "budget": 5,
        "output": str(tmp_path / "runs"),
        "evaluator": {"name": "classification", "dataset": "wine", "hidden": [4], "device": "cpu"},
        "models": {"init": "random", "count": 3},
        "space": {"name": "merge", "genes": {"weights": {"per": "model"}}, "fixed": {"scale": 1.0}},
        "strategy": {"name": "nsga", "objectives": {"accuracy_od": "max", "accuracy_even": "max"}},
        "runtime": {"progress": False},
    }
    assert main(["run", write(tmp_path, spec)]) == 2
    err = capsys.readouterr().err
    assert "strategy.objectives.accuracy_od: unknown objective 'accuracy_od' (did you mean 'accuracy_odd'?)" in err
    assert "the evaluator returns: accuracy, accuracy_odd, accuracy_even" in err
    assert not (tmp_path / "runs" / "bad").exists()


def test_export_point_of_an_empty_front_says_so(tmp_path: Path, capsys):
    """Every candidate NaN: the run finishes with an empty front, and `export --point` says why there is none."""
    evaluator = {"name": f"{__name__}:NanOn", "nan_on": [0, 1, 2], "tasks": TWO_TASKS, "device": "cpu"}
    strategy = {"name": "random", "objectives": {"accuracy_low": "max", "accuracy_high": "max"}}
    assert main(["run", write(tmp_path, mnist_spec(tmp_path, "empty", strategy, 3, evaluator)), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["export", str(tmp_path / "runs" / "empty"), "--point", "0"]) == 2
    assert "the front of" in (err := capsys.readouterr().err) and "is empty (0 evaluated, 3 failed)" in err


def test_front_plot_cannot_be_redrawn_for_other_objectives(map_run: Path, capsys):
    assert main(["front", str(map_run), "--plot", "--objectives", "accuracy_low:max,distance:min"]) == 2
    assert "--plot redraws the run's own front.csv and plots; it cannot be combined with --objectives" in (
        capsys.readouterr().err
    )


def test_models_from_an_evaluator_that_has_none(tmp_path: Path, capsys):
    spec = {
        "name": "no-models",
        "budget": 3,
        "output": str(tmp_path / "runs"),
        "evaluator": {"name": "classification", "dataset": "wine", "hidden": [4], "device": "cpu"},
        "models": {"init": "evaluator"},
        "strategy": {"name": "m2n2", "population": 4},
        "runtime": {"progress": False},
    }
    assert main(["run", write(tmp_path, spec)]) == 2
    assert "models.init 'evaluator' needs an evaluator that provides its models; ClassificationEvaluator does not" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "runs" / "no-models").exists()


@pytest.mark.parametrize(
    "options, message",
    [
        ({"tasks": {}}, r"evaluator\.tasks: needs at least one task"),
        ({"tasks": {"one": [3]}}, r"evaluator\.tasks\.one: got \[3\], a task needs at least 2 classes"),
        ({"tasks": {"big": [9, 10]}}, r"evaluator\.tasks\.big: classes \[10\] are not digits; allowed: 0-9"),
        ({"tasks": {"rep": [1, 1]}}, r"evaluator\.tasks\.rep: got \[1, 1\], classes repeat"),
        ({"hidden": [0]}, r"evaluator\.hidden\[0\]: got 0, must be > 0"),
        ({"hidden": []}, r"evaluator\.hidden: needs at least one layer"),
        ({"finetune_steps": -1}, r"evaluator\.finetune_steps: got -1, must be >= 0"),
        ({"lr": 0}, r"evaluator\.lr: got 0\.0, must be > 0"),
        ({"val_per_class": 0}, r"evaluator\.val_per_class: got 0, must be >= 1"),
        ({"test_per_class": 450}, r"evaluator\.test_per_class: val \+ test = 550 leaves no training images"),
        ({"dataset": "mnist"}, r"evaluator\.dataset"),
    ],
)
def test_multitask_options_are_checked(options: dict, message: str):
    from evomerge.errors import SpecError
    from evomerge.spec import spec_from_dict

    spec = yaml.safe_load((ROOT / "search_spaces" / "map_mnist_2tasks.yaml").read_text())
    spec["evaluator"].update(options)
    with pytest.raises(SpecError, match=message):
        spec_from_dict(spec)


def test_resume_of_a_strategy_that_finished_says_so_at_once(map_run: Path, capsys):
    """MAP evaluates a fixed design (22 points here); a larger budget cannot extend it."""
    import time

    start = time.monotonic()
    assert main(["resume", str(map_run), "--budget", "30", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "its map search finished after 22 evaluations and has nothing more to ask" in err
    assert time.monotonic() - start < 5  # refused before anything is built
    assert json.loads((map_run / "run.json").read_text())["status"] == "finished"


def test_export_point_with_other_objectives_gets_its_own_folder(map_run: Path, capsys):
    goals = "accuracy_high:max,accuracy_low:max"
    assert main(["export", str(map_run), "--point", "0"]) == 0
    assert main(["export", str(map_run), "--point", "0", "--objectives", goals]) == 0
    folders = sorted(p.name for p in (map_run / "export").iterdir() if p.name.startswith("point-0"))
    assert folders == ["point-0", "point-0-accuracy_high-max-accuracy_low-max"]
