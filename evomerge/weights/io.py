"""safetensors I/O for flat parameter vectors. Weights are never pickled."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from evomerge.errors import EvomergeError
from evomerge.store.atomic import atomic_write_bytes
from evomerge.weights.layout import Layout


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
