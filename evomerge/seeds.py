"""The models a search starts from: random inits, trained specialists (cached), or files."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evomerge.errors import EvomergeError, RunDirError
from evomerge.evaluate.base import Evaluator, ProvidesSeedModels, TrainsSpecialists
from evomerge.spec import ModelsSpec
from evomerge.store.atomic import atomic_write_text
from evomerge.weights import Layout, load_flat, save_flat
from evomerge.weights.checkpoint import Checkpoint
from evomerge.weights.safetensors_stream import DTYPES, NAMES
from evomerge.weights.seed_models import SeedModels


def cache_root() -> Path:
    return Path(os.environ.get("EVOMERGE_CACHE", Path.home() / ".cache" / "evomerge"))


def random_genome(layout: Layout, std: float, seed: int, index: int) -> np.ndarray:
    rng = np.random.default_rng([seed, index])
    return (rng.standard_normal(layout.size) * std).astype(np.float32)


def specialists(models: ModelsSpec, evaluator: Evaluator, evaluator_key: dict) -> list[np.ndarray]:
    """Train one model per class group (the paper: Adam, lr 0.003, 10 full-batch steps), cached.

    With `shared_init` every specialist starts from one random init, which comes first in the list:
    a common base model, as task-vector merging (task arithmetic, TIES, DARE) expects.
    """
    if not isinstance(evaluator, TrainsSpecialists):
        raise EvomergeError(
            f"models.init 'specialists' needs an evaluator that can train; {type(evaluator).__name__} cannot "
            "(use models.init: files)"
        )
    layout = evaluator.layout()
    out = [random_genome(layout, models.std, models.train_seed, 0)] if models.shared_init else []
    for k, classes in enumerate(models.specialists):
        key = json.dumps(
            {
                "evaluator": evaluator_key,
                "classes": classes,
                "steps": models.train_steps,
                "lr": models.train_lr,
                "seed": models.train_seed,
                "index": k,
                "std": models.std,
                **({"shared_init": True} if models.shared_init else {}),
            },
            sort_keys=True,
        )
        path = cache_root() / "specialists" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
        if path.exists():
            out.append(load_flat(path, layout))
            continue
        init = random_genome(layout, models.std, models.train_seed, 0 if models.shared_init else k)
        trained = evaluator.train_specialist(init, classes, models.train_steps, models.train_lr)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_flat(path, trained, layout, {"classes": json.dumps(classes), "recipe": key})
        out.append(trained)
    return out


def build_seeds(models: ModelsSpec, evaluator: Evaluator, evaluator_key: dict, seed: int) -> list[np.ndarray]:
    layout = evaluator.layout()
    if models.init == "random":
        return [random_genome(layout, models.std, seed, k) for k in range(models.count)]
    if models.init == "specialists":
        return specialists(models, evaluator, evaluator_key)
    if models.init == "evaluator":
        if not isinstance(evaluator, ProvidesSeedModels):
            raise EvomergeError(
                f"models.init 'evaluator' needs an evaluator that provides its models; {type(evaluator).__name__} "
                "does not (use models.init: files)"
            )
        return [layout.flatten(tensors, source="evaluator seed model") for tensors in evaluator.seed_models()]
    return [load_flat(p, layout) for p in models.paths]


MANIFEST = "seeds.json"


def weight_files(path: Path) -> list[Path]:
    """The files holding a checkpoint's tensors: the file itself, or a folder's (sharded) safetensors."""
    return sorted({Path(f) for f in Checkpoint.open(path).files()}) if path.is_dir() else [path]


def content_hash(path: Path) -> str:
    """sha256 over a checkpoint's weight files (names and bytes), so a changed shard is noticed as well."""
    digest = hashlib.sha256()
    for file in weight_files(path):
        digest.update(file.name.encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def content_size(path: Path) -> int:
    return sum(f.stat().st_size for f in weight_files(path))


def seed_sources(models: ModelsSpec) -> list[Path] | None:
    """The checkpoints a run's seed models come from, when the user gave them (`models.init: files`)."""
    return [Path(p).resolve() for p in models.paths] if models.init == "files" else None


def save_seeds(
    directory: Path, genomes: list[np.ndarray] | None, layout: Layout | None, sources: list[Path] | None = None
) -> None:
    """Seeds evomerge made (random inits, trained specialists, an evaluator's models) are written here; seeds
    given as checkpoints are recorded by path, size and content hash, not copied (they may be many gigabytes)."""
    directory.mkdir(parents=True, exist_ok=True)
    entries: list[dict[str, Any]] = []
    if sources is None:
        for k, genome in enumerate(genomes or []):
            save_flat(directory / f"seed_{k}.safetensors", genome, layout)
            entries.append({"file": f"seed_{k}.safetensors"})
    for source in sources or []:
        checkpoint = Checkpoint.open(source)
        entries.append(
            {
                "source": str(source),
                "size": content_size(source),
                "sha256": content_hash(source),
                "dtypes": {n: NAMES[checkpoint.dtype(n)] for n in checkpoint.names()},
            }
        )
    order = list(layout.names) if layout is not None else None  # the flat order every process of the run uses
    manifest = {"seeds": entries, **({"order": order} if order is not None else {})}
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def _manifest(directory: Path) -> dict[str, Any]:
    return json.loads((directory / MANIFEST).read_text()) if (directory / MANIFEST).is_file() else {}


def _entries(directory: Path) -> list[dict[str, Any]]:
    manifest = _manifest(directory)
    if manifest:
        return manifest["seeds"]
    if not directory.is_dir() or not any(directory.glob("seed_*.safetensors")):
        raise EvomergeError(f"seed models folder {directory} is missing or empty")
    paths = sorted(directory.glob("seed_*.safetensors"), key=lambda p: int(p.stem.split("_")[1]))
    return [{"file": p.name} for p in paths]  # a run from before seeds were recorded


def seed_dtypes(directory: Path) -> dict[str, torch.dtype]:
    """The dtype each tensor has in the seed checkpoints (recorded from their headers), so that a best model or an
    export is written the way its seeds are (bf16 seeds give bf16, not a float32 copy twice their size); models
    evomerge made are float32."""
    recorded = next((e["dtypes"] for e in _entries(directory) if "dtypes" in e), {})
    return {name: DTYPES[dtype] for name, dtype in recorded.items()}


def seed_paths(directory: Path) -> list[Path]:
    """Where each seed model's weights are: in the run's `seeds/` folder, or the user's checkpoint it records."""
    return [Path(e["source"]) if "source" in e else directory / e["file"] for e in _entries(directory)]


def load_seeds(directory: Path, layout: Layout | None = None, verify: bool = False) -> SeedModels:
    """The seed models, opened lazily; a recorded checkpoint that is gone or changed is refused (by size, and with
    `verify` by its content hash too, as the driver checks on resume; workers check sizes only)."""
    for k, (entry, path) in enumerate(zip(_entries(directory), seed_paths(directory))):
        if "source" not in entry:
            continue
        if not path.exists():
            raise RunDirError(f"seed model {k}: {path}, which the run started from, no longer exists")
        size = content_size(path)
        if size != entry["size"] or (verify and content_hash(path) != entry["sha256"]):
            what = f"{entry['size']:,} bytes then, {size:,} now" if size != entry["size"] else "its content hash"
            raise RunDirError(
                f"seed model {k}: {path} changed since the run started ({what}); the run cannot be continued "
                "with another model: restore the file, or start a new run"
            )
    order = _manifest(directory).get("order") or (list(layout.names) if layout is not None else None)
    return SeedModels.from_files(seed_paths(directory), order, layout)
