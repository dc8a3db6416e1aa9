"""The language-model benchmark's models: a tiny Llama pre-trained here on text that ships with Python, and
three fine-tunes of it (code, prose, 2-digit addition), saved as Hugging Face folders.

Nothing is downloaded: the code domain is the standard library's own top-level `.py` files, the prose
domain is `pydoc_data.topics` (the help texts of Python's keywords and topics), and the third task is
synthetic. Each stage (held-out data, tokenizer, base, each fine-tune) is built reproducibly (fixed seeds,
CPU) and cached under `$EVOMERGE_CACHE/language_models/<stage>-<hash>/`, keyed by everything that shapes it
(the recipe's fields and a hash of the corpus text, which differs between Python versions), so changing only
the fine-tune steps reuses the base. Weights are the same on one machine with one thread count; another CPU,
BLAS or thread count may round differently.

The embeddings are untied (`lm_head.weight` is its own tensor), so every tensor a merge touches is in the
checkpoint under one name and a merge may treat input and output embeddings differently.
"""

from __future__ import annotations

import json
import math
import re
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from evomerge.data.cache import cached_stage, stage_key
from evomerge.errors import EvomergeError

DOMAINS = ("code", "prose")
TASKS = ("code", "prose", "arith")
EOT = "<|endoftext|>"  # BOS, EOS and padding, as GPT-2 uses it
BUILDER_VERSION = 1  # part of every cache key: raise it when a change here changes what is built


