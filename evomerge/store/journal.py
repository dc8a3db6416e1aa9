"""Append-only JSONL journal: one line per evaluated candidate, each with its own CRC32.

A line cut short by a crash fails its checksum and is dropped (with everything after it) when
the run resumes; complete lines are never rewritten. A line cut short by a failed write (a full
disk) is cut off at once, so the journal always ends with a whole entry.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.errors import RunDirError
from evomerge.store.atomic import reporting_full_disk

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
    entries, lines = _read_lines(Path(path))
    return entries, sum(len(raw) for raw in lines)


def _read_lines(path: Path) -> tuple[list[dict[str, Any]], list[bytes]]:
    entries: list[dict[str, Any]] = []
    lines: list[bytes] = []
    if not path.exists():
        return entries, lines
    with open(path, "rb") as f:
        for raw in f:
            entry = parse_line(raw.decode("utf-8", errors="replace"))
            if entry is None:
                break
            entries.append(entry)
            lines.append(raw)
    return entries, lines


def iter_journal(path: str | Path) -> Iterator[dict[str, Any]]:
    yield from read_journal(path)[0]


@dataclass(frozen=True)
class JournalMark:
    """How long the journal was when a snapshot was taken: entries, bytes, and the CRC32 of those bytes."""

    entries: int
    size: int
    crc32: int

    def to_dict(self) -> dict[str, int]:
        return {"entries": self.entries, "size": self.size, "crc32": self.crc32}


class Journal:
    """Appends go straight to the OS; a background thread fsyncs within `fsync_seconds` of each append.

    So a killed driver loses no whole line, and a power cut loses at most the results applied in the
    last `fsync_seconds` (0: fsync every line). `sync()` makes everything durable at once (before a
    snapshot, so a snapshot is never ahead of the journal). A background fsync that fails (a full disk)
    is raised by the next `append` or `sync`.
    """

    def __init__(self, path: str | Path, fsync_seconds: float = 1.0):
        self.path = Path(path)
        entries, lines = _read_lines(self.path)
        good = sum(len(raw) for raw in lines)
        if self.path.exists() and self.path.stat().st_size > good:
            with open(self.path, "r+b") as f:
                f.truncate(good)
        self._crc = 0
        for raw in lines:
            self._crc = zlib.crc32(raw, self._crc)
        self._entries, self._size = len(entries), good
        self._recent: list[str] = []
        self._file = open(self.path, "ab", buffering=0)
        self._fsync_seconds = fsync_seconds
        self._dirty = threading.Event()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._sync_error: Exception | None = None
        self._syncer = None
        if fsync_seconds > 0:
            self._syncer = threading.Thread(target=self._sync_loop, name="journal-fsync", daemon=True)
            self._syncer.start()

    @property
    def mark(self) -> JournalMark:
        return JournalMark(self._entries, self._size, self._crc)

    def append(self, entry: dict[str, Any]) -> None:
        self._raise_sync_error()
        line = format_line(entry)
        raw = line.encode()
        with self._lock, reporting_full_disk(self.path):
            try:
                view = memoryview(raw)
                while view:
                    view = view[self._file.write(view) :]
            except BaseException:
                with contextlib.suppress(OSError):  # if this fails too, the resume drops the torn line
                    self._file.truncate(self._size)
                raise
            self._crc = zlib.crc32(raw, self._crc)
            self._entries += 1
            self._size += len(raw)
        self._recent.append(line)
        if self._fsync_seconds > 0:
            self._dirty.set()
        else:
            self._fsync()

    def recent_lines(self) -> list[str]:
        """The lines appended since the last `forget_recent()`."""
        return list(self._recent)

    def forget_recent(self) -> None:
        self._recent.clear()

    def sync(self) -> None:
        self._raise_sync_error()
        self._fsync()

    def _fsync(self) -> None:
        with self._lock, reporting_full_disk(self.path):
            if not self._file.closed:
                os.fsync(self._file.fileno())

    def _raise_sync_error(self) -> None:
        if self._sync_error is not None:
            raise self._sync_error

    def _sync_loop(self) -> None:
        while not self._closed.is_set():
            self._dirty.wait()
            self._dirty.clear()
            if self._closed.wait(self._fsync_seconds):
                return
            try:
                self._fsync()
            except Exception as err:  # noqa: BLE001 - handed to the driver's thread, which stops the run
                self._sync_error = err
                return

    def close(self) -> None:
        """Sync and close; the file is closed even when the last sync fails."""
        try:
            self.sync()
        finally:
            self._closed.set()
            self._dirty.set()
            if self._syncer is not None:
                self._syncer.join()
            self._file.close()


def check_journal(path: str | Path, mark: dict[str, int], tail: list[str]) -> None:
    """Make the journal agree with a snapshot's mark: repair it from `tail` (the lines the snapshot
    saw appended since the one before) when it is behind, refuse when it was changed."""
    path = Path(path)
    entries, lines = _read_lines(path)
    have = len(lines)
    if have < mark["entries"]:
        missing = mark["entries"] - have
        if missing > len(tail):
            raise RunDirError(
                f"{path} holds {have:,} results but the snapshot was taken after {mark['entries']:,}, and it "
                f"keeps only the last {len(tail):,}; the journal cannot be repaired"
            )
        Journal(path, fsync_seconds=0).close()  # truncates a torn last line
        with reporting_full_disk(path), open(path, "ab") as f:  # a torn line left here is truncated next time
            f.write("".join(tail[len(tail) - missing :]).encode())
            f.flush()
            os.fsync(f.fileno())
        entries, lines = _read_lines(path)
    crc = 0
    for raw in lines[: mark["entries"]]:
        crc = zlib.crc32(raw, crc)
    if crc != mark["crc32"]:
        raise RunDirError(
            f"{path}: its first {mark['entries']:,} results differ from the ones the snapshot was taken after "
            "(the file was changed or replaced); restore it, or start a new run"
        )
