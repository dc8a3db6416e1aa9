"""Models at scale: seeds as named tensors in their own dtype, candidates written into reused buffers, HF folders
(sharded) as seeds, and one clear line for seed checkpoints that cannot be merged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from evomerge.cli import main
from evomerge.merge.engine import merge_state_dicts
from evomerge.space.merge_genes import MergeGenesOptions, MergeGenesSpace
from evomerge.space.recipe import RecipeOptions, RecipeSpace, named_blocks
from evomerge.space.weights import WeightSpace
from evomerge.weights import Layout
from evomerge.weights.checkpoint import write_checkpoint
from evomerge.weights.seed_models import SeedModels, natural_order
from tests.conftest import write_spec

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def llama_like(hidden: int = 16, layers: int = 3, vocab: int = 40) -> list[tuple[str, tuple[int, ...]]]:
    names = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        names += [(f"model.layers.{i}.self_attn.q_proj.weight", (hidden, hidden))]
        names += [(f"model.layers.{i}.mlp.up_proj.weight", (2 * hidden, hidden))]
        names += [(f"model.layers.{i}.input_layernorm.weight", (hidden,))]
    return names + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def models(dtype: torch.dtype, count: int = 3, shapes=None) -> tuple[list[dict[str, torch.Tensor]], Layout]:
    shapes = shapes or llama_like()
    gen = torch.Generator().manual_seed(0)
    base = {n: torch.randn(s, generator=gen) * 0.1 for n, s in shapes}
    out = [
        {n: (t + (0.02 * torch.randn(t.shape, generator=gen) if k else 0)).to(dtype) for n, t in base.items()}
        for k in range(count)
    ]
    return out, Layout(tuple(n for n, _ in shapes), tuple(s for _, s in shapes))


def ulp_close(a: torch.Tensor, b: torch.Tensor, ulps: int = 1) -> None:
    """Equal to within `ulps` units in the last place of their dtype."""
    assert a.dtype == b.dtype and a.shape == b.shape
    eps = torch.finfo(a.dtype).eps
    diff = (a.double() - b.double()).abs()
    bound = ulps * eps * torch.maximum(a.double().abs(), b.double().abs()) + 1e-30
    assert bool((diff <= bound).all()), float(diff.max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "method",
    [
        {"name": "linear"},
        {"name": "task_arithmetic", "scale": 0.7},
        {"name": "ties", "density": 0.4, "scale": 0.9},
        {"name": "ties", "density": 0.4, "scope": "model"},
        {"name": "dare", "drop_rate": 0.5, "seed": 3},
        {"name": "breadcrumbs", "density": 0.6, "gamma": 0.05},
        {"name": "slerp", "t": 0.3},
        {"name": "slerp", "t": 0.3, "scope": "model"},
        {"name": "model_stock"},
    ],
    ids=lambda m: "-".join(str(v) for v in m.values()),
)
def test_candidates_written_into_buffers_equal_merge_state_dicts(method: dict, dtype: torch.dtype):
    """The merge space's worker path (the engine summing into reused buffers, in the seeds' dtype) gives what
    `merge_state_dicts` gives for the same options, to within one ulp of the dtype."""
    name = method["name"]
    needs_base = name not in ("linear", "slerp")
    count = 3 if needs_base or name == "linear" else 2
    seeds, layout = models(dtype, count)
    fixed = {k: v for k, v in method.items() if k != "name"}
    options = MergeGenesOptions(methods=[name], base=0 if needs_base else None, genes={}, fixed=fixed)
    if name == "model_stock":
        seeds, layout = models(dtype, 3)
    space = MergeGenesSpace(options, layout, SeedModels.from_tensors(seeds, layout))
    buffers = space.new_buffers()
    genome = np.zeros(space.dim, dtype=np.float32)
    space.write(genome, buffers)
    base = seeds[0] if needs_base else None
    others = seeds[1:] if needs_base else seeds
    expected = merge_state_dicts({"name": name, **space.knobs(genome, 0)}, base, others)
    for tensor_name in layout.names:
        assert buffers[tensor_name].dtype == dtype
        ulp_close(buffers[tensor_name], expected[tensor_name])
    space.write(genome, buffers)  # the same buffers again: nothing left over from the last candidate
    for tensor_name in layout.names:
        ulp_close(buffers[tensor_name], expected[tensor_name])


@pytest.mark.parametrize("dtype", DTYPES)
def test_recipe_written_in_the_seeds_dtype_is_the_exact_sum_rounded_once(dtype: torch.dtype):
    seeds, layout = models(dtype)
    space = RecipeSpace(
        layout,
        SeedModels.from_tensors(seeds, layout),
        [(a, b) for _, a, b in named_blocks(layout, RecipeOptions(blocks="layer"))],
    )
    genome = np.random.default_rng(0).normal(0.3, 0.2, space.dim).astype(np.float32)
    out = space.decode(genome)
    coefficients = space.coefficients(genome).astype(np.float32)
    for name in layout.names:
        block = space.pieces[name][0][0]
        terms = [float(coefficients[block, k]) * seeds[k][name].double() for k in range(3)]
        exact = sum(terms)
        assert out[name].dtype == dtype
        if dtype == torch.float32:  # three float32 roundings, each relative to the terms' size
            bound = 4 * torch.finfo(torch.float32).eps * sum(t.abs() for t in terms)
            assert bool(((out[name].double() - exact).abs() <= bound).all())
        else:  # float32 arithmetic, then one rounding to the dtype
            ulp_close(out[name], exact.to(dtype))


def test_weights_and_recipe_crossover_agree_on_ten_million_parameters():
    """M2N2's crossover of two seeds in the weights space and in the recipe space gives the same child: one SLERP
    angle accumulated in float64 from the whole vectors or from the per-block Gram matrices."""
    shapes = [("a.weight", (2000, 2000)), ("b.weight", (3000, 1000)), ("c.weight", (1000, 3000))]
    layout = Layout(tuple(n for n, _ in shapes), tuple(s for _, s in shapes))
    assert layout.size >= 10_000_000
    rng = np.random.default_rng(0)
    x = rng.standard_normal(layout.size).astype(np.float32)
    y = (0.8 * x + 0.6 * rng.standard_normal(layout.size)).astype(np.float32)
    weights = WeightSpace(layout, [x, y])
    recipe = RecipeSpace(layout, [x, y], [(a, b) for _, a, b in named_blocks(layout, RecipeOptions())])
    split, w = 4_000_000, 0.37  # the start of tensor b: a block boundary
    child = weights.crossover(x, y, split, w)
    as_recipe = layout.flatten(recipe.decode(recipe.crossover(*recipe.initial(), split, w)))
    np.testing.assert_allclose(as_recipe, child, rtol=2e-6, atol=1e-6)


PEAK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch
    from evomerge.runtime.executor import Materializer
    from evomerge.space.merge_genes import MergeGenesOptions, MergeGenesSpace
    from evomerge.space.recipe import RecipeOptions, RecipeSpace, named_blocks
    from evomerge.weights import Layout
    from evomerge.weights.seed_models import SeedModels

    torch.set_num_threads(1)
    shapes = [(f"model.layers.{i}.mlp.weight", (1024, 1024)) for i in range(64)]  # 1 M elements each
    layout = Layout(tuple(n for n, _ in shapes), tuple(s for _, s in shapes))
    gen = torch.Generator().manual_seed(0)
    seeds = SeedModels.from_tensors(
        [{n: torch.randn(s, generator=gen).to(torch.bfloat16) for n, s in shapes} for _ in range(3)], layout
    )

    def rss(field):
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field)) * 1024

    class Evaluator:  # what a worker's evaluator sees: the same buffers every time
        def layout(self):
            return layout

    spaces = {
        "recipe": RecipeSpace(layout, seeds, [(a, b) for _, a, b in named_blocks(layout, RecipeOptions("layer"))]),
        "task_arithmetic": MergeGenesSpace(MergeGenesOptions(methods=["task_arithmetic"]), layout, seeds),
        "ties": MergeGenesSpace(MergeGenesOptions(methods=["ties"], fixed={"density": 0.2}), layout, seeds),
    }
    growth = {}
    for name, space in spaces.items():
        materialize = Materializer(Evaluator(), space)
        genome = np.full(space.dim, 0.4, dtype=np.float32)
        materialize(genome)  # the first candidate allocates the scratch
        before = rss("VmRSS:")
        open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark
        for _ in range(3):
            materialize(genome)
        growth[name] = rss("VmHWM:") - before
    print(json.dumps({"growth": growth, "model": seeds.nbytes(), "largest_f32": 1024 * 1024 * 4}))
    """
)


