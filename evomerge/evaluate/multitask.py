"""Multi-task evaluator: a merged backbone scored on every task through that task's own fine-tuned head.

The search merges backbones only (the genome's layout is the backbone); heads stay per task, as
in task-arithmetic merging of a shared pre-trained model. Objectives are searched on the
validation split and reported on the test split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from evomerge.data.mnist import load_mnist5k
from evomerge.data.task_models import TaskModelsRecipe, backbone_layout, features, load_or_build, task_labels
from evomerge.errors import EvomergeError, ShapeMismatchError
from evomerge.evaluate import EVALUATORS
from evomerge.evaluate.base import EvalResult
from evomerge.evaluate.classification import resolve_device
from evomerge.evaluate.fisher import LogProbs, pick_examples, sum_fisher
from evomerge.schema import require
from evomerge.weights import Layout

DEFAULT_TASKS = {"low": [0, 1, 2, 3, 4], "high": [5, 6, 7, 8, 9]}


@dataclass
class MultiTaskOptions:
    dataset: Literal["mnist5k"] = "mnist5k"
    tasks: dict[str, list[int]] = field(default_factory=lambda: dict(DEFAULT_TASKS))
    hidden: list[int] = field(default_factory=lambda: [128, 64])
    pretrain_steps: int = 50
    finetune_steps: int = 200
    lr: float = 0.001
    seed: int = 0
    val_per_class: int = 100
    test_per_class: int = 100
    device: Literal["cpu", "cuda", "auto"] = "auto"

    def check(self, path: str) -> None:
        require(len(self.tasks) >= 1, f"{path}.tasks", "needs at least one task as {name: [classes]}")
        for name, classes in self.tasks.items():
            require(len(classes) >= 2, f"{path}.tasks.{name}", f"got {classes}, a task needs at least 2 classes")
            bad = [c for c in classes if not 0 <= c <= 9]
            require(not bad, f"{path}.tasks.{name}", f"classes {bad} are not digits; allowed: 0-9")
            require(len(set(classes)) == len(classes), f"{path}.tasks.{name}", f"got {classes}, classes repeat")
        for i, width in enumerate(self.hidden):
            require(width > 0, f"{path}.hidden[{i}]", f"got {width}, must be > 0")
        require(len(self.hidden) >= 1, f"{path}.hidden", "needs at least one layer")
        for name in ("pretrain_steps", "finetune_steps"):
            require(getattr(self, name) >= 0, f"{path}.{name}", f"got {getattr(self, name)}, must be >= 0")
        require(self.lr > 0, f"{path}.lr", f"got {self.lr}, must be > 0")
        for name in ("val_per_class", "test_per_class"):
            require(getattr(self, name) >= 1, f"{path}.{name}", f"got {getattr(self, name)}, must be >= 1")
        total = self.val_per_class + self.test_per_class
        require(total < 500, f"{path}.test_per_class", f"val + test = {total} leaves no training images of the 500")

    def recipe(self) -> TaskModelsRecipe:
        return TaskModelsRecipe(
            tasks=tuple((name, tuple(classes)) for name, classes in self.tasks.items()),
            hidden=tuple(self.hidden),
            pretrain_steps=self.pretrain_steps,
            finetune_steps=self.finetune_steps,
            lr=self.lr,
            seed=self.seed,
            val_per_class=self.val_per_class,
            test_per_class=self.test_per_class,
        )


class _TaskSplit:
    """One task's examples of one split, on the evaluator's device."""

    def __init__(self, x: np.ndarray, y: np.ndarray, classes: tuple[int, ...], device: torch.device):
        mask = np.isin(y, classes)
        self.x = torch.from_numpy(x[mask]).to(device)
        self.y = torch.from_numpy(task_labels(y[mask], classes)).to(device)


class MultiTaskEvaluator:
    """Per task: `accuracy_<task>`, `loss_<task>`, `normalized_accuracy_<task>` (merged / fine-tuned);
    overall: `accuracy`, `loss` (task means); costs: `distance` (‖θ − θ0‖ / ‖θ0‖) and `sparsity`
    (share of backbone entries left at the base's value)."""

    def __init__(self, options: MultiTaskOptions):
        self.options = options
        recipe = options.recipe()
        splits = load_mnist5k(options.val_per_class, options.test_per_class, options.seed)
        self.models = load_or_build(recipe, splits)
        self.device = resolve_device(options.device)
        self._layout = backbone_layout(options.hidden)
        self.n_layers = len(options.hidden)
        self.tasks = [name for name, _ in recipe.tasks]
        self.heads = {t: {k: v.to(self.device) for k, v in h.items()} for t, h in self.models.heads.items()}
        self.base = {k: v.to(self.device) for k, v in self.models.base.items()}
        self.base_norm = float(torch.sqrt(sum((v.double() ** 2).sum() for v in self.base.values())))
        self.reference = self.models.info["finetuned_accuracy"]
        self.splits = {
            split: {
                name: _TaskSplit(
                    splits.x[getattr(splits, split)], splits.y[getattr(splits, split)], classes, self.device
                )
                for name, classes in recipe.tasks
            }
            for split in ("val", "test")
        }
        self.n_examples = sum(len(s.y) for s in self.splits["val"].values())

    def layout(self) -> Layout:
        return self._layout

    def metric_names(self) -> list[str]:
        per_task = [f"{m}_{t}" for t in self.tasks for m in ("accuracy", "loss", "normalized_accuracy")]
        return [*per_task, "accuracy", "loss", "distance", "sparsity"]

    def seed_models(self) -> list[dict[str, torch.Tensor]]:
        """The pre-trained base first, then one fine-tuned backbone per task (the `models.init: evaluator` seeds)."""
        return [self.models.base, *(self.models.finetuned[t] for t in self.tasks)]

    def describe_seed_models(self) -> list[str]:
        return [f"cached in {self.models.directory}"] + [
            f"fine-tuned on {task}: val accuracy {acc['val']:.4f}, test accuracy {acc['test']:.4f}"
            for task, acc in self.models.info["finetuned_accuracy"].items()
        ]

    def _to_device(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for name, shape in zip(self._layout.names, self._layout.shapes):
            got = tuple(params[name].shape) if name in params else None
            if got != shape:
                raise ShapeMismatchError(f"parameter {name!r} has shape {got}, the backbone needs {shape}")
        return {k: params[k].to(self.device, dtype=torch.float32) for k in self._layout.names}

    @torch.no_grad()
    def _metrics(self, params: dict[str, torch.Tensor], split: str) -> tuple[dict[str, float], np.ndarray]:
        params = self._to_device(params)
        metrics: dict[str, float] = {}
        hits = []
        for task in self.tasks:
            data, head = self.splits[split][task], self.heads[task]
            logits = torch.addmm(head["bias"], features(params, data.x, self.n_layers), head["weight"])
            correct = logits.argmax(1) == data.y
            hits.append(correct.cpu().numpy())
            metrics[f"accuracy_{task}"] = float(correct.float().mean())
            metrics[f"loss_{task}"] = float(F.cross_entropy(logits, data.y))
            metrics[f"normalized_accuracy_{task}"] = metrics[f"accuracy_{task}"] / max(
                self.reference[task][split], 1e-9
            )
        metrics["accuracy"] = float(np.mean([metrics[f"accuracy_{t}"] for t in self.tasks]))
        metrics["loss"] = float(np.mean([metrics[f"loss_{t}"] for t in self.tasks]))
        delta = [params[k] - self.base[k] for k in self._layout.names]
        moved = float(torch.sqrt(sum((d.double() ** 2).sum() for d in delta)))
        metrics["distance"] = moved / max(self.base_norm, 1e-12)
        unchanged = sum(
            int((d.abs() <= 1e-7 * (1 + self.base[k].abs())).sum()) for d, k in zip(delta, self._layout.names)
        )
        metrics["sparsity"] = unchanged / self._layout.size
        return metrics, np.concatenate(hits).astype(np.float32)

    def evaluate(self, params: dict[str, torch.Tensor]) -> EvalResult:
        metrics, hits = self._metrics(params, "val")
        return EvalResult(metrics, hits)

    def test(self, params: dict[str, torch.Tensor]) -> dict[str, float]:
        return self._metrics(params, "test")[0]

    def fisher(
        self, params: dict[str, torch.Tensor], examples: int | None, seed: int, subset: str | None = None
    ) -> dict[str, torch.Tensor]:
        """Diagonal Fisher of the backbone on the validation split (see `EstimatesFisher`), each example through its
        task's head; `subset` is a task (the one a fine-tuned backbone was trained for)."""
        if subset is not None and subset not in self.tasks:
            raise EvomergeError(f"subset: got {subset!r}, the evaluator's tasks are: {', '.join(self.tasks)}")
        tasks = self.tasks if subset is None else [subset]
        sizes = [len(self.splits["val"][t].y) for t in tasks]
        index = pick_examples(sum(sizes), examples, seed)
        params = self._to_device(params)
        total = {k: torch.zeros_like(v) for k, v in params.items()}
        start = 0
        for task, size in zip(tasks, sizes):
            mine = (index[(index >= start) & (index < start + size)] - start).to(self.device)
            start += size
            head = self.heads[task]
            x = self.splits["val"][task].x[mine]
            for name, value in sum_fisher(self._log_probs(task), params, x, head["bias"].numel()).items():
                total[name] += value
        return {k: (v / len(index)).cpu() for k, v in total.items()}

    def _log_probs(self, task: str) -> LogProbs:
        """log p(label | x) of one example through `task`'s head."""
        head = self.heads[task]

        def log_probs(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
            logits = torch.addmm(head["bias"], features(p, xi[None], self.n_layers), head["weight"])
            return F.log_softmax(logits, dim=1)[0]

        return log_probs


@EVALUATORS.register("multitask", MultiTaskOptions, "merged MNIST-5k backbone scored per task through its own head")
def build_multitask(options: MultiTaskOptions) -> MultiTaskEvaluator:
    return MultiTaskEvaluator(options)
