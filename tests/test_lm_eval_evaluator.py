"""The `lm_eval` evaluator end to end on a tiny random Llama and lm-eval task YAMLs over local jsonl files."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")

from evomerge.errors import SpecError  # noqa: E402
from evomerge.evaluate import EVALUATORS  # noqa: E402
from evomerge.evaluate.lm_eval_tasks import LmEvalEvaluator  # noqa: E402

WORDS = "what color is the sky grass sun snow blue green yellow white red cat dog says meow woof moo a".split()
QUESTIONS = [
    ("what color is the sky", ["blue", "green", "red"], 0),
    ("what color is the grass", ["white", "green", "blue"], 1),
    ("what color is the sun", ["yellow", "blue", "green"], 0),
    ("what color is the snow", ["red", "green", "white"], 2),
    ("the cat says", ["woof", "meow", "moo"], 1),
    ("the dog says", ["woof", "moo", "meow"], 0),
]
TESTS = [
    ("what color is snow", ["white", "red"], 0),
    ("a dog says", ["meow", "woof"], 1),
    ("the sky", ["blue", "red"], 0),
]
TEXTS = ["the sky is blue", "the grass is green", "the cat says meow", "snow is white"]

MC_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {folder}/mc_validation.jsonl
    test: {folder}/mc_test.jsonl
output_type: multiple_choice
validation_split: validation
{test_line}
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""

PPL_YAML = """task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {folder}/text.jsonl
    test: {folder}/text.jsonl
