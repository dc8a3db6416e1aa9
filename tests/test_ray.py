"""The Ray executor on a real local Ray (started once for this module), with injected faults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from evomerge.cli import main
from evomerge.store import read_journal
from tests.conftest import write_spec

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never a cluster found here
    yield
    ray.shutdown()


def spec_with(
    tmp_path: Path, name: str, budget: int = 60, deadline_s: float = 600.0, in_flight: int = 2, **faults
) -> Path:
    spec = {
        "name": name,
        "budget": budget,
        "output": str(tmp_path / "runs"),
        "evaluator": {
            "name": "faulty",
            "dataset": "wine",
            "hidden": [8],
            "device": "cpu",
            "marker_dir": str(tmp_path / "markers"),
            **faults,
        },
        "models": {"init": "random", "std": 0.1},
        "strategy": {"name": "m2n2", "population": 6, "mutation_std": 0.05},
        "runtime": {
            "progress": False,
            "log_every": 20,
            "snapshot_every": 20,
            "threads": 1,
            "executor": {
                "name": "ray",
                "address": "auto",
                "workers": 2,
                "in_flight_per_worker": in_flight,
                "cpus_per_worker": 0.5,
                "deadline_s": deadline_s,
            },
        },
    }
    return write_spec(tmp_path / f"{name}.yaml", spec)


def finished(tmp_path: Path, name: str) -> tuple[dict, dict[int, dict]]:
    run = tmp_path / "runs" / name
    summary = json.loads((run / "summary.json").read_text())
    entries, _ = read_journal(run / "journal.jsonl")
    return summary, {e["id"]: e for e in entries}


def test_search_through_ray_records_workers(tmp_path):
    assert main(["run", str(spec_with(tmp_path, "plain")), "--quiet"]) == 0
    summary, entries = finished(tmp_path, "plain")
    assert summary["status"] == "finished" and summary["evaluations"] == 60 and summary["failures"] == 0
    assert sorted(entries) == list(range(60))
    workers = summary["workers"]
    assert len(workers) == 2 and sum(w["evaluations"] for w in workers) == 60
    assert all(w["node"] and 0 <= w["busy_share"] <= 1 for w in workers)


def test_evaluator_failures_fail_the_candidate_and_keep_the_worker(tmp_path):
    path = spec_with(tmp_path, "failing", raise_on=[5], nan_on=[6], wrong_length_on=[7])
    assert main(["run", str(path), "--quiet"]) == 0
    summary, entries = finished(tmp_path, "failing")
    assert summary["failures"] == 3 and summary["evaluations"] == 60
    assert "injected failure for candidate 5" in entries[5]["error"]
    assert "nan" in entries[6]["error"]
    assert "length" in entries[7]["error"]
    assert all(w["replaced"] == 0 for w in summary["workers"])


def test_crashed_worker_is_replaced_and_its_candidate_retried(tmp_path):
    assert main(["run", str(spec_with(tmp_path, "crash-once", exit_once_on=[9])), "--quiet"]) == 0
    summary, entries = finished(tmp_path, "crash-once")
    assert entries[9]["status"] == "ok"  # retried on the replacement worker
    assert summary["failures"] == 0 and summary["evaluations"] == 60
    assert sum(w["replaced"] for w in summary["workers"]) == 1


def test_candidate_that_always_kills_its_worker_is_poisoned(tmp_path):
    # one task per worker: the task that was running when a worker died is then known for certain
    # (with more queued, Ray may fail a just-finished task along with the dead actor, see ray_pool.py)
    assert main(["run", str(spec_with(tmp_path, "poison", in_flight=1, exit_on=[9])), "--quiet"]) == 0
    summary, entries = finished(tmp_path, "poison")
    assert entries[9]["status"] == "failed" and entries[9]["error"].startswith("poisoned")
    assert summary["failures"] == 1 and summary["evaluations"] == 60
    assert sum(w["replaced"] for w in summary["workers"]) == 2


def test_deadline_overrun_is_cancelled_and_resubmitted_then_failed(tmp_path):
    start = time.monotonic()
    path = spec_with(tmp_path, "hang", budget=30, deadline_s=2.0, hang_on=[4], hang_s=60)
    assert main(["run", str(path), "--quiet"]) == 0
    summary, entries = finished(tmp_path, "hang")
    assert entries[4]["status"] == "failed" and entries[4]["error"].startswith("deadline")
    assert summary["evaluations"] == 30 and time.monotonic() - start < 60


def test_results_out_of_order_and_in_flight_bound(tmp_path):
    """A slow candidate finishes after later ones; the pool never has more than its bound in flight."""
    from evomerge.runtime.ray_pool import RayExecutor
    from evomerge.search.base import Candidate
    from evomerge.seeds import save_seeds
    from evomerge.spec import ExecutorSpec, load_spec

    spec = load_spec(spec_with(tmp_path, "order", sleep_on={0: 1.5}))
    from evomerge.evaluate import EVALUATORS

    layout = EVALUATORS.build(spec.evaluator).layout()
    import numpy as np

    seeds = [np.random.default_rng(k).standard_normal(layout.size).astype(np.float32) for k in range(2)]
    save_seeds(tmp_path / "seeds", seeds, layout)
    pool = RayExecutor(
        spec.to_plain(),
        tmp_path / "seeds",
        ExecutorSpec(name="ray", address="auto", workers=2, in_flight_per_worker=1, cpus_per_worker=0.5),
    )
    try:
        for cid in range(6):
            pool.submit(Candidate(cid, seeds[cid % 2], {}))
            assert len(pool.running) <= pool.capacity == 2
        order = []
        while pool.in_flight():
            order += [o.candidate.id for o in pool.collect()]
            assert len(pool.running) <= 2
        assert sorted(order) == list(range(6)) and order[0] != 0 and order.index(0) > 0
    finally:
        pool.close()


def test_deterministic_mode_is_reproducible(tmp_path):
    runs = []
    for name in ("det-a", "det-b"):
        path = spec_with(tmp_path, name, sleep_on={3: 0.3, 10: 0.2})
        assert main(["run", str(path), "--quiet", "--deterministic"]) == 0
        _, entries = finished(tmp_path, name)
        runs.append([(i, e["objectives"], e["meta"]) for i, e in sorted(entries.items())])
    assert runs[0] == runs[1]


def test_evaluator_not_importable_on_workers(tmp_path, monkeypatch):
    """A user evaluator the driver can import but the workers cannot: refused before the search."""
    from evomerge.errors import EvomergeError
    from evomerge.runtime.ray_pool import RayExecutor
    from evomerge.spec import ExecutorSpec, spec_from_dict

    (tmp_path / "driver_only_eval.py").write_text(
        "from evomerge.evaluate.classification import ClassificationEvaluator, ClassificationOptions\n"
        "def make(**kw):\n"
        "    return ClassificationEvaluator(ClassificationOptions(dataset='wine', hidden=[4], device='cpu'))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = spec_from_dict({"name": "x", "budget": 5, "evaluator": "driver_only_eval:make", "strategy": "m2n2"})
    with pytest.raises(EvomergeError, match="failed to start.*driver_only_eval"):
        RayExecutor(spec.to_plain(), tmp_path, ExecutorSpec(name="ray", address="auto", workers=1, cpus_per_worker=0.5))


def test_nsga_front_through_ray_tells_partial_batches(tmp_path):
    """pymoo's NSGA-II on the multi-task benchmark through 2 Ray workers: results are told as they arrive,
    generations overlap, and the run still ends with a front, its plots and the Optuna mirror."""
    shipped = Path(__file__).resolve().parent.parent / "search_spaces" / "map_mnist_2tasks.yaml"
    spec = yaml.safe_load(shipped.read_text())
    spec.update(name="nsga-ray", budget=48, output=str(tmp_path / "runs"))
    spec["evaluator"]["device"] = "cpu"
    spec["strategy"] = {"name": "nsga", "pop_size": 8, "tell_every": 3, "objectives": spec["strategy"]["objectives"]}
    spec["runtime"] = {
        "progress": False,
        "threads": 1,
        "executor": {"name": "ray", "address": "auto", "workers": 2, "cpus_per_worker": 0.5, "in_flight_per_worker": 3},
    }
    assert main(["run", str(write_spec(tmp_path / "nsga.yaml", spec)), "--quiet"]) == 0
    run = tmp_path / "runs" / "nsga-ray"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["evaluations"] == 48 and summary["failures"] == 0
    assert sum(w["evaluations"] for w in summary["workers"]) >= 48
    entries, _ = read_journal(run / "journal.jsonl")
    batches = [e["meta"]["batch"] for e in entries]
    assert max(batches) >= 5  # 48 evaluations in batches of 8: pymoo was asked again and again
    assert 46 <= summary["final_stats"]["told"] <= 48  # told in partial batches of 3; the last may still wait
    assert summary["front"]["size"] >= 3 and (run / "front.csv").is_file() and (run / "optuna.journal").is_file()


def test_ray_errors_are_sorted_into_one_fault_policy():
    import ray.exceptions as rx

    from evomerge.runtime.ray_pool import Fault, classify

    try:
        raise ValueError("bad genome")
    except ValueError as err:
        task_error = rx.RayTaskError("evaluate", "traceback", err).as_instanceof_cause()
    node_death = rx.ActorDiedError()
    node_death.error_msg = "The actor died because its node has died. Node Id: abc"
    expected = {
        Fault.TRANSIENT: [
            rx.ActorUnavailableError("connection reset", None),
            rx.ObjectLostError("a" * 56, "owner", "call site"),
            rx.OwnerDiedError("a" * 56, "owner", "call site"),
        ],
        Fault.WORKER: [rx.ActorDiedError(), rx.WorkerCrashedError(), rx.OutOfMemoryError("killed by the monitor")],
        Fault.NODE: [rx.NodeDiedError("node gone"), rx.LocalRayletDiedError(), node_death],
        Fault.TASK: [task_error],
        Fault.FATAL: [rx.RaySystemError("the GCS is gone")],
    }
    assert {kind: [classify(e) for e in errors] for kind, errors in expected.items()} == {
        kind: [kind] * len(errors) for kind, errors in expected.items()
    }


def test_deadline_counts_from_when_the_worker_starts_the_candidate(tmp_path):
    """One worker, two in flight: the second candidate queues behind the first; only run time counts."""
    path = spec_with(tmp_path, "queued", budget=8, deadline_s=2.0, in_flight=2, sleep_on={i: 1.2 for i in range(8)})
    spec = yaml.safe_load(path.read_text())
    spec["runtime"]["executor"]["workers"] = 1
    assert main(["run", str(write_spec(path, spec)), "--quiet"]) == 0
    summary, entries = finished(tmp_path, "queued")
    assert summary["failures"] == 0 and [w["replaced"] for w in summary["workers"]] == [0]
    assert all(e["status"] == "ok" for e in entries.values())


def test_dead_worker_is_replaced_when_the_cluster_is_full(tmp_path):
    """Workers of 1 CPU fill the 2-CPU cluster: the replacement waits for Ray to free the dead one's CPU."""
    path = spec_with(tmp_path, "full", exit_once_on=[9, 20], sleep_on={i: 0.25 for i in range(20, 60)})
    spec = yaml.safe_load(path.read_text())
    spec["runtime"]["executor"]["cpus_per_worker"] = 1.0
    assert main(["run", str(write_spec(path, spec)), "--quiet"]) == 0
    summary, entries = finished(tmp_path, "full")
    assert summary["failures"] == 0 and entries[9]["status"] == entries[20]["status"] == "ok"
    assert sum(w["replaced"] for w in summary["workers"]) == 2
    assert [w["state"] for w in summary["workers"]] == ["live", "live"]  # none retired for want of room