def test_a_candidate_allocates_per_tensor_scratch_not_a_model():
    """Peak RSS while candidates are written into a worker's buffers grows by a few of the largest tensor
    (float32), not by a model: 64 tensors of 1 M elements, bf16, so one model is 128 MiB."""
    # a fixed mmap threshold: freed buffers go back to the system, so the peak is what was allocated at once,
    # not what glibc kept from earlier tensors
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT], capture_output=True, text=True, check=True, env=env)
    report = json.loads(done.stdout)
    largest, model = report["largest_f32"], report["model"]
    assert report["growth"]["recipe"] <= largest + (8 << 20), report
    assert report["growth"]["task_arithmetic"] <= largest + (8 << 20), report
    # float32 copies of one tensor's inputs, its task vectors, magnitudes and masks: about 15 of that tensor
    assert report["growth"]["ties"] <= 16 * largest, report
    assert 16 * largest <= model / 2  # far under one model: its 64 tensors are never held at once


def hf_folder(path: Path, tensors: dict[str, torch.Tensor], shard_bytes: int = 3000) -> Path:
    entries = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    return write_checkpoint(path, entries, tensors.items(), max_shard_bytes=shard_bytes)


WINE = [("layers.0.weight", (13, 8)), ("layers.0.bias", (8,)), ("layers.1.weight", (8, 3)), ("layers.1.bias", (3,))]


