"""Diagonal Fisher information of a checkpoint on an evaluator's data, cached as safetensors.

`evomerge fisher` and a merge plan's `fisher_estimate` both come here, so a Fisher is computed once per
(evaluator spec, model content, examples, seed, subset) and read back from
`cache_root()/fisher/<key>.safetensors` afterwards: float32 tensors under the model's tensor names, with the
recipe in the file's metadata (`evomerge_fisher`).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import NamedTuple

import torch

from evomerge.errors import EvaluationError, EvomergeError, ShapeMismatchError
from evomerge.evaluate import EVALUATORS
from evomerge.evaluate.base import EstimatesFisher
from evomerge.registry import Component
from evomerge.seeds import cache_root, content_hash
from evomerge.weights import Layout
from evomerge.weights.checkpoint import Checkpoint
from evomerge.weights.io import save_tensors

KIND = "predictive"  # the estimator (see `EstimatesFisher`); part of the cache key, so another one gets other files


class FisherFile(NamedTuple):
    path: Path
    cached: bool  # True: read from the cache, nothing was computed


def fisher_key(evaluator: Component, model: str | Path, examples: int | None, seed: int, subset: str | None) -> str:
    """What a Fisher depends on: the evaluator's spec (its data and model), the model's weights (by the content and
    names of its weight files, so a copy in another folder hits the cache and a changed file misses it), and which
    examples."""
    recipe = {
        "kind": KIND,
        "evaluator": evaluator.to_plain(),
        "model_sha256": content_hash(Path(model)),
        "examples": examples,
        "seed": seed,
        "subset": subset,
    }
    return json.dumps(recipe, sort_keys=True)


def estimate_fisher(
    evaluator: Component, model: str | Path, examples: int | None = None, seed: int = 0, subset: str | None = None
) -> FisherFile:
    """The cached Fisher file of `model` (a safetensors file or an HF folder) on `evaluator`'s search split,
    computed and written atomically on the first call."""
    return estimate_fishers(evaluator, [model], examples, seed, [subset])[0]


def estimate_fishers(
    evaluator: Component,
    models: list[str | Path],
    examples: int | None = None,
    seed: int = 0,
    subsets: list[str | None] | None = None,
) -> list[FisherFile]:
    """`estimate_fisher` of several models (`subsets`: one per model, or None), building the evaluator at most
    once (building one may load a dataset or train its task models)."""
    if examples is not None and examples < 1:
        raise EvomergeError(f"examples: got {examples}, must be >= 1")
    subsets = [None] * len(models) if subsets is None else subsets
    if len(subsets) != len(models):
        raise EvomergeError(f"subsets: got {len(subsets)} for {len(models)} models, need one per model")
    built = None
    out = []
    for model, subset in zip(models, subsets):
        checkpoint = Checkpoint.open(model)
        key = fisher_key(evaluator, model, examples, seed, subset)
        path = cache_root() / "fisher" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
        if path.is_file():
            out.append(FisherFile(path, True))
            continue
        if built is None:
            built = EVALUATORS.build(evaluator)
        if not isinstance(built, EstimatesFisher):
            raise EvomergeError(
                f"evaluator {evaluator.name!r} cannot estimate Fisher information ({type(built).__name__} has no "
                "fisher method); built-in ones that can: classification, multitask"
            )
        layout = built.layout()
        check_layout(checkpoint, layout)
        fisher = built.fisher({name: checkpoint.read(name) for name in layout.names}, examples, seed, subset)
        check_fisher(fisher, layout, type(built).__name__)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: fisher[name].to(torch.float32) for name in layout.names}
        save_tensors(path, tensors, {"evomerge_fisher": key, "model": str(Path(model).resolve())})
        out.append(FisherFile(path, False))
    return out


def check_layout(checkpoint: Checkpoint, layout: Layout) -> None:
    """The checkpoint holds exactly the evaluator's tensors, in its shapes; names the first that does not fit."""
    names = set(checkpoint.names())
    for name, shape in zip(layout.names, layout.shapes):
        if name not in names:
            raise ShapeMismatchError(
                f"{checkpoint.path} has no tensor {name!r}, which the evaluator's model needs (shape {tuple(shape)})"
            )
        if tuple(checkpoint.shape(name)) != tuple(shape):
            raise ShapeMismatchError(
                f"{checkpoint.path}: tensor {name!r} has shape {tuple(checkpoint.shape(name))}, the evaluator's "
                f"model needs {tuple(shape)}"
            )
    extra = sorted(names - set(layout.names))
    if extra:
        raise ShapeMismatchError(f"{checkpoint.path} has tensor {extra[0]!r}, which the evaluator's model does not")


def check_fisher(fisher: dict[str, torch.Tensor], layout: Layout, who: str) -> None:
    """An evaluator's answer has every tensor, in its shape, finite and >= 0 (a squared gradient's mean)."""
    for name, shape in zip(layout.names, layout.shapes):
        value = fisher.get(name)
        if value is None or tuple(value.shape) != tuple(shape):
            got = None if value is None else tuple(value.shape)
            raise EvaluationError(f"{who}.fisher returned shape {got} for {name!r}, expected {tuple(shape)}")
        total = float(value.double().sum())
        if not math.isfinite(total) or bool((value < 0).any()):
            raise EvaluationError(f"{who}.fisher returned a negative or non-finite value for {name!r}")
