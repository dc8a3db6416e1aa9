"""The models a search starts from: random inits, trained specialists (cached), or files."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.evaluate.base import Evaluator
from evomerge.spec import ModelsSpec
from evomerge.weights import Layout, load_flat, save_flat


def cache_root() -> Path:
    return Path(os.environ.get("EVOMERGE_CACHE", Path.home() / ".cache" / "evomerge"))


def random_genome(layout: Layout, std: float, seed: int, index: int) -> np.ndarray:
    rng = np.random.default_rng([seed, index])
    return (rng.standard_normal(layout.size) * std).astype(np.float32)


def specialists(models: ModelsSpec, evaluator: Evaluator, evaluator_key: dict) -> list[np.ndarray]:
    """Train one model per class group (the paper: Adam, lr 0.003, 10 full-batch steps), cached.

    With `shared_init` every specialist starts from one random init, which comes first in the list:
    a common base model, as task-vector merging (task arithmetic, TIES, DARE) expects.
    """
    train = getattr(evaluator, "train_specialist", None)
    if train is None:
        raise EvomergeError(
            f"models.init 'specialists' needs an evaluator that can train; {type(evaluator).__name__} cannot "
            "(use models.init: files)"
        )
    layout = evaluator.layout()
    out = [random_genome(layout, models.std, models.train_seed, 0)] if models.shared_init else []
    for k, classes in enumerate(models.specialists):
        key = json.dumps(
            {
                "evaluator": evaluator_key,
                "classes": classes,
                "steps": models.train_steps,
                "lr": models.train_lr,
                "seed": models.train_seed,
                "index": k,
                "std": models.std,
                **({"shared_init": True} if models.shared_init else {}),
            },
            sort_keys=True,
        )
        path = cache_root() / "specialists" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
        if path.exists():
            out.append(load_flat(path, layout))
            continue
        init = random_genome(layout, models.std, models.train_seed, 0 if models.shared_init else k)
        trained = train(init, classes, models.train_steps, models.train_lr)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_flat(path, trained, layout, {"classes": json.dumps(classes), "recipe": key})
        out.append(trained)
    return out


def build_seeds(models: ModelsSpec, evaluator: Evaluator, evaluator_key: dict, seed: int) -> list[np.ndarray]:
    layout = evaluator.layout()
    if models.init == "random":
        return [random_genome(layout, models.std, seed, k) for k in range(models.count)]
    if models.init == "specialists":
        return specialists(models, evaluator, evaluator_key)
    if models.init == "evaluator":
        provide = getattr(evaluator, "seed_models", None)
        if provide is None:
            raise EvomergeError(
                f"models.init 'evaluator' needs an evaluator that provides its models; {type(evaluator).__name__} "
                "does not (use models.init: files)"
            )
        return [layout.flatten(tensors, source="evaluator seed model") for tensors in provide()]
    return [load_flat(p, layout) for p in models.paths]


def save_seeds(directory: Path, genomes: list[np.ndarray], layout: Layout) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for k, genome in enumerate(genomes):
        save_flat(directory / f"seed_{k}.safetensors", genome, layout)


def load_seeds(directory: Path, layout: Layout) -> list[np.ndarray]:
    if not directory.is_dir() or not any(directory.glob("seed_*.safetensors")):
        raise EvomergeError(f"seed models folder {directory} is missing or empty")
    paths = sorted(directory.glob("seed_*.safetensors"), key=lambda p: int(p.stem.split("_")[1]))
    return [load_flat(p, layout) for p in paths]
