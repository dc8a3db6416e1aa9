"""`evomerge merge`: streaming merges of real safetensors checkpoints, equal to the in-memory merge,
with clear errors and no output on bad input, and peak memory bounded by tensors, not models."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from evomerge.cli import main
from evomerge.merge.engine import merge_state_dicts
from evomerge.weights.checkpoint import Checkpoint


def state(seed: int, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {"embeddings.weight": torch.randn(11, 6, generator=g)}
    for layer in range(3):
        sd[f"encoder.layer.{layer}.dense.weight"] = torch.randn(6, 6, generator=g)
        sd[f"encoder.layer.{layer}.dense.bias"] = torch.randn(6, generator=g)
    sd["head.weight"] = torch.randn(2, 6, generator=g)
    return {k: v.to(dtype) for k, v in sd.items()}


def folder(path: Path, sd: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True)
    save_file(sd, str(path / "model.safetensors"))
    (path / "config.json").write_text('{"model_type": "toy", "hidden_size": 6}')
    (path / "vocab.txt").write_text("a\nb\n")
    return path


@pytest.fixture
def checkpoints(tmp_path: Path) -> dict[str, Path]:
    base = state(0)
    tuned = [{k: v + 0.1 * state(10 + i)[k] for k, v in base.items()} for i in range(2)]
    return {
        "base": folder(tmp_path / "base", base),
        "a": folder(tmp_path / "a", tuned[0]),
        "b": folder(tmp_path / "b", tuned[1]),
    }


def plan(tmp_path: Path, method: dict, models: list[Path], base: Path | None = None, **extra) -> Path:
    data = {"method": method, "models": [str(m) for m in models], **extra}
    if base is not None:
        data["base"] = str(base)
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    "method",
    [
        {"name": "linear", "weights": [0.3, 0.7]},
        {"name": "task_arithmetic", "weights": [0.5, 0.8]},
        {"name": "ties", "density": 0.4, "scope": "model"},
        {"name": "dare", "drop_rate": 0.3, "seed": 7},
        {"name": "slerp", "t": 0.25, "scope": "model"},
        {"name": "model_stock"},
    ],
)
def test_streamed_merge_equals_in_memory_merge(tmp_path: Path, checkpoints, method: dict):
    needs_base = method["name"] not in ("linear", "slerp")
    base = checkpoints["base"] if needs_base else None
    out = tmp_path / "merged"
    assert (
        main(["merge", str(plan(tmp_path, method, [checkpoints["a"], checkpoints["b"]], base)), "--out", str(out)]) == 0
    )
    merged = load_file(str(out / "model.safetensors"))
    expected = merge_state_dicts(
        method,
        None if base is None else load_file(str(base / "model.safetensors")),
        [load_file(str(checkpoints[k] / "model.safetensors")) for k in ("a", "b")],
    )
    assert list(merged) == list(expected)
    for name, tensor in expected.items():
        assert merged[name].dtype == torch.bfloat16  # the input dtype is kept
        assert torch.equal(merged[name], tensor), name
    assert (out / "config.json").read_text() == (checkpoints["a"] / "config.json").read_text()
    assert (out / "vocab.txt").exists() and yaml.safe_load((out / "merge_plan.yaml").read_text())["method"] == method


def test_sharded_output_reloads(tmp_path: Path, checkpoints):
    out = tmp_path / "merged"
    p = plan(tmp_path, {"name": "linear"}, [checkpoints["a"], checkpoints["b"]], max_shard_size="0.0001MB")
    assert main(["merge", str(p), "--out", str(out)]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    merged = Checkpoint.open(out)
    a = load_file(str(checkpoints["a"] / "model.safetensors"))
    b = load_file(str(checkpoints["b"] / "model.safetensors"))
    for name in a:
        expected = ((a[name].float() + b[name].float()) / 2).to(torch.bfloat16)
        assert torch.equal(merged.read(name), expected)


@pytest.mark.parametrize(
    ("method", "with_base", "message"),
    [
        ({"name": "ties"}, False, "needs a base model"),
        ({"name": "ties", "density": 1.5}, True, r"method\.density: got 1\.5, must be in \(0, 1\]"),
        ({"name": "dare", "drop_rate": 1.0}, True, r"drop_rate: got 1\.0"),
        ({"name": "linear", "weights": [1.0]}, False, "1 weights for 2 models"),
        ({"name": "tiez"}, True, "did you mean 'ties'"),
    ],
)
def test_bad_plans_fail_before_any_output(tmp_path: Path, checkpoints, capsys, method, with_base, message):
    out = tmp_path / "merged"
    base = checkpoints["base"] if with_base else None
    assert (
        main(["merge", str(plan(tmp_path, method, [checkpoints["a"], checkpoints["b"]], base)), "--out", str(out)]) == 2
    )
    import re

    assert re.search(message, capsys.readouterr().err)
    assert not out.exists() and not (tmp_path / "merged.partial").exists()


def test_mismatched_models_name_the_tensor(tmp_path: Path, checkpoints, capsys):
    odd = state(3)
    odd["encoder.layer.1.dense.weight"] = torch.zeros(6, 7, dtype=torch.bfloat16)
    other = folder(tmp_path / "odd", odd)
    out = tmp_path / "merged"
    assert main(["merge", str(plan(tmp_path, {"name": "linear"}, [checkpoints["a"], other])), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "encoder.layer.1.dense.weight" in err and "(6, 6)" in err and "(6, 7)" in err
    assert not out.exists()


def test_non_finite_input_leaves_no_model(tmp_path: Path, checkpoints, capsys):
    bad = state(4)
    bad["head.weight"][0, 0] = float("nan")
    other = folder(tmp_path / "nan", bad)
    out = tmp_path / "merged"
    assert main(["merge", str(plan(tmp_path, {"name": "linear"}, [checkpoints["a"], other])), "--out", str(out)]) == 2
    assert "head.weight" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "merged.partial").exists()


def test_pickled_and_missing_models(tmp_path: Path, checkpoints, capsys):
    torch.save(state(5), tmp_path / "m.bin")
    p = plan(tmp_path, {"name": "linear"}, [checkpoints["a"], tmp_path / "m.bin"])
    assert main(["merge", str(p), "--out", str(tmp_path / "o1")]) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    assert main(["merge", str(p), "--out", str(tmp_path / "o1"), "--allow-pickle"]) == 0
    p = plan(tmp_path, {"name": "linear"}, [checkpoints["a"], tmp_path / "nowhere"])
    assert main(["merge", str(p), "--out", str(tmp_path / "o2")]) == 2
    assert "does not exist" in capsys.readouterr().err


PEAK = textwrap.dedent(
    """
    import sys, torch
    from evomerge.merge.plan import MergePlan
    def status_mb(key):  # VmHWM is this process's own peak (ru_maxrss would include the forked parent)
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    before = status_mb("VmRSS")
    MergePlan.load(sys.argv[1]).run(sys.argv[2])
    print(before, status_mb("VmHWM"))
    """
)


def test_streaming_peak_memory_is_tensors_not_models(tmp_path: Path):
    """Three 192 MB models merge while memory above the start grows by far less than one model."""
    tensor_mb, n_tensors = 8, 24
    paths = []
    for k in range(3):
        g = torch.Generator().manual_seed(k)
        sd = {f"layers.{i}.weight": torch.randn(tensor_mb * 2**18, generator=g) for i in range(n_tensors)}
        path = tmp_path / f"m{k}.safetensors"
        save_file(sd, str(path))
        paths.append(path)
        del sd
    model_mb = tensor_mb * n_tensors
    p = plan(tmp_path, {"name": "linear"}, paths)
    result = subprocess.run(
        [sys.executable, "-c", PEAK, str(p), str(tmp_path / "merged")], capture_output=True, text=True, check=True
    )
    before, peak = map(float, result.stdout.split())
    assert peak - before < 0.5 * model_mb, (before, peak)
    assert Checkpoint.open(tmp_path / "merged").nbytes() == model_mb * 2**20
