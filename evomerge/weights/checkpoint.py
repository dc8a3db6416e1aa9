"""Model checkpoints on disk: one safetensors file, a (sharded) Hugging Face folder, or a torch file.

Reading is lazy and per tensor. Writing goes to `<out>.partial/` and is renamed to `<out>` only
when every shard, the index and the copied config files are in place, so an interrupted merge
never leaves a folder that looks like a complete model.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch

from evomerge.errors import EvomergeError, ShapeMismatchError
from evomerge.weights.safetensors_stream import SafetensorsReader, SafetensorsWriter, tensor_bytes

PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
WEIGHT_SUFFIXES = (".safetensors", *PICKLED_SUFFIXES)
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class Checkpoint:
    """Tensor names, shapes and dtypes up front; tensor data read only when asked for."""

    def __init__(self, path: Path, readers: dict[str, SafetensorsReader], loaded: dict[str, torch.Tensor]):
        self.path = path
        self._readers = readers  # tensor name -> the file holding it
        self._loaded = loaded  # tensors from a torch file (those cannot be read lazily)

    @classmethod
    def open(cls, path: str | Path, allow_pickle: bool = False) -> Checkpoint:
        path = Path(path)
        if not path.exists():
            raise EvomergeError(f"model path {str(path)!r} does not exist")
        if path.is_dir():
            return cls._open_folder(path, allow_pickle)
        if path.suffix == ".safetensors":
            reader = SafetensorsReader(path)
            return cls(path, dict.fromkeys(reader.names(), reader), {})
        if path.suffix in PICKLED_SUFFIXES:
            return cls(path, {}, _load_torch(path, allow_pickle))
        raise EvomergeError(f"{path}: not a safetensors file, a torch checkpoint or a model folder")

    @classmethod
    def _open_folder(cls, folder: Path, allow_pickle: bool) -> Checkpoint:
        index = folder / INDEX_NAMES[0]
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            for shard in sorted(set(weight_map.values())):
                if not (folder / shard).is_file():
                    held = [name for name, f in weight_map.items() if f == shard]
                    raise EvomergeError(
                        f"{folder}: shard {shard}, which {index.name} lists for {len(held)} tensors "
                        f"(e.g. {held[0]!r}), is missing"
                    )
            readers = {f: SafetensorsReader(folder / f) for f in sorted(set(weight_map.values()))}
            return cls(folder, {name: readers[f] for name, f in weight_map.items()}, {})
        single = sorted(folder.glob("*.safetensors"))
        if single:
            readers_by_name: dict[str, SafetensorsReader] = {}
            for file in single:
                reader = SafetensorsReader(file)
                readers_by_name.update(dict.fromkeys(reader.names(), reader))
            return cls(folder, readers_by_name, {})
        pickled = [p for p in sorted(folder.iterdir()) if p.suffix in PICKLED_SUFFIXES]
        if pickled:
            loaded: dict[str, torch.Tensor] = {}
            for file in pickled:
                loaded.update(_load_torch(file, allow_pickle))
            return cls(folder, {}, loaded)
        raise EvomergeError(f"{folder}: no *.safetensors or torch checkpoint files in this folder")

    def names(self) -> list[str]:
        return list(self._readers) + [n for n in self._loaded if n not in self._readers]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._readers[name].shape(name) if name in self._readers else tuple(self._loaded[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._readers[name].dtype(name) if name in self._readers else self._loaded[name].dtype

    def read(self, name: str) -> torch.Tensor:
        return self._readers[name].read(name) if name in self._readers else self._loaded[name]

    def files(self) -> list[Path]:
        """The safetensors files the tensors are read from."""
        return sorted({reader.path for reader in self._readers.values()})

    def read_range(self, name: str, start: int, end: int) -> torch.Tensor:
        """Elements [start, end) of the flattened tensor."""
        if name in self._readers:
            return self._readers[name].read_range(name, start, end)
        return self._loaded[name].reshape(-1)[start:end]

    def nbytes(self) -> int:
        return sum(tensor_bytes(self.shape(n), self.dtype(n)) for n in self.names())

    def config_files(self) -> list[Path]:
        """Everything in a model folder that is not weights (config, tokenizer, …), to copy beside a merge."""
        if not self.path.is_dir():
            return []
        return [
            p
            for p in sorted(self.path.iterdir())
            if p.is_file() and p.suffix not in WEIGHT_SUFFIXES and p.name not in INDEX_NAMES
        ]


def _load_torch(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if not allow_pickle:
        raise EvomergeError(
            f"{path} is a pickled torch file; convert it to safetensors, or pass --allow-pickle to read it "
            "with torch.load(weights_only=True)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for unreadable or unsafe files
        raise EvomergeError(f"cannot read {path} with torch.load(weights_only=True): {err}") from err
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EvomergeError(f"{path} does not hold a flat dict of tensors")
    return state


def check_compatible(checkpoints: list[Checkpoint]) -> None:
    """Same tensor names and shapes everywhere; names the first difference and both shapes."""
    first = checkpoints[0]
    names = first.names()
    for other in checkpoints[1:]:
        other_names = set(other.names())
        for name in names:
            if name not in other_names:
                raise ShapeMismatchError(f"tensor {name!r} is in {first.path} but not in {other.path}")
            if first.shape(name) != other.shape(name):
                raise ShapeMismatchError(
                    f"tensor {name!r} has shape {first.shape(name)} in {first.path} "
                    f"and {other.shape(name)} in {other.path}"
                )
        extra = sorted(other_names - set(names))
        if extra:
            raise ShapeMismatchError(f"tensor {extra[0]!r} is in {other.path} but not in {first.path}")


def write_checkpoint(
    out: str | Path,
    entries: list[tuple[str, tuple[int, ...], torch.dtype]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    max_shard_bytes: int = 5 * 2**30,
    copy_files: Iterable[Path] = (),
    extra_files: dict[str, str] | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Stream `tensors` (in the order of `entries`) into a (sharded) safetensors model folder."""
    out = Path(out)
    if out.exists():
        raise EvomergeError(f"{out} already exists; choose another --out or remove it")
    partial = out.with_name(f"{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
    size = 0
    for entry in entries:
        nbytes = tensor_bytes(entry[1], entry[2])
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    files = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    )
    try:
        stream = iter(tensors)
        for file, shard in zip(files, shards):
            writer = SafetensorsWriter(partial / file, shard, {"format": "pt", **(metadata or {})})
            try:
                for _ in shard:
                    writer.write(*next(stream))
            except BaseException:
                writer.abort()
                raise
            writer.close()
        if len(files) > 1:
            weight_map = {name: file for file, shard in zip(files, shards) for name, _, _ in shard}
            total = sum(tensor_bytes(s, d) for _, s, d in entries)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (partial / INDEX_NAMES[0]).write_text(json.dumps(index, indent=2) + "\n")
        for path in copy_files:
            shutil.copy2(path, partial / path.name)
        for name, text in (extra_files or {}).items():
            (partial / name).write_text(text)
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out
