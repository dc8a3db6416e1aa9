"""The task-vector family as one pipeline: sparsify → sign consensus → aggregate → scale.

With τ_i = θ_i − θ0, every method here is θ0 + λ(l) · aggregate(consensus(w_i · sparsify(τ_i))). The named
methods (task_arithmetic, ties, dare, breadcrumbs, lines) are presets of `Pipeline`, which is itself registered
as `task_vectors` with every stage exposed, so a search can treat the operator as a gene. The stages are public
functions on float32 tensors so that they can be tested and reused alone.

Counting conventions: a `density` keeps ceil(density · n) entries (at least one), `gamma` drops floor(gamma · n)
outliers (it may drop none in a small tensor); magnitude thresholds keep every entry tied with the threshold.
`conventions: mergekit` follows mergekit 0.1.5 instead (max(1, int(density · n)) entries, exactly; a sign sum
of 0 elects +; disjoint means divided by the agreeing weights; DARE rescaled to the L1 norm): see README.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal, TypeVar

import numpy as np
import torch
from torch import Tensor

from evomerge.errors import EvomergeError
from evomerge.merge.base import (
    MERGE_METHODS,
    CheckedOptions,
    Conventions,
    MergeContext,
    Merger,
    TensorGroup,
    field_path,
    weighted_sum,
)
from evomerge.schema import require

Sparsify = Literal["none", "magnitude", "random", "outliers"]
Consensus = Literal["none", "elect"]
Aggregate = Literal["sum", "mean", "disjoint_mean"]
Scope = Literal["tensor", "model"]

_FUZZ = 1e-12  # so that 0.3 · 10 = 3.0000000000000004 counts as 3


def keep_count(density: float, n: int, conventions: Conventions = "evomerge") -> int:
    """How many entries a density keeps: ceil(density · n), or mergekit's int(density · n) (every entry at
    density >= 1); at least one of a non-empty tensor."""
    if conventions == "mergekit":
        return min(n, max(1, int(density * n))) if n else 0
    return min(n, max(1, math.ceil(density * n * (1 - _FUZZ)))) if n else 0


def drop_count(gamma: float, n: int) -> int:
    """How many top outliers a gamma drops: floor(gamma · n)."""
    return min(n, math.floor(gamma * n * (1 + _FUZZ)))


def magnitude_threshold(magnitudes: Tensor, density: float) -> float:
    """The k-th largest magnitude, k = keep_count(density, n); keeping |τ| ≥ it keeps the top-k fraction."""
    flat = magnitudes.reshape(-1)
    n = flat.numel()
    if n == 0:
        return math.inf
    rank = n - keep_count(density, n)  # 0-based rank of the threshold in ascending order
    if flat.device.type == "cpu":  # numpy's introselect is linear time, torch.kthvalue far slower on CPU
        return float(np.partition(flat.detach().to(torch.float32).numpy(), rank)[rank])
    return float(torch.kthvalue(flat, rank + 1).values)


def global_magnitude_thresholds(task_vectors: Iterable[Sequence[Tensor]], density: float | list[float]) -> list[float]:
    """Per-task thresholds over the whole model, exact: collects every |τ_i| (fine for in-memory merges).

    `task_vectors` yields, per tensor name, one task-vector tensor per task.
    """
    collected: list[list[Tensor]] = []
    for taus in task_vectors:
        collected = collected or [[] for _ in taus]
        for bucket, tau in zip(collected, taus):
            bucket.append(tau.detach().abs().reshape(-1).to(torch.float32))
    return [magnitude_threshold(torch.cat(bucket), for_task(density, k)) for k, bucket in enumerate(collected)]


def sparsify_magnitude(tau: Tensor, density: float, threshold: float | None = None) -> Tensor:
    """TIES trim: keep the entries with |τ| ≥ threshold (the tensor's own top-k threshold when None)."""
    magnitude = tau.abs()
    if threshold is None:
        threshold = magnitude_threshold(magnitude, density)
    return tau.masked_fill(magnitude < threshold, 0.0)


def dare_generator(seed: int, task: int, name: str) -> torch.Generator:
    """A CPU generator fixed by (seed, task index, tensor name); crc32 because Python's hash() is salted."""
    state = np.random.SeedSequence([seed, task, zlib.crc32(name.encode())]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def dare_mask(shape: Sequence[int], drop_rate: float, seed: int, task: int, name: str) -> Tensor:
    """DARE's keep mask (True = kept); drawn on the CPU so that it is the same on every device."""
    return torch.rand(tuple(shape), generator=dare_generator(seed, task, name)) >= drop_rate


def sparsify_top_k(tau: Tensor, k: int) -> Tensor:
    """mergekit's TIES trim: exactly the k largest |τ|, ties broken by position (a stable sort's order)."""
    return _keep_band(tau, 0, k)


def sparsify_random(
    tau: Tensor, drop_rate: float, keep: Tensor, rescale: Literal["inverse", "l1"] = "inverse"
) -> Tensor:
    """DARE: zero the dropped entries and rescale the survivors to keep the expectation, by 1/(1 − p), or (mergekit)
    by |τ|₁ / |kept τ|₁, left unscaled when either norm is below 1e-7."""
    if rescale == "inverse":
        return torch.where(keep.to(tau.device), tau / (1.0 - drop_rate), torch.zeros_like(tau))
    kept = tau * keep.to(tau.device)
    before, after = tau.abs().sum(), kept.abs().sum()
    return kept if before < 1e-7 or after < 1e-7 else kept * (before / after)


def sparsify_outliers(tau: Tensor, density: float, gamma: float) -> Tensor:
    """Model Breadcrumbs: drop the largest gamma fraction of |τ| and the smallest, keeping a `density` band.

    Ranks come from a stable sort, so ties are broken by position and the band has exactly the counted size.
    """
    n = tau.numel()
    return _keep_band(tau, drop_count(gamma, n), keep_count(density, n))


def _keep_band(tau: Tensor, start: int, count: int) -> Tensor:
    """τ with only the entries ranked start .. start + count − 1 by descending |τ| (stable ranks) kept."""
    flat = tau.reshape(-1)
    band = torch.sort(flat.abs(), descending=True, stable=True).indices[start : start + count]
    out = torch.zeros_like(flat)
    out[band] = flat[band]
    return out.reshape(tau.shape)


def elect_signs(taus: Tensor, conventions: Conventions = "evomerge") -> Tensor:
    """TIES sign election on stacked task vectors: sign(Σ_i τ_i) per coordinate (0 where the sum is 0, where
    mergekit elects +)."""
    total = taus.sum(dim=0)
    if conventions == "mergekit":
        return torch.where(total >= 0, 1.0, -1.0).to(taus.dtype)
    return torch.sign(total)


def aggregate(
    taus: Tensor, mode: Aggregate, signs: Tensor | None = None, weights: Sequence[float] | None = None
) -> Tensor:
    """Combine stacked task vectors; with `signs`, only entries agreeing with the elected sign take part.

    `disjoint_mean` divides by the number of non-zero (agreeing) entries per coordinate, as in TIES, or, given the
    models' `weights` (mergekit), by the sum of the agreeing models' weights (1 where that sum is 0).
    """
    if signs is not None:
        agree = (taus * signs) > 0  # zero entries never agree: they add nothing and are not counted
        taus = taus * agree
    else:
        agree = taus != 0
    if mode == "sum":
        return taus.sum(dim=0)
    if mode == "mean":
        return taus.mean(dim=0)
    if weights is None:
        return taus.sum(dim=0) / agree.sum(dim=0).clamp(min=1)
    w = torch.tensor(weights, dtype=taus.dtype, device=taus.device).view(-1, *[1] * (taus.dim() - 1))
    divisor = (agree * w).sum(dim=0)
    return taus.sum(dim=0) / torch.where(divisor == 0, 1.0, divisor)


def per_task_values(value: float | list[float]) -> list[float]:
    return list(value) if isinstance(value, list) else [value]


def for_task(value: float | list[float], task: int) -> float:
    """A knob's value for task `task`: the one value, or the task's entry of a per-task list."""
    if not isinstance(value, list):
        return value
    if task >= len(value):
        raise EvomergeError(f"a per-task list has {len(value)} values but task {task} was merged")
    return value[task]


def depth_scale(alpha: float, beta: float, layer: int | None, num_layers: int | None, name: str = "") -> float:
    """LiNeS: λ(l) = α + β · l/(L − 1); tensors outside the layer stack (embeddings, heads) get α."""
    if layer is None or beta == 0:
        return alpha
    if num_layers is None:
        raise EvomergeError(f"tensor {name!r} is in layer {layer} but num_layers was not given")
    if not 0 <= layer < num_layers:
        raise EvomergeError(f"tensor {name!r} is in layer {layer}, outside 0..{num_layers - 1}")
    return alpha + beta * (layer / (num_layers - 1) if num_layers > 1 else 0.0)


@dataclass
class Pipeline(CheckedOptions):
    """Every stage of the task-vector pipeline; registered as `task_vectors`, and what each preset builds.

    `scale` is λ (LiNeS's α); with `beta` ≠ 0 the scale grows with depth as λ(l) = scale + beta · l/(L − 1).
    `weights` multiply each τ_i after sparsification, before sign election. `conventions: mergekit` counts, elects
    and rescales as mergekit 0.1.5 does (module docstring).
    """

    sparsify: Sparsify = "none"
    density: float | list[float] = 0.2  # one value, or one per task
    drop_rate: float | list[float] = 0.9
    gamma: float = 0.01
    seed: int = 0
    scope: Scope = "tensor"
    consensus: Consensus = "none"
    aggregate: Aggregate = "sum"
    weights: list[float] | None = None
    scale: float = 1.0
    beta: float = 0.0
    conventions: Conventions = "evomerge"

    def check(self, path: str) -> None:
        super().check(path)
        self.check_consistency(path)

    def check_consistency(self, path: str) -> None:
        """Rules between fields, shared by the presets (whose fields carry the same names)."""
        if self.sparsify == "outliers":
            require(
                max(per_task_values(self.density)) + self.gamma <= 1,
                field_path(path, "density"),
                f"got {self.density} with gamma {self.gamma}; density + gamma must be <= 1",
            )
        if self.scope == "model":
            require(
                self.sparsify == "magnitude",
                field_path(path, "scope"),
                f"'model' needs sparsify 'magnitude', got {self.sparsify!r}",
            )
        if self.conventions == "mergekit":
            require(self.scope == "tensor", field_path(path, "scope"), "mergekit's conventions are per tensor")
            require(
                self.sparsify != "outliers",
                field_path(path, "conventions"),
                "mergekit's breadcrumbs conventions are not implemented; use evomerge's",
            )

    def sparsified(self, task: int, name: str, tau: Tensor, context: MergeContext, method: str) -> Tensor:
        if not tau.any():  # a zero task vector stays zero under every sparsifier; skip the sort or the mask
            return tau
        density, drop_rate = for_task(self.density, task), for_task(self.drop_rate, task)
        mergekit = self.conventions == "mergekit"
        if self.sparsify == "magnitude" and mergekit:
            return sparsify_top_k(tau, keep_count(density, tau.numel(), "mergekit"))
        if self.sparsify == "magnitude":
            return sparsify_magnitude(tau, density, self._threshold(task, name, context, method))
        if self.sparsify == "random":
            keep = dare_mask(tau.shape, drop_rate, self.seed, task, name)
            return sparsify_random(tau, drop_rate, keep, "l1" if mergekit else "inverse")
        if self.sparsify == "outliers":
            return sparsify_outliers(tau, density, self.gamma)
        return tau

    def _threshold(self, task: int, name: str, context: MergeContext, method: str) -> float | None:
        if self.scope == "tensor":
            return None
        if context.model_stats is None:
            raise EvomergeError(
                f"method {method!r} with scope 'model' needs model-wide thresholds for {name!r}: "
                "run Merger.prepare over all tensors first (merge_state_dicts does)"
            )
        return context.model_stats[task]

    def merge(self, method: str, name: str, base: Tensor, tensors: list[Tensor], context: MergeContext) -> Tensor:
        for knob in ("density", "drop_rate"):
            value = getattr(self, knob)
            if isinstance(value, list) and len(value) != len(tensors):
                raise EvomergeError(f"method {method!r}: got {len(value)} {knob} values for {len(tensors)} models")
        if self.is_linear:
            return weighted_sum([base, *tensors], self.linear_weights(name, len(tensors), context))
        if all(torch.equal(t, base) for t in tensors):  # e.g. embeddings every fine-tune froze: nothing to trim
            return base.clone()
        lam = depth_scale(self.scale, self.beta, context.layer, context.num_layers, name)
        # one task vector at a time: only the sparsified ones are held together (a worker's peak is per tensor)
        taus = torch.stack([self.sparsified(i, name, t - base, context, method) for i, t in enumerate(tensors)])
        if self.weights is not None:
            taus = taus * torch.tensor(self.weights, dtype=taus.dtype, device=taus.device).view(-1, *[1] * base.dim())
        signs = elect_signs(taus, self.conventions) if self.consensus == "elect" else None
        weights = (self.weights or [1.0] * len(tensors)) if self.conventions == "mergekit" else None
        return base + lam * aggregate(taus, self.aggregate, signs, weights)

    @property
    def is_linear(self) -> bool:
        """No per-entry stage: θ0 + λ Σ c_i (θ_i − θ0) is one weighted sum of the inputs, with no task vector built."""
        return self.sparsify == "none" and self.consensus == "none" and self.aggregate in ("sum", "mean")

    def linear_weights(self, name: str, count: int, context: MergeContext) -> list[float]:
        """The weights of [θ0, *θ_i] in that sum."""
        lam = depth_scale(self.scale, self.beta, context.layer, context.num_layers, name)
        c = [lam * w for w in (self.weights or [1.0] * count)]
        if self.aggregate == "mean":
            c = [v / count for v in c]
        return [1.0 - sum(c), *c]

    def prepare(self, groups: Iterable[TensorGroup]) -> list[float]:
        return global_magnitude_thresholds(([t - g.base for t in g.tensors] for g in groups), self.density)

    def merger(self, method: str, options: object) -> Merger:
        def kernel(name: str, base: Tensor | None, tensors: list[Tensor], context: MergeContext) -> Tensor:
            assert base is not None  # Merger checks needs_base first
            return self.merge(method, name, base, tensors, context)

        two_pass = self.sparsify == "magnitude" and self.scope == "model"
        prepare = self.prepare if two_pass else None
        linear_fn = self.linear_weights if self.is_linear else None
        return Merger(
            method,
            kernel,
            needs_base=True,
            weights=self.weights,
            prepare_fn=prepare,
            options=options,
            linear_fn=linear_fn,
        )


@dataclass(kw_only=True)
class _Preset(CheckedOptions):
    """A named method: a fixed choice of stages, exposing only the knobs that method has.

    A preset's fields that carry a `Pipeline` field's name pass through unchanged; `fixed` (set by `@preset`)
    holds the stages the method does not let the user choose, and `stages()` derives what is named differently.
    """

    method: ClassVar[str]
    fixed: ClassVar[dict[str, object]]
    weights: list[float] | None = None

    def stages(self) -> dict[str, object]:
        return dict(self.fixed)

    def pipeline(self) -> Pipeline:
        shared = {f.name for f in dataclasses.fields(Pipeline)}
        knobs = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in shared}
        return Pipeline(**{**knobs, **self.stages()})  # type: ignore[arg-type]

    def check(self, path: str) -> None:
        super().check(path)
        self.pipeline().check_consistency(path)


def build_task_vector_method(options: _Preset | Pipeline) -> Merger:
    """The one factory of the family: a preset becomes its pipeline, the pipeline becomes a Merger."""
    if isinstance(options, Pipeline):
        return options.merger("task_vectors", options)
    return options.pipeline().merger(options.method, options)


P = TypeVar("P", bound=type[_Preset])


def preset(method: str, summary: str, **fixed: object) -> Callable[[P], P]:
    """Register an options class as the named method `method`, with the pipeline stages in `fixed`."""

    def register(cls: P) -> P:
        cls.method, cls.fixed = method, fixed
        MERGE_METHODS.register(method, cls, summary)(build_task_vector_method)
        return cls

    return register


MERGE_METHODS.register("task_vectors", Pipeline, "sparsify → sign consensus → aggregate → scale, every stage open")(
    build_task_vector_method
)


@dataclass(kw_only=True)
class _ScaledPreset(_Preset):
    """Presets with one constant λ on the merged task vector."""

    scale: float = 1.0


@preset("task_arithmetic", "θ0 + Σ λ_i τ_i")
@dataclass(kw_only=True)
class TaskArithmeticOptions(_ScaledPreset):
    pass


@preset("ties", "TIES: trim to top-k |τ|, elect signs, disjoint mean", sparsify="magnitude", consensus="elect")
@dataclass(kw_only=True)
class TiesOptions(_ScaledPreset):
    """`aggregate: mean` is TIES's disjoint mean over the entries that agree with the elected sign."""

    density: float | list[float] = 0.2
    scope: Scope = "tensor"
    aggregate: Literal["mean", "sum"] = "mean"
    conventions: Conventions = "evomerge"

    def stages(self) -> dict[str, object]:
        return {**self.fixed, "aggregate": "disjoint_mean" if self.aggregate == "mean" else "sum"}


@preset("dare", "DARE: drop τ entries with probability p, rescale by 1/(1 − p)", sparsify="random")
@dataclass(kw_only=True)
class DareOptions(_ScaledPreset):
    """`consensus: elect` gives DARE-TIES; the mask is fixed by (seed, task index, tensor name)."""

    drop_rate: float | list[float] = 0.9
    seed: int = 0
    consensus: Consensus = "none"
    aggregate: Aggregate = "sum"
    conventions: Conventions = "evomerge"


@preset("breadcrumbs", "Model Breadcrumbs: drop the top gamma and the small entries of |τ|", sparsify="outliers")
@dataclass(kw_only=True)
class BreadcrumbsOptions(_ScaledPreset):
    """Keeps the `density` band of |τ| below the top `gamma` outliers (density + gamma <= 1)."""

    density: float | list[float] = 0.9
    gamma: float = 0.01


@preset("lines", "LiNeS: task vectors scaled by α + β · depth")
@dataclass(kw_only=True)
class LinesOptions(_Preset):
    """LiNeS on a task-arithmetic merge: shallow layers keep less of the task vectors than deep ones."""

    alpha: float
    beta: float
    aggregate: Aggregate = "sum"

    def stages(self) -> dict[str, object]:
        return {**self.fixed, "scale": self.alpha}
