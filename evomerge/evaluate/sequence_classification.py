"""Built-in evaluator `sequence_classification`: a merged encoder backbone (BERT, MiniLM) scored on text
classification tasks, each through its own fixed linear head.

As in the MNIST multi-task benchmark, only the backbone is merged: the genome's layout is the backbone's
checkpoint tensors, and every task keeps one head, either given as a file (the head fine-tuned with that task's
backbone) or trained once on the base backbone's frozen features and cached. The backbone is instantiated once
and each candidate is written into its parameters (`ResidentModel`). Every text is tokenized at construction.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from evomerge.data.jsonl import read_jsonl
from evomerge.errors import EvomergeError
from evomerge.evaluate import EVALUATORS
from evomerge.evaluate.base import EvalResult
from evomerge.evaluate.classification import resolve_device
from evomerge.evaluate.hf_resident import (
    checkpoint_parameters,
    layout_of,
    load_model,
    load_tokenizer,
    model_folder,
    resolve_dtype,
    write_into,
)
from evomerge.schema import require
from evomerge.weights import Layout
from evomerge.weights.checkpoint import Checkpoint

HEAD_FORMAT = 1  # bump when head training changes, so cached heads are retrained


@dataclass
class TextTask:
    validation: str  # jsonl searched on
    train: str | None = None  # jsonl the head is trained on (needed unless `head` is given)
    test: str | None = None  # jsonl reported by `test`
    head: str | None = None  # safetensors with `weight` [classes, hidden] and `bias` [classes]

    def check(self, path: str) -> None:
        require(
            self.train is not None or self.head is not None,
            path,
            "needs `train` (a jsonl file to train its head on) or `head` (a safetensors head)",
        )
        for key in ("validation", "train", "test", "head"):
            value = getattr(self, key)
            require(value is None or Path(value).is_file(), f"{path}.{key}", f"file {value!r} does not exist")


@dataclass
class SequenceClassificationOptions:
    model: str  # HF folder of the base backbone: config.json, weights, tokenizer
    tasks: dict[str, TextTask]
    text_field: str = "text"
    label_field: str = "label"
    pooling: Literal["mean", "cls", "pooler"] = "mean"
    max_length: int = 128
    batch_size: int = 64
    head_steps: int = 300
    head_lr: float = 0.01
    device: Literal["cpu", "cuda", "auto"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    def check(self, path: str) -> None:
        require(len(self.tasks) >= 1, f"{path}.tasks", "needs at least one task as {name: {validation: FILE, ...}}")
        for name in self.tasks:
            require(name.isidentifier(), f"{path}.tasks.{name}", "task names must be identifiers (they name metrics)")
        require(self.max_length >= 2, f"{path}.max_length", f"got {self.max_length}, must be >= 2")
        require(self.batch_size >= 1, f"{path}.batch_size", f"got {self.batch_size}, must be >= 1")
        require(self.head_steps >= 1, f"{path}.head_steps", f"got {self.head_steps}, must be >= 1")
        require(self.head_lr > 0, f"{path}.head_lr", f"got {self.head_lr}, must be > 0")


def read_examples(path: str, text_field: str, label_field: str) -> tuple[list[str], list[Any]]:
    """Texts and raw labels of a jsonl file; a malformed line is refused with its line number."""
    texts, labels = [], []
    for where, row in read_jsonl(path):
        if not isinstance(row.get(text_field), str) or label_field not in row:
            raise EvomergeError(f"{where}: needs a string {text_field!r} and a {label_field!r}")
        texts.append(row[text_field])
        labels.append(row[label_field])
    if not texts:
        raise EvomergeError(f"{path}: no examples")
    return texts, labels


def label_ids(files: dict[str, list[Any]], where: str) -> dict[str, np.ndarray]:
    """Integer labels stay class indices; string labels become indices in sorted order over all the task's files."""
    every = [label for labels in files.values() for label in labels]
    if all(isinstance(label, int) and not isinstance(label, bool) for label in every):
        if min(every) < 0:
            raise EvomergeError(f"{where}: label {min(every)} is negative; integer labels are class indices")
        return {split: np.asarray(labels, dtype=np.int64) for split, labels in files.items()}
    if all(isinstance(label, str) for label in every):
        classes = {label: i for i, label in enumerate(sorted(set(every)))}
        return {split: np.asarray([classes[v] for v in labels], dtype=np.int64) for split, labels in files.items()}
    raise EvomergeError(f"{where}: labels must be all integers (class indices) or all strings")


