"""safetensors I/O for flat parameter vectors. Weights are never pickled."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from evomerge.errors import EvomergeError
from evomerge.store.atomic import atomic_write_bytes, reporting_full_disk
from evomerge.weights.layout import Layout
from evomerge.weights.safetensors_stream import SafetensorsWriter


class TensorSource(Protocol):
    """A space, as far as writing one of its candidates goes."""

    layout: Layout

    def tensors(self, genome: np.ndarray) -> Iterator[tuple[str, torch.Tensor]]: ...


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write atomically (temp file + rename), so a crash or a full disk never leaves a half-written model.

    The file is built in memory first: these are seed, best and cached task models, never large checkpoints
    (those stream through `write_checkpoint`)."""
    data = save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, metadata=metadata or {})
    atomic_write_bytes(path, data)


def save_flat(path: str | Path, flat: np.ndarray, layout: Layout, metadata: dict[str, str] | None = None) -> None:
    save_tensors(path, layout.views(np.ascontiguousarray(flat, dtype=np.float32)), metadata)


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise EvomergeError(f"model file {str(path)!r} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise EvomergeError(f"cannot read {str(path)!r} as safetensors: {err}") from err


def load_flat(path: str | Path, layout: Layout) -> np.ndarray:
    return layout.flatten(load_tensors(path), source=str(path))


def write_model(
    path: str | Path,
    space: TensorSource,
    genome: np.ndarray,
    dtypes: Mapping[str, torch.dtype],
    metadata: dict[str, str] | None = None,
) -> None:
    """Stream a candidate into one safetensors file a tensor at a time, each in the seeds' dtype (float32 where
    none is recorded), atomically: a best model is never held whole in the driver."""
    layout: Layout = space.layout
    entries = [(n, tuple(s), dtypes.get(n, torch.float32)) for n, s in zip(layout.names, layout.shapes)]
    with reporting_full_disk(path):
        writer = SafetensorsWriter(path, entries, metadata)
        try:
            for name, tensor in space.tensors(genome):
                writer.write(name, tensor.to(dtypes.get(name, torch.float32)))
        except BaseException:
            writer.abort()
            raise
        writer.close()
