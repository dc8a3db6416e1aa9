"""What every merge method shares: the registry, input checks, the dtype round trip and state-dict merging.

A method is a per-tensor kernel `(name, base, tensors, context) -> Tensor` on float32 tensors. `Merger` wraps a
kernel with everything that must behave the same for all methods (base and model count, weight count, shapes,
non-finite values, dtype preserved), so a method writes only its arithmetic. Methods whose statistics span the
whole model (TIES with `scope: model`, whole-model SLERP) declare a `prepare` pass, which the merge engine
(`engine.py`) runs before the tensors are merged.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from evomerge.errors import EvomergeError, ShapeMismatchError
from evomerge.registry import Component, Registry
from evomerge.schema import ChecksItself, require
from evomerge.weights.blocks import layer_index

MERGE_METHODS: Registry = Registry("merge method")

# Whose counting and edge-case rules a method follows: ours, or mergekit 0.1.5's (README, "mergekit conventions").
Conventions = Literal["evomerge", "mergekit"]

# Allowed ranges of option fields, by field name, written as they appear in error messages.
RANGES: dict[str, str] = {
    "density": "(0, 1]",
    "drop_rate": "[0, 1)",
    "gamma": "[0, 1)",
    "t": "[0, 1]",
    "seed": "[0, inf)",
    "epsilon": "(0, inf)",
    "scale": "(-inf, inf)",
    "alpha": "(-inf, inf)",
    "beta": "(-inf, inf)",
}


def field_path(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def check_interval(value: float, path: str, interval: str) -> None:
    """Raise `SpecError` unless `value` lies in `interval`, e.g. "(0, 1]"; one string gives test and message."""
    low, high = (float(bound) for bound in interval[1:-1].split(","))
    above = value > low if interval[0] == "(" else value >= low
    below = value < high if interval[-1] == ")" else value <= high
    require(above and below, path, f"got {value}, must be in {interval}")


class CheckedOptions:
    """Mixin for options dataclasses: checks every field named in `RANGES` and the per-model `weights`."""

    def check(self, path: str) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.name in RANGES and isinstance(value, list):
                for i, item in enumerate(value):
                    check_interval(item, f"{field_path(path, f.name)}[{i}]", RANGES[f.name])
            elif f.name in RANGES:
                check_interval(value, field_path(path, f.name), RANGES[f.name])
        for i, w in enumerate(getattr(self, "weights", None) or []):
            require(math.isfinite(w), f"{field_path(path, 'weights')}[{i}]", f"got {w}, must be a finite number")


class TensorGroup(NamedTuple):
    """One tensor name with the base's tensor (or None) and the fine-tuned models' tensors."""

    name: str
    base: Tensor | None
    tensors: Sequence[Tensor]


@dataclass
class MergeContext:
    """What a kernel may need beyond the tensors: depth (LiNeS), Fisher tensors, model-wide statistics."""

    layer: int | None = None
    num_layers: int | None = None
    fisher: Sequence[Tensor] | None = None
    model_stats: Any = None


Kernel = Callable[[str, Tensor | None, list[Tensor], MergeContext], Tensor]
Prepare = Callable[[Iterable[TensorGroup]], Any]


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def label_of(index: int | None) -> str:
    return "the base model" if index is None else f"models[{index}]"


def check_tensor(name: str, tensor: Tensor, who: str, shape: tuple[int, ...] | None = None) -> None:
    """Shape against `shape` (when given) and finiteness of one input tensor; `who` names its owner."""
    if shape is not None and _shape(tensor) != shape:
        raise ShapeMismatchError(f"tensor {name!r}: {who} has shape {_shape(tensor)}, expected {shape}")
    # one cheap reduction first: a sum is finite unless an entry is not (or the sum overflows)
    if tensor.is_floating_point() and not math.isfinite(float(tensor.sum())) and not bool(torch.isfinite(tensor).all()):
        kind = "nan" if bool(torch.isnan(tensor).any()) else "inf"
        raise EvomergeError(f"tensor {name!r} of {who} has a non-finite value ({kind})")


def weighted_sum(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Σ w_i t_i accumulated in place, so only one extra tensor is alive however many models there are."""
    out = torch.mul(tensors[0], float(weights[0]))
    for w, t in zip(weights[1:], tensors[1:]):
        out.add_(t, alpha=float(w))
    return out


