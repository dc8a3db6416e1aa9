"""The run directory is the source of truth of a search: see the README's "Run directory" section."""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any

import yaml

from evomerge.errors import RunDirError, SpecError
from evomerge.spec import SearchSpec, spec_from_dict
from evomerge.store.atomic import atomic_write_text
from evomerge.store.lock import RunLock

RUN_FILE = "run.json"


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.held_lock: RunLock | None = None

    # files ----------------------------------------------------------------------------------
    spec_path = property(lambda self: self.path / "spec.yaml")
    info_path = property(lambda self: self.path / RUN_FILE)
    journal_path = property(lambda self: self.path / "journal.jsonl")
    snapshot_path = property(lambda self: self.path / "snapshot.safetensors")
    summary_path = property(lambda self: self.path / "summary.json")
    curve_path = property(lambda self: self.path / "curve.csv")
    best_path = property(lambda self: self.path / "best.safetensors")
    seeds_dir = property(lambda self: self.path / "seeds")
    plots_dir = property(lambda self: self.path / "plots")

    def lock(self) -> RunLock:
        return RunLock(self.path / ".lock")

    # lifecycle ------------------------------------------------------------------------------
    @classmethod
    def create(cls, spec: SearchSpec, root: str | Path) -> RunDir:
        """Make and lock a new run directory; the caller must release `run.held_lock`."""
        run = cls(Path(root) / spec.name)
        run.refuse_existing(spec)
        run.path.mkdir(parents=True, exist_ok=True)
        run.held_lock = run.lock()
        run.held_lock.acquire()
        try:
            run.refuse_existing(spec)  # another driver may have created it meanwhile
            atomic_write_text(run.spec_path, spec.dump())
            run.write_info(
                {
                    "name": spec.name,
                    "created": now(),
                    "status": "created",
                    "budget": spec.budget,
                    "spec_sha256": spec.identity_hash(),
                    "spec": spec.to_plain(),
                }
            )
        except BaseException:
            run.held_lock.release()
            raise
        return run

    def refuse_existing(self, spec: SearchSpec) -> None:
        if not self.info_path.exists():
            return
        if self.load_spec().identity_hash() != spec.identity_hash():
            raise RunDirError(
                f"{self.path} already holds a run of a different spec ({self.describe_change(spec)}); "
                "choose another --name or delete that directory"
            )
        raise RunDirError(f"{self.path} already holds this run; continue it with: evomerge resume {self.path}")

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        run = cls(path)
        if not run.path.exists():
            raise RunDirError(f"{run.path} does not exist")
        if not run.path.is_dir():
            raise RunDirError(f"{run.path} is not a directory")
        if not run.info_path.is_file() or not run.spec_path.is_file():
            raise RunDirError(f"{run.path} is not an evomerge run (no {RUN_FILE} and spec.yaml)")
        return run

    def load_spec(self) -> SearchSpec:
        try:
            return spec_from_dict(yaml.safe_load(self.spec_path.read_text()))
        except SpecError as err:
            raise RunDirError(f"{self.spec_path} no longer validates: {err}") from err

    def check_spec_unchanged(self) -> SearchSpec:
        """The stored spec must still hash to what the run started with."""
        spec = self.load_spec()
        info = self.info()
        if spec.identity_hash() != info["spec_sha256"]:
            change = _first_difference(info.get("spec", {}), spec.to_plain())
            raise RunDirError(
                f"{self.spec_path} was changed after the run started ({change}), so its results would not match "
                "it; restore the file or start a new run with the changed spec"
            )
        return spec

    def describe_change(self, other: SearchSpec) -> str:
        mine, theirs = _flatten(self.load_spec().to_plain()), _flatten(other.to_plain())
        for key in sorted(set(mine) | set(theirs)):
            if (
                key not in ("name", "budget", "output", "description")
                and not key.startswith("runtime.")
                and mine.get(key) != theirs.get(key)
            ):
                return f"{key}: {mine.get(key)!r} there, {theirs.get(key)!r} now"
        return "same spec"

    # run.json -------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return json.loads(self.info_path.read_text())

    def write_info(self, info: dict[str, Any]) -> None:
        atomic_write_text(self.info_path, json.dumps(info, indent=2) + "\n")

    def update_info(self, **fields: Any) -> None:
        info = self.info()
        info.update(fields, updated=now())
        self.write_info(info)

    def summary(self) -> dict[str, Any] | None:
        return json.loads(self.summary_path.read_text()) if self.summary_path.exists() else None


def _first_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """The first field that changes the search's result, as 'field: old there, new now'."""
    mine, theirs = _flatten(old), _flatten(new)
    for key in sorted(set(mine) | set(theirs)):
        ignored = key in ("name", "budget", "output", "description") or key.startswith("runtime.")
        if not ignored and mine.get(key) != theirs.get(key):
            return f"{key}: {mine.get(key)!r} there, {theirs.get(key)!r} now"
    return "same spec"


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def list_runs(root: str | Path) -> list[RunDir]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((RunDir(p) for p in root.iterdir() if (p / RUN_FILE).is_file()), key=lambda r: r.path.name)
