"""safetensors I/O for flat parameter vectors. Weights are never pickled."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from evomerge.errors import EvomergeError
from evomerge.weights.layout import Layout


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write atomically (temp file + rename), so a crash never leaves a half-written model."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(tmp), metadata=metadata or {})
    os.replace(tmp, path)


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
