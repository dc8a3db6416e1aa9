"""The causal_lm evaluator on tiny random Llamas built here, and the language-model benchmark's builder."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from threadpoolctl import threadpool_limits

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from evomerge.errors import EvaluationError, EvomergeError, SpecError  # noqa: E402
from evomerge.evaluate import EVALUATORS  # noqa: E402
from evomerge.evaluate.causal_lm import CausalLMEvaluator, anchor_examples  # noqa: E402

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.",
    "for i in range(10):\n    print(i)\n",
    "Python is a programming language that lets you work quickly.",
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(threads)


def _tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXTS * 4, trainer=trainer)
    eot = "<|endoftext|>"
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eot, eos_token=eot, pad_token=eot).save_pretrained(
        str(folder)
    )


def _model(folder: Path, seed: int, tie: bool = False, vocab: int = 300) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # random init gives near-uniform outputs; larger weights make the scores differ
        for param in model.parameters():
            param.mul_(8.0 if param.dim() > 1 else 1.0)
    model.save_pretrained(str(folder))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Folders of tiny random Llamas sharing one tokenizer: a, b (same shapes, other weights), tied."""
    root = tmp_path_factory.mktemp("tiny-llamas")
    folders = {"a": root / "a", "b": root / "b", "tied": root / "tied"}
    _tokenizer(root / "a")
    for name, folder in folders.items():
        if name != "a":
            shutil.copytree(root / "a", folder)
    _model(folders["a"], 0)
    _model(folders["b"], 1)
    _model(folders["tied"], 2, tie=True)
    return folders


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _evaluator(model: Path, datasets: list[dict[str, Any]], **options: Any) -> CausalLMEvaluator:
    """Through the registry, as a spec builds it (validation included)."""
    spec = {"name": "causal_lm", "model": str(model), "datasets": datasets, "device": "cpu", **options}
    return EVALUATORS.build(EVALUATORS.resolve(spec, "evaluator"))


