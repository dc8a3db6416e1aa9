"""The `optuna` strategy (Optuna's samplers through ask/tell) and the Optuna journal mirror of a run.

Unit tests drive the strategy by hand on a toy two-objective box problem; end-to-end tests run a
small digits merge search through the CLI and mirror it into an Optuna journal file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

optuna = pytest.importorskip("optuna")

from optuna.storages import JournalStorage  # noqa: E402
from optuna.storages.journal import JournalFileBackend  # noqa: E402
from optuna.study import StudyDirection  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from evomerge.cli import main  # noqa: E402
from evomerge.errors import EvomergeError, SpecError  # noqa: E402
from evomerge.evaluate.base import EvalResult  # noqa: E402
from evomerge.registry import Component  # noqa: E402
from evomerge.report.optuna_mirror import mirror_run  # noqa: E402
from evomerge.search import STRATEGIES  # noqa: E402
from evomerge.search.base import Candidate  # noqa: E402
from evomerge.search.optuna_search import OptunaOptions, OptunaSearch, trial_seed  # noqa: E402
from evomerge.spec import spec_from_dict  # noqa: E402
from evomerge.store import Journal, load_state, read_journal, save_state  # noqa: E402
from tests.conftest import tiny_spec, write_spec  # noqa: E402

SAMPLERS = ["nsga2", "nsga3", "tpe", "gp"]
BOX = SimpleNamespace(low=np.array([-1.0, 0.0, 2.0]), high=np.array([1.0, 0.5, 3.0]), dim=3)
GOALS = {"cost": "min", "gain": "max"}  # one of each, to check the direction handling


def toy(genome: np.ndarray) -> EvalResult:
    """Two conflicting objectives of x0; x1 and x2 only add a penalty (best at x1 = 0.25, x2 = 2.5)."""
    x = genome.astype(np.float64)
    penalty = (x[1] - 0.25) ** 2 + (x[2] - 2.5) ** 2
    return EvalResult({"cost": float((x[0] + 1) ** 2 + penalty), "gain": float(-((x[0] - 1) ** 2) - penalty)})


def options(sampler: str, **kw) -> OptunaOptions:
    return OptunaOptions(sampler=sampler, objectives=dict(GOALS), population=4, startup_trials=3, **kw)


def build(sampler: str, seed: int = 0) -> OptunaSearch:
    return STRATEGIES.build(Component("optuna", options(sampler)), space=BOX, seed=seed)


def ask(strategy: OptunaSearch, cid: int) -> Candidate:
    proposal = strategy.ask()
    return Candidate(cid, proposal.genome, proposal.meta)


def drive(strategy: OptunaSearch, n: int, in_flight: int = 1, fail_every: int = 0) -> list[Candidate]:
    """Ask n candidates keeping `in_flight` outstanding, telling the middle one first (out of order)."""
    pending: list[Candidate] = []
    asked = []
    for cid in range(n):
        pending.append(ask(strategy, cid))
        asked.append(pending[-1])
        if len(pending) >= in_flight:
            c = pending.pop(len(pending) // 2)
            strategy.tell(c, None if fail_every and c.id % fail_every == fail_every - 1 else toy(c.genome))
    for c in pending:
        strategy.tell(c, toy(c.genome))
    return asked


def study_attrs(strategy: OptunaSearch) -> dict:
    """The study's system attributes (NSGA-II/III's parent lists), which Optuna 4+ keeps off the Study API."""
    return strategy.study._storage.get_study_system_attrs(strategy.study._study_id)


def mean_score(result: EvalResult) -> float:
    return (-result.objectives["cost"] + result.objectives["gain"]) / 2


# options ----------------------------------------------------------------------------------------
def test_options_are_validated_with_dotted_paths():
    spec = tiny_spec(Path("/tmp"), space="slerp")
    spec["strategy"] = {"name": "optuna", "objectives": {"accuracy_odd": "max"}}
    with pytest.raises(SpecError, match=r"strategy\.objectives: needs at least 2"):
        spec_from_dict(spec)
    spec["strategy"] = {"name": "optuna", "objectives": {"accuracy_odd": "max", "accuracy_even": "up"}}
    with pytest.raises(SpecError, match=r"strategy\.objectives\.accuracy_even: got 'up'"):
        spec_from_dict(spec)
    spec["strategy"] = {"name": "optuna", "sampler": "nsga4"}
    with pytest.raises(SpecError, match=r"strategy\.sampler: got 'nsga4', allowed: 'nsga2', 'nsga3', 'tpe', 'gp'"):
        spec_from_dict(spec)
    spec["strategy"] = {"name": "optuna", "population": 1}
    with pytest.raises(SpecError, match=r"strategy\.population: got 1"):
        spec_from_dict(spec)
    spec["strategy"] = {"name": "optuna"}
    resolved = spec_from_dict(spec).strategy.options
    assert (resolved.sampler, resolved.population, resolved.startup_trials) == ("tpe", 20, 10)
    assert resolved.objectives == {"accuracy_odd": "max", "accuracy_even": "max"}


def test_needs_a_box_space():
    spec = tiny_spec(Path("/tmp"))  # space 'weights' has no bounds
    spec["strategy"] = {"name": "optuna"}
    from evomerge.search import check_compatible

    with pytest.raises(SpecError, match="space.name: strategy 'optuna' needs a space with bounded genes"):
        check_compatible(spec_from_dict(spec))


def test_unknown_objective_is_named():
    strategy = build("tpe")
    c = ask(strategy, 0)
    with pytest.raises(SpecError, match=r"strategy\.objectives\.cost: unknown objective 'cost'.*returns: accuracy"):
        strategy.tell(c, EvalResult({"accuracy": 1.0}))


# ask/tell ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_ask_tell_on_a_toy_problem(sampler: str):
    n = 7 if sampler == "gp" else 16
    strategy = build(sampler)
    assert strategy.best() is None
    asked = drive(strategy, n, in_flight=3, fail_every=5)
    study = strategy.study
    assert study.directions == [StudyDirection.MINIMIZE, StudyDirection.MAXIMIZE]
    assert [c.meta["trial"] for c in asked] == list(range(n))
    assert all(c.meta["genes"] == c.genome.tolist() for c in asked)
    assert json.loads(json.dumps([c.meta for c in asked])) == [c.meta for c in asked]
    genomes = np.stack([c.genome for c in asked])
    assert genomes.dtype == np.float32
    if sampler in ("tpe", "gp"):  # uniform crossover may copy a parent: NSGA-II/III can repeat a genome
        assert len(np.unique(genomes, axis=0)) == n
    assert np.all(genomes >= BOX.low.astype(np.float32)) and np.all(genomes <= BOX.high.astype(np.float32))
    trials = study.trials
    failed = {c.id for c in asked if c.id % 5 == 4 and c.id < n - 1}  # the last one is told after the loop
    assert {t.number for t in trials if t.state == TrialState.FAIL} == failed
    for c, t in zip(asked, trials):
        np.testing.assert_array_equal(np.array([t.params[f"x{i}"] for i in range(3)], dtype=np.float32), c.genome)
        if t.state == TrialState.COMPLETE:
            r = toy(c.genome)
            assert t.values == [r.objectives["cost"], r.objectives["gain"]]  # natural values, not minimised
    ok = [c for c in asked if c.id not in failed]
    scores = [mean_score(toy(c.genome)) for c in ok]
    top = ok[int(np.argmax(scores))]
    genome, score = strategy.best()
    np.testing.assert_array_equal(genome, top.genome)
    assert score == pytest.approx(max(scores))
    stats = strategy.stats()
    assert stats["trials_told"] == n and stats["failures"] == len(failed) and stats["in_flight"] == 0
    F = np.array([[toy(c.genome).objectives["cost"], -toy(c.genome).objectives["gain"]] for c in ok])
    front = {c.id for c, f in zip(ok, F) if not any(np.all(g <= f) and np.any(g < f) for g in F)}
    assert {number for number, _ in strategy.front} == front and stats["front_size"] == len(front)
    assert [genome_objs[1] for genome_objs in strategy.pareto_front()] == [
        toy(c.genome).objectives for c in ok if c.id in front
    ]


@pytest.mark.parametrize("sampler", ["nsga2", "nsga3"])
def test_genetic_samplers_advance_a_generation_per_population(sampler: str):
    strategy = build(sampler)
    drive(strategy, 13)
    key = {"nsga2": "NSGAIISampler:generation", "nsga3": "NSGAIIISampler:generation"}[sampler]
    assert [t.system_attrs[key] for t in strategy.study.trials] == [0] * 4 + [1] * 4 + [2] * 4 + [3]


@pytest.mark.parametrize("sampler", ["tpe", "gp"])
def test_model_based_samplers_start_random_then_use_the_model(sampler: str):
    """The first `startup_trials` trials are the random sampler's with the trial's seed; later ones are not."""
    strategy = build(sampler)
    asked = drive(strategy, 5)
    for c in asked:
        rng_sampler = optuna.samplers.RandomSampler(seed=trial_seed(0, c.meta["trial"]))
        study = optuna.create_study(directions=["minimize", "maximize"], sampler=rng_sampler)
        random_genome = np.array(list(study.ask(strategy.distributions).params.values()), dtype=np.float32)
        assert np.array_equal(random_genome, c.genome) == (c.id < 3)


def test_tpe_improves_on_its_random_start():
    strategy = build("tpe")
    asked = drive(strategy, 40, in_flight=2)
    penalty = [float((c.genome[1] - 0.25) ** 2 + (c.genome[2] - 2.5) ** 2) for c in asked]
    assert np.mean(penalty[-10:]) < 0.5 * np.mean(penalty[:10])


def test_tells_in_any_order_with_many_in_flight():
    strategy = build("nsga2")
    first = [ask(strategy, cid) for cid in range(6)]
    assert [t.state for t in strategy.study.trials] == [TrialState.RUNNING] * 6
    assert strategy.stats()["in_flight"] == 6
    order = [4, 0, 5, 2]
    for k in order:
        strategy.tell(first[k], None if k == 5 else toy(first[k].genome))
    states = [t.state for t in strategy.study.trials]
    assert states == [
        TrialState.COMPLETE,
        TrialState.RUNNING,
        TrialState.COMPLETE,
        TrialState.RUNNING,
        TrialState.COMPLETE,
        TrialState.FAIL,
    ]
    more = ask(strategy, 6)  # asking goes on while 1 and 3 are out
    assert more.meta["trial"] == 6
    strategy.tell(first[3], toy(first[3].genome))
    strategy.tell(more, toy(more.genome))
    strategy.tell(first[1], toy(first[1].genome))
    stats = strategy.stats()
    assert (stats["trials_told"], stats["failures"], stats["in_flight"]) == (7, 1, 0)
    assert [t.state for t in strategy.study.trials].count(TrialState.COMPLETE) == 6
    with pytest.raises(ValueError, match="Cannot tell a COMPLETE trial"):  # a trial is told once
        strategy.tell(first[1], toy(first[1].genome))


def test_same_seed_same_search_other_seed_other_search():
    a, b, c = build("tpe", seed=5), build("tpe", seed=5), build("tpe", seed=6)
    ga = [x.genome for x in drive(a, 12, in_flight=2)]
    gb = [x.genome for x in drive(b, 12, in_flight=2)]
    gc = [x.genome for x in drive(c, 12, in_flight=2)]
    np.testing.assert_array_equal(np.stack(ga), np.stack(gb))
    assert not np.array_equal(ga[0], gc[0])


# resume -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_state_round_trip_with_trials_in_flight(sampler: str, tmp_path: Path):
    before, after = (6, 4) if sampler == "gp" else (11, 12)
    original = build(sampler)
    pending: list[Candidate] = []
    for cid in range(before):  # three in flight, told out of order, one failure
        pending.append(ask(original, cid))
        if len(pending) == 3:
            c = pending.pop(1)
            original.tell(c, None if c.id == 2 else toy(c.genome))
    assert len(pending) == 2
    save_state(tmp_path / "s.safetensors", original.state_dict())
    restored = build(sampler, seed=123)  # everything must come from the state
    restored.load_state_dict(load_state(tmp_path / "s.safetensors"))
    fields = (
        "number",
        "state",
        "values",
        "params",
        "system_attrs",
        "user_attrs",
        "datetime_start",
        "datetime_complete",
    )
    assert [[getattr(t, f) for f in fields] for t in restored.study.trials] == [
        [getattr(t, f) for f in fields] for t in original.study.trials
    ]
    assert study_attrs(restored) == study_attrs(original)
    assert restored.stats() == original.stats() and restored.stats()["in_flight"] == 2
    np.testing.assert_array_equal(restored.best()[0], original.best()[0])
    queues = {id(original): list(pending), id(restored): list(pending)}
    for cid in range(before, before + after):
        genomes = []
        for strategy in (original, restored):
            queue = queues[id(strategy)]
            queue.append(ask(strategy, cid))
            genomes.append(queue[-1].genome)
            c = queue.pop(0)  # includes the trials that were RUNNING at the snapshot
            strategy.tell(c, toy(c.genome))
        np.testing.assert_array_equal(genomes[0], genomes[1])
    assert original.best()[1] == restored.best()[1]
    assert original.stats() == restored.stats()


@pytest.mark.parametrize("sampler", ["nsga2", "tpe"])
def test_trials_grow_the_snapshot_body_not_its_header(sampler: str, tmp_path: Path):
    """The samplers read every trial, so the state is O(trials), but in arrays: the JSON header stays put."""
    strategy = build(sampler)
    sizes = []
    for n in (20, 200):
        drive(strategy, n - len(strategy.study.trials), in_flight=3, fail_every=7)
        save_state(tmp_path / f"{n}.safetensors", strategy.state_dict())
        data = (tmp_path / f"{n}.safetensors").read_bytes()
        header = int.from_bytes(data[:8], "little")
        sizes.append((header, len(data) - 8 - header))
    (header_20, body_20), (header_200, body_200) = sizes
    assert header_200 - header_20 < 64 and header_200 < 4000, sizes  # a few digits longer: offsets, shapes
    assert body_200 > body_20 + 180 * 8 * 3, sizes  # 180 more trials' params alone
    if sampler == "nsga2":  # the parent lists of 30-odd generations are in the body too
        assert len(study_attrs(strategy)) >= 30


# end to end -------------------------------------------------------------------------------------
def digits_optuna_spec(tmp_path: Path, name: str = "opt", **strategy) -> dict:
    spec = tiny_spec(tmp_path, name=name, budget=30)
    spec["evaluator"] = {"name": "classification", "dataset": "digits", "hidden": [32], "device": "cpu"}
    spec["models"] = {
        "init": "specialists",
        "specialists": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]],
        "shared_init": True,
        "train_steps": 10,
    }
    spec["space"] = {
        "name": "merge",
        "methods": ["task_arithmetic"],
        "base": 0,
        "genes": {"weights": {"low": 0, "high": 1, "per": "model"}},
        "fixed": {"scale": 1.0},
    }
    spec["strategy"] = {
        "name": "optuna",
        "sampler": "nsga2",
        "population": 8,
        "objectives": {"accuracy_odd": "max", "accuracy_even": "max"},
        **strategy,
    }
    spec["runtime"] = {"progress": False, "snapshot_every": 10, "log_every": 10}
    return spec


@pytest.fixture(scope="module")
def optuna_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp_path = tmp_path_factory.mktemp("optuna_run")
    spec = digits_optuna_spec(tmp_path)
    assert main(["run", str(write_spec(tmp_path / "spec.yaml", spec)), "--quiet"]) == 0
    return Path(spec["output"]) / spec["name"]


def test_cli_run_of_the_optuna_strategy(optuna_run: Path):
    entries, _ = read_journal(optuna_run / "journal.jsonl")
    assert [e["id"] for e in entries] == list(range(30))
    assert [e["meta"]["trial"] for e in entries] == list(range(30))
    assert all(e["status"] == "ok" for e in entries)
    summary = json.loads((optuna_run / "summary.json").read_text())
    means = [(e["objectives"]["accuracy_odd"] + e["objectives"]["accuracy_even"]) / 2 for e in entries]
    assert summary["best_train"] == pytest.approx(max(means))
    assert summary["final_stats"]["trials_told"] == 30 and summary["final_stats"]["in_flight"] == 0
    state = load_state(optuna_run / "snapshot.safetensors")["strategy"]
    assert state["params"].shape == (30, 2) and np.all((state["params"] >= 0) & (state["params"] <= 1))
    assert state["system_attrs"]["NSGAIISampler:generation"].tolist() == sorted(
        [g for g in range(4) for _ in range(8)][:30]
    )


def test_cli_resume_asks_what_an_uninterrupted_run_asks(optuna_run: Path, tmp_path: Path):
    spec = digits_optuna_spec(tmp_path, name="half")
    spec["budget"] = 13  # stops mid-generation; the resume then extends snapshot and journal to 30
    assert main(["run", str(write_spec(tmp_path / "spec.yaml", spec)), "--quiet"]) == 0
    half = Path(spec["output"]) / "half"
    assert main(["resume", str(half), "--budget", "30", "--quiet"]) == 0
    whole, _ = read_journal(optuna_run / "journal.jsonl")
    resumed, _ = read_journal(half / "journal.jsonl")
    assert [(e["id"], e["meta"], e["objectives"]) for e in resumed] == [
        (e["id"], e["meta"], e["objectives"]) for e in whole
    ]
    a = load_state(optuna_run / "snapshot.safetensors")["strategy"]
    b = load_state(half / "snapshot.safetensors")["strategy"]
    np.testing.assert_array_equal(a["params"], b["params"])


# mirror -----------------------------------------------------------------------------------------
def load_mirror(path: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(path))))


def test_mirror_writes_one_trial_per_evaluation_and_is_idempotent(optuna_run: Path, tmp_path: Path):
    run = tmp_path / "opt"
    shutil.copytree(optuna_run, run)
    (run / "optuna.journal").unlink()  # the finished run's own mirror: start this test's from nothing
    journal = run / "journal.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join(lines[:12]))  # a run still going: only 12 entries so far

    path = mirror_run(run)
    assert path == run / "optuna.journal"
    study = load_mirror(path, "opt")
    assert len(study.trials) == 12
    assert study.directions == [StudyDirection.MAXIMIZE, StudyDirection.MAXIMIZE]  # from the strategy's objectives
    assert study.metric_names == ["accuracy_odd", "accuracy_even"]

    journal.write_bytes(b"".join(lines))  # the run goes on: 18 more entries, a failure, and one with genes
    writer = Journal(journal)
    writer.append({"id": 30, "status": "failed", "error": "EvaluationError: boom", "meta": {"trial": 30}, "seconds": 1})
    writer.append(
        {
            "id": 31,
            "status": "ok",
            "objectives": {"accuracy": 0.5, "accuracy_odd": 0.25, "accuracy_even": 0.75},
            "meta": {"parents": [3, 4], "genes": [0.125, 0.5]},
            "seconds": 0.25,
        }
    )
    writer.close()
    assert mirror_run(run) == path
    assert mirror_run(run) == path  # a second call adds nothing
    study = load_mirror(path, "opt")
    entries, _ = read_journal(journal)
    assert len(study.trials) == len(entries) == 32
    by_id = {t.user_attrs["evomerge_id"]: t for t in study.trials}
    assert sorted(by_id) == list(range(32))
    for e in entries[:30]:
        t = by_id[e["id"]]
        assert t.state == TrialState.COMPLETE
        assert t.values == [e["objectives"]["accuracy_odd"], e["objectives"]["accuracy_even"]]
        assert t.user_attrs["meta"] == {"trial": e["meta"]["trial"]}  # the genes became the params
        assert t.params == {f"x{i}": g for i, g in enumerate(e["meta"]["genes"])} and len(t.params) == 2
    failed = by_id[30]
    assert failed.state == TrialState.FAIL and failed.values is None
    assert failed.user_attrs["error"] == "EvaluationError: boom"
    with_genes = by_id[31]
    assert with_genes.params == {"x0": 0.125, "x1": 0.5}
    assert with_genes.user_attrs["meta"] == {"parents": [3, 4]}
    assert with_genes.duration.total_seconds() == pytest.approx(0.25)


def test_mirror_objectives_default_and_override(tmp_path: Path):
    spec = tiny_spec(tmp_path, name="m2", budget=5)
    assert main(["run", str(write_spec(tmp_path / "spec.yaml", spec)), "--quiet"]) == 0
    run = Path(spec["output"]) / "m2"
    entries, _ = read_journal(run / "journal.jsonl")
    study = load_mirror(mirror_run(run), "m2")  # m2n2 has one `objective`: accuracy, maximised
    assert study.directions == [StudyDirection.MAXIMIZE]
    assert [t.values for t in study.trials] == [[e["objectives"]["accuracy"]] for e in entries]
    with pytest.raises(EvomergeError, match="delete the file or mirror the same objectives"):
        mirror_run(run, {"accuracy": "min", "accuracy_odd": "max"})
    other = tmp_path / "m2copy"
    shutil.copytree(run, other)
    (other / "optuna.journal").unlink()
    with pytest.raises(SpecError, match=r"objectives\.loss: unknown objective 'loss'"):
        mirror_run(other, {"loss": "min", "accuracy": "max"})


def test_mirror_of_a_run_without_entries_is_none(optuna_run: Path, tmp_path: Path):
    run = tmp_path / "empty"
    shutil.copytree(optuna_run, run)
    (run / "journal.jsonl").unlink()
    (run / "optuna.journal").unlink()
    assert mirror_run(run) is None
    assert not (run / "optuna.journal").exists()
