"""Checkpoint I/O: our streaming reader/writer against the safetensors library, sharded HF folders,
torch files only through weights_only=True, and no half-written model after a failure."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from evomerge.errors import EvomergeError, ShapeMismatchError
from evomerge.weights.checkpoint import Checkpoint, check_compatible, write_checkpoint
from evomerge.weights.safetensors_stream import SafetensorsReader, SafetensorsWriter


def model(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(7, 4, generator=g).to(dtype),
        "layers.0.weight": torch.randn(4, 4, generator=g).to(dtype),
        "layers.0.bias": torch.randn(4, generator=g).to(dtype),
        "layers.1.weight": torch.randn(4, 4, generator=g).to(dtype),
        "step": torch.tensor([3], dtype=torch.int64),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reader_reads_library_files(tmp_path, dtype):
    tensors = model(dtype=dtype)
    save_file(tensors, str(tmp_path / "m.safetensors"), metadata={"k": "v"})
    reader = SafetensorsReader(tmp_path / "m.safetensors")
    assert reader.metadata == {"k": "v"} and sorted(reader.names()) == sorted(tensors)
    for name, tensor in tensors.items():
        assert reader.dtype(name) == tensor.dtype and reader.shape(name) == tuple(tensor.shape)
        assert torch.equal(reader.read(name), tensor)


def test_writer_output_loads_with_the_library(tmp_path):
    tensors = model(dtype=torch.bfloat16)
    entries = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    writer = SafetensorsWriter(tmp_path / "out.safetensors", entries, {"recipe": "x"})
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.close()
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as f:
        assert f.metadata() == {"recipe": "x"}
        for name, tensor in tensors.items():
            assert torch.equal(f.get_tensor(name), tensor)


def test_writer_refuses_out_of_order_and_leaves_no_file(tmp_path):
    tensors = model()
    entries = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    writer = SafetensorsWriter(tmp_path / "out.safetensors", entries)
    with pytest.raises(EvomergeError, match="expected tensor"):
        writer.write("layers.0.bias", tensors["layers.0.bias"])
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_sharded_folder_round_trip_with_config_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text('{"model_type": "toy"}')
    (src / "tokenizer.json").write_text("{}")
    tensors = model(dtype=torch.float16)
    entries = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    out = write_checkpoint(
        tmp_path / "merged",
        entries,
        tensors.items(),
        max_shard_bytes=64,
        copy_files=[src / "config.json", src / "tokenizer.json"],
    )
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in files and "config.json" in files and "tokenizer.json" in files
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and shards[0].startswith("model-00001-of-")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    back = Checkpoint.open(out)
    assert back.names() == list(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(back.read(name), tensor)
    assert [p.name for p in back.config_files()] == ["config.json", "tokenizer.json"]


def test_interrupted_write_leaves_no_model_folder(tmp_path):
    tensors = model()
    entries = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]

    def failing():
        yield "embed.weight", tensors["embed.weight"]
        raise RuntimeError("merge died")

    with pytest.raises(RuntimeError):
        write_checkpoint(tmp_path / "merged", entries, failing())
    assert list(tmp_path.iterdir()) == []


def test_pickled_files_refused_unless_allowed(tmp_path):
    torch.save(model(), tmp_path / "m.bin")
    with pytest.raises(EvomergeError, match="pickled.*--allow-pickle"):
        Checkpoint.open(tmp_path / "m.bin")
    loaded = Checkpoint.open(tmp_path / "m.bin", allow_pickle=True)
    assert torch.equal(loaded.read("layers.0.bias"), model()["layers.0.bias"])


def test_unsafe_pickle_refused_even_when_allowed(tmp_path):
    torch.save({"w": torch.zeros(2), "hook": print}, tmp_path / "evil.pt")
    with pytest.raises(EvomergeError, match="weights_only=True"):
        Checkpoint.open(tmp_path / "evil.pt", allow_pickle=True)


def test_unreadable_and_missing_paths(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(EvomergeError, match="cannot read"):
        Checkpoint.open(tmp_path / "junk.safetensors")
    with pytest.raises(EvomergeError, match="does not exist"):
        Checkpoint.open(tmp_path / "nope.safetensors")


def test_mismatch_names_first_differing_tensor_and_both_shapes(tmp_path):
    a, b = model(), model(1)
    b["layers.0.weight"] = torch.zeros(4, 5)
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    with pytest.raises(ShapeMismatchError, match=r"layers\.0\.weight.*\(4, 4\).*\(4, 5\)"):
        check_compatible([Checkpoint.open(tmp_path / "a.safetensors"), Checkpoint.open(tmp_path / "b.safetensors")])
    del b["layers.0.weight"]
    save_file(b, str(tmp_path / "b.safetensors"))
    with pytest.raises(ShapeMismatchError, match=r"layers\.0\.weight.*not in"):
        check_compatible([Checkpoint.open(tmp_path / "a.safetensors"), Checkpoint.open(tmp_path / "b.safetensors")])
