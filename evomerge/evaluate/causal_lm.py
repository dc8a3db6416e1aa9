"""Built-in evaluator: a transformers causal language model kept resident, scored on local text datasets.

The model is loaded once (per process, so once per Ray worker) and evomerge writes each candidate into its
parameters in place (`ResidentModel`); no candidate is re-instantiated or written to disk. Every example of
every dataset is tokenized when the evaluator is built, so a bad file, an answer out of range or a sequence
longer than the model's context is refused before the search starts. transformers is imported only when
this evaluator is built: the other evaluators do not need it installed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from evomerge.data.jsonl import read_jsonl
from evomerge.errors import EvaluationError, EvomergeError, ShapeMismatchError, SpecError
from evomerge.evaluate import EVALUATORS
from evomerge.evaluate.base import EvalResult
from evomerge.evaluate.classification import resolve_device
from evomerge.evaluate.fisher import pick_examples
from evomerge.evaluate.hf_resident import checkpoint_parameters, layout_of, resolve_dtype
from evomerge.schema import require
from evomerge.weights import Layout

Kind = Literal["loglik", "multiple_choice", "exact_match"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
MAX_NLL = 700.0  # perplexity is capped at exp(700) so that a broken merge scores badly instead of overflowing


@dataclass
class DatasetOptions:
    name: str  # metric suffix: loglik_<name>, acc_<name>, ...
    search: str  # the file searched on (jsonl, or txt for loglik)
    kind: Kind = "loglik"
    test: str | None = None  # held-out file; null: a deterministic share of `search` becomes the test split
    test_fraction: float = 0.5  # with test null: share of `search`'s examples held out
    split_seed: int = 0  # with test null: the permutation that picks them
    txt_split: Literal["paragraph", "line"] = "paragraph"  # txt files: one example per paragraph or per line
    delimiter: str = " "  # multiple_choice: put between question and option (lm-eval's target_delimiter)
    score_by: Literal["acc", "acc_norm"] = "acc"  # multiple_choice: which accuracy the per-example score is
    max_new_tokens: int = 16  # exact_match: greedy tokens generated at most
    subset: int | None = None  # fitness on this many search examples; test adds the full split
    subset_by: Literal["random", "anchors"] = "random"  # a fixed random draw, or anchors chosen from the seeds' scores
    subset_seed: int = 0  # the draw's seed (anchors: the clustering's start)

    def check(self, path: str) -> None:
        require(
            re.fullmatch(r"[A-Za-z0-9_]+", self.name) is not None,
            f"{path}.name",
            f"got {self.name!r}; use letters, digits and _ (it names metrics)",
        )
        require(bool(self.search), f"{path}.search", "needs a file (.jsonl, or .txt for kind loglik)")
        for key in ("search", "test"):
            value = getattr(self, key)
            if value is not None and Path(value).suffix == ".txt":
                require(
                    self.kind == "loglik",
                    f"{path}.{key}",
                    f"a .txt file holds plain text, which only kind 'loglik' reads; {self.kind} needs .jsonl",
                )
        require(0 < self.test_fraction < 1, f"{path}.test_fraction", f"got {self.test_fraction}, must be in (0, 1)")
        require(self.max_new_tokens >= 1, f"{path}.max_new_tokens", f"got {self.max_new_tokens}, must be >= 1")
        if self.subset is not None:
            require(self.subset >= 1, f"{path}.subset", f"got {self.subset}, must be >= 1")
        require(
            self.subset is not None or self.subset_by == "random",
            f"{path}.subset_by",
            f"got {self.subset_by!r} without subset; anchors are `subset` examples, so set subset: N",
        )


@dataclass
class CausalLMOptions:
    model: str  # a local Hugging Face model folder (config.json + weights)
    datasets: list[DatasetOptions] = field(default_factory=list)
    tokenizer: str | None = None  # folder of the tokenizer; null: the model folder
    device: Literal["cpu", "cuda", "auto"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    batch_tokens: int = 8192  # padded tokens per forward pass (rows x longest row)
    max_length: int | None = None  # longest sequence allowed; null: the model's context
    truncate: bool = False  # loglik texts longer than max_length keep their first max_length tokens
    add_bos: bool = True  # start every sequence with the tokenizer's BOS token (when it has one)

    def check(self, path: str) -> None:
        require(bool(self.model), f"{path}.model", "needs a local model folder")
        require(len(self.datasets) >= 1, f"{path}.datasets", "needs at least one dataset {name, kind, search, test}")
        names = [d.name for d in self.datasets]
        dup = sorted({n for n in names if names.count(n) > 1})
        require(not dup, f"{path}.datasets", f"dataset names repeat: {', '.join(dup)}")
        require(self.batch_tokens >= 1, f"{path}.batch_tokens", f"got {self.batch_tokens}, must be >= 1")
        if self.max_length is not None:
            require(self.max_length >= 2, f"{path}.max_length", f"got {self.max_length}, must be >= 2")


@dataclass
class _Split:
    """One dataset split, tokenized: flat scored sequences plus what groups them into examples."""

    kind: Kind
    sequences: list[list[int]]  # loglik and multiple_choice: the scored sequences; exact_match: the prompts
    n_scored: list[int]  # per sequence: how many of its last tokens are scored
    choices_per_example: list[int] = field(default_factory=list)  # multiple_choice
    choice_chars: list[float] = field(default_factory=list)  # multiple_choice: character length per option
    answers: list[int] = field(default_factory=list)  # multiple_choice
    targets: list[str] = field(default_factory=list)  # exact_match
    weights: np.ndarray | None = None  # per example: how many examples of the whole split it stands for (anchors)

    @property
    def n_examples(self) -> int:
        if self.kind == "multiple_choice":
            return len(self.answers)
        return len(self.sequences)

    def select(self, chosen: list[int], weights: np.ndarray | None = None) -> _Split:
        """The split of examples `chosen` (in that order), each weighted by `weights` in the metrics."""
        if self.kind != "multiple_choice":
            rows = [(self.sequences[i], self.n_scored[i]) for i in chosen]
            targets = [self.targets[i] for i in chosen] if self.targets else []
            return _Split(self.kind, [r[0] for r in rows], [r[1] for r in rows], targets=targets, weights=weights)
        starts = np.cumsum([0, *self.choices_per_example]).tolist()
        options = [j for i in chosen for j in range(starts[i], starts[i + 1])]
        return _Split(
            self.kind,
            [self.sequences[j] for j in options],
            [self.n_scored[j] for j in options],
            [self.choices_per_example[i] for i in chosen],
            [self.choice_chars[j] for j in options],
            [self.answers[i] for i in chosen],
            weights=weights,
        )


def _read_txt(path: Path, split: str) -> list[tuple[str, dict[str, Any]]]:
    """Paragraphs (blocks separated by blank lines) or non-blank lines, each with the line it starts on."""
    rows, block, start = [], [], 0
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            text = line.rstrip("\n")
            if split == "line":
                if text.strip():
                    rows.append((f"{path}:{number}", {"text": text}))
                continue
            if text.strip():
                start = start or number
                block.append(text)
            elif block:
                rows.append((f"{path}:{start}", {"text": "\n".join(block)}))
                block, start = [], 0
    if block:
        rows.append((f"{path}:{start}", {"text": "\n".join(block)}))
    return rows


def _field(where: str, row: dict[str, Any], key: str, kind: str, expected: type | tuple[type, ...]) -> Any:
    if key not in row:
        raise EvomergeError(f"{where}: missing field {key!r} (a {kind} dataset's lines need it)")
    value = row[key]
    if not isinstance(value, expected) or isinstance(value, bool):
        names = " or ".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))
        raise EvomergeError(f"{where}: field {key!r} is {value!r}, expected {names}")
    return value


def load_examples(path: Path, kind: Kind, txt_split: str) -> list[tuple[str, dict[str, Any]]]:
    """Read and check one dataset file; every problem names the file and line."""
    if not path.is_file():
        raise EvomergeError(f"dataset file {path} does not exist")
    rows = _read_txt(path, txt_split) if path.suffix == ".txt" else read_jsonl(path)
    if not rows:
        raise EvomergeError(f"dataset file {path} has no examples")
    for where, row in rows:
        if kind == "loglik":
            if not _field(where, row, "text", kind, str).strip():
                raise EvomergeError(f"{where}: field 'text' is empty")
        elif kind == "multiple_choice":
            _field(where, row, "question", kind, str)
            choices = _field(where, row, "choices", kind, list)
            if len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
                raise EvomergeError(f"{where}: 'choices' must be a list of at least 2 non-empty strings")
            answer = _field(where, row, "answer", kind, int)
            if not 0 <= answer < len(choices):
                raise EvomergeError(
                    f"{where}: answer {answer} is out of range for {len(choices)} choices (0-{len(choices) - 1})"
                )
        else:
            _field(where, row, "prompt", kind, str)
            _field(where, row, "target", kind, str)
    return rows


def split_rows(rows: list, fraction: float, seed: int, where: str) -> tuple[list, list]:
    """A deterministic (search, test) split of one file, each keeping the file's order."""
    if len(rows) < 2:
        raise EvomergeError(f"{where}: {len(rows)} example cannot be split into search and test; give a test file")
    n_test = min(max(1, round(len(rows) * fraction)), len(rows) - 1)
    held = set(np.random.default_rng(seed).permutation(len(rows))[:n_test].tolist())
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def _chunks(indices: list[int], lengths: list[int], budget: int) -> Iterator[list[int]]:
    """Consecutive runs of `indices` (sorted longest first) whose padded size stays within `budget` tokens."""
    batch: list[int] = []
    for i in indices:
        if batch and (len(batch) + 1) * lengths[batch[0]] > budget:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


