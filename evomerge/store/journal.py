"""Append-only JSONL journal: one line per evaluated candidate, each with its own CRC32.

A line cut short by a crash fails its checksum and is dropped (with everything after it) when
the run resumes; complete lines are never rewritten.
"""

from __future__ import annotations

import base64
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

_PREFIX = '{"crc32":"'
_ENTRY = '","entry":'


def encode_scores(scores: np.ndarray) -> dict[str, Any]:
    """0/1 scores pack to bits (180 bytes for the digits train split); others go as float32."""
    if np.all((scores == 0) | (scores == 1)):
        return {"bits": base64.b64encode(np.packbits(scores.astype(bool))).decode(), "n": int(scores.shape[0])}
    return {"f32": base64.b64encode(np.ascontiguousarray(scores, dtype=np.float32).tobytes()).decode()}


def decode_scores(data: dict[str, Any]) -> np.ndarray:
    if "bits" in data:
        bits = np.frombuffer(base64.b64decode(data["bits"]), dtype=np.uint8)
        return np.unpackbits(bits, count=data["n"]).astype(np.float32)
    return np.frombuffer(base64.b64decode(data["f32"]), dtype=np.float32).copy()


def format_line(entry: dict[str, Any]) -> str:
    payload = json.dumps(entry, separators=(",", ":"))
    return f"{_PREFIX}{zlib.crc32(payload.encode()):08x}{_ENTRY}{payload}}}\n"


def parse_line(line: str) -> dict[str, Any] | None:
    """The entry, or None when the line is torn or corrupt."""
    if not (line.startswith(_PREFIX) and line.endswith("}\n")):
        return None
    crc = line[len(_PREFIX) : len(_PREFIX) + 8]
    payload = line[len(_PREFIX) + 8 + len(_ENTRY) : -2]
    try:
        if int(crc, 16) != zlib.crc32(payload.encode()):
            return None
        return json.loads(payload)
    except ValueError:
        return None


def read_journal(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """Entries up to the first bad line, and the byte length of that good prefix."""
    path = Path(path)
    entries: list[dict[str, Any]] = []
    good = 0
    if not path.exists():
        return entries, good
    with open(path, "rb") as f:
        for raw in f:
            entry = parse_line(raw.decode("utf-8", errors="replace"))
            if entry is None:
                break
            entries.append(entry)
            good += len(raw)
    return entries, good


def iter_journal(path: str | Path) -> Iterator[dict[str, Any]]:
    yield from read_journal(path)[0]


class Journal:
    """Appends go straight to the OS (no Python buffering), so a killed driver loses no whole line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        _, good = read_journal(self.path)
        if self.path.exists() and self.path.stat().st_size > good:
            with open(self.path, "r+b") as f:
                f.truncate(good)
        self._file = open(self.path, "a", buffering=1)

    def append(self, entry: dict[str, Any]) -> None:
        self._file.write(format_line(entry))

    def close(self) -> None:
        self._file.close()
