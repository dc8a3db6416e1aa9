"""The YAML schema of a search: what is searched, how it is scored, how long, and where it goes."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from evomerge.registry import Component
from evomerge.schema import parse, require, to_plain
from evomerge.yaml_io import dump_plain_yaml, read_yaml_mapping


@dataclass
class ModelsSpec:
    """Where the first individuals come from."""

    init: Literal["random", "specialists", "files", "evaluator"] = "random"  # evaluator: its own models
    count: int = 2
    std: float = 0.01
    specialists: list[list[int]] = field(default_factory=lambda: [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
    train_steps: int = 10
    train_lr: float = 0.003
    train_seed: int = 42
    shared_init: bool = False
    paths: list[str] = field(default_factory=list)

    def check(self, path: str) -> None:
        require(self.count >= 1, f"{path}.count", f"got {self.count}, must be >= 1")
        require(self.std > 0, f"{path}.std", f"got {self.std}, must be > 0")
        require(self.train_steps >= 1, f"{path}.train_steps", f"got {self.train_steps}, must be >= 1")
        require(self.train_lr > 0, f"{path}.train_lr", f"got {self.train_lr}, must be > 0")
        if self.init == "specialists":
            require(len(self.specialists) >= 2, f"{path}.specialists", "needs at least 2 class groups")
        if self.init == "files":
            require(len(self.paths) >= 1, f"{path}.paths", "init 'files' needs at least one path")


@dataclass
class ExecutorSpec:
    """Where evaluations run: in the driver's process, or on a pool of Ray actors."""

    name: Literal["inprocess", "ray"] = "inprocess"
    address: str = "local"  # local (start Ray here) | auto (join the running cluster) | host:port
    workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    accelerator_type: str | None = None  # e.g. H100: place workers only on nodes with it
    in_flight_per_worker: int = 2
    deadline_s: float = 600.0  # per evaluation, counted from when a worker starts it
    start_timeout_s: float | None = None  # per worker start; default 120 s + 30 s per GiB of seed models
    runtime_env: dict[str, Any] | None = None  # Ray runtime environment of the workers, e.g. {py_modules: [dir]}
    deterministic: bool = False  # apply results in submission order (reproducible, slower)
    dashboard: bool = False  # with address 'local': start Ray's dashboard (needs ray[default])

    def check(self, path: str) -> None:
        require(self.workers >= 1, f"{path}.workers", f"got {self.workers}, must be >= 1")
        require(self.cpus_per_worker >= 0, f"{path}.cpus_per_worker", f"got {self.cpus_per_worker}, must be >= 0")
        require(self.gpus_per_worker >= 0, f"{path}.gpus_per_worker", f"got {self.gpus_per_worker}, must be >= 0")
        require(self.in_flight_per_worker >= 1, f"{path}.in_flight_per_worker", "must be >= 1")
        require(self.deadline_s > 0, f"{path}.deadline_s", f"got {self.deadline_s}, must be > 0")
        if self.start_timeout_s is not None:
            require(self.start_timeout_s > 0, f"{path}.start_timeout_s", f"got {self.start_timeout_s}, must be > 0")


@dataclass
class RuntimeSpec:
    """How the driver loop behaves; none of it changes the search's result."""

    snapshot_every: int = 2000
    log_every: int = 500
    threads: int = 1  # torch intra-op threads per process: 1 is fastest for small models on busy CPUs
    progress: bool = True
    journal_fsync_s: float = 1.0  # a power cut loses at most this many seconds of results (0: fsync every one)
    executor: ExecutorSpec = field(default_factory=ExecutorSpec)

    def check(self, path: str) -> None:
        require(self.snapshot_every >= 1, f"{path}.snapshot_every", f"got {self.snapshot_every}, must be >= 1")
        require(self.log_every >= 1, f"{path}.log_every", f"got {self.log_every}, must be >= 1")
        require(self.threads >= 0, f"{path}.threads", f"got {self.threads}, must be >= 0 (0 = torch default)")
        require(
            self.journal_fsync_s >= 0, f"{path}.journal_fsync_s", f"got {self.journal_fsync_s}, must be >= 0 seconds"
        )


@dataclass
class _RawSpec:
    name: str
    budget: int
    strategy: Any = None
    seed: int = 0
    output: str = "runs"
    evaluator: Any = "classification"
    space: Any = "weights"
    models: ModelsSpec = field(default_factory=ModelsSpec)
    runtime: RuntimeSpec = field(default_factory=RuntimeSpec)
    description: str = ""

    def check(self, path: str) -> None:
        require(self.budget > 0, "budget", f"got {self.budget}, must be > 0 (evaluations)")
        require(bool(self.name) and "/" not in self.name, "name", f"got {self.name!r}, must be a plain non-empty name")


@dataclass
class SearchSpec:
    name: str
    budget: int
    seed: int
    output: str
    description: str
    evaluator: Component
    space: Component
    strategy: Component
    models: ModelsSpec
    runtime: RuntimeSpec

    def to_plain(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "budget": self.budget,
            "seed": self.seed,
            "output": self.output,
            "evaluator": self.evaluator.to_plain(),
            "models": to_plain(self.models),
            "space": self.space.to_plain(),
            "strategy": self.strategy.to_plain(),
            "runtime": to_plain(self.runtime),
        }

    def identity_hash(self) -> str:
        """Hash of everything that determines the search's result (not its name, budget or runtime)."""
        plain = self.to_plain()
        for key in ("name", "budget", "output", "runtime", "description"):
            plain.pop(key)
        return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()

    def dump(self) -> str:
        return dump_plain_yaml(self.to_plain())


def spec_from_dict(data: Any) -> SearchSpec:
    from evomerge.evaluate import EVALUATORS
    from evomerge.search import STRATEGIES
    from evomerge.space import SPACES

    raw = parse(_RawSpec, data)
    spec = SearchSpec(
        name=raw.name,
        budget=raw.budget,
        seed=raw.seed,
        output=raw.output,
        description=raw.description,
        evaluator=EVALUATORS.resolve(raw.evaluator, "evaluator"),
        space=SPACES.resolve(raw.space, "space"),
        strategy=STRATEGIES.resolve(raw.strategy, "strategy"),
        models=raw.models,
        runtime=raw.runtime,
    )
    from evomerge.search import check_compatible

    check_compatible(spec)
    return spec


def load_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> SearchSpec:
    """Read and validate a YAML spec; `overrides` (from the CLI) replace top-level fields."""
    data = read_yaml_mapping(path, "spec file")
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return spec_from_dict(data)