def _hand_loglik(model, ids: list[int], n_scored: int) -> float:
    """Sum of log p(token | prefix) over the last `n_scored` tokens, by log_softmax."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    logp = torch.log_softmax(logits.double(), dim=-1)
    start = len(ids) - n_scored
    return float(sum(logp[t - 1, ids[t]] for t in range(start, len(ids))))


def _reference(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def test_loglik_scores_equal_a_hand_computation(models, tmp_path):
    search = _jsonl(tmp_path / "s.jsonl", [{"text": TEXTS[0]}, {"text": TEXTS[1]}])
    test = _jsonl(tmp_path / "t.jsonl", [{"text": TEXTS[2]}])
    # a 30-token budget puts the two texts in separate batches, a large one pads them into one
    for budget in (30, 4096):
        ev = _evaluator(models["a"], [{"name": "mix", "search": search, "test": test}], batch_tokens=budget)
        result = ev.evaluate(ev.resident_parameters())
        model, tok = _reference(models["a"])
        sums, counts = [], []
        for text in TEXTS[:2]:
            ids = [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]
            sums.append(_hand_loglik(model, ids, len(ids) - 1))
            counts.append(len(ids) - 1)
        expected = np.exp(np.array(sums) / np.array(counts))
        np.testing.assert_allclose(result.per_example, expected, rtol=1e-5)
        mean = sum(sums) / sum(counts)
        assert result.objectives["loglik_mix"] == pytest.approx(mean, rel=1e-5)
        assert result.objectives["perplexity_mix"] == pytest.approx(math.exp(-mean), rel=1e-5)
        assert result.objectives["score"] == pytest.approx(float(expected.mean()), rel=1e-5)
        assert ev.n_examples == 2 and sorted(result.objectives) == sorted(ev.metric_names())
    assert set(ev.test(ev.resident_parameters())) == set(ev.metric_names())


def test_multiple_choice_acc_and_acc_norm_equal_a_hand_computation(models, tmp_path):
    model, tok = _reference(models["a"])
    questions = [("def add(a, b):", ["return", "print(i) for i in range(10)", "x"]), ("The quick", ["brown fox", "a"])]
    hand = []
    for question, choices in questions:
        context = [tok.bos_token_id, *tok(question, add_special_tokens=False)["input_ids"]]
        lls = []
        for choice in choices:
            whole = [tok.bos_token_id, *tok(f"{question} {choice}", add_special_tokens=False)["input_ids"]]
            lls.append(_hand_loglik(model, whole, len(whole) - len(context)))
        hand.append(np.array(lls))
    lengths = [np.array([len(c) for c in choices], dtype=float) for _, choices in questions]
    # the answer is the length-normalised winner, so acc_norm is 1 and acc says whether the raw sum agrees
    answers = [int(np.argmax(ll / n)) for ll, n in zip(hand, lengths)]
    acc = [float(np.argmax(ll) == a) for ll, a in zip(hand, answers)]
    rows = [{"question": q, "choices": c, "answer": a} for (q, c), a in zip(questions, answers)]
    search = _jsonl(tmp_path / "mc.jsonl", rows)
    for score_by, expected in (("acc", acc), ("acc_norm", [1.0, 1.0])):
        dataset = {"name": "qa", "kind": "multiple_choice", "search": search, "test": search, "score_by": score_by}
        ev = _evaluator(models["a"], [dataset])
        np.testing.assert_allclose(ev._logliks(ev.splits["search"]["qa"], "qa"), np.concatenate(hand), rtol=1e-5)
        result = ev.evaluate(ev.resident_parameters())
        assert result.per_example.tolist() == expected
        assert result.objectives["acc_qa"] == pytest.approx(np.mean(acc))
        assert result.objectives["acc_norm_qa"] == 1.0


def test_exact_match_compares_the_greedy_generation(models, tmp_path):
    model, tok = _reference(models["a"])
    prompt = [tok.bos_token_id, *tok("def add", add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        ids = torch.tensor([prompt])  # the BOS is id 0, which generate would take for padding without a mask
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    generated = out[0, len(prompt) :].tolist()
    eos = tok.eos_token_id
    generated = generated[: generated.index(eos)] if eos in generated else generated
    greedy = tok.decode(generated, skip_special_tokens=True).split("\n")[0].strip()
    rows = [{"prompt": "def add", "target": greedy}, {"prompt": "def add", "target": greedy + "never"}]
    data = _jsonl(tmp_path / "em.jsonl", rows)
    ev = _evaluator(
        models["a"], [{"name": "gen", "kind": "exact_match", "search": data, "test": data, "max_new_tokens": 4}]
    )
    result = ev.evaluate(ev.resident_parameters())
    assert result.per_example.tolist() == [1.0, 0.0]
    assert result.objectives["exact_match_gen"] == 0.5


def test_writing_weights_into_the_resident_model_equals_loading_them(models, tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS])
    ev = _evaluator(models["a"], [{"name": "d", "search": data, "test_fraction": 0.25}])
    with safe_open(str(models["a"] / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    layout = ev.layout()
    assert set(layout.names) == saved and layout.names[0] == "model.embed_tokens.weight"
    assert layout.names.index("model.layers.0.self_attn.q_proj.weight") < layout.names.index(
        "model.layers.1.mlp.up_proj.weight"
    )
    resident = ev.resident_parameters()
    assert [tuple(resident[n].shape) for n in layout.names] == list(layout.shapes)

    b = load_file(str(models["b"] / "model.safetensors"))
    with torch.no_grad():  # what evomerge does: write the candidate in place, then evaluate those tensors
        for name, tensor in resident.items():
            tensor.copy_(b[name])
    ids = torch.tensor([[0, 5, 17, 42, 99, 3]])
    reference, _ = _reference(models["b"])
    with torch.no_grad():
        torch.testing.assert_close(ev.model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=0)
    in_place = ev.evaluate(resident)

    fresh = _evaluator(models["a"], [{"name": "d", "search": data, "test_fraction": 0.25}])
    copied = fresh.evaluate(b)  # a plain dict is copied into the resident model
    np.testing.assert_array_equal(in_place.per_example, copied.per_example)
    assert in_place.objectives == copied.objectives
    assert fresh.test(b) == ev.test(resident)


def test_a_tied_head_appears_once_under_the_saved_name(models, tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS])
    ev = _evaluator(models["tied"], [{"name": "d", "search": data}])
    assert "lm_head.weight" not in ev.layout().names
    embed = ev.resident_parameters()["model.embed_tokens.weight"]
    assert embed is ev.model.get_output_embeddings().weight
    before = ev.evaluate(ev.resident_parameters()).objectives["loglik_d"]
    with torch.no_grad():
        embed.mul_(0.5)
    assert ev.evaluate(ev.resident_parameters()).objectives["loglik_d"] != before


def test_a_folder_of_pickled_weights_is_keyed_by_the_modules_names(models, tmp_path):
    """No safetensors files to read names from (transformers loads the .bin): the module's own parameter names,
    the same as the safetensors checkpoint's here, in the same order, with the same scores."""
    pickled = tmp_path / "pickled"
    shutil.copytree(models["a"], pickled)
    (pickled / "model.safetensors").unlink()
    torch.save(load_file(str(models["a"] / "model.safetensors")), pickled / "pytorch_model.bin")
    data = _jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS])
    saved, loaded = (_evaluator(folder, [{"name": "d", "search": data}]) for folder in (models["a"], pickled))
    assert loaded.layout() == saved.layout()
    assert (
        loaded.evaluate(loaded.resident_parameters()).objectives
        == saved.evaluate(saved.resident_parameters()).objectives
    )