# Elements per step of `weighted_sum_into`: the float32 partial sums stay in cache (CPU) or in L2 (GPU), so memory
# traffic is one read of each input and one write of the output, as close to a plain copy as the sum allows.
SUM_CHUNK = {"cpu": 1 << 16, "cuda": 1 << 22}


def sum_scratch(device: torch.device | str) -> Tensor:
    """The float32 buffer `weighted_sum_into` works in on `device`."""
    device = torch.device(device)
    return torch.empty(SUM_CHUNK.get(device.type, 1 << 20), dtype=torch.float32, device=device)


def weighted_sum_into(out: Tensor, tensors: Sequence[Tensor], weights: Sequence[float], scratch: Tensor) -> Tensor:
    """out ← Σ w_i t_i, in float32 arithmetic whatever the dtypes, written in out's dtype a chunk at a time through
    `scratch` (see `sum_scratch`): nothing is allocated, so a candidate costs no memory beyond its buffers."""
    flat_out = out.view(-1)
    flats = [t.reshape(-1) for t in tensors]
    step = scratch.numel()
    with torch.no_grad():
        for start in range(0, flat_out.numel(), step):
            end = min(start + step, flat_out.numel())
            acc = scratch[: end - start]
            acc.copy_(flats[0][start:end]).mul_(float(weights[0]))
            for w, flat in zip(weights[1:], flats[1:]):
                acc.add_(flat[start:end], alpha=float(w))
            flat_out[start:end].copy_(acc)
    return out


@dataclass(frozen=True)
class Merger:
    """A built merge method: call it per tensor; it checks inputs and returns the dtype it was given."""

    method: str
    kernel: Kernel
    needs_base: bool = False
    min_models: int = 1
    max_models: int | None = None
    weights: Sequence[float] | None = None
    prepare_fn: Prepare | None = None
    options: Any = None
    # For methods whose result is a weighted sum of their inputs ([base, *models], or the models): the weights of
    # one tensor, so that a candidate is summed straight into its buffer (`MergeEngine.merged(out=...)`).
    linear_fn: Callable[[str, int, MergeContext], list[float]] | None = None

    @property
    def needs_prepare(self) -> bool:
        return self.prepare_fn is not None

    def check_models(self, has_base: bool, count: int) -> None:
        """Errors that depend only on what was given, raised before any tensor is read."""
        if self.needs_base and not has_base:
            raise EvomergeError(f"method {self.method!r} needs a base model")
        if count < self.min_models:
            raise EvomergeError(f"method {self.method!r} needs at least {self.min_models} models, got {count}")
        if self.max_models is not None and count > self.max_models:
            raise EvomergeError(f"method {self.method!r} takes at most {self.max_models} models, got {count}")
        if self.weights is not None and len(self.weights) != count:
            raise EvomergeError(f"method {self.method!r}: got {len(self.weights)} weights for {count} models")

    def _float32(self, name: str, base: Tensor | None, tensors: Sequence[Tensor]) -> TensorGroup:
        self.check_models(base is not None, len(tensors))
        shape = _shape(_reference(base, tensors))
        if base is not None:
            check_tensor(name, base, label_of(None))
        for i, t in enumerate(tensors):
            check_tensor(name, t, label_of(i), shape)
        as32 = [t.detach().to(torch.float32) for t in tensors]
        return TensorGroup(name, None if base is None else base.detach().to(torch.float32), as32)

    def linear_weights(
        self, name: str, base: Tensor | None, tensors: Sequence[Tensor], context: MergeContext
    ) -> list[float] | None:
        """The weights of [base, *tensors] (or of the tensors, without a base) whose sum this merge is, if it is one."""
        if self.linear_fn is None or not _reference(base, tensors).is_floating_point():
            return None
        self.check_models(base is not None, len(tensors))
        return self.linear_fn(name, len(tensors), context)

    def prepare(self, groups: Iterable[TensorGroup]) -> Any:
        """The model-wide statistics of a two-pass method (None for the others); floating tensors only."""
        if self.prepare_fn is None:
            return None
        return self.prepare_fn(self._float32(*g) for g in groups if _reference(g.base, g.tensors).is_floating_point())

    def __call__(
        self, name: str, base: Tensor | None, tensors: Sequence[Tensor], context: MergeContext | None = None
    ) -> Tensor:
        if tensors and not _reference(base, tensors).is_floating_point():
            return _pass_through(name, base, tensors)
        base32, tensors32 = self._float32(name, base, tensors)[1:]
        with torch.no_grad():
            out = self.kernel(name, base32, list(tensors32), context or MergeContext())
        return out.to(_reference(base, tensors).dtype)


