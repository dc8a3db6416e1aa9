"""Merge methods outside the task-vector pipeline: linear soup, SLERP, Model Stock and Fisher merging.

Importing this module fills `MERGE_METHODS` with every built-in method (the task-vector family registers itself
from `evomerge.merge.task_vectors`). Each method is a plain function on float32 tensors plus a registered factory
that binds its options into a `Merger`, which adds the input checks and the dtype round trip.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from evomerge.errors import EvomergeError
from evomerge.merge import task_vectors  # noqa: F401  (registers the task-vector family)
from evomerge.merge.base import (
    MERGE_METHODS,
    CheckedOptions,
    Conventions,
    MergeContext,
    Merger,
    TensorGroup,
    check_tensor,
    field_path,
    weighted_sum,
)
from evomerge.merge.slerp import dot_products64, slerp_coefficients
from evomerge.schema import require

# --- linear (model soup) ---------------------------------------------------------------------------------------


@dataclass
class LinearOptions(CheckedOptions):
    """`weights` default to 1/N each; `normalize` divides by Σ w so that any positive weights give an average."""

    weights: list[float] | None = None
    normalize: bool = False

    def check(self, path: str) -> None:
        super().check(path)
        if self.normalize and self.weights is not None:
            require(sum(self.weights) != 0, field_path(path, "weights"), f"got {self.weights}; normalize needs Σ ≠ 0")


def linear_weights(count: int, weights: Sequence[float] | None = None, normalize: bool = False) -> list[float]:
    w = [1.0 / count] * count if weights is None else list(weights)
    if normalize:
        total = sum(w)
        if total == 0:
            raise EvomergeError(f"linear merge: weights {w} sum to 0 and cannot be normalized")
        w = [x / total for x in w]
    return w


def linear(tensors: Sequence[Tensor], weights: Sequence[float] | None = None, normalize: bool = False) -> Tensor:
    """Model soup Σ w_i θ_i."""
    return weighted_sum(tensors, linear_weights(len(tensors), weights, normalize))


@MERGE_METHODS.register("linear", LinearOptions, "model soup: Σ w_i θ_i")
def build_linear(options: LinearOptions) -> Merger:
    def kernel(name: str, base: Tensor | None, tensors: list[Tensor], context: MergeContext) -> Tensor:
        return linear(tensors, options.weights, options.normalize)

    def linear_fn(name: str, count: int, context: MergeContext) -> list[float]:
        return linear_weights(count, options.weights, options.normalize)

    return Merger("linear", kernel, weights=options.weights, options=options, linear_fn=linear_fn)


# --- SLERP -----------------------------------------------------------------------------------------------------


@dataclass
class SlerpOptions(CheckedOptions):
    """`scope: model` takes one angle over the whole model (a first pass collects the dot product and norms)."""

    t: float = 0.5
    scope: Literal["tensor", "model"] = "tensor"
    conventions: Conventions = "evomerge"

    def check(self, path: str) -> None:
        super().check(path)
        if self.conventions == "mergekit":
            require(self.scope == "tensor", field_path(path, "scope"), "mergekit's conventions are per tensor")


SlerpStats = tuple[float, float, float]


def slerp_model_stats(pairs: Iterable[tuple[Tensor, Tensor]]) -> SlerpStats:
    """(x·y, |x|, |y|) summed over tensor pairs; one pass, streaming-friendly, accumulated in float64 (the same
    angle as M2N2's crossover of the same weights, whatever the model's size)."""
    dot = xx = yy = 0.0
    for x, y in pairs:
        d, a, b = dot_products64(x, y)
        dot, xx, yy = dot + d, xx + a, yy + b
    return dot, math.sqrt(xx), math.sqrt(yy)


def slerp_tensors(
    x: Tensor, y: Tensor, t: float, stats: SlerpStats | None = None, conventions: Conventions = "evomerge"
) -> Tensor:
    """SLERP of two tensors: the angle of these tensors, or of whole models when `stats` are given."""
    a, b = slerp_coefficients(t, *(stats if stats is not None else slerp_model_stats([(x, y)])), conventions)
    return torch.mul(x, a).add_(y, alpha=b)


def _slerp_ends(base: Tensor | None, tensors: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """The two models, or their task vectors when a base is given."""
    return (tensors[0], tensors[1]) if base is None else (tensors[0] - base, tensors[1] - base)


@MERGE_METHODS.register("slerp", SlerpOptions, "spherical interpolation of two models (or task vectors)")
def build_slerp(options: SlerpOptions) -> Merger:
    def kernel(name: str, base: Tensor | None, tensors: list[Tensor], context: MergeContext) -> Tensor:
        stats = context.model_stats if options.scope == "model" else None
        if options.scope == "model" and stats is None:
            raise EvomergeError(
                f"method 'slerp' with scope 'model' needs model-wide statistics for {name!r}: "
                "run Merger.prepare over all tensors first (merge_state_dicts does)"
            )
        out = slerp_tensors(*_slerp_ends(base, tensors), options.t, stats, options.conventions)
        return out if base is None else base + out

    def prepare(groups: Iterable[TensorGroup]) -> SlerpStats:
        return slerp_model_stats(_slerp_ends(g.base, g.tensors) for g in groups)

    prepare_fn = prepare if options.scope == "model" else None
    return Merger("slerp", kernel, min_models=2, max_models=2, prepare_fn=prepare_fn, options=options)


# --- Model Stock -----------------------------------------------------------------------------------------------


def mean_pairwise_cosine(taus: Sequence[Tensor], min_norm_product: float = 0.0) -> float:
    """Mean cosine over pairs of task vectors; a zero vector counts as orthogonal to everything. With
    `min_norm_product` (mergekit: 1e-6) each cosine is x·y / max(|x||y|, it), clipped to [-1, 1]."""
    flat = torch.stack([t.reshape(-1) for t in taus]).double()
    norms = flat.norm(dim=1)
    outer = norms[:, None] * norms[None, :]
    if min_norm_product > 0:
        cos = ((flat @ flat.T) / outer.clamp(min=min_norm_product)).clamp(-1.0, 1.0)
    else:
        cos = torch.where(outer > 0, (flat @ flat.T) / outer.clamp(min=1e-300), torch.zeros_like(outer))
    i, j = torch.triu_indices(len(taus), len(taus), offset=1)
    return float(cos[i, j].mean())


def model_stock(base: Tensor, tensors: Sequence[Tensor], conventions: Conventions = "evomerge") -> Tensor:
    """Model Stock: t = N cos φ / (1 + (N − 1) cos φ); θ = t · mean θ_i + (1 − t) θ0.

    cos φ is clamped to [0, 1] so that t stays in [0, 1] (the formula has a pole at cos φ = −1/(N − 1));
    mergekit leaves it unclamped, so t may leave [0, 1] when task vectors disagree, and takes t = 0 within 1e-6 of
    the pole.
    """
    n = len(tensors)
    taus = [t - base for t in tensors]
    if conventions == "mergekit":
        cos = mean_pairwise_cosine(taus, min_norm_product=1e-6)
    else:
        cos = min(1.0, max(0.0, mean_pairwise_cosine(taus)))
    denominator = 1 + (n - 1) * cos
    t = 0.0 if abs(denominator) < 1e-6 else n * cos / denominator
    return t * linear(tensors) + (1 - t) * base


@dataclass
class ModelStockOptions(CheckedOptions):
    """Model Stock has no knobs; only whose conventions it follows."""

    conventions: Conventions = "evomerge"


@MERGE_METHODS.register(
    "model_stock", ModelStockOptions, "Model Stock: interpolate toward the base by the task-vector angle"
)
def build_model_stock(options: ModelStockOptions) -> Merger:
    def kernel(name: str, base: Tensor | None, tensors: list[Tensor], context: MergeContext) -> Tensor:
        assert base is not None  # Merger checks needs_base first
        return model_stock(base, tensors, options.conventions)

    return Merger("model_stock", kernel, needs_base=True, min_models=2, options=options)


# --- Fisher ----------------------------------------------------------------------------------------------------


@dataclass
class FisherOptions(CheckedOptions):
    """`epsilon` is added to every Fisher value, so coordinates without information get the λ-weighted mean."""

    weights: list[float] | None = None
    epsilon: float = 1e-8

    def check(self, path: str) -> None:
        super().check(path)
        for i, w in enumerate(self.weights or []):
            require(w > 0, f"{field_path(path, 'weights')}[{i}]", f"got {w}, must be > 0")


def fisher_merge(
    tensors: Sequence[Tensor], fishers: Sequence[Tensor], weights: Sequence[float] | None = None, epsilon: float = 1e-8
) -> Tensor:
    """Fisher merging Σ λ_i F_i θ_i / Σ λ_i F_i with diagonal Fisher F_i (+ epsilon)."""
    weights = [1.0] * len(tensors) if weights is None else weights
    num, den = torch.zeros_like(tensors[0]), torch.zeros_like(tensors[0])
    for lam, f, theta in zip(weights, fishers, tensors):
        weight = lam * (f + epsilon)
        num += weight * theta
        den += weight
    return num / den


@MERGE_METHODS.register("fisher", FisherOptions, "Fisher merging with diagonal Fisher information")
def build_fisher(options: FisherOptions) -> Merger:
    def kernel(name: str, base: Tensor | None, tensors: list[Tensor], context: MergeContext) -> Tensor:
        fishers = context.fisher
        if fishers is None or len(fishers) != len(tensors):
            got = 0 if fishers is None else len(fishers)
            raise EvomergeError(f"method 'fisher' needs one Fisher tensor per model for {name!r}, got {got}")
        for i, f in enumerate(fishers):
            check_tensor(name, f, f"fishers[{i}]", tuple(tensors[0].shape))
            if bool((f < 0).any()):
                raise EvomergeError(f"tensor {name!r} of fishers[{i}] has negative values; a Fisher diagonal is >= 0")
        fishers32 = [f.detach().to(device=tensors[0].device, dtype=torch.float32) for f in fishers]
        return fisher_merge(tensors, fishers32, options.weights, options.epsilon)

    return Merger("fisher", kernel, weights=options.weights, options=options)
