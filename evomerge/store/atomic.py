"""Write-then-rename: a reader (or a resumed run) sees the old file or the new one, never half of one.

A full disk is reported as a NoSpaceError naming the file, so the CLI can print one line and the
driver can say how to go on.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from evomerge.errors import RunDirError

FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


class NoSpaceError(RunDirError):
    """A write failed because its file system is full (or over quota); `path` is the file being written."""

    def __init__(self, path: str | Path, detail: str = ""):
        self.path = Path(path)
        super().__init__(f"{self.path}: no space left on device{detail}")


@contextmanager
def reporting_full_disk(path: str | Path) -> Iterator[None]:
    """Turn ENOSPC/EDQUOT raised while writing `path` into a NoSpaceError that names it (write() errors don't)."""
    try:
        yield
    except OSError as err:
        if err.errno in FULL_DISK:
            raise NoSpaceError(path) from err
        raise


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with reporting_full_disk(path):
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # e.g. a full disk: the old file stays, no half-written one beside it
            raise
        fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())
