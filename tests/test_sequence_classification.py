"""The `sequence_classification` evaluator on a tiny random BERT backbone: accuracies by hand, weights written in."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from evomerge.errors import EvomergeError  # noqa: E402
from evomerge.evaluate import EVALUATORS  # noqa: E402
from evomerge.evaluate.sequence_classification import SequenceClassificationEvaluator  # noqa: E402

WORDS = "the a cat dog bird red blue green sky grass is runs flies big small happy sad good bad".split()


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _sentences(rng: np.random.Generator, n: int) -> list[str]:
    return [" ".join(rng.choice(WORDS, size=rng.integers(2, 7))) for _ in range(n)]


@pytest.fixture(scope="session")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two random BERT backbones with the same shapes, a word-piece vocabulary, two tasks of jsonl files."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("seqcls")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab))
    config = BertConfig(
        vocab_size=5 + len(WORDS),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    folders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        folder = root / f"backbone{seed}"
        BertModel(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders.append(folder)
    # topic labels: a linear probe of the base backbone's pooled features, so a trained head can recover them
    base = BertModel.from_pretrained(folders[0]).eval()
    probe = torch.randn(config.hidden_size, generator=torch.Generator().manual_seed(3))
    rng = np.random.default_rng(0)
    files = {}
    for split, n in (("train", 40), ("validation", 24), ("test", 12)):
        texts = _sentences(rng, n)
        with torch.no_grad():
            scores = [
                float(base(**tokenizer(t, return_tensors="pt")).last_hidden_state[0].mean(0) @ probe) for t in texts
            ]
        cut = float(np.median(scores))
        files[f"topic_{split}"] = _jsonl(
            root / f"topic_{split}.jsonl",
            [{"text": t, "label": "animal" if v > cut else "other"} for t, v in zip(texts, scores)],
        )
        files[f"mood_{split}"] = _jsonl(
            root / f"mood_{split}.jsonl", [{"text": t, "label": int(rng.integers(0, 3))} for t in _sentences(rng, n)]
        )
    torch.manual_seed(2)
    head = root / "mood_head.safetensors"
    save_file({"weight": torch.randn(3, 16), "bias": torch.randn(3)}, str(head))
    return {"root": root, "folders": folders, "files": files, "head": head}


def _spec(setup: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    files = setup["files"]
    return {
        "name": "sequence_classification",
        "model": str(setup["folders"][0]),
        "tasks": {
            "topic": {
                "train": str(files["topic_train"]),
                "validation": str(files["topic_validation"]),
                "test": str(files["topic_test"]),
            },
            "mood": {"validation": str(files["mood_validation"]), "head": str(setup["head"])},
        },
        "device": "cpu",
        "batch_size": 8,
        "head_steps": 300,
        "head_lr": 0.05,
        **overrides,
    }


@pytest.fixture(scope="session")
def evaluator(setup: dict[str, Any]) -> SequenceClassificationEvaluator:
    return EVALUATORS.build(EVALUATORS.resolve(_spec(setup), "evaluator"))


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@torch.no_grad()
def _by_hand(folder: Path, path: Path, head: dict[str, torch.Tensor], classes: list[Any]) -> np.ndarray:
    """Per-example correctness: mean-pooled features of one text at a time (no padding), through the head."""
    from transformers import AutoTokenizer, BertModel

    model, tokenizer = BertModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    hits = []
    for row in _rows(path):
        hidden = model(**tokenizer(row["text"], return_tensors="pt")).last_hidden_state[0]
        logits = F.linear(hidden.mean(0), head["weight"], head["bias"])
        hits.append(int(logits.argmax()) == classes.index(row["label"]))
    return np.asarray(hits, dtype=np.float32)


def test_accuracies_equal_a_hand_computation(evaluator: SequenceClassificationEvaluator, setup: dict[str, Any]) -> None:
    files, base = setup["files"], setup["folders"][0]
    assert evaluator.tasks == ["topic", "mood"]
    assert evaluator.metric_names() == [
        "accuracy_topic",
        "loss_topic",
        "accuracy_mood",
        "loss_mood",
        "accuracy",
        "loss",
    ]
    names = evaluator.layout().names  # the checkpoint's tensors, in the module's order (layer by layer)
    assert set(names) == set(load_file(str(base / "model.safetensors")))
    assert names == tuple(name for name, _ in evaluator.model.named_parameters())
    result = evaluator.evaluate(evaluator.resident_parameters())
    topic = _by_hand(base, files["topic_validation"], evaluator.heads["topic"], ["animal", "other"])
    mood = _by_hand(base, files["mood_validation"], load_file(str(setup["head"])), [0, 1, 2])
    np.testing.assert_array_equal(result.per_example, np.concatenate([topic, mood]))
    assert evaluator.n_examples == len(topic) + len(mood)
    assert result.objectives["accuracy_topic"] == pytest.approx(topic.mean())
    assert result.objectives["accuracy_mood"] == pytest.approx(mood.mean())
    assert result.objectives["accuracy"] == pytest.approx((topic.mean() + mood.mean()) / 2)
    held_out = evaluator.test(evaluator.resident_parameters())
    topic_test = _by_hand(base, files["topic_test"], evaluator.heads["topic"], ["animal", "other"])
    assert set(held_out) == {"accuracy_topic", "loss_topic", "accuracy", "loss"}
    assert held_out["accuracy_topic"] == pytest.approx(topic_test.mean())


def test_trained_head_fits_and_is_cached(evaluator: SequenceClassificationEvaluator, setup: dict[str, Any]) -> None:
    train = _by_hand(setup["folders"][0], setup["files"]["topic_train"], evaluator.heads["topic"], ["animal", "other"])
    assert train.mean() >= 0.9  # the head trained on the base's features recovers the probe's labels
    again = SequenceClassificationEvaluator(EVALUATORS.resolve(_spec(setup), "evaluator").options)
    torch.testing.assert_close(again.heads["topic"], evaluator.heads["topic"], rtol=0, atol=0)


def test_written_weights_change_predictions(evaluator: SequenceClassificationEvaluator, setup: dict[str, Any]) -> None:
    files, (base, other) = setup["files"], setup["folders"]
    resident = evaluator.resident_parameters()
    before = evaluator.evaluate(resident)
    weights = load_file(str(other / "model.safetensors"))
    swapped = evaluator.evaluate({k: weights[k] for k in evaluator.layout().names})  # copied into the model
    assert torch.equal(
        resident["encoder.layer.0.attention.self.query.weight"], weights["encoder.layer.0.attention.self.query.weight"]
    )
    expected = np.concatenate(
        [
            _by_hand(other, files["topic_validation"], evaluator.heads["topic"], ["animal", "other"]),
            _by_hand(other, files["mood_validation"], load_file(str(setup["head"])), [0, 1, 2]),
        ]
    )
    np.testing.assert_array_equal(swapped.per_example, expected)
    assert not np.array_equal(swapped.per_example, before.per_example)
    for name, tensor in load_file(str(base / "model.safetensors")).items():  # in place, as evomerge writes
        if name in resident:
            resident[name].copy_(tensor)
    np.testing.assert_array_equal(evaluator.evaluate(resident).per_example, before.per_example)


def test_bad_input_is_one_line(setup: dict[str, Any], tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the cat", "label": 0}\n{"text": "a dog", "label": \n')
    spec = _spec(setup)
    spec["tasks"]["mood"]["validation"] = str(bad)
    with pytest.raises(EvomergeError, match=f"^{bad}:2: not a JSON line"):
        EVALUATORS.build(EVALUATORS.resolve(spec, "evaluator"))
    narrow = tmp_path / "narrow.safetensors"
    save_file({"weight": torch.zeros(2, 16), "bias": torch.zeros(2)}, str(narrow))
    spec = _spec(setup)
    spec["tasks"]["mood"]["head"] = str(narrow)
    with pytest.raises(EvomergeError, match="has 2 classes, the labels need 3"):
        EVALUATORS.build(EVALUATORS.resolve(spec, "evaluator"))