class _Batches:
    """One split's texts, tokenized once and batched by length (little padding); `order` maps back."""

    def __init__(self, tokenizer: Any, texts: list[str], labels: np.ndarray, options: SequenceClassificationOptions):
        lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=options.max_length)["input_ids"]]
        self.order = np.argsort(lengths, kind="stable")
        self.batches = []
        for start in range(0, len(texts), options.batch_size):
            chunk = [texts[i] for i in self.order[start : start + options.batch_size]]
            self.batches.append(
                dict(
                    tokenizer(chunk, truncation=True, max_length=options.max_length, padding=True, return_tensors="pt")
                )
            )
        self.labels = torch.from_numpy(labels)


class SequenceClassificationEvaluator:
    """Per task `accuracy_<task>` and `loss_<task>` (cross-entropy of its head); `accuracy` and `loss` are the
    task means. Per-example scores: correctness on every task's validation examples, tasks in spec order."""

    def __init__(self, options: SequenceClassificationOptions, path: str = "evaluator"):
        from transformers import AutoModel

        self.options = options
        self.folder = model_folder(options.model, f"{path}.model")
        self.device = resolve_device(options.device)
        self.tokenizer = load_tokenizer(self.folder, f"{path}.model")
        self.model = load_model(
            AutoModel, self.folder, resolve_dtype(options.dtype, self.device), self.device, f"{path}.model"
        )
        self._resident = checkpoint_parameters(self.model, self.folder, f"{path}.model")
        self._layout = layout_of(self._resident)
        self.tasks = list(options.tasks)
        self.splits: dict[str, dict[str, _Batches]] = {"validation": {}, "test": {}, "train": {}}
        self.heads: dict[str, dict[str, torch.Tensor]] = {}
        for name, task in options.tasks.items():
            here = f"{path}.tasks.{name}"
            raw = {
                split: read_examples(getattr(task, split), options.text_field, options.label_field)
                for split in ("validation", "train", "test")
                if getattr(task, split) is not None
            }
            labels = label_ids({split: rows[1] for split, rows in raw.items()}, here)
            for split, (texts, _) in raw.items():
                self.splits[split][name] = _Batches(self.tokenizer, texts, labels[split], options)
            n_classes = int(max(int(v.max()) for v in labels.values())) + 1
            self.heads[name] = self._head(name, task, n_classes, here)
        self.n_examples = sum(len(b.labels) for b in self.splits["validation"].values())

    def layout(self) -> Layout:
        return self._layout

    def resident_parameters(self) -> dict[str, torch.Tensor]:
        return self._resident

    def metric_names(self) -> list[str]:
        per_task = [f"{m}_{t}" for t in self.tasks for m in ("accuracy", "loss")]
        return [*per_task, "accuracy", "loss"]

    @torch.no_grad()
    def features(self, batches: _Batches) -> torch.Tensor:
        """Pooled float32 features of a split, in file order, from the backbone as it is now."""
        out = []
        for batch in batches.batches:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            hidden = self.model(**batch)
            if self.options.pooling == "pooler":
                pooled = hidden.pooler_output
            elif self.options.pooling == "cls":
                pooled = hidden.last_hidden_state[:, 0]
            else:
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.last_hidden_state.dtype)
                pooled = (hidden.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(pooled.float())
        features = torch.cat(out)
        restored = torch.empty_like(features)
        restored[torch.from_numpy(batches.order).to(features.device)] = features
        return restored

    def _head(self, name: str, task: TextTask, n_classes: int, path: str) -> dict[str, torch.Tensor]:
        """The task's fixed head: from its file, or trained on the base backbone's features (cached by content)."""
        hidden = self.model.config.hidden_size
        if task.head is not None:
            from safetensors.torch import load_file

            head = load_file(task.head)
            if set(head) != {"weight", "bias"} or head["weight"].shape[1:] != (hidden,):
                raise EvomergeError(
                    f"{path}.head: {task.head} must hold `weight` [classes, {hidden}] and `bias` [classes]; "
                    f"it holds {', '.join(f'{k} {list(v.shape)}' for k, v in head.items())}"
                )
            if head["weight"].shape[0] < n_classes or head["bias"].shape != (head["weight"].shape[0],):
                raise EvomergeError(
                    f"{path}.head: {task.head} has {head['weight'].shape[0]} classes, the labels need {n_classes}"
                )
            return {k: v.float().to(self.device) for k, v in head.items()}
        from safetensors.torch import load_file, save_file

        from evomerge.seeds import cache_root

        cache = cache_root() / "sequence_heads" / f"{self._head_key(task, n_classes)}.safetensors"
        if cache.is_file():
            return {k: v.to(self.device) for k, v in load_file(str(cache)).items()}
        batches = self.splits["train"][name]
        x, y = self.features(batches), batches.labels.to(self.device)
        weight = torch.zeros(n_classes, hidden, device=self.device, requires_grad=True)
        bias = torch.zeros(n_classes, device=self.device, requires_grad=True)
        optimizer = torch.optim.Adam([weight, bias], lr=self.options.head_lr)
        for _ in range(self.options.head_steps):
            optimizer.zero_grad()
            F.cross_entropy(F.linear(x, weight, bias), y).backward()
            optimizer.step()
        head = {"weight": weight.detach(), "bias": bias.detach()}
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_suffix(".partial")
        save_file({k: v.cpu().contiguous() for k, v in head.items()}, str(partial))
        partial.replace(cache)
        return head

    def _head_key(self, task: TextTask, n_classes: int) -> str:
        """Everything a trained head depends on: the backbone's and the task's files, and the training options."""
        digest = hashlib.sha256()
        files = [getattr(task, split) for split in ("train", "validation", "test") if getattr(task, split) is not None]
        for file in [*Checkpoint.open(self.folder).files(), *map(Path, files)]:
            with open(file, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        o = self.options
        digest.update(
            repr(
                (HEAD_FORMAT, n_classes, o.pooling, o.max_length, o.text_field, o.label_field, o.head_steps, o.head_lr)
            ).encode()
        )
        digest.update(str(self.model.dtype).encode())
        return digest.hexdigest()[:24]

    def _metrics(self, params: dict[str, torch.Tensor], split: str) -> tuple[dict[str, float], np.ndarray]:
        write_into(self._resident, params)
        metrics: dict[str, float] = {}
        hits = []
        for task, batches in self.splits[split].items():
            head = self.heads[task]
            logits = F.linear(self.features(batches), head["weight"], head["bias"])
            labels = batches.labels.to(self.device)
            correct = logits.argmax(1) == labels
            hits.append(correct.cpu().numpy())
            metrics[f"accuracy_{task}"] = int(correct.sum()) / len(correct)  # exact: equal counts tie exactly
            metrics[f"loss_{task}"] = float(F.cross_entropy(logits, labels))
        names = list(self.splits[split])
        if names:
            metrics["accuracy"] = float(np.mean([metrics[f"accuracy_{t}"] for t in names]))
            metrics["loss"] = float(np.mean([metrics[f"loss_{t}"] for t in names]))
        return metrics, np.concatenate(hits).astype(np.float32) if hits else np.zeros(0, np.float32)

    def evaluate(self, params: dict[str, torch.Tensor]) -> EvalResult:
        metrics, hits = self._metrics(params, "validation")
        return EvalResult(metrics, hits)

    def test(self, params: dict[str, torch.Tensor]) -> dict[str, float]:
        """Tasks with a `test` file only."""
        return self._metrics(params, "test")[0] if self.splits["test"] else {}


@EVALUATORS.register(
    "sequence_classification", SequenceClassificationOptions, "merged encoder backbone, a fixed head per text task"
)
def build_sequence_classification(options: SequenceClassificationOptions) -> SequenceClassificationEvaluator:
    return SequenceClassificationEvaluator(options)
