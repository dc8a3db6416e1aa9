"""One-line progress on a terminal; a periodic plain line when output is a file (CI logs)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(self, total: int, enabled: bool = True, stream: TextIO | None = None, width: int = 24):
        self.total = total
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.width = width
        self._last = 0.0
        self._interval = 0.2 if self.tty else 10.0

    def update(
        self,
        done: int,
        rate: float,
        best: float | None,
        test: float | None,
        failures: int,
        extra: str = "",
        force: bool = False,
    ) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < self._interval:
            return
        self._last = now
        filled = int(self.width * done / max(1, self.total))
        bar = "#" * filled + "." * (self.width - filled)
        eta = (self.total - done) / rate if rate > 0 else 0.0
        best_s = "-" if best is None else f"{best:.4f}"
        test_s = "-" if test is None else f"{test:.4f}"
        line = (
            f"[{bar}] {done:,}/{self.total:,} evals  {rate:,.0f}/s  best train {best_s}  test {test_s}"
            f"  failed {failures}{'  ' + extra if extra else ''}  eta {_clock(eta)}"
        )
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
