"""Bad input is refused with a message that names the field, the value and what is allowed.

Every refusal must happen before results are lost: a refused `run`/`resume` leaves the run
directory's journal byte-for-byte as it was.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from evomerge.cli import main
from evomerge.errors import EvomergeError, RunDirError, ShapeMismatchError, SpecError
from evomerge.evaluate.classification import mlp_layout
from evomerge.runtime import start_run
from evomerge.spec import load_spec, spec_from_dict
from evomerge.store import RunDir, read_journal

STRATEGY_NAMES = ("cma_es", "ga", "grid", "m2n2", "map_elites")
M2N2_FIELDS = ("alpha", "crossover", "matchmaker", "mutation_std", "objective", "population", "split_point")
WINE_LAYOUT = mlp_layout([13, 8, 3])  # wine: 13 features, 3 classes; hidden [8]
WINE_SHAPES = dict(zip(WINE_LAYOUT.names, WINE_LAYOUT.shapes, strict=True))


def wine_spec(name: str = "wine-run", budget: int = 40, **overrides) -> dict:
    """A spec that runs in a fraction of a second: wine, a 13-8-3 MLP on the CPU, one thread."""
    spec = {
        "name": name,
        "budget": budget,
        "seed": 0,
        "evaluator": {"name": "classification", "dataset": "wine", "hidden": [8], "device": "cpu"},
        "models": {"init": "random", "count": 2, "std": 0.1},
        "space": "weights",
        "strategy": {"name": "m2n2", "population": 6, "mutation_std": 0.05},
        "runtime": {"threads": 1, "progress": False},
    }
    spec.update(copy.deepcopy(overrides))
    return spec


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def spec_error(spec: dict) -> SpecError:
    with pytest.raises(SpecError) as info:
        spec_from_dict(spec)
    return info.value


def cli_error(capsys, argv: list[str]) -> str:
    """Run the CLI in-process, expect the clean one-line refusal (exit 2), return stderr."""
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    # the error comes last, once; only the "run NAME: ..." header may precede it
    assert err.count("evomerge: error: ") == 1, err
    head, _, message = err.partition("evomerge: error: ")
    assert head == "" or (head.startswith("run ") and head.count("\n") == 1), err
    return "evomerge: error: " + message


def journal_bytes(run: Path) -> bytes:
    return (run / "journal.jsonl").read_bytes()


def finished_run(tmp_path: Path, capsys, name: str = "wine-run", budget: int = 40, **overrides) -> Path:
    """Run a tiny wine search through the CLI; returns its run directory."""
    out = tmp_path / "runs"
    spec = write_spec(tmp_path / f"{name}.yaml", wine_spec(name, budget, **overrides))
    rc = main(["run", str(spec), "--output", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    run = out / name
    assert json.loads((run / "summary.json").read_text())["status"] == "finished"
    entries, _ = read_journal(run / "journal.jsonl")
    assert len(entries) == budget
    return run


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path_factory):
    """Keep the user's specialist cache untouched and torch on one thread (restored afterwards)."""
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path_factory.mktemp("evomerge-cache")))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def subprocess_env(tmp_path: Path, extra_path: Path | None = None) -> dict[str, str]:
    env = dict(os.environ, EVOMERGE_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra_path), env.get("PYTHONPATH")]))
    return env


# 1. unknown strategy ------------------------------------------------------------------------


def test_unknown_strategy_lists_valid_names_and_suggests_close_one():
    err = spec_error(wine_spec(strategy={"name": "m2n3", "population": 6}))
    assert err.path == "strategy.name"
    msg = str(err)
    assert msg.startswith("strategy.name: ")
    assert "'m2n3'" in msg
    assert "did you mean 'm2n2'" in msg
    for name in STRATEGY_NAMES:
        assert name in msg