def test_nan_weights_fail_the_candidate_only(models, tmp_path):
    text = {"name": "d", "search": _jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS])}
    em = _jsonl(tmp_path / "em.jsonl", [{"prompt": "def", "target": "x"}, {"prompt": "The", "target": "y"}])
    generation = {"name": "g", "kind": "exact_match", "search": em, "max_new_tokens": 2}
    for datasets in ([text, generation], [generation, text]):  # the first dataset scored meets the NaN
        ev = _evaluator(models["a"], datasets)
        good = {k: v.clone() for k, v in ev.resident_parameters().items()}
        bad = dict(good)
        bad["model.layers.1.mlp.down_proj.weight"] = torch.full_like(bad["model.layers.1.mlp.down_proj.weight"], np.nan)
        with pytest.raises(EvaluationError, match="NaN"):
            ev.evaluate(bad)
        with pytest.raises(EvaluationError, match="NaN"):
            ev.test(bad)
        assert np.isfinite(ev.evaluate(good).objectives["loglik_d"])  # the next candidate is scored as usual


def test_txt_files_and_a_deterministic_split(models, tmp_path):
    text = tmp_path / "doc.txt"
    text.write_text("first paragraph\nstill first\n\nsecond\n\n\nthird one\nthird two\nthird three\n")
    by_paragraph = _evaluator(models["a"], [{"name": "t", "search": str(text), "test": str(text)}])
    assert by_paragraph.n_examples == 3
    by_line = _evaluator(models["a"], [{"name": "t", "search": str(text), "test": str(text), "txt_split": "line"}])
    assert by_line.n_examples == 6
    data = _jsonl(tmp_path / "d.jsonl", [{"text": f"{t} {k}"} for k in range(5) for t in TEXTS])
    split = [_evaluator(models["a"], [{"name": "d", "search": data, "test_fraction": 0.3}]) for _ in range(2)]
    assert split[0].n_examples == 14 and len(split[0].splits["test"]["d"].sequences) == 6
    assert split[0].splits["test"]["d"].sequences == split[1].splits["test"]["d"].sequences