class CausalLMEvaluator:
    """Per dataset: `loglik_<d>` (mean token log-likelihood) and `perplexity_<d>` for loglik, `acc_<d>` and
    `acc_norm_<d>` for multiple_choice, `exact_match_<d>` for exact_match; `score` is the mean over datasets of
    their mean per-example score. Per-example scores: exp(mean token log-likelihood) for loglik, 1/0 otherwise."""

    def __init__(self, options: CausalLMOptions):
        self.options = options
        self.device = resolve_device(options.device)
        self.dtype = resolve_dtype(options.dtype, self.device)
        if not Path(options.model).is_dir():
            raise EvomergeError(f"evaluator.model: {options.model} is not a folder (a local Hugging Face model folder)")
        field_name = "evaluator.tokenizer" if options.tokenizer else "evaluator.model"
        self.tokenizer = self._load_tokenizer(Path(options.tokenizer or options.model), field_name)
        self.model = self._load_model(Path(options.model))
        self._resident = checkpoint_parameters(self.model, Path(options.model), "evaluator.model")
        self._layout = layout_of(self._resident)
        self.max_length = self._max_length()
        self.vocab = self.model.get_input_embeddings().weight.shape[0]
        self.bos = [self.tokenizer.bos_token_id] if options.add_bos and self.tokenizer.bos_token_id is not None else []
        self.splits: dict[str, dict[str, _Split]] = {"search": {}, "search_full": {}, "test": {}}
        for k, dataset in enumerate(options.datasets):
            path = f"evaluator.datasets[{k}]"
            search, test = self._rows(dataset, path)
            full = self.splits["search_full"][dataset.name] = self._tokenize(dataset, search, path)
            self.splits["test"][dataset.name] = self._tokenize(dataset, test, path)
            self.splits["search"][dataset.name] = full  # until a subset is drawn or chosen
            if dataset.subset is not None and dataset.subset >= full.n_examples:
                raise SpecError(
                    f"{path}.subset",
                    f"got {dataset.subset}, but the search split has {full.n_examples} examples; use fewer, or none",
                )
            if dataset.subset is not None and dataset.subset_by == "random":
                drawn = np.random.default_rng(dataset.subset_seed).choice(
                    full.n_examples, dataset.subset, replace=False
                )
                self.splits["search"][dataset.name] = full.select(np.sort(drawn).tolist())
        self.subsets = any(d.subset is not None for d in options.datasets)
        self._anchored = [d for d in options.datasets if d.subset_by == "anchors"]
        self._pending = bool(self._anchored)  # anchors are chosen from the seeds' scores when a run starts
        self._stop: list[int] | None = None
        self.n_examples = sum(
            d.subset if d.subset is not None else self.splits["search_full"][d.name].n_examples
            for d in options.datasets
        )

    # -- building ---------------------------------------------------------------------------------------------

    def _load_tokenizer(self, folder: Path, field_name: str) -> Any:
        from transformers import AutoTokenizer

        if not folder.is_dir():
            raise EvomergeError(f"{field_name}: {folder} is not a folder")
        if not any((folder / name).is_file() for name in TOKENIZER_FILES):
            raise EvomergeError(
                f"{field_name}: {folder} has no tokenizer ({', '.join(TOKENIZER_FILES)}); save one there with "
                "tokenizer.save_pretrained(folder) or point evaluator.tokenizer at its folder"
            )
        try:
            return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as err:  # transformers raises many types; the user needs one line
            raise EvomergeError(f"{field_name}: cannot load the tokenizer in {folder}: {_first_line(err)}") from None

    def _load_model(self, folder: Path) -> Any:
        import transformers
        from transformers import AutoModelForCausalLM

        if not (folder / "config.json").is_file():
            raise EvomergeError(f"evaluator.model: {folder} is not a Hugging Face model folder (no config.json)")
        try:
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=self.dtype, local_files_only=True)
        except Exception as err:
            raise EvomergeError(
                f"evaluator.model: transformers {transformers.__version__} cannot load {folder} as a causal "
                f"language model: {_first_line(err)}"
            ) from None
        model.to(self.device).eval()
        model.requires_grad_(False)  # evomerge writes candidates into these tensors in place
        return model

    def _max_length(self) -> int:
        config = self.model.config
        context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        wanted = self.options.max_length
        if wanted is None:
            if context is None:
                raise EvomergeError("evaluator.max_length: the model's config names no context length; set one")
            return int(context)
        if context is not None and wanted > context:
            raise EvomergeError(f"evaluator.max_length: got {wanted}, longer than the model's context ({context})")
        return wanted

    def _rows(self, dataset: DatasetOptions, path: str) -> tuple[list, list]:
        """The (search, test) rows of one dataset."""
        search = load_examples(Path(dataset.search), dataset.kind, dataset.txt_split)
        if dataset.test is not None:
            return search, load_examples(Path(dataset.test), dataset.kind, dataset.txt_split)
        return split_rows(search, dataset.test_fraction, dataset.split_seed, f"{path}.search ({dataset.search})")

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _fit(self, ids: list[int], extra: int, dataset: DatasetOptions, where: str, path: str) -> list[int]:
        """Refuse (or, for loglik with truncate, cut) a sequence the model cannot take."""
        if len(ids) + extra > self.max_length:
            if dataset.kind == "loglik" and self.options.truncate:
                return ids[: self.max_length]
            hint = "set truncate: true or " if dataset.kind == "loglik" else ""
            needs = f"{len(ids)} tokens" + (f" + {extra} to generate" if extra else "")
            raise EvomergeError(
                f"{path} ({dataset.name}): the example at {where} has {needs}, more than max_length "
                f"{self.max_length} (the model's context unless set); shorten it or {hint}use a model with a longer "
                "context"
            )
        high = max(ids, default=0)
        if high >= self.vocab:
            raise EvomergeError(
                f"{path} ({dataset.name}): the tokenizer gives id {high} at {where}, but the model has only "
                f"{self.vocab} embeddings: the tokenizer does not belong to this model"
            )
        return ids

    def _tokenize(self, dataset: DatasetOptions, rows: list, path: str) -> _Split:
        out = _Split(dataset.kind, [], [])
        for where, row in rows:
            if dataset.kind == "loglik":
                ids = self._fit(self.bos + self._encode(row["text"]), 0, dataset, where, path)
                out.sequences.append(ids)
                out.n_scored.append(len(ids) - 1)  # every token after the first (the BOS, when there is one)
                if out.n_scored[-1] < 1:
                    raise EvomergeError(f"{where}: one token, nothing to score (set add_bos: true)")
            elif dataset.kind == "multiple_choice":
                for choice in row["choices"]:
                    context, continuation = _move_space(row["question"], dataset.delimiter + choice)
                    context_ids = self.bos + self._encode(context)
                    whole = self.bos + self._encode(context + continuation)
                    n = len(whole) - len(context_ids)
                    if n < 1 or not context_ids:
                        raise EvomergeError(f"{where}: choice {choice!r} leaves nothing to score after the question")
                    out.sequences.append(self._fit(whole, 0, dataset, where, path))
                    out.n_scored.append(n)
                    out.choice_chars.append(float(len(choice)))
                out.choices_per_example.append(len(row["choices"]))
                out.answers.append(row["answer"])
            else:
                prompt = self.bos + self._encode(row["prompt"])
                if not prompt:
                    raise EvomergeError(f"{where}: empty prompt (and no BOS token to start from)")
                out.sequences.append(self._fit(prompt, dataset.max_new_tokens, dataset, where, path))
                out.n_scored.append(0)
                out.targets.append(row["target"].strip())
        return out

    # -- the resident model -----------------------------------------------------------------------------------

    def layout(self) -> Layout:
        return self._layout

    def resident_parameters(self) -> dict[str, torch.Tensor]:
        """The live parameters (device and dtype of the model), keyed as the checkpoint's files name them."""
        return dict(self._resident)

    def fisher(
        self, params: dict[str, torch.Tensor], examples: int | None, seed: int, subset: str | None = None
    ) -> dict[str, torch.Tensor]:
        """Diagonal Fisher of the model's predictive (see `EstimatesFisher`) on the search split's sequences (of
        dataset `subset`, or all): per sequence, one token sampled per position from the model with `seed`, the
        squared gradient of their mean log-likelihood; averaged over sequences."""
        names = [d.name for d in self.options.datasets]
        if subset is not None and subset not in names:
            raise EvomergeError(f"subset: got {subset!r}, the evaluator's datasets are: {', '.join(names)}")
        sequences = [
            seq for name in (names if subset is None else [subset]) for seq in self.splits["search"][name].sequences
        ]
        chosen = pick_examples(len(sequences), examples, seed)
        self._load(params)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        leaves = list(self._resident.values())
        sums = [torch.zeros(t.shape, dtype=torch.float32, device=self.device) for t in leaves]
        try:
            for t in leaves:
                t.requires_grad_(True)
            with torch.enable_grad():
                for index in chosen.tolist():
                    ids = torch.tensor([sequences[index]], device=self.device)
                    logits = self.model(input_ids=ids).logits[0, :-1].float()
                    sampled = torch.multinomial(logits.detach().softmax(-1), 1, generator=generator)
                    loglik = logits.log_softmax(-1).gather(1, sampled).mean()
                    for total, grad in zip(sums, torch.autograd.grad(loglik, leaves)):
                        total += grad.float() ** 2
        finally:
            for t in leaves:
                t.requires_grad_(False)
        return {n: (total / len(chosen)).cpu() for n, total in zip(self._resident, sums)}

    # -- anchor examples (`SubsetFromSeeds`) -------------------------------------------------------------------

    def needs_seed_scores(self) -> bool:
        return bool(self._anchored)

    def full_scores(self, params: dict[str, torch.Tensor]) -> np.ndarray:
        """Per-example scores on the whole search split of every dataset, in `evaluate`'s order."""
        self._load(params)
        return self._metrics("search_full")[1]

    def choose_subset(self, seed_scores: np.ndarray) -> dict[str, Any]:
        """Per `subset_by: anchors` dataset, its anchors (indices into its whole search split) and their weights,
        from the seeds' scores [seeds, examples of every dataset's whole search split]."""
        record: dict[str, Any] = {}
        start = 0
        for dataset in self.options.datasets:
            n = self.splits["search_full"][dataset.name].n_examples
            if dataset.subset is not None and dataset.subset_by == "anchors":
                features = np.asarray(seed_scores)[:, start : start + n].T
                examples, weights = anchor_examples(features, dataset.subset, dataset.subset_seed)
                record[dataset.name] = {"examples": examples, "weights": weights.tolist()}
            start += n
        return record

    def use_subset(self, record: dict[str, Any]) -> None:
        """Score the anchors of a record `choose_subset` made (the run's `subset.json`) from now on."""
        for dataset in self._anchored:
            full = self.splits["search_full"][dataset.name]
            entry = record.get(dataset.name) if isinstance(record, dict) else None
            examples, weights = (entry.get("examples"), entry.get("weights")) if isinstance(entry, dict) else ([], [])
            fits = (
                isinstance(examples, list)
                and isinstance(weights, list)
                and len(examples) == dataset.subset == len(weights)
                and all(isinstance(i, int) and 0 <= i < full.n_examples for i in examples)
                and sorted(set(examples)) == examples
                and all(isinstance(w, (int, float)) and w > 0 for w in weights)
            )
            if not fits:
                raise EvomergeError(
                    f"the run's subset record does not fit dataset {dataset.name!r}: it needs {dataset.subset} "
                    f"distinct anchors (in order) among its {full.n_examples} search examples, each with a weight > 0"
                )
            self.splits["search"][dataset.name] = full.select(examples, np.asarray(weights, dtype=np.float64))
        self._pending = False

    def metric_names(self) -> list[str]:
        """What `evaluate` returns, so a strategy's objectives are checked before the first evaluation."""
        names = []
        for dataset in self.options.datasets:
            names += {
                "loglik": [f"loglik_{dataset.name}", f"perplexity_{dataset.name}"],
                "multiple_choice": [f"acc_{dataset.name}", f"acc_norm_{dataset.name}"],
                "exact_match": [f"exact_match_{dataset.name}"],
            }[dataset.kind]
        return [*names, "score"]

    @torch.no_grad()
    def _load(self, params: dict[str, torch.Tensor]) -> None:
        """Copy a candidate in unless it already is the resident tensors (evomerge wrote it there)."""
        for name, shape in zip(self._layout.names, self._layout.shapes):
            given = params.get(name)
            if given is None or tuple(given.shape) != shape:
                got = None if given is None else tuple(given.shape)
                raise ShapeMismatchError(f"parameter {name!r} has shape {got}, the model needs {shape}")
            live = self._resident[name]
            if given.device == live.device and given.data_ptr() == live.data_ptr() and given.dtype == live.dtype:
                continue
            live.copy_(given)

    # -- scoring ----------------------------------------------------------------------------------------------

    def _logliks(self, split: _Split, dataset: str) -> np.ndarray:
        """Sum of the log-likelihoods of each sequence's scored tokens, in longest-first padded batches."""
        lengths = [len(s) for s in split.sequences]
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        out = np.zeros(len(lengths), dtype=np.float64)
        for batch in _chunks(order, lengths, self.options.batch_tokens):
            width = lengths[batch[0]]
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            targets = torch.full((len(batch), width - 1), -100, dtype=torch.long)
            for row, i in enumerate(batch):
                seq, n = split.sequences[i], split.n_scored[i]
                ids[row, : len(seq)] = torch.tensor(seq)
                targets[row, len(seq) - 1 - n : len(seq) - 1] = ids[row, len(seq) - n : len(seq)]
            # right padding: in a causal model the real tokens never attend to the padding after them
            logits = self.model(input_ids=ids.to(self.device)).logits[:, :-1]
            nll = F.cross_entropy(
                logits.float().flatten(0, 1), targets.to(self.device).flatten(), reduction="none", ignore_index=-100
            )
            sums = -nll.view(len(batch), width - 1).sum(1).double().cpu().numpy()
            if not np.all(np.isfinite(sums)):
                raise EvaluationError(f"the forward pass gives NaN or inf log-likelihoods on dataset {dataset!r}")
            out[batch] = sums
        return out

    def _stop_tokens(self) -> list[int]:
        """Tokens that end a generation: EOS and any token whose text holds a newline (decoded once)."""
        if self._stop is None:
            texts = self.tokenizer.batch_decode([[i] for i in range(min(self.vocab, len(self.tokenizer)))])
            stop = {i for i, text in enumerate(texts) if "\n" in text}
            if self.tokenizer.eos_token_id is not None:
                stop.add(self.tokenizer.eos_token_id)
            self._stop = sorted(stop)
        return self._stop

    def _generate(self, split: _Split, max_new: int, dataset: str) -> list[str]:
        """Greedy generations (transformers' `generate`), batched over prompts of equal length: no padding,
        so no position shifts; each is cut at its first newline and stripped."""
        from transformers import GenerationConfig, LogitsProcessorList

        stop = self._stop_tokens()
        config = GenerationConfig(
            max_new_tokens=max_new, do_sample=False, eos_token_id=stop or None, pad_token_id=stop[0] if stop else 0
        )
        processors = LogitsProcessorList([_FiniteLogits(dataset)])
        by_length: dict[int, list[int]] = {}
        for i, prompt in enumerate(split.sequences):
            by_length.setdefault(len(prompt), []).append(i)
        texts = [""] * len(split.sequences)
        for length, members in by_length.items():
            rows = max(1, self.options.batch_tokens // (length + max_new))
            for start in range(0, len(members), rows):
                batch = members[start : start + rows]
                ids = torch.tensor([split.sequences[i] for i in batch], device=self.device)
                out = self.model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    generation_config=config,
                    logits_processor=processors,
                )
                for i, row in zip(batch, out[:, length:].cpu().tolist()):
                    row = row[: row.index(self.tokenizer.eos_token_id)] if self.tokenizer.eos_token_id in row else row
                    texts[i] = self.tokenizer.decode(row, skip_special_tokens=True).split("\n")[0].strip()
        return texts

    @torch.inference_mode()
    def _metrics(self, split_name: str) -> tuple[dict[str, float], np.ndarray]:
        metrics: dict[str, float] = {}
        scores, means = [], []
        for dataset in self.options.datasets:
            split, name = self.splits[split_name][dataset.name], dataset.name
            weights = split.weights
            if split.kind == "loglik":
                sums, counts = self._logliks(split, name), np.asarray(split.n_scored, dtype=np.float64)
                mean = float(sums.sum() / counts.sum() if weights is None else (weights @ sums) / (weights @ counts))
                metrics[f"loglik_{name}"] = mean
                metrics[f"perplexity_{name}"] = math.exp(min(-mean, MAX_NLL))
                per_example = np.exp(sums / counts)
            elif split.kind == "multiple_choice":
                sums = self._logliks(split, name)
                chars = np.asarray(split.choice_chars)
                acc, acc_norm, start = [], [], 0
                for count, answer in zip(split.choices_per_example, split.answers):
                    options = sums[start : start + count]
                    acc.append(float(np.argmax(options) == answer))
                    acc_norm.append(float(np.argmax(options / chars[start : start + count]) == answer))
                    start += count
                metrics[f"acc_{name}"] = _mean(np.asarray(acc), weights)
                metrics[f"acc_norm_{name}"] = _mean(np.asarray(acc_norm), weights)
                per_example = np.asarray(acc if dataset.score_by == "acc" else acc_norm)
            else:
                texts = self._generate(split, dataset.max_new_tokens, name)
                per_example = np.asarray([float(t == target) for t, target in zip(texts, split.targets)])
                metrics[f"exact_match_{name}"] = _mean(per_example, weights)
            scores.append(per_example)
            means.append(_mean(per_example, weights))
        metrics["score"] = float(np.mean(means))
        return metrics, np.concatenate(scores).astype(np.float32)

    def evaluate(self, params: dict[str, torch.Tensor]) -> EvalResult:
        if self._pending:
            raise EvomergeError(
                "evaluator.datasets: anchor examples (subset_by: anchors) are chosen from the seed models' scores "
                "when a run starts; outside a run, call use_subset(choose_subset(seed scores)) first"
            )
        self._load(params)
        metrics, per_example = self._metrics("search")
        return EvalResult(metrics, per_example)

    def test(self, params: dict[str, torch.Tensor]) -> dict[str, float]:
        """The test split's metrics; with subsets, also the whole search split's as `search_full_<metric>` (what
        the subset stands in for)."""
        self._load(params)
        metrics = self._metrics("test")[0]
        if self.subsets:
            metrics |= {f"search_full_{k}": v for k, v in self._metrics("search_full")[0].items()}
        return metrics