def test_unknown_strategy_given_as_plain_string_and_through_cli(tmp_path, capsys):
    spec = write_spec(tmp_path / "s.yaml", wine_spec(strategy="map_elite"))
    out = tmp_path / "out"
    err = cli_error(capsys, ["run", str(spec), "--output", str(out), "--quiet"])
    assert "strategy.name" in err
    assert "did you mean 'map_elites'" in err
    assert all(name in err for name in STRATEGY_NAMES)
    assert not out.exists()


def test_unknown_strategy_without_close_match_gives_no_suggestion():
    err = spec_error(wine_spec(strategy={"name": "simulated_annealing"}))
    assert err.path == "strategy.name"
    assert "did you mean" not in str(err)
    assert all(name in str(err) for name in STRATEGY_NAMES)


# 2. unknown evaluator -----------------------------------------------------------------------


def test_unknown_evaluator_lists_valid_ones_and_import_form():
    err = spec_error(wine_spec(evaluator={"name": "classifcation", "dataset": "wine"}))
    assert err.path == "evaluator.name"
    msg = str(err)
    assert "'classifcation'" in msg
    assert "did you mean 'classification'" in msg
    assert re.search(r"valid: [a-z_, ]*\bclassification\b", msg)
    assert "package.module:attr" in msg


def test_evaluator_import_that_fails_names_the_module():
    err = spec_error(wine_spec(evaluator={"name": "no_such_module_xyz:make"}))
    assert err.path == "evaluator.name"
    assert "no_such_module_xyz" in str(err)
    assert "cannot import" in str(err)


def test_unknown_dataset_lists_valid_ones():
    err = spec_error(wine_spec(evaluator={"name": "classification", "dataset": "wien"}))
    assert err.path == "evaluator.dataset"
    assert "'wien'" in str(err)
    assert "did you mean 'wine'" in str(err)
    assert "digits" in str(err) and "wine" in str(err)


# 3. missing required fields -----------------------------------------------------------------


@pytest.mark.parametrize("missing", ["budget", "strategy", "name"])
def test_missing_required_field_is_named(missing):
    spec = wine_spec()
    del spec[missing]
    err = spec_error(spec)
    assert err.path == missing
    assert str(err).startswith(f"{missing}: ")
    assert "missing required field" in str(err)


def test_missing_strategy_name_lists_valid_strategies():
    err = spec_error(wine_spec(strategy={"population": 6}))
    assert err.path == "strategy.name"
    assert "missing required field" in str(err)
    assert all(name in str(err) for name in STRATEGY_NAMES)


def test_missing_field_through_cli_exits_2(tmp_path, capsys):
    spec = wine_spec()
    del spec["budget"]
    out = tmp_path / "out"
    err = cli_error(capsys, ["run", str(write_spec(tmp_path / "s.yaml", spec)), "--output", str(out)])
    assert "budget: missing required field" in err
    assert not out.exists()


# 4. ill-typed fields ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "path", "value", "expected"),
    [
        ({"budget": "many"}, "budget", "'many'", "integer"),
        ({"budget": True}, "budget", "True", "integer"),
        ({"strategy": {"name": "m2n2", "population": 2.5}}, "strategy.population", "2.5", "integer"),
        ({"strategy": {"name": "m2n2", "matchmaker": "yes"}}, "strategy.matchmaker", "'yes'", "true or false"),
        ({"strategy": {"name": "m2n2", "alpha": "one"}}, "strategy.alpha", "'one'", "number"),
        ({"models": {"init": "file"}}, "models.init", "'file'", "'random', 'specialists', 'files'"),
        ({"evaluator": {"name": "classification", "hidden": 8}}, "evaluator.hidden", "8", "list of int"),
        ({"evaluator": {"name": "classification", "hidden": [8, "x"]}}, "evaluator.hidden[1]", "'x'", "integer"),
        ({"models": "random"}, "models", "'random'", "mapping"),
    ],
)
def test_ill_typed_field_names_path_and_value(overrides, path, value, expected):
    err = spec_error(wine_spec(**overrides))
    assert err.path == path
    msg = str(err)
    assert msg.startswith(f"{path}: ")
    assert f"got {value}" in msg
    assert expected in msg


