"""The multi-task merging benchmark's models: one pre-trained backbone, one fine-tuned copy and head per task.

Built reproducibly (fixed seeds, full-batch Adam on CPU) from MNIST-5k and cached as safetensors,
keyed by everything that shapes them, so every run, worker and benchmark merges the same models.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from evomerge.data.mnist import Splits, load_mnist5k
from evomerge.weights import Layout
from evomerge.weights.io import load_tensors, save_tensors

N_PIXELS = 784


@dataclass(frozen=True)
class TaskModelsRecipe:
    tasks: tuple[tuple[str, tuple[int, ...]], ...]  # (name, classes) in order
    hidden: tuple[int, ...] = (128, 64)
    pretrain_steps: int = 50
    finetune_steps: int = 200
    lr: float = 1e-3
    seed: int = 0
    val_per_class: int = 100
    test_per_class: int = 100

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class TaskModels:
    base: dict[str, torch.Tensor]
    finetuned: dict[str, dict[str, torch.Tensor]]
    heads: dict[str, dict[str, torch.Tensor]]  # task -> {"weight": [features, classes], "bias": [classes]}
    info: dict  # the recipe and the fine-tuned models' accuracies per split
    directory: Path


def backbone_layout(hidden: tuple[int, ...] | list[int]) -> Layout:
    widths = [N_PIXELS, *hidden]
    names, shapes = [], []
    for k, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        names += [f"layers.{k}.weight", f"layers.{k}.bias"]
        shapes += [(n_in, n_out), (n_out,)]
    return Layout(tuple(names), tuple(shapes))


def features(params: dict[str, torch.Tensor], x: torch.Tensor, n_layers: int) -> torch.Tensor:
    for k in range(n_layers):
        x = torch.relu(torch.addmm(params[f"layers.{k}.bias"], x, params[f"layers.{k}.weight"]))
    return x


def task_labels(y: np.ndarray, classes: tuple[int, ...]) -> np.ndarray:
    """Position of each label within the task's classes (the head's output index)."""
    lookup = {c: i for i, c in enumerate(classes)}
    return np.array([lookup[int(v)] for v in y], dtype=np.int64)


def _train(
    backbone: dict[str, torch.Tensor],
    head: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    lr: float,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    backbone = {k: v.clone().requires_grad_(True) for k, v in backbone.items()}
    head = {k: v.clone().requires_grad_(True) for k, v in head.items()}
    optimizer = torch.optim.Adam([*backbone.values(), *head.values()], lr=lr)
    n_layers = len(backbone) // 2
    for _ in range(steps):
        optimizer.zero_grad()
        logits = torch.addmm(head["bias"], features(backbone, x, n_layers), head["weight"])
        F.cross_entropy(logits, y).backward()
        optimizer.step()
    return {k: v.detach() for k, v in backbone.items()}, {k: v.detach() for k, v in head.items()}


def _new_head(n_features: int, n_classes: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"weight": torch.randn(n_features, n_classes, generator=g) / n_features**0.5, "bias": torch.zeros(n_classes)}


def head_accuracy(
    backbone: dict[str, torch.Tensor], head: dict[str, torch.Tensor], splits: Splits, split: np.ndarray, classes
) -> float:
    idx = split[np.isin(splits.y[split], classes)]
    with torch.no_grad():
        logits = torch.addmm(
            head["bias"], features(backbone, torch.from_numpy(splits.x[idx]), len(backbone) // 2), head["weight"]
        )
    return float((logits.argmax(1).numpy() == task_labels(splits.y[idx], classes)).mean())


def build_task_models(recipe: TaskModelsRecipe, splits: Splits) -> tuple[dict, dict, dict, dict]:
    """Pre-train the backbone on all ten classes, then fine-tune a copy (backbone and a new head) per task."""
    layout = backbone_layout(recipe.hidden)
    g = torch.Generator().manual_seed(recipe.seed)
    base = {
        name: torch.randn(shape, generator=g) * (2 / shape[0]) ** 0.5 if len(shape) == 2 else torch.zeros(shape)
        for name, shape in zip(layout.names, layout.shapes)
    }
    x = torch.from_numpy(splits.x[splits.train])
    y = torch.from_numpy(splits.y[splits.train])
    base, _ = _train(base, _new_head(recipe.hidden[-1], 10, recipe.seed + 1), x, y, recipe.pretrain_steps, recipe.lr)
    finetuned, heads, accuracy = {}, {}, {}
    for k, (name, classes) in enumerate(recipe.tasks):
        mask = np.isin(splits.y[splits.train], classes)
        xt = x[torch.from_numpy(mask)]
        yt = torch.from_numpy(task_labels(splits.y[splits.train][mask], classes))
        head = _new_head(recipe.hidden[-1], len(classes), recipe.seed + 100 + k)
        finetuned[name], heads[name] = _train(base, head, xt, yt, recipe.finetune_steps, recipe.lr)
        accuracy[name] = {
            split: head_accuracy(finetuned[name], heads[name], splits, getattr(splits, split), classes)
            for split in ("val", "test")
        }
    info = {"recipe": asdict(recipe), "finetuned_accuracy": accuracy}
    return base, finetuned, heads, info


def cache_dir(recipe: TaskModelsRecipe) -> Path:
    from evomerge.seeds import cache_root

    return cache_root() / "task_models" / recipe.key()


def load_or_build(recipe: TaskModelsRecipe, splits: Splits | None = None) -> TaskModels:
    """From the cache, or built once and written there atomically (safe when several workers race)."""
    directory = cache_dir(recipe)
    if not (directory / "info.json").is_file():
        splits = splits or load_mnist5k(recipe.val_per_class, recipe.test_per_class, recipe.seed)
        base, finetuned, heads, info = build_task_models(recipe, splits)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        save_tensors(tmp / "base.safetensors", base)
        for name in finetuned:
            save_tensors(tmp / f"task_{name}.safetensors", finetuned[name])
        save_tensors(tmp / "heads.safetensors", {f"{t}.{k}": v for t, head in heads.items() for k, v in head.items()})
        (tmp / "info.json").write_text(json.dumps(info, indent=2) + "\n")
        try:
            os.rename(tmp, directory)
        except OSError:  # another process finished first; its models are identical
            shutil.rmtree(tmp, ignore_errors=True)
    info = json.loads((directory / "info.json").read_text())
    names = [name for name, _ in recipe.tasks]
    stacked = load_tensors(directory / "heads.safetensors")
    return TaskModels(
        base=load_tensors(directory / "base.safetensors"),
        finetuned={name: load_tensors(directory / f"task_{name}.safetensors") for name in names},
        heads={name: {"weight": stacked[f"{name}.weight"], "bias": stacked[f"{name}.bias"]} for name in names},
        info=info,
        directory=directory,
    )
