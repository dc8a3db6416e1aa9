"""Built-in evaluator `lm_eval`: lm-evaluation-harness tasks run on the resident in-memory causal LM.

mergekit-evolve's users score merges with lm-eval; this evaluator does the same without writing a model to disk
per candidate: the model is instantiated once, wrapped once in lm-eval's `HFLM`, and each candidate is written
into its parameters. Tasks are loaded (datasets read, configs resolved) once at construction, so unknown task
names and metrics are refused before any search; every evaluation then only runs lm-eval's `evaluate` on them.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from evomerge.errors import EvaluationError, EvomergeError, SpecError
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

Split = Literal["train", "validation", "test"]
SPLIT_FIELDS = {"train": "training_split", "validation": "validation_split", "test": "test_split"}
# lm-eval aggregations whose per-sample values can become one score per example (see `_example_score`)
PER_SAMPLE_AGGREGATIONS = ("mean", "perplexity", "weighted_perplexity", "bits_per_byte")


@dataclass
class LmEvalTask:
    """One entry of `tasks`: a task, group or tag lm-eval knows, or a task YAML file."""

    name: str
    metrics: dict[str, Literal["max", "min", "auto"]] = field(default_factory=dict)  # {} = its first metric, auto
    weight: float = 1.0

    def check(self, path: str) -> None:
        require(self.weight >= 0, f"{path}.weight", f"got {self.weight}, must be >= 0")


@dataclass
class LmEvalOptions:
    model: str  # HF model folder: config.json, weights, tokenizer
    tasks: list[str | LmEvalTask]
    test_tasks: list[str | LmEvalTask] | None = None  # null = the same tasks
    include_path: list[str] = field(default_factory=list)
    include_defaults: bool = True
    search_split: Split = "validation"
    test_split: Split | None = "test"
    num_fewshot: int | None = None
    fewshot_seed: int = 1234
    limit: float | None = None
    subset: float | None = None  # search documents per task: a count or a share, a fixed random draw (lm-eval samples)
    subset_seed: int = 0
    apply_chat_template: bool | str = False
    fewshot_as_multiturn: bool = True
    system_instruction: str | None = None
    gen_kwargs: dict[str, Any] | None = None
    per_example: bool = True
    progress_bars: bool = False
    batch_size: int = 8
    max_length: int | None = None
    device: Literal["cpu", "cuda", "auto"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    model_args: dict[str, Any] = field(default_factory=dict)
    confirm_run_unsafe_code: bool = False

    def check(self, path: str) -> None:
        require(len(self.tasks) >= 1, f"{path}.tasks", "needs at least one lm-eval task")
        require(self.test_tasks is None or len(self.test_tasks) >= 1, f"{path}.test_tasks", "null or a task list")
        require(self.batch_size >= 1, f"{path}.batch_size", f"got {self.batch_size}, must be >= 1")
        for key in ("limit", "subset"):
            value = getattr(self, key)
            require(value is None or value > 0, f"{path}.{key}", f"got {value}, must be > 0")
            require(
                value is None or value < 1 or value == int(value),
                f"{path}.{key}",
                f"got {value}: a count of examples (integer) or a share below 1",
            )
        require(
            self.subset is None or self.limit is None,
            f"{path}.subset",
            f"got {self.subset} with limit {self.limit}; lm-eval takes one of them: the first documents (limit) or a "
            "random draw (subset)",
        )
        require(self.num_fewshot is None or self.num_fewshot >= 0, f"{path}.num_fewshot", "must be >= 0")
        for i, folder in enumerate(self.include_path):
            require(Path(folder).exists(), f"{path}.include_path[{i}]", f"{folder!r} does not exist")


@dataclass
class _Metric:
    key: str  # lm-eval's result key, `metric,filter`
    name: str  # `task/metric` (`task/metric/filter` for a filter other than `none`)
    sign: float  # +1 for max, -1 for min


@dataclass
class _Task:
    """A leaf lm-eval task with what the spec asked of it."""

    task: Any
    name: str
    weight: float
    reported: list[_Metric]  # every metric it reports (objectives)
    chosen: list[_Metric]  # the ones in the fitness; the first gives per-example scores
    aggregation: str  # lm-eval's aggregation of chosen[0]
    n_docs: int
    samples: list[int] | None = None  # the documents evaluated (lm-eval's `samples`), when not all


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class LmEvalEvaluator:
    """Objectives `task/metric` for every metric each task reports, and `fitness`: the task-weighted mean of
    each task's chosen metrics, negated for a `min` goal, so that larger is always better."""

    def __init__(self, options: LmEvalOptions, path: str = "evaluator"):
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
        from transformers import AutoModelForCausalLM

        self.options = options
        folder = model_folder(options.model, f"{path}.model")
        manager = TaskManager(
            include_path=[str(p) for p in options.include_path] or None, include_defaults=options.include_defaults
        )
        # tasks first: a wrong task name or metric is refused before the model is loaded
        self._search = self._load(manager, options.tasks, options.search_split, f"{path}.tasks", options.per_example)
        self._test: list[_Task] = []
        if options.test_split is not None:
            tests = options.test_tasks if options.test_tasks is not None else options.tasks
            field_name = f"{path}.test_tasks" if options.test_tasks is not None else f"{path}.tasks"
            self._test = self._load(manager, tests, options.test_split, field_name, False)
        if options.subset is not None:
            for t in self._search:
                self._draw(t, options.subset, options.subset_seed)
        self.tasks = [t.name for t in self._search]
        self.n_examples = sum(t.n_docs for t in self._search) if options.per_example else None
        self.device = resolve_device(options.device)
        tokenizer = load_tokenizer(folder, f"{path}.model")
        model = load_model(
            AutoModelForCausalLM, folder, resolve_dtype(options.dtype, self.device), self.device, f"{path}.model"
        )
        self._resident = checkpoint_parameters(model, folder, f"{path}.model")
        self._layout = layout_of(self._resident)
        self.lm = HFLM(
            pretrained=model,
            tokenizer=tokenizer,
            batch_size=options.batch_size,
            max_length=options.max_length,
            **options.model_args,
        )

    def _load(
        self, manager: Any, entries: list[str | LmEvalTask], split: str, path: str, per_example: bool
    ) -> list[_Task]:
        out: list[_Task] = []
        for i, entry in enumerate(entries):
            entry = LmEvalTask(entry) if isinstance(entry, str) else entry
            here = f"{path}[{i}]"
            if entry.name not in manager.all_tasks and not Path(entry.name).is_file():
                close = difflib.get_close_matches(entry.name, manager.all_tasks, n=3)
                hint = f" (close matches: {', '.join(close)})" if close else ""
                raise SpecError(
                    f"{here}.name",
                    f"unknown lm-eval task {entry.name!r}{hint}; give a task, group or tag name lm-eval knows or a "
                    "task YAML file (folders of task YAMLs go in include_path)",
                )
            try:
                leaves = manager.load([entry.name])["tasks"]
            except Exception as err:  # noqa: BLE001  (lm-eval and datasets raise anything; one line either way)
                raise EvomergeError(f"{here}.name: lm-eval cannot load {entry.name!r}: {_first_line(err)}") from err
            for task in leaves.values():
                self._configure(task, split, here)
                out.append(self._describe(task, entry, len(leaves), here, per_example))
        names = [t.name for t in out]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise SpecError(path, f"lm-eval task {repeated[0]!r} appears more than once")
        return out

    def _configure(self, task: Any, split: str, path: str) -> None:
        """The requested split becomes the one lm-eval evaluates; few-shot and generation options as
        `simple_evaluate` applies them (a task whose config fixes num_fewshot at 0 keeps it)."""
        docs = task.get_config(SPLIT_FIELDS[split])
        if docs is None:
            has = [role for role, key in SPLIT_FIELDS.items() if task.get_config(key) is not None]
            raise SpecError(
                path,
                f"lm-eval task {task.task_name!r} has no {split} split (it has: {', '.join(has) or 'none'}); "
                "set search_split / test_split, or test_tasks",
            )
        task.set_config(key="test_split", value=docs)
        if self.options.gen_kwargs and task.get_config("output_type") == "generate_until":
            task.set_config(key="generation_kwargs", value=dict(self.options.gen_kwargs), update=True)
        if self.options.num_fewshot is not None:
            if task.get_config("num_fewshot") != 0:
                task.set_config(key="num_fewshot", value=self.options.num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)

    def _describe(self, task: Any, entry: LmEvalTask, n_leaves: int, path: str, per_example: bool) -> _Task:
        name = task.task_name
        aggregation = task.aggregation()
        better = task.higher_is_better()
        filters = [f["name"] for f in task.get_config("filter_list") or []] or ["none"]

        def metric(metric_name: str, filter_name: str, goal: str) -> _Metric:
            if goal == "auto":
                goal = "max" if better.get(metric_name, True) else "min"
            label = f"{name}/{metric_name}" if filter_name == "none" else f"{name}/{metric_name}/{filter_name}"
            return _Metric(f"{metric_name},{filter_name}", label, 1.0 if goal == "max" else -1.0)

        reported = [metric(m, f, "auto") for f in filters for m in aggregation]
        known = [m.key if len(filters) > 1 else m.key.split(",")[0] for m in reported]
        chosen = []
        for key, goal in (entry.metrics or {next(iter(aggregation)): "auto"}).items():
            metric_name, _, filter_name = key.partition(",")
            filter_name = filter_name or filters[0]
            if metric_name not in aggregation or filter_name not in filters:
                raise SpecError(
                    f"{path}.metrics",
                    f"lm-eval task {name!r} does not report {key!r}; it reports: {', '.join(known)}",
                )
            chosen.append(metric(metric_name, filter_name, goal))
        first = chosen[0].key.split(",")[0]
        aggregation_name = getattr(aggregation[first], "__name__", str(aggregation[first]))
        if per_example and aggregation_name not in PER_SAMPLE_AGGREGATIONS:
            raise SpecError(
                f"{path}.metrics",
                f"per-example scores need a per-sample metric first, but {first!r} of lm-eval task {name!r} is "
                f"aggregated over the whole split ({aggregation_name}); list another metric first or set "
                "per_example: false",
            )
        n_docs = len(task.eval_docs)
        if self.options.limit is not None:
            n_docs = min(
                n_docs, math.ceil(n_docs * self.options.limit) if self.options.limit < 1 else int(self.options.limit)
            )
        return _Task(task, name, entry.weight / n_leaves, reported, chosen, aggregation_name, n_docs)

    @staticmethod
    def _draw(t: _Task, subset: float, seed: int) -> None:
        """A fixed random draw of a task's documents, its own per task (seeded by `seed` and the task's name, so it
        does not change with the other tasks listed); a task with no more documents than asked for is kept whole."""
        n = t.n_docs
        k = math.ceil(n * subset) if subset < 1 else int(subset)
        if k < n:
            rng = np.random.default_rng([seed, zlib.crc32(t.name.encode())])
            t.samples = np.sort(rng.choice(n, k, replace=False)).tolist()
            t.n_docs = k

    def layout(self) -> Layout:
        return self._layout

    def resident_parameters(self) -> dict[str, torch.Tensor]:
        return self._resident

    def metric_names(self) -> list[str]:
        """Every `task/metric` the search split reports, and `fitness`."""
        return [m.name for t in self._search for m in t.reported] + ["fitness"]

    def _run(
        self, params: dict[str, torch.Tensor], tasks: list[_Task], per_example: bool, whole: bool = False
    ) -> tuple[dict[str, float], np.ndarray | None]:
        """lm-eval on `tasks` (each on its drawn documents, or on all of them when `whole`)."""
        from lm_eval.evaluator import evaluate as lm_evaluate

        write_into(self._resident, params)
        for t in tasks:
            t.task.set_fewshot_seed(seed=self.options.fewshot_seed)  # the same few-shot prompts for every candidate
        limit = self.options.limit
        samples = None if whole else {t.name: t.samples for t in tasks if t.samples is not None}
        # lm-eval draws several progress bars on stderr per evaluation: thousands in a search, unless asked for
        hide = contextlib.nullcontext() if self.options.progress_bars else contextlib.redirect_stderr(io.StringIO())
        with hide:
            out = lm_evaluate(
                lm=self.lm,
                task_dict={"tasks": {t.name: t.task for t in tasks}, "groups": {}, "group_map": {}},
                limit=int(limit) if limit is not None and limit >= 1 else limit,
                samples=samples or None,
                bootstrap_iters=0,
                log_samples=per_example,
                system_instruction=self.options.system_instruction,
                apply_chat_template=self.options.apply_chat_template,
                fewshot_as_multiturn=self.options.fewshot_as_multiturn,
                confirm_run_unsafe_code=self.options.confirm_run_unsafe_code,
            )
        objectives: dict[str, float] = {}
        fitness = total = 0.0
        for t in tasks:
            values = out["results"][t.name]
            for m in t.reported:
                objectives[m.name] = float(values[m.key])
            fitness += t.weight * float(np.mean([m.sign * float(values[m.key]) for m in t.chosen]))
            total += t.weight
        objectives["fitness"] = fitness / total if total > 0 else 0.0
        if not per_example:
            return objectives, None
        scores = [self._example_scores(t, out["samples"][t.name]) for t in tasks]
        return objectives, np.concatenate(scores).astype(np.float32)

    @staticmethod
    def _example_scores(t: _Task, samples: list[dict[str, Any]]) -> np.ndarray:
        """One non-negative, larger-is-better score per example from lm-eval's logged samples: a mean-aggregated
        metric as it is (1/(1+v) for a `min` goal), a log-likelihood as a likelihood per token/word/byte."""
        metric = t.chosen[0]
        metric_name, _, filter_name = metric.key.partition(",")
        rows = sorted((s for s in samples if s["filter"] == filter_name), key=lambda s: s["doc_id"])
        scores = np.empty(len(rows), dtype=np.float64)
        for i, row in enumerate(rows):
            value = row[metric_name]
            if t.aggregation == "perplexity":
                scores[i] = math.exp(float(value))
            elif t.aggregation in ("weighted_perplexity", "bits_per_byte"):
                scores[i] = math.exp(float(value[0]) / max(float(value[1]), 1.0))
            else:
                value = float(value)
                if value < 0:
                    raise EvaluationError(f"{metric.name}: per-sample value {value} is negative")
                scores[i] = value if metric.sign > 0 else 1.0 / (1.0 + value)
        if len(scores) != t.n_docs:
            raise EvaluationError(f"{t.name}: lm-eval logged {len(scores)} samples, expected {t.n_docs}")
        return scores

    def evaluate(self, params: dict[str, torch.Tensor]) -> EvalResult:
        objectives, scores = self._run(params, self._search, self.options.per_example)
        return EvalResult(objectives, scores)

    def test(self, params: dict[str, torch.Tensor]) -> dict[str, float]:
        """The test split's metrics; with `subset`, also the search split's on every document as
        `search_full_<objective>` (what the subset stands in for)."""
        metrics = self._run(params, self._test, False)[0] if self._test else {}
        if self.options.subset is not None:
            whole = self._run(params, self._search, False, whole=True)[0]
            metrics |= {f"search_full_{k}": v for k, v in whole.items()}
        return metrics


@EVALUATORS.register("lm_eval", LmEvalOptions, "lm-evaluation-harness tasks on the resident causal LM")
def build_lm_eval(options: LmEvalOptions) -> LmEvalEvaluator:
    return LmEvalEvaluator(options)