def test_ill_typed_field_through_cli(tmp_path, capsys):
    spec = write_spec(tmp_path / "s.yaml", wine_spec(strategy={"name": "m2n2", "population": 2.5}))
    err = cli_error(capsys, ["run", str(spec), "--output", str(tmp_path / "out")])
    assert "strategy.population: got 2.5, expected an integer" in err


def test_spec_that_is_not_yaml_or_not_a_mapping(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    assert "not valid YAML" in cli_error(capsys, ["run", str(bad)])
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    assert "must hold a mapping" in cli_error(capsys, ["run", str(listed)])
    missing = tmp_path / "nope.yaml"
    err = cli_error(capsys, ["run", str(missing)])
    assert "does not exist" in err and "nope.yaml" in err


# 5. unknown fields --------------------------------------------------------------------------


def test_unknown_strategy_field_suggests_and_lists_allowed():
    err = spec_error(wine_spec(strategy={"name": "m2n2", "populaton": 6}))
    assert err.path == "strategy.populaton"
    msg = str(err)
    assert "unknown field" in msg
    assert "did you mean 'population'" in msg
    assert "allowed fields: " + ", ".join(M2N2_FIELDS) in msg


def test_unknown_top_level_field_suggests_and_lists_allowed():
    spec = wine_spec()
    spec["budgte"] = spec.pop("budget")
    err = spec_error(spec)
    assert err.path == "budgte"
    assert "unknown field" in str(err)
    assert "did you mean 'budget'" in str(err)
    for name in ("budget", "evaluator", "models", "name", "output", "runtime", "seed", "space", "strategy"):
        assert name in str(err)


def test_unknown_nested_field_in_models_and_runtime():
    err = spec_error(wine_spec(models={"init": "random", "cuont": 2}))
    assert err.path == "models.cuont"
    assert "did you mean 'count'" in str(err)
    err = spec_error(wine_spec(runtime={"snapshot_evry": 10}))
    assert err.path == "runtime.snapshot_evry"
    assert "did you mean 'snapshot_every'" in str(err)


# 6. ranges: budget, population --------------------------------------------------------------


@pytest.mark.parametrize("budget", [0, -5])
def test_budget_not_positive_in_spec_is_refused(budget):
    err = spec_error(wine_spec(budget=budget))
    assert err.path == "budget"
    assert f"got {budget}" in str(err)
    assert "must be > 0" in str(err)


def test_budget_zero_on_cli_refused_and_nothing_created(tmp_path, capsys):
    spec = write_spec(tmp_path / "s.yaml", wine_spec())
    out = tmp_path / "out"
    err = cli_error(capsys, ["run", str(spec), "--budget", "0", "--output", str(out), "--quiet"])
    assert "budget: got 0, must be > 0" in err
    assert not out.exists()


def test_budget_not_an_integer_on_cli_is_an_argparse_error(tmp_path, capsys):
    spec = write_spec(tmp_path / "s.yaml", wine_spec())
    with pytest.raises(SystemExit) as info:
        main(["run", str(spec), "--budget", "many", "--output", str(tmp_path / "out")])
    assert info.value.code == 2
    assert "--budget" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("strategy", ["m2n2", "ga", "cma_es"])
@pytest.mark.parametrize("population", [1, 0])
def test_population_below_two_refused(strategy, population):
    err = spec_error(wine_spec(strategy={"name": strategy, "population": population}))
    assert err.path == "strategy.population"
    assert f"got {population}, must be >= 2" in str(err)


def test_population_one_on_cli_exits_2_and_creates_nothing(tmp_path, capsys):
    spec = write_spec(tmp_path / "s.yaml", wine_spec(strategy={"name": "m2n2", "population": 1}))
    out = tmp_path / "out"
    assert "strategy.population: got 1, must be >= 2" in cli_error(capsys, ["run", str(spec), "--output", str(out)])
    assert not out.exists()


def test_resume_budget_zero_refused_and_journal_kept(tmp_path, capsys):
    run = finished_run(tmp_path, capsys)
    before = journal_bytes(run)
    err = cli_error(capsys, ["resume", str(run), "--budget", "0", "--quiet"])
    assert "--budget must be > 0, got 0" in err
    assert journal_bytes(run) == before


# 7. model/data shape mismatch ---------------------------------------------------------------


def write_model(path: Path, shapes: dict[str, tuple[int, ...]] | None = None, seed: int = 0) -> Path:
    shapes = WINE_SHAPES if shapes is None else shapes
    gen = torch.Generator().manual_seed(seed)
    save_file({k: torch.randn(s, generator=gen) * 0.1 for k, s in shapes.items()}, str(path))
    return path


def files_spec(tmp_path: Path, paths: list[Path]) -> dict:
    models = {"init": "files", "paths": [str(p) for p in paths]}
    return wine_spec("from-files", models=models, output=str(tmp_path / "out"))


def test_layout_of_wine_model_is_what_the_tests_assume():
    assert WINE_LAYOUT.names == ("layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias")
    assert WINE_LAYOUT.shapes == ((13, 8), (8,), (8, 3), (3,))


def test_model_file_with_wrong_shape_names_tensor_and_both_shapes(tmp_path):
    shapes = dict(WINE_SHAPES)
    shapes["layers.0.weight"] = (13, 9)
    bad = write_model(tmp_path / "bad.safetensors", shapes)
    good = write_model(tmp_path / "good.safetensors", seed=1)
    spec = spec_from_dict(files_spec(tmp_path, [good, bad]))
    with pytest.raises(ShapeMismatchError) as info:
        start_run(spec, progress=False)
    msg = str(info.value)
    assert isinstance(info.value, EvomergeError)
    assert "'layers.0.weight'" in msg
    assert "(13, 9)" in msg and "(13, 8)" in msg
    assert "bad.safetensors" in msg


def test_model_file_with_wrong_shape_through_cli(tmp_path, capsys):
    shapes = dict(WINE_SHAPES)
    shapes["layers.1.weight"] = (8, 10)
    bad = write_model(tmp_path / "bad.safetensors", shapes)
    good = write_model(tmp_path / "good.safetensors")
    spec = write_spec(tmp_path / "s.yaml", files_spec(tmp_path, [bad, good]))
    err = cli_error(capsys, ["run", str(spec), "--quiet"])
    assert "'layers.1.weight'" in err
    assert "(8, 10)" in err and "(8, 3)" in err
    assert "bad.safetensors" in err
    # nothing was evaluated
    journal = tmp_path / "out" / "from-files" / "journal.jsonl"
    assert read_journal(journal)[0] == []


def test_model_file_missing_or_extra_tensor_or_absent(tmp_path):
    shapes = dict(WINE_SHAPES)
    del shapes["layers.1.bias"]
    missing = write_model(tmp_path / "missing.safetensors", shapes)
    with pytest.raises(ShapeMismatchError, match=r"no tensor 'layers\.1\.bias' \(expected shape \(3,\)\)"):
        start_run(spec_from_dict(files_spec(tmp_path / "a", [missing])), progress=False)

    shapes = {**WINE_SHAPES, "layers.2.weight": (3, 3)}
    extra = write_model(tmp_path / "extra.safetensors", shapes)
    with pytest.raises(ShapeMismatchError, match=r"'layers\.2\.weight'"):
        start_run(spec_from_dict(files_spec(tmp_path / "b", [extra])), progress=False)

    with pytest.raises(EvomergeError, match="does not exist"):
        start_run(spec_from_dict(files_spec(tmp_path / "c", [tmp_path / "absent.safetensors"])), progress=False)


def test_models_files_without_paths_is_refused():
    err = spec_error(wine_spec(models={"init": "files"}))
    assert err.path == "models.paths"
    assert "at least one path" in str(err)


# 8. resume on something that is not a run ---------------------------------------------------


def test_resume_directory_that_is_not_a_run(tmp_path, capsys):
    folder = tmp_path / "just-a-folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    err = cli_error(capsys, ["resume", str(folder), "--quiet"])
    assert str(folder) in err
    assert "not an evomerge run" in err
    assert "run.json" in err and "spec.yaml" in err
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]  # no lock, no journal left behind