def wine_folders(tmp_path: Path, dtype: torch.dtype = torch.bfloat16) -> list[Path]:
    seeds, _ = models(dtype, 2, WINE)
    return [hf_folder(tmp_path / f"seed{k}", seed, shard_bytes=200) for k, seed in enumerate(seeds)]


def files_spec(tmp_path: Path, folders: list[Path], space: dict | str = "recipe", **extra) -> Path:
    spec = {
        "name": "hf",
        "budget": 24,
        "output": str(tmp_path / "runs"),
        "evaluator": {"name": "classification", "dataset": "wine", "hidden": [8], "device": "cpu"},
        "models": {"init": "files", "paths": [str(f) for f in folders]},
        "space": space,
        "strategy": {"name": "m2n2", "population": 4, "mutation_std": 0.0},
        "runtime": {"progress": False, "threads": 1},
        **extra,
    }
    return write_spec(tmp_path / "spec.yaml", spec)


def test_sharded_bf16_folders_as_seeds_give_a_bf16_best_model_and_export(tmp_path: Path):
    folders = wine_folders(tmp_path)
    assert (folders[0] / "model.safetensors.index.json").is_file()  # sharded
    assert main(["run", str(files_spec(tmp_path, folders)), "--quiet"]) == 0
    run = tmp_path / "runs" / "hf"
    manifest = json.loads((run / "seeds" / "seeds.json").read_text())
    assert [e["source"] for e in manifest["seeds"]] == [str(f.resolve()) for f in folders]
    assert manifest["order"] == natural_order([n for n, _ in WINE])
    assert not list((run / "seeds").glob("*.safetensors"))  # recorded, not copied
    from safetensors.torch import load_file

    best = load_file(str(run / "best.safetensors"))
    assert {t.dtype for t in best.values()} == {torch.bfloat16}
    assert main(["export", str(run), "--out", str(tmp_path / "exported")]) == 0
    exported = load_file(str(tmp_path / "exported" / "model.safetensors"))
    assert all(torch.equal(exported[n], best[n]) for n in best)


def error_line(capsys) -> str:
    """The one error line a refused run prints (after the run's header)."""
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("evomerge: error")]
    assert len(errors) == 1
    return errors[0]


def test_a_folder_missing_a_shard_is_refused_naming_it(tmp_path: Path, capsys):
    folders = wine_folders(tmp_path)
    index = json.loads((folders[1] / "model.safetensors.index.json").read_text())
    lost = sorted(set(index["weight_map"].values()))[-1]
    (folders[1] / lost).unlink()
    assert main(["run", str(files_spec(tmp_path, folders)), "--quiet"]) == 2
    err = error_line(capsys)
    assert f"shard {lost}" in err and str(folders[1]) in err and "is missing" in err
    assert not (tmp_path / "runs" / "hf").exists()


def test_seeds_of_different_dtypes_are_refused_naming_file_and_tensor(tmp_path: Path, capsys):
    a = wine_folders(tmp_path / "a", torch.bfloat16)[0]
    b = wine_folders(tmp_path / "b", torch.float16)[0]
    assert main(["run", str(files_spec(tmp_path, [a, b])), "--quiet"]) == 2
    err = error_line(capsys)
    assert str(b) in err and "'layers.0.bias' is float16, but bfloat16 in" in err


def test_the_weights_space_refuses_a_model_above_its_limit_naming_recipe_and_merge(tmp_path: Path, capsys, monkeypatch):
    import evomerge.space.weights as weights_space

    monkeypatch.setattr(weights_space, "MAX_PARAMETERS", 100)
    folders = wine_folders(tmp_path)
    assert main(["run", str(files_spec(tmp_path, folders, space="weights")), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "above the limit of 100" in err and "'recipe'" in err and "'merge'" in err
    assert not (tmp_path / "runs" / "hf").exists()


def test_seeds_that_do_not_fit_the_gpu_are_refused_before_any_is_loaded(monkeypatch):
    """The check a GPU worker makes before making its seeds resident (exercised here with the free memory the
    CUDA runtime would report, no GPU needed)."""
    from evomerge.errors import EvomergeError
    from evomerge.weights.seed_models import check_device_memory

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (20 * 2**30, 80 * 2**30))
    gib = 2**30
    check_device_memory(torch.device("cuda"), 3 * 4 * gib, 4 * gib, ["a", "b", "c"])  # 12 + 4.8 GiB fit in 20
    with pytest.raises(EvomergeError) as info:
        check_device_memory(torch.device("cuda"), 3 * 14 * gib, 14 * gib, ["/m/a", "/m/b", "/m/c"])
    message = str(info.value)
    assert "3 seed models of 14.00 GiB each (/m/a, /m/b, /m/c)" in message
    assert "need 58.8 GiB on cuda, which has 20.0 GiB free of 80.0 GiB" in message
    check_device_memory(torch.device("cpu"), 10**15, 10**15, ["a"])  # the CPU is not checked
