"""Local JSON-lines datasets: one object per line, refused with the file and line number when malformed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError


def read_jsonl(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """("file:line", object) for every non-blank line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise EvomergeError(f"{path}:{number}: not a JSON line ({err.msg})") from None
            if not isinstance(row, dict):
                raise EvomergeError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append((f"{path}:{number}", row))
    return rows