def test_worker_death_during_a_test_pass_is_replaced_and_the_pass_retried(tmp_path):
    assert main(["run", str(spec_with(tmp_path, "test-crash", exit_once_on_test=True)), "--quiet"]) == 0
    summary, entries = finished(tmp_path, "test-crash")
    assert summary["status"] == "finished" and summary["failures"] == 0 and len(entries) == 60
    assert sum(w["replaced"] for w in summary["workers"]) == 1
    curve = (tmp_path / "runs" / "test-crash" / "curve.csv").read_text().splitlines()
    header, first = curve[0].split(","), curve[1].split(",")
    assert first[header.index("evaluations")] == "1" and float(first[header.index("test_accuracy")]) > 0


PLUGIN = """
import os
from pathlib import Path
from evomerge.evaluate.classification import ClassificationEvaluator, ClassificationOptions
def make(**kw):
    if os.environ.get("PLUGIN_MARKS"):
        Path(os.environ["PLUGIN_MARKS"], "{copy}-" + str(os.getpid())).touch()
    return ClassificationEvaluator(ClassificationOptions(dataset="wine", hidden=[4], device="cpu"))
"""


def test_plugin_evaluator_shipped_to_workers_by_runtime_env(tmp_path):
    """The driver imports its own copy of a user's evaluator package; `runtime_env: {py_modules: [...]}`
    ships another to the workers (whose import leaves a mark), as it would to every node of a cluster."""
    for copy in ("driver", "shipped"):
        (tmp_path / copy / "my_eval_plugin").mkdir(parents=True)
        (tmp_path / copy / "my_eval_plugin" / "__init__.py").write_text(PLUGIN.replace("{copy}", copy))
    marks = tmp_path / "marks"
    marks.mkdir()
    path = spec_with(tmp_path, "plugin", budget=20)
    spec = yaml.safe_load(path.read_text())
    spec["evaluator"] = "my_eval_plugin:make"
    spec["runtime"]["executor"]["runtime_env"] = {
        "py_modules": [str(tmp_path / "shipped" / "my_eval_plugin")],
        "env_vars": {"PLUGIN_MARKS": str(marks)},
    }
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "driver")}
    cmd = [sys.executable, "-m", "evomerge", "run", str(write_spec(path, spec)), "--quiet", "--ray", "local"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    summary, _ = finished(tmp_path, "plugin")
    assert summary["evaluations"] == 20 and sum(w["evaluations"] for w in summary["workers"]) == 20
    assert sorted(m.name.split("-")[0] for m in marks.iterdir()) == ["shipped", "shipped"]  # both workers


def test_health_check_answers_while_the_worker_evaluates(tmp_path):
    """An unreachable worker is checked with `ready`, which runs beside a long evaluation, not after it."""
    import numpy as np
    import ray

    from evomerge.evaluate import EVALUATORS
    from evomerge.runtime.ray_pool import RayExecutor
    from evomerge.search.base import Candidate
    from evomerge.seeds import save_seeds
    from evomerge.spec import ExecutorSpec, load_spec

    spec = load_spec(spec_with(tmp_path, "health", sleep_on={0: 8.0}))
    layout = EVALUATORS.build(spec.evaluator).layout()
    seeds = [np.random.default_rng(k).standard_normal(layout.size).astype(np.float32) for k in range(2)]
    save_seeds(tmp_path / "seeds", seeds, layout)
    pool = RayExecutor(spec.to_plain(), tmp_path / "seeds", ExecutorSpec(name="ray", workers=1, cpus_per_worker=0.5))
    try:
        pool.submit(Candidate(0, seeds[0], {}))
        time.sleep(1.0)  # the worker is now inside the 8 s evaluation
        start = time.monotonic()
        node, pid = ray.get(pool.health_check(pool.workers[0]), timeout=5)
        assert time.monotonic() - start < 5 and pid == pool.workers[0].pid
        assert [o.candidate.id for o in pool.collect()] == [0]
    finally:
        pool.close()


def test_runtime_env_refused_when_ray_was_started_by_the_caller(tmp_path):
    """The fixture started Ray in this process: a job's runtime environment can no longer be set from the spec."""
    from evomerge.errors import EvomergeError
    from evomerge.runtime.ray_pool import RayExecutor
    from evomerge.spec import ExecutorSpec, load_spec

    spec = load_spec(spec_with(tmp_path, "env"))
    options = ExecutorSpec(name="ray", address="auto", workers=1, runtime_env={"env_vars": {"A": "1"}})
    with pytest.raises(EvomergeError, match=r"runtime\.executor\.runtime_env: Ray was already started in this process"):
        RayExecutor(spec.to_plain(), tmp_path / "seeds", options)


def test_the_driver_holds_only_the_search(tmp_path, monkeypatch, capsys):
    """With Ray evaluating, the driver process builds no evaluator and makes no seed resident: bf16 seed folders
    stay on disk (read a tensor at a time for the recipe's angles and the best model), objectives are checked
    against what a worker reports, and test passes run on the workers."""
    import evomerge.runtime.driver as driver
    from evomerge.weights.seed_models import SeedModels
    from tests.test_model_scale import wine_folders

    def refuse(*args, **kwargs):
        raise AssertionError("the driver of a Ray run built an evaluator or loaded seed tensors")

    monkeypatch.setattr(driver, "build_evaluator", refuse)
    monkeypatch.setattr(SeedModels, "resident", refuse)
    spec = yaml.safe_load(spec_with(tmp_path, "lean", budget=30).read_text())
    spec["evaluator"] = {"name": "classification", "dataset": "wine", "hidden": [8], "device": "cpu"}
    spec["models"] = {"init": "files", "paths": [str(p) for p in wine_folders(tmp_path)]}
    spec["space"] = {"name": "recipe", "blocks": "layer"}
    spec["strategy"]["mutation_std"] = 0.0
    assert main(["run", str(write_spec(tmp_path / "lean.yaml", spec)), "--quiet"]) == 0
    summary, entries = finished(tmp_path, "lean")
    assert summary["evaluations"] == 30 and summary["failures"] == 0
    assert summary["test"]["accuracy"] > 0  # the best individual's test pass, done by a worker
    spec["space"] = {"name": "merge", "methods": ["task_arithmetic"]}
    spec["strategy"] = {"name": "map", "objectives": {"accuracy": "max", "accuracy_nope": "max"}}
    spec["name"] = "lean-bad-objective"
    capsys.readouterr()
    assert main(["run", str(write_spec(tmp_path / "bad.yaml", spec)), "--quiet"]) == 2
    assert "accuracy_nope" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "lean-bad-objective").exists()