def test_resume_path_that_does_not_exist(tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    err = cli_error(capsys, ["resume", str(missing), "--quiet"])
    assert str(missing) in err
    assert "does not exist" in err
    assert not missing.exists()


def test_resume_a_file_and_report_a_non_run(tmp_path, capsys):
    file = tmp_path / "file.txt"
    file.write_text("x")
    assert "not a directory" in cli_error(capsys, ["resume", str(file)])
    folder = tmp_path / "folder"
    folder.mkdir()
    assert "not an evomerge run" in cli_error(capsys, ["report", str(folder)])


# 9. changed specs ---------------------------------------------------------------------------


def test_resume_with_hand_edited_spec_is_refused(tmp_path, capsys):
    run = finished_run(tmp_path, capsys)
    before = journal_bytes(run)
    info_before = (run / "run.json").read_text()
    spec = yaml.safe_load((run / "spec.yaml").read_text())
    assert spec["strategy"]["population"] == 6
    spec["strategy"]["population"] = 8
    (run / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))

    err = cli_error(capsys, ["resume", str(run), "--budget", "80", "--quiet"])
    assert "spec.yaml" in err
    assert "changed" in err
    assert journal_bytes(run) == before
    assert (run / "run.json").read_text() == info_before
    assert json.loads((run / "summary.json").read_text())["evaluations"] == 40