@dataclass(frozen=True)
class LanguageModelsRecipe:
    corpus_chars: int = 400_000  # characters kept per text domain (code, prose), before the split
    min_chunk_chars: int = 160  # paragraphs are joined into examples of at least this many characters ...
    max_chunk_chars: int = 400  # ... and cut at a line boundary to at most this many
    eval_examples: int = 64  # validation and test examples per task
    vocab_size: int = 2048  # byte-level BPE, trained on the training split
    hidden: int = 192
    layers: int = 4
    heads: int = 6
    intermediate: int = 512
    context: int = 256  # max_position_embeddings
    seq_len: int = 128  # training window (tokens)
    batch_size: int = 16  # windows per step
    pretrain_steps: int = 600  # AdamW on code + prose, half the windows from each
    finetune_steps: int = 150  # per task, from the base
    pretrain_lr: float = 3e-3
    finetune_lr: float = 1e-3
    seed: int = 0

    def check(self) -> None:
        if not 0 < self.min_chunk_chars <= self.max_chunk_chars:
            raise EvomergeError("language models: need 0 < min_chunk_chars <= max_chunk_chars")
        for name in ("corpus_chars", "eval_examples", "vocab_size", "hidden", "layers", "heads", "context"):
            if getattr(self, name) < 1:
                raise EvomergeError(f"language models: {name} must be >= 1, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise EvomergeError(f"language models: hidden {self.hidden} is not a multiple of heads {self.heads}")
        if self.seq_len > self.context:
            raise EvomergeError(f"language models: seq_len {self.seq_len} exceeds context {self.context}")


@dataclass
class LanguageModels:
    """Where everything is: HF model folders (each with its tokenizer) and the held-out jsonl files."""

    base: Path
    finetuned: dict[str, Path]  # task -> folder: code, prose, arith
    datasets: dict[str, dict[str, Path]]  # code, prose (text), arith (multiple choice), arith_em (exact match)
    tokenizer: Path
    info: dict = field(default_factory=dict)  # per stage: training losses and seconds


# -- corpus -------------------------------------------------------------------------------------------------


def _chunks(text: str, low: int, high: int) -> list[str]:
    """Blank-line-separated paragraphs joined until `low` characters, cut at a line boundary to `high`."""
    out, current = [], ""
    for paragraph in re.split(r"\n[ \t]*\n", text):
        paragraph = paragraph.strip("\n").rstrip()
        if not paragraph.strip():
            continue
        current = f"{current}\n\n{paragraph}" if current else paragraph
        if len(current) >= low:
            cut = current.rfind("\n", 0, high + 1) if len(current) > high else len(current)
            out.append(current[: cut if cut >= low // 2 else high])
            current = ""
    return out


def domain_texts() -> dict[str, list[str]]:
    """The raw documents of each domain, in a fixed order: standard-library modules, pydoc topics."""
    from pydoc_data.topics import topics

    code = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            code.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return {"code": code, "prose": [topics[name] for name in sorted(topics)]}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _arith_rows(rng: np.random.Generator) -> list[dict]:
    """Every a + b with 10 <= a, b <= 99, shuffled, as 4-option multiple choice. One distractor is a near miss
    (±1 or ±10: only exact addition rules it out), two are other sums (the size of the answer rules them out)."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    rows = []
    for k in rng.permutation(len(pairs)):
        a, b = pairs[k]
        answer = a + b
        wrong = [answer + int(rng.choice([-10, -1, 1, 10]))]
        while len(wrong) < 3:
            other = int(rng.integers(20, 199))
            if other != answer and other not in wrong:
                wrong.append(other)
        choices = [str(w) for w in wrong]
        position = int(rng.integers(4))
        choices.insert(position, str(answer))
        rows.append({"question": f"{a} + {b} =", "choices": choices, "answer": position})
    return rows


def _build_data(recipe: LanguageModelsRecipe, texts: dict[str, list[str]], out: Path) -> None:
    """Per domain: a shuffled pool of chunks, the first `eval_examples` validation, the next test, the rest train."""
    n = recipe.eval_examples
    for k, domain in enumerate(DOMAINS):
        chunks = [c for doc in texts[domain] for c in _chunks(doc, recipe.min_chunk_chars, recipe.max_chunk_chars)]
        order = np.random.default_rng([recipe.seed, k]).permutation(len(chunks))
        pool, total = [], 0
        for i in order:
            if total >= recipe.corpus_chars:
                break
            pool.append(chunks[i])
            total += len(chunks[i])
        if len(pool) < 2 * n + 1:
            raise EvomergeError(f"language models: the {domain} corpus gives {len(pool)} chunks, too few for 2 x {n}")
        for split, rows in (("validation", pool[:n]), ("test", pool[n : 2 * n]), ("train", pool[2 * n :])):
            _write_jsonl(out / f"{domain}_{split}.jsonl", [{"text": t} for t in rows])
    arith = _arith_rows(np.random.default_rng([recipe.seed, len(DOMAINS)]))
    for split, rows in (("validation", arith[:n]), ("test", arith[n : 2 * n]), ("train", arith[2 * n :])):
        _write_jsonl(out / f"arith_{split}.jsonl", rows)
        if split != "train":
            exact = [{"prompt": r["question"], "target": r["choices"][r["answer"]]} for r in rows]
            _write_jsonl(out / f"arith_em_{split}.jsonl", exact)


def _train_texts(data: Path, task: str) -> list[str]:
    rows = _read_jsonl(data / f"{task}_train.jsonl")
    if task == "arith":
        return [f"{r['question']} {r['choices'][r['answer']]}" for r in rows]
    return [r["text"] for r in rows]


# -- tokenizer ----------------------------------------------------------------------------------------------


def _build_tokenizer(recipe: LanguageModelsRecipe, data: Path, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    # digits are single tokens (as in Llama's tokenizer), so that a + b is learnable digit by digit
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([t for task in TASKS for t in _train_texts(data, task)], trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOT, eos_token=EOT, pad_token=EOT)
    wrapped.save_pretrained(str(out))


# -- training -----------------------------------------------------------------------------------------------


def _stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """One token stream: each document after an end-of-text token, the way evaluation starts a sequence."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return torch.tensor([t for doc in ids for t in (tokenizer.bos_token_id, *doc)], dtype=torch.long)


def _windows(stream: torch.Tensor, count: int, length: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - length, (count,), generator=generator)
    return torch.stack([stream[s : s + length] for s in starts.tolist()])


def _train(
    model, streams: list[torch.Tensor], recipe: LanguageModelsRecipe, steps: int, lr: float, seed: int
) -> list[float]:
    """AdamW with a linear warm-up (5%) and a cosine decay to 10%; windows drawn evenly from `streams`."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            (s + 1) / warmup
            if s < warmup
            else 0.1 + 0.45 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))
        ),
    )
    share = [recipe.batch_size // len(streams) + (k < recipe.batch_size % len(streams)) for k in range(len(streams))]
    model.train()
    losses = []
    for _ in range(steps):
        batch = torch.cat([_windows(s, n, recipe.seq_len, generator) for s, n in zip(streams, share) if n])
        loss = model(input_ids=batch, labels=batch).loss  # the model shifts the labels itself
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return losses


def _summary(losses: list[float], seconds: float) -> dict:
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "steps": len(losses),
        "first_loss": losses[0] if losses else None,
        "final_loss": float(np.mean(tail)) if tail else None,
        "seconds": round(seconds, 1),
    }


def _build_base(recipe: LanguageModelsRecipe, data: Path, tokenizer_dir: Path, out: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden,
        intermediate_size=recipe.intermediate,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.heads,
        max_position_embeddings=recipe.context,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(recipe.seed)
    model = LlamaForCausalLM(config)
    streams = [_stream(tokenizer, _train_texts(data, d)) for d in DOMAINS]
    losses = _train(model, streams, recipe, recipe.pretrain_steps, recipe.pretrain_lr, recipe.seed)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    (out / "training.json").write_text(json.dumps(_summary(losses, time.perf_counter() - start), indent=2) + "\n")


def _build_finetune(recipe: LanguageModelsRecipe, data: Path, base: Path, task: str, out: Path) -> None:
    from transformers import AutoTokenizer, LlamaForCausalLM

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    model = LlamaForCausalLM.from_pretrained(str(base), local_files_only=True, dtype=torch.float32)
    stream = _stream(tokenizer, _train_texts(data, task))
    seed = recipe.seed + 1 + TASKS.index(task)
    losses = _train(model, [stream], recipe, recipe.finetune_steps, recipe.finetune_lr, seed)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    (out / "training.json").write_text(json.dumps(_summary(losses, time.perf_counter() - start), indent=2) + "\n")


def _check_fits(recipe: LanguageModelsRecipe, data: Path, tokenizer_dir: Path) -> None:
    """Every held-out example, after its BOS token, fits the model's context (the evaluator would refuse it)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    for domain in DOMAINS:
        for split in ("validation", "test"):
            texts = [r["text"] for r in _read_jsonl(data / f"{domain}_{split}.jsonl")]
            longest = max(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
            if longest + 1 > recipe.context:
                raise EvomergeError(
                    f"language models: a {domain} {split} example has {longest} tokens, more than the context "
                    f"{recipe.context} allows; lower max_chunk_chars or raise context"
                )


def language_models(recipe: LanguageModelsRecipe | None = None) -> LanguageModels:
    """The benchmark's folders, building whatever stage is missing from the cache (minutes on 2 CPU cores)."""
    from evomerge.seeds import cache_root

    recipe = recipe or LanguageModelsRecipe()
    recipe.check()
    fields = asdict(recipe)
    root = cache_root() / "language_models"
    texts = domain_texts()
    corpus = stage_key(texts)
    data_key = stage_key(
        BUILDER_VERSION,
        corpus,
        {k: fields[k] for k in ("corpus_chars", "min_chunk_chars", "max_chunk_chars", "eval_examples", "seed")},
    )
    data = cached_stage(root / f"data-{data_key}", lambda out: _build_data(recipe, texts, out))
    tokenizer_key = stage_key(data_key, recipe.vocab_size)
    tokenizer = cached_stage(root / f"tokenizer-{tokenizer_key}", lambda out: _build_tokenizer(recipe, data, out))
    _check_fits(recipe, data, tokenizer)
    model_fields = ("hidden", "layers", "heads", "intermediate", "context", "seq_len", "batch_size", "seed")
    base_key = stage_key(
        tokenizer_key,
        {k: fields[k] for k in (*model_fields, "pretrain_steps", "pretrain_lr")},
    )
    base = cached_stage(root / f"base-{base_key}", lambda out: _build_base(recipe, data, tokenizer, out))
    finetuned = {}
    for task in TASKS:
        key = stage_key(base_key, task, recipe.finetune_steps, recipe.finetune_lr)
        finetuned[task] = cached_stage(
            root / f"finetune-{task}-{key}", lambda out, task=task: _build_finetune(recipe, data, base, task, out)
        )
    datasets = {
        name: {split: data / f"{name}_{split}.jsonl" for split in ("validation", "test")}
        for name in (*TASKS, "arith_em")
    }
    info = {"recipe": fields, "training": {"base": json.loads((base / "training.json").read_text())}}
    for task, folder in finetuned.items():
        info["training"][task] = json.loads((folder / "training.json").read_text())
    return LanguageModels(base=base, finetuned=finetuned, datasets=datasets, tokenizer=tokenizer, info=info)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="build (or find in the cache) the tiny-Llama benchmark models")
    parser.add_argument("--pretrain-steps", type=int, default=LanguageModelsRecipe.pretrain_steps)
    parser.add_argument("--finetune-steps", type=int, default=LanguageModelsRecipe.finetune_steps)
    args = parser.parse_args()
    built = language_models(
        LanguageModelsRecipe(pretrain_steps=args.pretrain_steps, finetune_steps=args.finetune_steps)
    )
    print(json.dumps({"base": str(built.base), **{k: str(v) for k, v in built.finetuned.items()}}, indent=2))
    print(json.dumps(built.info["training"], indent=2))
