"""Tensor-at-a-time safetensors reading and writing.

Reads use plain positioned reads instead of mmap, so a tensor's bytes leave memory when the
tensor does. Writes compute the whole header up front (every output shape and dtype is known
before merging starts), then stream tensors in order: peak memory is one tensor, not one model.
The file is written under a temporary name and renamed only when complete.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import torch

from evomerge.errors import EvomergeError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsReader:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                if length > 100_000_000:
                    raise ValueError("header too large")
                header = json.loads(f.read(length))
        except (OSError, ValueError, struct.error) as err:
            raise EvomergeError(f"cannot read {self.path} as safetensors: {err}") from err
        self.metadata: dict[str, str] = header.pop("__metadata__", {}) or {}
        self.data_start = 8 + length
        self.entries: dict[str, dict[str, Any]] = header
        for name, entry in header.items():
            if entry["dtype"] not in DTYPES:
                raise EvomergeError(f"{self.path}: tensor {name!r} has unsupported dtype {entry['dtype']}")

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self.entries[name]["dtype"]]

    def read(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        begin, end = entry["data_offsets"]
        buffer = bytearray(end - begin)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            if f.readinto(buffer) != len(buffer):
                raise EvomergeError(f"{self.path}: tensor {name!r} is truncated")
        dtype = DTYPES[entry["dtype"]]
        if not buffer:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(entry["shape"])

    def read_range(self, name: str, start: int, end: int) -> torch.Tensor:
        """Elements [start, end) of the flattened tensor, reading only their bytes (a slice of a tensor too large
        to hold several copies of)."""
        entry = self.entries[name]
        dtype = DTYPES[entry["dtype"]]
        size = torch.empty((), dtype=dtype).element_size()
        buffer = bytearray((end - start) * size)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + entry["data_offsets"][0] + start * size)
            if f.readinto(buffer) != len(buffer):
                raise EvomergeError(f"{self.path}: tensor {name!r} is truncated")
        return torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)


def tensor_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


class SafetensorsWriter:
    """Write tensors one by one, in the order given to the constructor."""

    def __init__(
        self,
        path: str | Path,
        entries: list[tuple[str, tuple[int, ...], torch.dtype]],
        metadata: dict[str, str] | None = None,
    ):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.partial")
        header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for name, shape, dtype in entries:
            size = tensor_bytes(shape, dtype)
            header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.expected = [(name, tuple(shape), dtype) for name, shape, dtype in entries]
        self.position = 0
        self.file = open(self.tmp, "wb")
        self.file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want = self.expected[self.position]
        got = (name, tuple(tensor.shape), tensor.dtype)
        if got != want:
            raise EvomergeError(f"{self.path}: expected tensor {want} next, got {got}")
        data = tensor.detach().cpu().contiguous()
        if data.numel():
            self.file.write(memoryview(data.view(torch.uint8).reshape(-1).numpy()))
        self.position += 1

    def close(self) -> None:
        if self.position != len(self.expected):
            self.abort()
            raise EvomergeError(f"{self.path}: {len(self.expected) - self.position} tensors were never written")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)