def _one_line(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def test_bad_input_gets_one_line_each(models, tmp_path):
    good = _jsonl(tmp_path / "good.jsonl", [{"text": t} for t in TEXTS])
    datasets = [{"name": "d", "search": good}]

    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(models["a"] / name, no_tokenizer / name)
    with pytest.raises(EvomergeError, match="has no tokenizer") as err:
        _evaluator(no_tokenizer, datasets)
    _one_line(err)

    unknown = tmp_path / "unknown-arch"
    shutil.copytree(models["a"], unknown)
    (unknown / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(EvomergeError, match="cannot load .* as a causal language model") as err:
        _evaluator(unknown, datasets)
    _one_line(err)

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n\n{"text": "cut off\n')
    with pytest.raises(EvomergeError, match=r"broken\.jsonl:3: not a JSON line") as err:
        _evaluator(models["a"], [{"name": "d", "search": str(broken)}])
    _one_line(err)

    missing = _jsonl(tmp_path / "missing.jsonl", [{"text": "a"}, {"body": "b"}])
    with pytest.raises(EvomergeError, match=r"missing\.jsonl:2: missing field 'text'"):
        _evaluator(models["a"], [{"name": "d", "search": missing}])

    mc = _jsonl(
        tmp_path / "mc.jsonl",
        [{"question": "q", "choices": ["a", "b"], "answer": 1}, {"question": "q", "choices": ["a", "b"], "answer": 2}],
    )
    with pytest.raises(EvomergeError, match=r"mc\.jsonl:2: answer 2 is out of range for 2 choices") as err:
        _evaluator(models["a"], [{"name": "m", "kind": "multiple_choice", "search": mc}])
    _one_line(err)

    long = _jsonl(tmp_path / "long.jsonl", [{"text": "short"}, {"text": " ".join(TEXTS * 20)}])
    with pytest.raises(
        EvomergeError, match=r"datasets\[0\] \(essays\): the example at .*long\.jsonl:2 has \d+ tokens"
    ) as err:
        _evaluator(models["a"], [{"name": "essays", "search": long, "test": long}])
    _one_line(err)
    truncated = _evaluator(models["a"], [{"name": "essays", "search": long, "test": long}], truncate=True)
    assert max(len(s) for s in truncated.splits["search"]["essays"].sequences) == 64

    with pytest.raises(SpecError, match="only kind 'loglik' reads"):
        _evaluator(models["a"], [{"name": "m", "kind": "multiple_choice", "search": str(tmp_path / "x.txt")}])
    with pytest.raises(EvomergeError, match="longer than the model's context"):
        _evaluator(models["a"], datasets, max_length=65)
    with pytest.raises(EvomergeError, match="does not exist"):
        _evaluator(models["a"], [{"name": "d", "search": str(tmp_path / "nowhere.jsonl")}])


def test_language_models_build_loadable_reproducible_folders(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.data.language_models import LanguageModelsRecipe, language_models

    recipe = LanguageModelsRecipe(
        corpus_chars=30_000,
        min_chunk_chars=80,
        max_chunk_chars=160,
        eval_examples=8,
        vocab_size=400,
        hidden=32,
        layers=2,
        heads=2,
        intermediate=64,
        context=256,
        seq_len=32,
        batch_size=4,
        pretrain_steps=3,
        finetune_steps=2,
    )
    built = []
    for k in range(2):
        monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / f"cache{k}"))
        built.append(language_models(recipe))
    first, second = built
    assert sorted(first.finetuned) == ["arith", "code", "prose"]
    for folder in (first.base, *first.finetuned.values()):
        AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
        assert model.config.tie_word_embeddings is False
        a = load_file(str(folder / "model.safetensors"))
        b = load_file(str(second.base.parent / folder.name / "model.safetensors"))
        assert all(torch.equal(a[n], b[n]) for n in a)  # the same recipe gives the same weights
    assert (first.datasets["code"]["validation"]).read_text() == (second.datasets["code"]["validation"]).read_text()
    again = language_models(recipe)  # cached: the same folders, nothing rebuilt
    assert again.base == second.base and again.finetuned == second.finetuned

    d = first.datasets
    ev = _evaluator(
        first.finetuned["arith"],
        [
            {"name": "code", "search": str(d["code"]["validation"]), "test": str(d["code"]["test"])},
            {
                "name": "arith",
                "kind": "multiple_choice",
                "search": str(d["arith"]["validation"]),
                "test": str(d["arith"]["test"]),
            },
            {
                "name": "sum",
                "kind": "exact_match",
                "search": str(d["arith_em"]["validation"]),
                "test": str(d["arith_em"]["test"]),
                "max_new_tokens": 3,
            },
        ],
    )
    result = ev.evaluate(ev.resident_parameters())
    assert result.per_example.shape == (24,) and set(result.objectives) == set(ev.metric_names())


def test_fitness_on_a_fixed_subset_with_the_full_split_in_test(models, tmp_path):
    """`subset: N` scores candidates on N search examples (the same N every time); a test pass adds the whole
    search split, which the subset stands in for."""
    rows = [{"text": t} for t in TEXTS * 2]
    search = _jsonl(tmp_path / "s.jsonl", rows)
    test = _jsonl(tmp_path / "t.jsonl", rows[:2])
    full = _evaluator(models["a"], [{"name": "mix", "search": search, "test": test}])
    part = _evaluator(models["a"], [{"name": "mix", "search": search, "test": test, "subset": 3, "subset_seed": 1}])
    whole = full.evaluate(full.resident_parameters())
    sub = part.evaluate(part.resident_parameters())
    assert part.n_examples == 3 and sub.per_example.shape == (3,)
    chosen = np.sort(np.random.default_rng(1).choice(8, 3, replace=False))
    np.testing.assert_allclose(sub.per_example, whole.per_example[chosen], rtol=1e-5)
    assert part.evaluate(part.resident_parameters()).per_example.tolist() == sub.per_example.tolist()
    tested = part.test(part.resident_parameters())
    assert tested["search_full_loglik_mix"] == pytest.approx(whole.objectives["loglik_mix"], rel=1e-6)
    assert tested["loglik_mix"] == pytest.approx(full.test(full.resident_parameters())["loglik_mix"], rel=1e-6)
    with pytest.raises(EvomergeError, match=r"evaluator.datasets\[0\].subset: got 8, but the search split has 8"):
        _evaluator(models["a"], [{"name": "mix", "search": search, "test": test, "subset": 8}])


def test_anchor_examples_stand_for_the_clusters_of_the_seeds_scores():
    """k-means over the seeds' per-example scores: one anchor per cluster, nearest its centre, weighing the
    cluster's size; with fewer distinct score rows than anchors, the clusters share them by size."""
    features = np.array([[0, 0], [0, 0], [0.1, 0], [0, 0.1], [1, 1], [0.9, 1], [1, 0.9], [0, 1]])
    for seed in range(4):  # clusters this clear come out the same from any start
        examples, weights = anchor_examples(features, 3, seed)
        assert examples == [0, 4, 7] and weights.tolist() == [4.0, 3.0, 1.0]
    # per-example accuracies of two seeds: 6 right for both, 3 wrong for both, one only the first gets right
    binary = np.array([[1, 1]] * 6 + [[0, 0]] * 3 + [[1, 0]])
    examples, weights = anchor_examples(binary, 5, 0)
    assert examples == [0, 1, 2, 6, 9] and weights.tolist() == [2.0, 2.0, 2.0, 3.0, 1.0]
    assert (weights @ binary[examples]).tolist() == binary.sum(0).tolist()  # the seeds' totals, exactly


def test_anchor_subset_is_chosen_from_the_seeds_scores(models, tmp_path):
    """`subset_by: anchors`: the seeds' scores on the whole search split choose the anchors; candidates are then
    scored on them, each weighted by the examples it stands for, beside a random subset of another dataset."""
    questions = [("def add(a, b):", ["return", "x"]), ("The quick", ["brown fox", "a"]), ("for i in", ["range", "b"])]
    qa = _jsonl(tmp_path / "qa.jsonl", [{"question": q, "choices": c, "answer": 0} for q, c in questions * 2])
    mix = _jsonl(tmp_path / "mix.jsonl", [{"text": f"{t} {k}"} for k in range(3) for t in TEXTS])
    test = _jsonl(tmp_path / "t.jsonl", [{"text": TEXTS[0]}, {"text": TEXTS[1]}])
    qa_test = _jsonl(tmp_path / "qa_test.jsonl", [{"question": "x", "choices": ["a", "b"], "answer": 1}])
    whole = [
        {"name": "qa", "kind": "multiple_choice", "search": qa, "test": qa_test},
        {"name": "mix", "search": mix, "test": test},
    ]
    datasets = [{**whole[0], "subset": 2, "subset_seed": 1}, {**whole[1], "subset": 4, "subset_by": "anchors"}]
    ev = _evaluator(models["a"], datasets)
    assert ev.n_examples == 2 + 4 and ev.needs_seed_scores()
    with pytest.raises(EvomergeError, match=r"anchor examples \(subset_by: anchors\) are chosen from the seed models"):
        ev.evaluate(ev.resident_parameters())
    full = _evaluator(models["a"], whole)
    seeds = [load_file(str(models[k] / "model.safetensors")) for k in ("a", "b")]
    scores = np.stack([ev.full_scores(seed) for seed in seeds])
    assert scores.shape == (2, 6 + 12)
    np.testing.assert_array_equal(scores[1], full.evaluate(seeds[1]).per_example)
    record = ev.choose_subset(scores)
    examples, weights = anchor_examples(scores[:, 6:].T, 4, 0)
    assert record == {"mix": {"examples": examples, "weights": weights.tolist()}} and weights.sum() == 12
    ev.use_subset(json.loads(json.dumps(record)))

    result, reference = ev.evaluate(seeds[1]), full.evaluate(seeds[1])
    drawn = np.sort(np.random.default_rng(1).choice(6, 2, replace=False))
    expected = np.concatenate([reference.per_example[drawn], reference.per_example[6:][examples]])
    np.testing.assert_allclose(result.per_example, expected, rtol=1e-5)
    split = full.splits["search"]["mix"]
    sums, counts = full._logliks(split, "mix")[examples], np.asarray(split.n_scored, dtype=np.float64)[examples]
    assert result.objectives["loglik_mix"] == pytest.approx((weights @ sums) / (weights @ counts), rel=1e-6)
    assert result.objectives["acc_qa"] == float(reference.per_example[drawn].mean())
    anchored = np.average(reference.per_example[6:][examples], weights=weights)
    assert result.objectives["score"] == pytest.approx((reference.per_example[drawn].mean() + anchored) / 2, rel=1e-6)
    tested = ev.test(seeds[1])
    assert tested["search_full_loglik_mix"] == pytest.approx(reference.objectives["loglik_mix"], rel=1e-6)

    with pytest.raises(EvomergeError, match="subset record does not fit dataset 'mix': it needs 4 distinct anchors"):
        ev.use_subset({"mix": {"examples": [0, 1], "weights": [6.0, 6.0]}})
    with pytest.raises(SpecError, match=r"^evaluator.datasets\[0\].subset_by: got 'anchors' without subset"):
        _evaluator(models["a"], [{"name": "mix", "search": mix, "subset_by": "anchors"}])


def test_fisher_of_sampled_tokens_equals_a_hand_computation(models, tmp_path):
    from evomerge.evaluate.base import EstimatesFisher

    search = _jsonl(tmp_path / "s.jsonl", [{"text": TEXTS[0]}, {"text": TEXTS[1]}])
    ev = _evaluator(models["a"], [{"name": "mix", "search": search, "test": search}])
    assert isinstance(ev, EstimatesFisher)
    fisher = ev.fisher(ev.resident_parameters(), None, seed=5)
    assert set(fisher) == set(ev.layout().names) and all(bool((f >= 0).all()) for f in fisher.values())
    model, tok = _reference(models["a"])
    generator = torch.Generator().manual_seed(5)
    names = list(ev.layout().names)
    params = dict(model.named_parameters())
    leaves = [params[n] for n in names]
    expected = [torch.zeros_like(p) for p in leaves]
    for text in TEXTS[:2]:
        ids = torch.tensor([[tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]])
        logits = model(input_ids=ids).logits[0, :-1].float()
        sampled = torch.multinomial(logits.detach().softmax(-1), 1, generator=generator)
        loglik = logits.log_softmax(-1).gather(1, sampled).mean()
        for total, grad in zip(expected, torch.autograd.grad(loglik, leaves)):
            total += grad**2
    for name, total in zip(names, expected):
        torch.testing.assert_close(fisher[name], total / 2, rtol=1e-4, atol=1e-10)
    assert torch.equal(ev.fisher(ev.resident_parameters(), None, seed=5)[names[0]], fisher[names[0]])
    assert not any(t.requires_grad for t in ev.resident_parameters().values())
    with pytest.raises(EvomergeError, match="the evaluator's datasets are: mix"):
        ev.fisher(ev.resident_parameters(), None, seed=5, subset="nope")