def _mean(values: np.ndarray, weights: np.ndarray | None) -> float:
    """The mean of per-example values, each anchor counting for the examples it stands for."""
    return float(values.mean() if weights is None else np.average(values, weights=weights))


def anchor_examples(features: np.ndarray, count: int, seed: int) -> tuple[list[int], np.ndarray]:
    """`count` examples that stand for all of them, and how many examples each stands for.

    `features` holds one row per example: its scores under each seed model. Examples the seeds score alike (easy
    for all, hard for all, one seed's speciality) are clustered: k-means (a k-means++ start drawn with `seed`, then
    Lloyd steps) over the distinct rows, each weighted by how often it occurs, with k = min(count, distinct rows).
    Every cluster gets one anchor and the rest go one at a time to the cluster whose anchors stand for the most
    examples apiece (ties: the cluster of the earliest example); a cluster's anchors are its examples nearest its
    centre, each weighing cluster size / anchors. As tinyBenchmarks' anchor points (Polo et al., 2024), the
    weighted means over anchors estimate the whole split's means for the seeds, and, unlike a random draw, no kind
    of example is missed or crowded out."""
    features = np.asarray(features, dtype=np.float64)
    points, inverse, counts = np.unique(features, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    rng = np.random.default_rng(seed)
    picked = [int(rng.choice(len(points), p=counts / counts.sum()))]
    nearest = ((points - points[picked[0]]) ** 2).sum(-1)
    while len(picked) < min(count, len(points)) and nearest.sum() > 0:  # k-means++: likely far from those chosen
        weight = nearest * counts
        picked.append(int(rng.choice(len(points), p=weight / weight.sum())))
        nearest = np.minimum(nearest, ((points - points[picked[-1]]) ** 2).sum(-1))
    centres = points[picked]

    def nearest_centre() -> np.ndarray:
        return ((points[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)

    for _ in range(100):
        assign = nearest_centre()
        moved = centres.copy()
        for c in range(len(centres)):
            members = assign == c
            if members.any():  # an emptied cluster keeps its centre (and is dropped below)
                moved[c] = np.average(points[members], axis=0, weights=counts[members])
        if np.array_equal(moved, centres):
            break
        centres = moved
    cluster = nearest_centre()[inverse]
    distance = ((features - centres[cluster]) ** 2).sum(-1)
    used = sorted({int(c) for c in cluster}, key=lambda c: int(np.flatnonzero(cluster == c)[0]))  # by first member
    sizes = np.array([(cluster == c).sum() for c in used], dtype=np.float64)
    anchors = np.ones(len(used), dtype=np.int64)
    while anchors.sum() < count:  # count < examples, so some cluster has members left
        share = np.where(anchors < sizes, sizes / anchors, -np.inf)
        anchors[int(np.argmax(share))] += 1
    chosen: list[tuple[int, float]] = []
    for c, size, n in zip(used, sizes, anchors):
        members = np.flatnonzero(cluster == c)
        nearest_first = members[np.lexsort((members, distance[members]))]
        chosen += [(int(i), float(size / n)) for i in nearest_first[:n]]
    chosen.sort()
    return [i for i, _ in chosen], np.array([w for _, w in chosen])


class _FiniteLogits:
    """A logits processor that fails the candidate as soon as a generation step gives NaN or inf logits."""

    def __init__(self, dataset: str):
        self.dataset = dataset

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not bool(torch.isfinite(scores).all()):
            raise EvaluationError(f"the forward pass gives NaN or inf logits on dataset {self.dataset!r}")
        return scores


def _move_space(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval's `_encode_pair`: trailing spaces of the context belong to the continuation."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        return context[:-spaces], context[-spaces:] + continuation
    return context, continuation


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@EVALUATORS.register("causal_lm", CausalLMOptions, "a transformers causal LM kept resident, on local text datasets")
def build_causal_lm(options: CausalLMOptions) -> CausalLMEvaluator:
    return CausalLMEvaluator(options)
