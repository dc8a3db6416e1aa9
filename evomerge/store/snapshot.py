"""Strategy and driver state as one safetensors file: arrays as tensors, the rest as JSON metadata."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load, save

from evomerge.store.atomic import atomic_write_bytes

_ARRAY = "__array__"


def _split(obj: Any, key: str, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(obj, np.ndarray):
        arrays[key] = np.ascontiguousarray(obj)
        return {_ARRAY: key}
    if isinstance(obj, dict):
        return {str(k): _split(v, f"{key}.{k}", arrays) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split(v, f"{key}[{i}]", arrays) for i, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _join(obj: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_ARRAY}:
            return arrays[obj[_ARRAY]]
        return {k: _join(v, arrays) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, arrays) for v in obj]
    return obj


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    arrays: dict[str, np.ndarray] = {}
    skeleton = _split(state, "state", arrays)
    atomic_write_bytes(path, save(arrays, metadata={"state": json.dumps(skeleton)}))


def load_state(path: str | Path) -> dict[str, Any]:
    data = Path(path).read_bytes()
    arrays = load(data)
    header_len = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8 : 8 + header_len])["__metadata__"]
    return _join(json.loads(metadata["state"]), arrays)
