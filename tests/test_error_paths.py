"""Bad input to the parts added for merging, recipes and distribution: each refused with a message
that names the field or file and what is allowed."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from evomerge.cli import main
from evomerge.errors import EvomergeError, SpecError
from evomerge.evaluate.classification import mlp_layout
from evomerge.merge.plan import MergePlan, parse_size
from evomerge.schema import parse
from evomerge.space.merge_genes import MergeGenesOptions, MergeGenesSpace
from evomerge.space.recipe import RecipeOptions, build_recipe_space
from evomerge.space.slerp_line import build_slerp_space
from evomerge.spec import spec_from_dict
from evomerge.weights.blocks import BlockMap
from evomerge.weights.checkpoint import Checkpoint
from evomerge.weights.safetensors_stream import SafetensorsWriter
from tests.conftest import tiny_spec, write_spec

LAYOUT = mlp_layout([5, 4, 3])
ONE_SEED = [np.zeros(LAYOUT.size, dtype=np.float32)]


@pytest.mark.parametrize(
    ("executor", "path", "message"),
    [
        ({"workers": 0}, "runtime.executor.workers", "got 0, must be >= 1"),
        ({"deadline_s": 0}, "runtime.executor.deadline_s", "must be > 0"),
        ({"gpus_per_worker": -1}, "runtime.executor.gpus_per_worker", "must be >= 0"),
        ({"name": "dask"}, "runtime.executor.name", "allowed: 'inprocess', 'ray'"),
    ],
)
def test_executor_settings_are_checked(tmp_path, executor, path, message):
    spec = tiny_spec(tmp_path)
    spec["runtime"]["executor"] = executor
    with pytest.raises(SpecError, match=message) as err:
        spec_from_dict(spec)
    assert err.value.path == path


def test_cli_refuses_zero_workers(tmp_path, capsys):
    path = write_spec(tmp_path / "s.yaml", tiny_spec(tmp_path))
    assert main(["run", str(path), "--ray", "local", "--workers", "0", "--quiet"]) == 2
    assert "--workers: got 0, must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "tiny").exists()


def test_merge_space_base_out_of_range():
    options = parse(MergeGenesOptions, {"base": 5}, "space")
    with pytest.raises(SpecError, match="got 5, the run has 1 seed models") as err:
        MergeGenesSpace(options, LAYOUT, ONE_SEED)
    assert err.value.path == "space.base"


def test_gene_range_must_be_increasing():
    with pytest.raises(SpecError, match=r"space\.genes\.scale\.high: got 0\.5, must be > low = 1\.0"):
        parse(MergeGenesOptions, {"genes": {"scale": {"low": 1.0, "high": 0.5}}}, "space")


def test_recipe_and_slerp_spaces_need_two_seeds():
    with pytest.raises(SpecError, match="'recipe' merges seed models and needs at least 2, models.init gives 1"):
        build_recipe_space(RecipeOptions(), LAYOUT, ONE_SEED)
    with pytest.raises(SpecError, match="'slerp' needs two seed models, models.init gives 1"):
        build_slerp_space(None, LAYOUT, ONE_SEED)


@pytest.mark.parametrize("regex", ["layers\\.(\\d+", "layers\\.\\d+"])
def test_block_regex_must_compile_with_one_group(regex):
    with pytest.raises(EvomergeError, match="blocks.regex"):
        BlockMap.by_layer(["layers.0.weight"], regex)


def test_shard_size_must_be_a_size():
    assert parse_size("1.5MB") == int(1.5 * 2**20)
    with pytest.raises(SpecError, match="max_shard_size: got 'huge', expected a size such as 500MB or 5GB"):
        parse_size("huge")


def _models(tmp_path, n: int = 2) -> list[str]:
    paths = []
    for k in range(n):
        g = torch.Generator().manual_seed(k)
        sd = {"layers.0.weight": torch.randn(3, 3, generator=g), "layers.1.weight": torch.randn(3, 3, generator=g)}
        save_file(sd, str(tmp_path / f"m{k}.safetensors"))
        paths.append(str(tmp_path / f"m{k}.safetensors"))
    return paths


def _plan(tmp_path, **fields) -> MergePlan:
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(fields))
    return MergePlan.load(tmp_path / "plan.yaml")


def test_plan_with_an_unknown_block_names_the_model_blocks(tmp_path):
    plan = _plan(tmp_path, method={"name": "linear"}, models=_models(tmp_path), blocks={"layer.7": {"weights": [1, 0]}})
    with pytest.raises(EvomergeError, match=r"blocks\.layer\.7: no such block; the model's blocks: layer\.0, layer\.1"):
        plan.run(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_plan_override_is_validated_with_its_path(tmp_path):
    with pytest.raises(SpecError, match=r"blocks\.layer\.0\.density: got 2\.0, must be in \(0, 1\]"):
        _plan(tmp_path, method={"name": "ties"}, models=_models(tmp_path), blocks={"layer.0": {"density": 2.0}})


def test_missing_plan_file(tmp_path, capsys):
    assert main(["merge", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "merge plan" in err and "nope.yaml" in err and "does not exist" in err


def test_checkpoint_folder_without_weights_and_unknown_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvomergeError, match=r"no \*\.safetensors or torch checkpoint files in this folder"):
        Checkpoint.open(tmp_path / "empty")
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(EvomergeError, match="not a safetensors file, a torch checkpoint or a model folder"):
        Checkpoint.open(tmp_path / "model.onnx")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(EvomergeError, match="does not hold a flat dict of tensors"):
        Checkpoint.open(tmp_path / "list.pt", allow_pickle=True)


def test_writer_closed_early_leaves_no_file(tmp_path):
    writer = SafetensorsWriter(tmp_path / "m.safetensors", [("a", (2,), torch.float32), ("b", (2,), torch.float32)])
    writer.write("a", torch.zeros(2))
    with pytest.raises(EvomergeError, match="1 tensors were never written"):
        writer.close()
    assert list(tmp_path.iterdir()) == []


def test_export_before_any_snapshot(tmp_path, capsys):
    from evomerge.spec import spec_from_dict as build
    from evomerge.store import RunDir

    run = RunDir.create(build(tiny_spec(tmp_path)), tmp_path / "runs")
    run.held_lock.release()
    assert main(["export", str(run.path)]) == 2
    assert "has no snapshot yet; nothing to export" in capsys.readouterr().err


def test_weights_space_refuses_a_model_too_large_before_building_seeds(tmp_path, capsys):
    """64 -> 8,000 -> 8,000 -> 10 is 64.6 M parameters, above the flat space's 50 M: recipe and merge are named."""
    spec = tiny_spec(tmp_path, evaluator={"name": "classification", "dataset": "digits", "hidden": [8000, 8000]})
    start = time.monotonic()
    assert main(["run", str(write_spec(tmp_path / "big.yaml", spec)), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("evomerge: error: space: 'weights' keeps every individual as one flat float32 vector")
    assert "64,608,010 parameters" in err and "'recipe'" in err and "'merge'" in err
    assert time.monotonic() - start < 10 and not (tmp_path / "runs" / "tiny").exists()
