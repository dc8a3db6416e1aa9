"""The seed models as named tensors in their own dtype: what every space merges.

On the driver they stay in their checkpoints and are read a tensor at a time (Gram matrices, a best model
streamed to a file). A worker makes them resident once, on its evaluator's device, and writes every candidate
into one set of buffers there. Only the `weights` space turns them into flat float32 vectors, for small models.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from evomerge.errors import EvomergeError, ShapeMismatchError
from evomerge.weights.checkpoint import Checkpoint
from evomerge.weights.layout import Layout

Read = Callable[[str], Tensor]
Slice = Callable[[str, int, int], Tensor]

LARGEST_BUFFER_SHARE = 0.2  # besides one model's buffers, a candidate needs float32 scratch for its largest tensor


class SeedModels:
    def __init__(
        self,
        layout: Layout,
        readers: Sequence[Read],
        labels: Sequence[str],
        dtypes: dict[str, torch.dtype],
        device: torch.device | None = None,
        slicers: Sequence[Slice] | None = None,
    ):
        self.layout = layout
        self._readers = list(readers)
        self._slicers = list(slicers) if slicers is not None else [_slicer(r) for r in self._readers]
        self.labels = list(labels)  # where each seed comes from, for messages
        self.dtypes = dtypes
        self.device = device  # None while the tensors stay in their files

    @classmethod
    def from_tensors(
        cls, models: Sequence[dict[str, Tensor]], layout: Layout, labels: Sequence[str] = ()
    ) -> SeedModels:
        """Seeds already in memory (evomerge made them, or a test did)."""
        labels = list(labels) or [f"seed model {k}" for k in range(len(models))]
        for model, label in zip(models, labels):
            _check_names(layout, model, label)
        dtypes = {name: models[0][name].dtype for name in layout.names}
        _check_dtypes(dtypes, [{n: m[n].dtype for n in layout.names} for m in models], labels)
        readers = [model.__getitem__ for model in models]
        device = models[0][layout.names[0]].device if layout.names else torch.device("cpu")
        return cls(layout, readers, labels, dtypes, device)

    @classmethod
    def from_vectors(cls, vectors: Sequence[np.ndarray], layout: Layout) -> SeedModels:
        return cls.from_tensors([layout.views(np.ascontiguousarray(v, dtype=np.float32)) for v in vectors], layout)

    @classmethod
    def from_files(
        cls, paths: Sequence[str | Path], order: Sequence[str] | None = None, expected: Layout | None = None
    ) -> SeedModels:
        """Checkpoints opened lazily (safetensors files or HF folders, sharded or not), checked against each other
        and against `expected` (the evaluator's names and shapes) from their headers alone. Tensors go in `order`
        (as recorded when the run started), else in natural order (`layers.2` before `layers.10`), so that every
        process of a run sees the same flat order whatever it holds."""
        checkpoints = [Checkpoint.open(p) for p in paths]
        labels = [str(c.path) for c in checkpoints]
        first = checkpoints[0]
        names = list(order) if order is not None else natural_order(_floating(first))
        present = set(first.names())
        layout = Layout(tuple(names), tuple(first.shape(n) if n in present else () for n in names))
        for checkpoint, label in zip(checkpoints, labels):
            shapes = {n: checkpoint.shape(n) for n in _floating(checkpoint)}
            if expected is not None:
                _check_names(expected, shapes, label)
            else:
                _check_names(layout, shapes, label, f"{labels[0]} has")
        dtypes = {name: first.dtype(name) for name in layout.names}
        _check_dtypes(dtypes, [{n: c.dtype(n) for n in layout.names} for c in checkpoints], labels)
        return cls(layout, [c.read for c in checkpoints], labels, dtypes, slicers=[c.read_range for c in checkpoints])

    def __len__(self) -> int:
        return len(self._readers)

    def tensor(self, k: int, name: str) -> Tensor:
        """Seed k's tensor `name`, in its dtype (on the resident device, or fresh from its file)."""
        return self._readers[k](name)

    def slice(self, k: int, name: str, start: int, end: int) -> Tensor:
        """Elements [start, end) of seed k's flattened tensor `name`; from a file, only those bytes are read."""
        return self._slicers[k](name, start, end)

    def flat(self, k: int) -> np.ndarray:
        """Seed k as one float32 vector (the `weights` space; small models only)."""
        return self.layout.flatten({n: self.tensor(k, n).cpu() for n in self.layout.names}, source=self.labels[k])

    def nbytes(self) -> int:
        """One model's bytes in its dtypes."""
        return sum(math.prod(s) * self.dtypes[n].itemsize for n, s in zip(self.layout.names, self.layout.shapes))

    def resident(self, device: torch.device | str = "cpu") -> SeedModels:
        """Every seed read once onto `device` in its dtype, after checking that they and one candidate fit there."""
        device = torch.device(device)
        check_device_memory(device, len(self) * self.nbytes(), self.nbytes(), self.labels)
        models = [{n: self.tensor(k, n).to(device) for n in self.layout.names} for k in range(len(self))]
        return SeedModels.from_tensors(models, self.layout, self.labels)

    def allocate(self, device: torch.device | str | None = None) -> dict[str, Tensor]:
        """One set of uninitialised parameter buffers shaped and typed like the seeds: where candidates go."""
        device = torch.device(device) if device is not None else (self.device or torch.device("cpu"))
        return {
            name: torch.empty(shape, dtype=self.dtypes[name], device=device)
            for name, shape in zip(self.layout.names, self.layout.shapes)
        }


def _slicer(read: Read) -> Slice:
    return lambda name, start, end: read(name).reshape(-1)[start:end]


def _floating(checkpoint: Checkpoint) -> list[str]:
    """The tensors a merge is about: integer and bool buffers (position ids, masks) are left to the model's code."""
    return [n for n in checkpoint.names() if checkpoint.dtype(n).is_floating_point]


def natural_order(names: Sequence[str]) -> list[str]:
    """Names sorted with their numbers compared as numbers: a model's layers in depth order."""
    return sorted(names, key=lambda n: [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", n)])


def write_tensors(tensors: Iterator[tuple[str, Tensor]], out: dict[str, Tensor]) -> dict[str, Tensor]:
    """Copy merged tensors into `out` as they come (casting to its dtype), so one merged tensor is alive at a time."""
    with torch.no_grad():
        for name, tensor in tensors:
            out[name].copy_(tensor)
    return out


def check_device_memory(device: torch.device, seeds_bytes: int, model_bytes: int, labels: Sequence[str]) -> None:
    """Refuse, before the first evaluation, seeds that cannot all be resident on a GPU with room for one candidate."""
    if device.type != "cuda":
        return
    free, total = torch.cuda.mem_get_info(device)
    needed = seeds_bytes + int(model_bytes * (1 + LARGEST_BUFFER_SHARE))
    if needed > free:
        gib = 2**30
        raise EvomergeError(
            f"{len(labels)} seed models of {model_bytes / gib:.2f} GiB each ({', '.join(labels)}) and one candidate "
            f"need {needed / gib:.1f} GiB on {device}, which has {free / gib:.1f} GiB free of {total / gib:.1f} GiB; "
            "use fewer seed models, a GPU with more memory, or the CPU"
        )


def _check_names(layout: Layout, shapes_or_tensors: dict, label: str, reference: str = "the model needs") -> None:
    """Same names and shapes as the layout; names the first difference, the file and both shapes."""
    for name, shape in zip(layout.names, layout.shapes):
        if name not in shapes_or_tensors:
            raise ShapeMismatchError(f"{label} has no tensor {name!r} (expected shape {tuple(shape)})")
        got = shapes_or_tensors[name]
        got = tuple(got.shape) if isinstance(got, Tensor) else tuple(got)
        if got != tuple(shape):
            raise ShapeMismatchError(f"{label}: tensor {name!r} has shape {got}, expected {tuple(shape)} ({reference})")
    extra = sorted(set(shapes_or_tensors) - set(layout.names))
    if extra:
        raise ShapeMismatchError(f"{label} has tensor {extra[0]!r} that the model does not have")


def _check_dtypes(reference: dict[str, torch.dtype], others: list[dict[str, torch.dtype]], labels: list[str]) -> None:
    for other, label in zip(others[1:], labels[1:]):
        for name, dtype in reference.items():
            if other[name] != dtype:
                raise ShapeMismatchError(
                    f"{label}: tensor {name!r} is {str(other[name]).removeprefix('torch.')}, but "
                    f"{str(dtype).removeprefix('torch.')} in {labels[0]}; seed models must share their dtypes "
                    "(convert one to the others' dtype)"
                )


def as_seed_models(seeds: SeedModels | Sequence[np.ndarray], layout: Layout) -> SeedModels:
    """Seeds as given to a space: SeedModels, or flat float32 vectors (small models built in memory)."""
    return seeds if isinstance(seeds, SeedModels) else SeedModels.from_vectors(seeds, layout)