def _reference(base: Tensor | None, tensors: Sequence[Tensor]) -> Tensor:
    """The tensor whose shape and dtype the others must match: the base's, else the first model's."""
    return base if base is not None else tensors[0]


def _pass_through(name: str, base: Tensor | None, tensors: Sequence[Tensor]) -> Tensor:
    """Integer and bool buffers (position ids, masks) are not merged; they must agree across models."""
    reference = _reference(base, tensors)
    for i, t in enumerate(tensors):
        if _shape(t) != _shape(reference) or not torch.equal(t, reference):
            raise EvomergeError(
                f"tensor {name!r} has dtype {reference.dtype} and differs in {label_of(i)}; "
                "only floating-point tensors can be merged"
            )
    return reference.clone()


def as_merger(method: Merger | Component | Mapping[str, Any] | str | Kernel, path: str = "merge") -> Merger:
    """A Merger from a built one, a resolved Component, a `{name: ..., **options}` block or a plain kernel."""
    if isinstance(method, Merger):
        return method
    if isinstance(method, (str, Mapping)):
        method = MERGE_METHODS.resolve(method if isinstance(method, str) else dict(method), path)
    if isinstance(method, Component):
        if isinstance(method.options, ChecksItself):
            method.options.check(path)
        return MERGE_METHODS.build(method)
    if callable(method):
        return Merger(getattr(method, "__name__", "custom"), method)
    raise TypeError(f"cannot make a merge method of {method!r}")


def merge_tensor(
    method: Merger | Component | Mapping[str, Any] | str,
    name: str,
    base: Tensor | None,
    tensors: Sequence[Tensor],
    context: MergeContext | None = None,
) -> Tensor:
    """Merge one tensor with a named method; convenient for tests and one-off calls."""
    return as_merger(method)(name, base, tensors, context)


def layer_index_from_name(name: str) -> int | None:
    """Transformer block index in names like `model.layers.3.mlp.weight` or `h.3.attn`; None elsewhere."""
    return layer_index(name)


def check_same_layout(reference: Mapping[str, Tensor], ref_label: str, others: Sequence[tuple[str, Mapping]]) -> None:
    """ShapeMismatchError naming the first tensor (in the reference's order) that is missing or shaped otherwise."""
    for name, tensor in reference.items():
        for label, other in others:
            if name not in other:
                raise ShapeMismatchError(
                    f"tensor {name!r}: {ref_label} has shape {_shape(tensor)}, {label} has no such tensor"
                )
            if _shape(other[name]) != _shape(tensor):
                raise ShapeMismatchError(
                    f"tensor {name!r}: {ref_label} has shape {_shape(tensor)}, {label} has shape {_shape(other[name])}"
                )
    for label, other in others:
        for name, tensor in other.items():
            if name not in reference:
                raise ShapeMismatchError(
                    f"tensor {name!r}: {label} has shape {_shape(tensor)}, {ref_label} has no such tensor"
                )
