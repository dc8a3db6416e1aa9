"""The built-in classification evaluator, result validation, and specialist training and caching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evomerge.errors import EvaluationError, EvomergeError
from evomerge.evaluate.base import EvalResult, as_result
from evomerge.evaluate.classification import ClassificationEvaluator, ClassificationOptions
from evomerge.seeds import build_seeds, random_genome
from evomerge.spec import ModelsSpec


@pytest.fixture(scope="module")
def digits() -> ClassificationEvaluator:
    return ClassificationEvaluator(ClassificationOptions(device="cpu"))


def test_paper_setting_sizes(digits: ClassificationEvaluator):
    layout = digits.layout()
    assert layout.size == 19_210  # 64 -> 256 -> 10
    assert layout.shapes == ((64, 256), (256,), (256, 10), (10,))
    assert digits.n_examples == 1437 and len(digits.y_test) == 360


def test_evaluate_reports_per_example_correctness(digits: ClassificationEvaluator):
    genome = random_genome(digits.layout(), 0.01, seed=0, index=0)
    result = digits.evaluate(digits.layout().views(genome))
    hits = result.per_example
    assert hits.shape == (1437,) and set(np.unique(hits)) <= {0.0, 1.0}
    assert result.objectives["accuracy"] == pytest.approx(hits.mean())
    y = digits.y_train.numpy()
    assert result.objectives["accuracy_odd"] == pytest.approx(hits[y % 2 == 1].mean())
    assert result.objectives["accuracy_even"] == pytest.approx(hits[y % 2 == 0].mean())


def test_wrong_parameter_shape_names_both_shapes(digits: ClassificationEvaluator):
    params = {name: torch.zeros(shape) for name, shape in zip(digits.layout().names, digits.layout().shapes)}
    params["layers.0.weight"] = torch.zeros(64, 128)
    with pytest.raises(EvomergeError, match=r"layers\.0\.weight.*\(64, 128\).*\(64, 256\)"):
        digits.evaluate(params)


def test_cuda_refused_clearly_when_absent():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(EvomergeError, match="cuda"):
        ClassificationEvaluator(ClassificationOptions(dataset="wine", hidden=[4], device="cuda"))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (EvalResult({"accuracy": float("nan")}), "NaN|nan"),
        (EvalResult({"accuracy": "high"}), "not a number"),
        (EvalResult({"accuracy": 0.5}, np.ones(3)), "length 3, expected 5"),
        (EvalResult({"accuracy": 0.5}, -np.ones(5)), "non-negative"),
        (EvalResult({"accuracy": 0.5}, np.array([1, 1, np.inf, 0, 0])), "NaN or inf"),
        ([0.5], "expected EvalResult"),
    ],
)
def test_unusable_results_are_refused(raw, message: str):
    with pytest.raises(EvaluationError, match=message):
        as_result(raw, n_examples=5)


def test_plain_dicts_are_accepted():
    assert as_result({"accuracy": 1}, None).objectives == {"accuracy": 1.0}
    result = as_result({"objectives": {"accuracy": 0.5}, "per_example": [1, 0]}, 2)
    np.testing.assert_array_equal(result.per_example, [1.0, 0.0])


def test_specialists_learn_their_classes_and_are_cached(digits: ClassificationEvaluator, tmp_path, monkeypatch):
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path))
    models = ModelsSpec(init="specialists")
    first = build_seeds(models, digits, {"name": "classification"}, seed=0)
    cached = sorted((tmp_path / "specialists").glob("*.safetensors"))
    assert len(first) == 2 and len(cached) == 2
    y = digits.y_train.numpy()
    for genome, classes in zip(first, models.specialists):
        hits = digits.evaluate(digits.layout().views(genome)).per_example
        assert hits[np.isin(y, classes)].mean() > 0.9  # the paper's specialists know their half
        assert hits[~np.isin(y, classes)].mean() < 0.1
    again = build_seeds(models, digits, {"name": "classification"}, seed=0)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert sorted((tmp_path / "specialists").glob("*.safetensors")) == cached