def test_resume_with_spec_edited_into_invalid_is_refused(tmp_path, capsys):
    run = finished_run(tmp_path, capsys)
    before = journal_bytes(run)
    spec = yaml.safe_load((run / "spec.yaml").read_text())
    spec["strategy"]["populaton"] = spec["strategy"].pop("population")
    (run / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    err = cli_error(capsys, ["resume", str(run), "--budget", "80", "--quiet"])
    assert "no longer validates" in err
    assert "strategy.populaton" in err
    assert journal_bytes(run) == before


def test_resume_edit_of_budget_or_runtime_only_is_allowed(tmp_path, capsys):
    """Name, budget and runtime do not change the search, so they are not 'changes' of the spec."""
    run = finished_run(tmp_path, capsys)
    before = journal_bytes(run)
    spec = yaml.safe_load((run / "spec.yaml").read_text())
    spec["runtime"]["log_every"] = 7
    spec["description"] = "edited"
    (run / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    assert main(["resume", str(run), "--budget", "50", "--quiet"]) == 0
    assert journal_bytes(run)[: len(before)] == before
    assert len(read_journal(run / "journal.jsonl")[0]) == 50


def test_run_of_different_spec_with_same_name_is_refused_naming_the_field(tmp_path, capsys):
    run = finished_run(tmp_path, capsys)
    before = journal_bytes(run)
    strategy = {"name": "m2n2", "population": 8, "mutation_std": 0.05}  # only the population differs
    other = write_spec(tmp_path / "other.yaml", wine_spec("another", strategy=strategy))
    err = cli_error(capsys, ["run", str(other), "--name", "wine-run", "--output", str(run.parent), "--quiet"])
    assert str(run) in err
    assert "different spec" in err
    assert "strategy.population: 6 there, 8 now" in err
    assert "--name" in err
    assert journal_bytes(run) == before
    assert yaml.safe_load((run / "spec.yaml").read_text())["strategy"]["population"] == 6


def test_run_of_different_seed_with_same_name_is_refused(tmp_path, capsys):
    run = finished_run(tmp_path, capsys)
    spec = write_spec(tmp_path / "again.yaml", wine_spec())
    err = cli_error(capsys, ["run", str(spec), "--seed", "5", "--output", str(run.parent), "--quiet"])
    assert "seed: 0 there, 5 now" in err


def test_run_of_same_spec_again_points_to_resume(tmp_path, capsys):
    run = finished_run(tmp_path, capsys)
    before = journal_bytes(run)
    spec = write_spec(tmp_path / "again.yaml", wine_spec())
    for extra in ([], ["--budget", "80"]):  # the budget is not part of what makes a run "the same"
        err = cli_error(capsys, ["run", str(spec), "--output", str(run.parent), "--quiet", *extra])
        assert "already holds this run" in err
        assert f"evomerge resume {run}" in err
    assert journal_bytes(run) == before


def test_resume_of_finished_run_without_larger_budget_is_refused(tmp_path, capsys):
    run = finished_run(tmp_path, capsys)
    before = journal_bytes(run)
    for extra in ([], ["--budget", "40"], ["--budget", "20"]):
        err = cli_error(capsys, ["resume", str(run), "--quiet", *extra])
        assert "already finished" in err
        assert "--budget" in err
    assert journal_bytes(run) == before


# 10. a second driver is refused by the lock -------------------------------------------------


def test_second_driver_refused_while_run_is_locked(tmp_path, capsys):
    run = finished_run(tmp_path, capsys)
    before = journal_bytes(run)
    info_before = (run / "run.json").read_text()
    cmd = [sys.executable, "-m", "evomerge", "resume", str(run), "--budget", "80", "--quiet"]
    with RunDir(run).lock():
        proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(tmp_path), timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("evomerge: error: ")
        assert "in use" in proc.stderr
        assert f"pid {os.getpid()}" in proc.stderr
        assert "Traceback" not in proc.stderr
        # also refused in-process while held (a second RunLock is a second open file description)
        with pytest.raises(RunDirError, match="in use"):
            RunDir(run).lock().acquire()
    assert journal_bytes(run) == before
    assert (run / "run.json").read_text() == info_before

    # 12. once the lock is free the same resume works and keeps every earlier result
    assert main(["resume", str(run), "--budget", "80", "--quiet"]) == 0
    entries, _ = read_journal(run / "journal.jsonl")
    assert len(entries) == 80
    assert journal_bytes(run)[: len(before)] == before
    assert [e["id"] for e in entries] == list(range(80))


def test_fresh_run_into_locked_directory_is_refused(tmp_path, capsys):
    """`run` into a directory another driver holds (run.json not yet written) fails on the lock."""
    out = tmp_path / "out"
    target = out / "wine-run"
    target.mkdir(parents=True)
    spec = write_spec(tmp_path / "s.yaml", wine_spec())
    with RunDir(target).lock():
        err = cli_error(capsys, ["run", str(spec), "--output", str(out), "--quiet"])
    assert "in use" in err
    assert not (target / "journal.jsonl").exists()


# 11. failing evaluators fail the candidate, not the search ----------------------------------

FLAKY = textwrap.dedent(
    """
    from evomerge.evaluate.classification import ClassificationEvaluator, ClassificationOptions


    class Flaky:
        def __init__(self, raise_every, nan_every):
            self.inner = ClassificationEvaluator(ClassificationOptions(dataset="wine", hidden=[8], device="cpu"))
            self.n_examples = self.inner.n_examples
            self.raise_every = raise_every
            self.nan_every = nan_every
            self.calls = 0

        def layout(self):
            return self.inner.layout()

        def evaluate(self, params):
            self.calls += 1
            if self.calls % self.raise_every == 0:
                raise RuntimeError("boom")
            if self.calls % self.nan_every == 0:
                return {"accuracy": float("nan")}
            return self.inner.evaluate(params)

        def test(self, params):
            return self.inner.test(params)


    def make(raise_every=7, nan_every=11):
        return Flaky(raise_every, nan_every)
    """
)


@pytest.fixture
def flaky_module(tmp_path, monkeypatch):
    (tmp_path / "flaky.py").write_text(FLAKY)
    sys.modules.pop("flaky", None)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("flaky", None)


def expected_failure(eval_id: int) -> str | None:
    call = eval_id + 1  # one candidate per evaluate() call, in id order
    if call % 7 == 0:
        return "RuntimeError: boom"
    if call % 11 == 0:
        return "objective 'accuracy' is nan"
    return None


def check_flaky_run(run: Path, budget: int) -> None:
    summary = json.loads((run / "summary.json").read_text())
    failures = sum(expected_failure(i) is not None for i in range(budget))
    assert summary["status"] == "finished"
    assert summary["evaluations"] == budget
    assert summary["failures"] == failures > 0
    assert summary["best_train"] is not None and summary["best_train"] > 0
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    entries, _ = read_journal(run / "journal.jsonl")
    assert [e["id"] for e in entries] == list(range(budget))
    for entry in entries:
        expected = expected_failure(entry["id"])
        if expected is None:
            assert entry["status"] == "ok", entry
            assert "error" not in entry
        else:
            assert entry["status"] == "failed", entry
            assert entry["error"] == expected
            assert "objectives" not in entry
    errors = {e["error"] for e in entries if e["status"] == "failed"}
    assert any("boom" in e for e in errors) and any("nan" in e.lower() for e in errors)
    assert (run / "best.safetensors").exists()


def test_raising_or_nan_evaluator_fails_candidates_not_the_search(tmp_path, capsys, flaky_module):
    spec = wine_spec("flaky-run", 100, evaluator={"name": "flaky:make", "raise_every": 7, "nan_every": 11})
    spec_path = write_spec(tmp_path / "flaky.yaml", spec)
    rc = main(["run", str(spec_path), "--output", str(tmp_path / "runs"), "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    run = tmp_path / "runs" / "flaky-run"
    check_flaky_run(run, 100)
    assert yaml.safe_load((run / "spec.yaml").read_text())["evaluator"] == {
        "name": "flaky:make",
        "raise_every": 7,
        "nan_every": 11,
    }
    # the result table reports the failures
    header, _, row = captured.out.splitlines()[:3]
    table = dict(zip(re.split(r"\s{2,}", header.strip()), re.split(r"\s{2,}", row.strip()), strict=True))
    assert table["run"] == "flaky-run"
    assert table["failed"] == "22"


def test_flaky_evaluator_in_subprocess_via_pythonpath(tmp_path):
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "flaky.py").write_text(FLAKY)
    spec = wine_spec("flaky-sub", 60, evaluator={"name": "flaky:make"})
    spec_path = write_spec(tmp_path / "flaky.yaml", spec)
    proc = subprocess.run(
        [sys.executable, "-m", "evomerge", "run", str(spec_path), "--output", str(tmp_path / "runs"), "--quiet"],
        capture_output=True,
        text=True,
        env=subprocess_env(tmp_path, tmp_path / "mods"),
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    check_flaky_run(tmp_path / "runs" / "flaky-sub", 60)


def test_load_spec_round_trip_of_written_run(tmp_path, capsys):
    """The resolved spec.yaml in a run validates again and hashes to what run.json recorded."""
    run = finished_run(tmp_path, capsys)
    info = json.loads((run / "run.json").read_text())
    assert load_spec(run / "spec.yaml").identity_hash() == info["spec_sha256"]


# a start that fails before any evaluation leaves nothing behind --------------------------------


def test_failed_start_leaves_no_run_directory(tmp_path, capsys):
    spec = wine_spec(name="no-model")
    spec["models"] = {"init": "files", "paths": [str(tmp_path / "missing.safetensors")]}
    spec["output"] = str(tmp_path / "runs")
    err = cli_error(capsys, ["run", str(write_spec(tmp_path / "s.yaml", spec)), "--quiet"])
    assert "missing.safetensors" in err and "does not exist" in err
    assert not (tmp_path / "runs" / "no-model").exists()
    # the same name is free again once the spec is fixed
    spec["models"] = {"init": "random"}
    assert main(["run", str(write_spec(tmp_path / "s.yaml", spec)), "--quiet"]) == 0


def test_run_into_a_locked_directory_writes_nothing(tmp_path, capsys):
    spec = wine_spec(name="locked-new")
    spec["output"] = str(tmp_path / "runs")
    target = tmp_path / "runs" / "locked-new"
    target.mkdir(parents=True)
    with RunDir(target).lock():
        err = cli_error(capsys, ["run", str(write_spec(tmp_path / "s.yaml", spec)), "--quiet"])
    assert "in use" in err
    assert sorted(p.name for p in target.iterdir()) == [".lock"]


def test_seed_files_are_recorded_not_copied_and_a_changed_one_is_refused_on_resume(tmp_path, capsys):
    """Models given as files stay where they are (path, size, sha256 in seeds/seeds.json); resuming after
    one changed on disk, even at the same size, is refused naming the file, and after one vanished too."""
    a, b = write_model(tmp_path / "a.safetensors", seed=1), write_model(tmp_path / "b.safetensors", seed=2)
    spec = write_spec(tmp_path / "files.yaml", files_spec(tmp_path, [a, b]))
    assert main(["run", str(spec), "--quiet"]) == 0
    run = tmp_path / "out" / "from-files"
    assert sorted(p.name for p in (run / "seeds").iterdir()) == ["seeds.json"]
    recorded = json.loads((run / "seeds" / "seeds.json").read_text())["seeds"]
    assert [e["source"] for e in recorded] == [str(a.resolve()), str(b.resolve())]
    assert main(["export", str(run)]) == 0
    assert json.loads((run / "export" / "best" / "recipe.json").read_text())["seeds"] == [str(a), str(b)]

    write_model(b, seed=3)  # same tensors and shapes, other values: same size, other content
    err = cli_error(capsys, ["resume", str(run), "--budget", "60", "--quiet"])
    assert f"seed model 1: {b.resolve()} changed since the run started (its content hash)" in err
    b.unlink()
    err = cli_error(capsys, ["resume", str(run), "--budget", "60", "--quiet"])
    assert f"seed model 1: {b.resolve()}, which the run started from, no longer exists" in err
    assert len(read_journal(run / "journal.jsonl")[0]) == 40  # nothing was run or lost


def test_best_model_and_exports_are_written_in_the_seed_files_dtype(tmp_path):
    """bf16 seed files give a bf16 best.safetensors and export (half the size of float32 copies)."""
    from safetensors.torch import load_file

    paths = []
    for k in (1, 2):
        path = write_model(tmp_path / f"m{k}.safetensors", seed=k)
        save_file({n: t.to(torch.bfloat16) for n, t in load_file(str(path)).items()}, str(path))
        paths.append(path)
    assert main(["run", str(write_spec(tmp_path / "bf16.yaml", files_spec(tmp_path, paths))), "--quiet"]) == 0
    run = tmp_path / "out" / "from-files"
    assert {t.dtype for t in load_file(str(run / "best.safetensors")).values()} == {torch.bfloat16}
    assert main(["export", str(run)]) == 0
    exported = load_file(str(run / "export" / "best" / "model.safetensors"))
    assert {t.dtype for t in exported.values()} == {torch.bfloat16}
    assert sorted(exported) == sorted(WINE_SHAPES)
