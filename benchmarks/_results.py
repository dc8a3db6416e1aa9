"""Where benchmarks put their results: benchmarks/results/<name>.json, with the date, machine and command."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def save_result(name: str, table: str, rows: list[dict[str, Any]], **extra: Any) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {
        "benchmark": name,
        "date": dt.date.today().isoformat(),
        "machine": {"cpus": os.cpu_count(), "gpu": None, "platform": platform.platform()},
        "command": "python " + " ".join(["benchmarks/" + Path(sys.argv[0]).name, *sys.argv[1:]]),
        "rows": rows,
        **extra,
        "table": table,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    return path