output_type: loglikelihood_rolling
validation_split: validation
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
"""


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="session")
def lm_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random Llama with a word-level tokenizer, and a folder of task YAMLs over local jsonl files."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("lm_eval")
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<pad>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    model_dir = root / "model"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    tasks = root / "tasks"
    tasks.mkdir()
    _jsonl(tasks / "mc_validation.jsonl", [{"question": q, "choices": c, "label": a} for q, c, a in QUESTIONS])
    _jsonl(tasks / "mc_test.jsonl", [{"question": q, "choices": c, "label": a} for q, c, a in TESTS])
    _jsonl(tasks / "text.jsonl", [{"text": t} for t in TEXTS])
    (tasks / "tiny_mc.yaml").write_text(MC_YAML.format(task="tiny_mc", folder=tasks, test_line="test_split: test"))
    # the same task without a test split: lm-eval then evaluates its validation split, our search split
    (tasks / "tiny_mc_val.yaml").write_text(MC_YAML.format(task="tiny_mc_val", folder=tasks, test_line=""))
    (tasks / "tiny_ppl.yaml").write_text(PPL_YAML.format(folder=tasks))
    return {"model": model_dir, "tasks": tasks}


def _build(lm_setup: dict[str, Path], **overrides: Any) -> LmEvalEvaluator:
    spec = {
        "name": "lm_eval",
        "model": str(lm_setup["model"]),
        "tasks": [{"name": "tiny_mc", "metrics": {"acc": "max", "acc_norm": "max"}}],
        "include_path": [str(lm_setup["tasks"])],
        "include_defaults": False,
        "device": "cpu",
        "batch_size": 4,
        **overrides,
    }
    return EVALUATORS.build(EVALUATORS.resolve(spec, "evaluator"))


@pytest.fixture(scope="session")
def evaluator(lm_setup: dict[str, Path]) -> LmEvalEvaluator:
    return _build(
        lm_setup,
        tasks=[{"name": "tiny_mc", "metrics": {"acc": "max"}, "weight": 3.0}, {"name": "tiny_ppl"}],
    )


def _simple_evaluate(evaluator: LmEvalEvaluator, lm_setup: dict[str, Path], task: str) -> dict[str, Any]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(lm_setup["tasks"]), include_defaults=False)
    return simple_evaluate(model=evaluator.lm, tasks=[task], task_manager=manager, bootstrap_iters=0, log_samples=True)


def test_objectives_and_per_example_scores_equal_lm_eval(evaluator: LmEvalEvaluator, lm_setup: dict[str, Path]) -> None:
    assert evaluator.tasks == ["tiny_mc", "tiny_ppl"]
    assert evaluator.metric_names() == ["tiny_mc/acc", "tiny_mc/acc_norm", "tiny_ppl/word_perplexity", "fitness"]
    assert evaluator.n_examples == len(QUESTIONS) + len(TEXTS)
    result = evaluator.evaluate(evaluator.resident_parameters())

    ours_mc = _simple_evaluate(evaluator, lm_setup, "tiny_mc_val")
    assert result.objectives["tiny_mc/acc"] == pytest.approx(ours_mc["results"]["tiny_mc_val"]["acc,none"])
    assert result.objectives["tiny_mc/acc_norm"] == pytest.approx(ours_mc["results"]["tiny_mc_val"]["acc_norm,none"])
    ppl = _simple_evaluate(evaluator, lm_setup, "tiny_ppl")
    wppl = ppl["results"]["tiny_ppl"]["word_perplexity,none"]
    assert result.objectives["tiny_ppl/word_perplexity"] == pytest.approx(wppl)
    # weights 3 and 1; word perplexity is lower-is-better in lm-eval, so it enters negated
    expected = (3 * result.objectives["tiny_mc/acc"] - wppl) / 4
    assert result.objectives["fitness"] == pytest.approx(expected)

    scores = result.per_example
    assert scores.shape == (len(QUESTIONS) + len(TEXTS),)
    samples = sorted(ours_mc["samples"]["tiny_mc_val"], key=lambda s: s["doc_id"])
    np.testing.assert_allclose(scores[: len(QUESTIONS)], [s["acc"] for s in samples])
    assert set(scores[: len(QUESTIONS)]) <= {0.0, 1.0}
    rows = sorted(ppl["samples"]["tiny_ppl"], key=lambda s: s["doc_id"])
    likelihood = [math.exp(s["word_perplexity"][0] / s["word_perplexity"][1]) for s in rows]
    np.testing.assert_allclose(scores[len(QUESTIONS) :], likelihood, rtol=1e-5)
    assert np.all((scores[len(QUESTIONS) :] > 0) & (scores[len(QUESTIONS) :] <= 1))


def test_test_split_equals_lm_eval(evaluator: LmEvalEvaluator, lm_setup: dict[str, Path]) -> None:
    held_out = evaluator.test(evaluator.resident_parameters())
    reference = _simple_evaluate(evaluator, lm_setup, "tiny_mc")["results"]["tiny_mc"]
    assert held_out["tiny_mc/acc"] == pytest.approx(reference["acc,none"])
    assert set(held_out) == set(evaluator.metric_names())


def test_written_weights_change_the_scores(evaluator: LmEvalEvaluator) -> None:
    resident = evaluator.resident_parameters()
    base = {k: v.detach().clone() for k, v in resident.items()}
    before = evaluator.evaluate(resident).objectives
    other = {k: v * 3.0 if v.dim() == 2 else v for k, v in base.items()}
    try:
        after = evaluator.evaluate(other).objectives  # other tensors: copied into the resident model
        assert torch.equal(resident["model.embed_tokens.weight"], other["model.embed_tokens.weight"])
        assert after["tiny_ppl/word_perplexity"] != pytest.approx(before["tiny_ppl/word_perplexity"])
    finally:
        again = evaluator.evaluate(base).objectives
    assert again == pytest.approx(before)


def test_min_goal_flips_the_sign_of_fitness(lm_setup: dict[str, Path]) -> None:
    low = _build(lm_setup, tasks=[{"name": "tiny_mc", "metrics": {"acc": "min"}}], test_split=None, limit=4)
    result = low.evaluate(low.resident_parameters())
    assert result.objectives["tiny_mc/acc"] > 0
    assert result.objectives["fitness"] == pytest.approx(-result.objectives["tiny_mc/acc"])
    assert low.n_examples == 4 and result.per_example.shape == (4,)
    # the per-example score of a `min` metric is 1 / (1 + value): larger is still better for M2N2
    assert result.per_example.mean() > 0.5
    assert low.test(low.resident_parameters()) == {}


def test_unknown_task_names_close_matches(lm_setup: dict[str, Path]) -> None:
    with pytest.raises(SpecError) as err:
        _build(lm_setup, tasks=["tiny_mcq"])
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("evaluator.tasks[0].name: unknown lm-eval task 'tiny_mcq' (close matches: tiny_mc")


def test_metric_the_task_does_not_report(lm_setup: dict[str, Path]) -> None:
    with pytest.raises(SpecError) as err:
        _build(lm_setup, tasks=[{"name": "tiny_mc", "metrics": {"accuracy": "max"}}])
    assert str(err.value) == (
        "evaluator.tasks[0].metrics: lm-eval task 'tiny_mc' does not report 'accuracy'; it reports: acc, acc_norm"
    )


def test_missing_split_is_refused(lm_setup: dict[str, Path]) -> None:
    with pytest.raises(SpecError, match="lm-eval task 'tiny_mc_val' has no test split \\(it has: validation\\)"):
        _build(lm_setup, tasks=["tiny_mc_val"])


def test_subset_is_a_fixed_random_draw_of_each_tasks_documents(
    evaluator: LmEvalEvaluator, lm_setup: dict[str, Path]
) -> None:
    """`subset: N` evaluates N documents of each search task (lm-eval's `samples`), drawn once per task with
    `subset_seed` and the task's name; a test pass adds every document as `search_full_<objective>`."""
    import zlib

    tasks = [{"name": "tiny_mc", "metrics": {"acc": "max"}, "weight": 3.0}, {"name": "tiny_ppl"}]
    part = _build(lm_setup, tasks=tasks, subset=3, subset_seed=5)
    drawn = {
        name: np.sort(np.random.default_rng([5, zlib.crc32(name.encode())]).choice(n, 3, replace=False))
        for name, n in (("tiny_mc", len(QUESTIONS)), ("tiny_ppl", len(TEXTS)))
    }
    assert part.n_examples == 6
    full = evaluator.evaluate(evaluator.resident_parameters())
    sub = part.evaluate(part.resident_parameters())
    expected = np.concatenate(
        [full.per_example[drawn["tiny_mc"]], full.per_example[len(QUESTIONS) + drawn["tiny_ppl"]]]
    )
    np.testing.assert_allclose(sub.per_example, expected, rtol=1e-5)
    assert sub.objectives["tiny_mc/acc"] == pytest.approx(float(np.mean(sub.per_example[:3])))
    assert part.evaluate(part.resident_parameters()).per_example.tolist() == sub.per_example.tolist()
    tested = part.test(part.resident_parameters())
    assert tested["search_full_tiny_mc/acc"] == pytest.approx(full.objectives["tiny_mc/acc"])
    assert tested["search_full_fitness"] == pytest.approx(full.objectives["fitness"], rel=1e-5)
    assert set(tested) == set(part.metric_names()) | {f"search_full_{k}" for k in part.metric_names()}

    assert _build(lm_setup, tasks=tasks, subset=0.5).n_examples == 3 + 2  # a share: ceil(6 / 2), ceil(4 / 2)
    whole = _build(lm_setup, tasks=tasks, subset=5)  # tiny_ppl has 4 documents: all of them
    assert whole.n_examples == 5 + 4 and whole.evaluate(whole.resident_parameters()).per_example.shape == (9,)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"subset": 3, "limit": 2}, r"^evaluator\.subset: got 3\.0 with limit 2\.0; lm-eval takes one of them"),
        ({"subset": 1.5}, r"^evaluator\.subset: got 1\.5: a count of examples \(integer\) or a share below 1$"),
        ({"subset": 0}, r"^evaluator\.subset: got 0\.0, must be > 0$"),
    ],
)
def test_bad_subset_is_one_line(lm_setup: dict[str, Path], options: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        _build(lm_setup, **options)
