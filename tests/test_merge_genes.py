"""The `merge` space: operator and knobs as genes, decoded through the operator library."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from evomerge.cli import main
from evomerge.errors import SpecError
from evomerge.evaluate.classification import mlp_layout
from evomerge.merge.engine import merge_state_dicts
from evomerge.schema import parse
from evomerge.space.merge_genes import MergeGenesOptions, MergeGenesSpace
from evomerge.weights import Layout
from tests.conftest import assert_export_reapplies, tiny_spec, write_spec

LAYOUT = mlp_layout([5, 4, 3])  # two layers -> blocks layer.0, layer.1
SEEDS = [np.random.default_rng(k).standard_normal(LAYOUT.size).astype(np.float32) for k in range(3)]


def space(**options) -> MergeGenesSpace:
    return MergeGenesSpace(parse(MergeGenesOptions, options, "space"), LAYOUT, SEEDS)


def test_genome_layout_and_decoding_per_model_and_block():
    s = space(methods=["task_arithmetic"], genes={"weights": {"low": 0, "high": 2, "per": "model_block"}})
    assert s.dim == 2 * 2  # two fine-tuned models x two blocks (seed 0 is the base)
    genome = np.array([0.1, 0.2, 0.3, 0.4], dtype=np.float32)  # model-major: m0b0, m0b1, m1b0, m1b1
    out = s.decode(genome)
    base, a, b = (LAYOUT.views(x) for x in SEEDS)
    for name in LAYOUT.names:
        block = 0 if name.startswith("layers.0") else 1
        w = [2 * float(genome[block]), 2 * float(genome[2 + block])]
        expected = merge_state_dicts(
            {"name": "task_arithmetic", "weights": w}, {name: base[name]}, [{name: a[name]}, {name: b[name]}]
        )
        torch.testing.assert_close(out[name], expected[name])


def test_operator_is_a_categorical_gene():
    s = space(methods=["task_arithmetic", "ties"], genes={"scale": {"low": 0, "high": 1}})
    assert s.dim == 2
    assert s.method_of(np.array([0.2, 0.5])) == "task_arithmetic"
    assert s.method_of(np.array([0.7, 0.5])) == "ties"
    assert s.method_of(np.array([1.0, 0.5])) == "ties"


def test_scalar_knob_cannot_be_per_model():
    with pytest.raises(SpecError, match=r"space\.genes\.scale\.per.*allowed: 'global', 'block'"):
        parse(MergeGenesOptions, {"methods": ["ties"], "genes": {"scale": {"per": "model"}}}, "space")


def test_density_per_model_and_block_reaches_each_task():
    s = space(methods=["ties"], genes={"density": {"low": 0.1, "high": 0.9, "per": "model_block"}})
    genome = np.array([0.0, 1.0, 0.5, 0.25], dtype=np.float32)
    assert s.knobs(genome, block=0)["density"] == pytest.approx([0.1, 0.5])
    assert s.knobs(genome, block=1)["density"] == pytest.approx([0.9, 0.3])
    out = s.decode(genome)
    base, a, b = (LAYOUT.views(x) for x in SEEDS)
    name = "layers.1.weight"
    expected = merge_state_dicts(
        {"name": "ties", "density": [0.9, 0.3]}, {name: base[name]}, [{name: a[name]}, {name: b[name]}]
    )
    torch.testing.assert_close(out[name], expected[name])


def test_unknown_knob_names_the_method_options():
    with pytest.raises(SpecError, match=r"space\.genes\.densty: no listed method has an option 'densty'.*density"):
        parse(MergeGenesOptions, {"methods": ["ties"], "genes": {"densty": {}}}, "space")


def test_a_knob_only_reaches_the_methods_that_have_it():
    """The operator gene and a `density` gene together: task arithmetic ignores density, TIES uses it."""
    options = parse(
        MergeGenesOptions,
        {
            "methods": ["task_arithmetic", "ties"],
            "genes": {"density": {"low": 0.1, "high": 0.9}},
            "fixed": {"scale": 1.0},
        },
        "space",
    )
    s = MergeGenesSpace(options, LAYOUT, SEEDS)
    assert s.knobs(np.array([0.2, 0.5]), block=0) == {"scale": 1.0}  # gene 0 < 0.5: task arithmetic
    assert s.knobs(np.array([0.7, 0.5]), block=0) == {"scale": 1.0, "density": pytest.approx(0.5)}  # TIES


def test_search_over_merge_genes_end_to_end(tmp_path):
    """CMA-ES over per-block task-arithmetic weights of two specialists sharing one init (the base)."""
    spec = tiny_spec(tmp_path, name="genes", budget=60)
    spec["models"] = {
        "init": "specialists",
        "specialists": [[0], [1, 2]],
        "shared_init": True,
        "train_steps": 20,
        "train_lr": 0.01,
    }
    spec["space"] = {
        "name": "merge",
        "methods": ["task_arithmetic", "ties"],
        "genes": {"weights": {"low": 0, "high": 1.5, "per": "model_block"}},
    }
    spec["strategy"] = {"name": "cma_es", "population": 6, "sigma0": 0.2}
    assert main(["run", str(write_spec(tmp_path / "s.yaml", spec)), "--quiet"]) == 0
    import json

    summary = json.loads((tmp_path / "runs" / "genes" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["failures"] == 0
    assert summary["best_train"] > 0.5


def test_per_task_list_must_match_the_models():
    from evomerge.errors import EvomergeError

    base, a, b = (LAYOUT.views(x) for x in SEEDS)
    with pytest.raises(EvomergeError, match="3 density values for 2 models"):
        merge_state_dicts({"name": "ties", "density": [0.2, 0.3, 0.4]}, base, [a, b])


def test_exported_merge_plan_reapplies_the_found_merge(tmp_path):
    """export writes merge_plan.yaml; `evomerge merge` of it rebuilds the exported model exactly."""

    spec = tiny_spec(tmp_path, name="genes-export", budget=24)
    spec["models"] = {"init": "specialists", "specialists": [[0], [1, 2]], "shared_init": True, "train_steps": 5}
    spec["space"] = {
        "name": "merge",
        "methods": ["task_arithmetic", "ties"],
        "genes": {"weights": {"low": 0, "high": 1.5, "per": "model_block"}, "scale": {"per": "block"}},
    }
    spec["strategy"] = {"name": "cma_es", "population": 6, "sigma0": 0.3}
    assert_export_reapplies(spec, tmp_path)


def test_exported_plan_of_a_tiny_llama_merges_lm_head_as_the_head(tmp_path):
    """A search over per-block genes of real Llama checkpoints: its exported plan rebuilds the best model exactly,
    and `lm_head.weight`, which the safetensors files list first, is merged with the `head` block's genes."""
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    import shutil

    import yaml
    from safetensors.torch import load_file

    from evomerge.weights.blocks import block_map
    from evomerge.weights.checkpoint import Checkpoint
    from tests.test_causal_lm import TEXTS, _jsonl, _model, _tokenizer

    _tokenizer(tmp_path / "base")
    shutil.copytree(tmp_path / "base", tmp_path / "tuned")
    _model(tmp_path / "base", 0)
    _model(tmp_path / "tuned", 1)
    assert Checkpoint.open(tmp_path / "base").names()[0] == "lm_head.weight"
    spec = tiny_spec(tmp_path, name="llama-genes", budget=4)
    spec["evaluator"] = {
        "name": "causal_lm",
        "model": str(tmp_path / "base"),
        "device": "cpu",
        "datasets": [{"name": "code", "search": _jsonl(tmp_path / "code.jsonl", [{"text": t} for t in TEXTS])}],
    }
    spec["models"] = {"init": "files", "paths": [str(tmp_path / "base"), str(tmp_path / "tuned")]}
    spec["space"] = {"name": "merge", "methods": ["task_arithmetic"], "genes": {"scale": {"high": 2, "per": "block"}}}
    spec["strategy"] = {"name": "cma_es", "population": 4, "sigma0": 0.3, "objective": "loglik_code"}
    spec["runtime"] = {"progress": False, "threads": 1}
    assert_export_reapplies(spec, tmp_path)
    exported = tmp_path / "runs" / "llama-genes" / "export" / "best"
    plan = yaml.safe_load((exported / "merge_plan.yaml").read_text())
    assert block_map(Checkpoint.open(tmp_path / "base").names(), "layer").tensor_blocks["lm_head.weight"] == "head"
    assert plan["blocks"]["head"] != plan["blocks"]["embed"]
    base, tuned = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("base", "tuned"))
    head = merge_state_dicts({"name": "task_arithmetic", **plan["blocks"]["head"]}, base, [tuned])
    assert torch.equal(load_file(str(exported / "model.safetensors"))["lm_head.weight"], head["lm_head.weight"])


# --- smoothing across layers --------------------------------------------------------------------------------------


def _llama_space(**options) -> tuple[MergeGenesSpace, list[np.ndarray]]:
    from tests.test_blocks import LLAMA

    layout = Layout(tuple(LLAMA), tuple((3, 2) for _ in LLAMA))
    seeds = [np.random.default_rng(k).standard_normal(layout.size).astype(np.float32) for k in range(3)]
    return MergeGenesSpace(parse(MergeGenesOptions, options, "space"), layout, seeds), seeds


SMOOTH = {
    "methods": ["task_arithmetic"],
    "layer_granularity": 2,
    "filters": ["mlp"],
    "genes": {"scale": {"low": 0.0, "high": 2.0, "per": "block"}},
}


def test_smooth_interpolates_block_genes_between_the_layer_group_anchors():
    """5 layers in groups of 2 (layers.0-1, 2-3, 4-4): the groups' genes are anchors at depths 0, 1/2, 1 and
    layer i (depth i/4) gets the straight line between its neighbours, per filter part; embed and head keep theirs."""
    space, seeds = _llama_space(**SMOOTH, smooth=True)
    assert space.blockmap.blocks == (
        "embed",
        *(f"{group}.{part}" for group in ("layers.0-1", "layers.2-3", "layers.4-4") for part in ("mlp", "other")),
        "head",
    )
    assert space.dim == 8  # the genes stay per layer group
    genome = np.array([0.5, 0.125, 0.25, 0.375, 0.75, 0.875, 0.5, 0.0625], dtype=np.float32)
    # mapped to [0, 2]: embed 1.0; mlp anchors 0.25, 0.75, 1.75; other anchors 0.5, 1.5, 1.0; head 0.125
    expected = {"embed": 1.0, "head": 0.125}
    for layer, (mlp, other) in enumerate([(0.25, 0.5), (0.5, 1.0), (0.75, 1.5), (1.25, 1.25), (1.75, 1.0)]):
        expected |= {f"layer.{layer}.mlp": mlp, f"layer.{layer}.other": other}
    blocks = space.engine_blocks.blocks
    assert set(blocks) == set(expected)
    assert {block: space.knobs(genome, i)["scale"] for i, block in enumerate(blocks)} == expected
    out = space.decode(genome)
    base, a, b = (space.layout.views(s) for s in seeds)
    for name in space.layout.names:
        scale = expected[space.engine_blocks.tensor_blocks[name]]
        merged = merge_state_dicts({"name": "task_arithmetic", "scale": scale}, base, [a, b])
        assert torch.equal(out[name], merged[name]), name
    stepwise, _ = _llama_space(**SMOOTH)
    layer_1 = stepwise.knobs(genome, stepwise.blockmap.blocks.index("layers.0-1.mlp"))["scale"]
    assert layer_1 == 0.25 != expected["layer.1.mlp"]  # without smooth, layer 1 takes its group's value


def test_smoothed_merge_exports_as_a_plan_per_layer(tmp_path):
    """The plan of a smoothed genome has a block per layer; `evomerge merge` of it and of its mergekit config
    rebuild the decoded model exactly, `lm_head.weight` included: the space lists it last, the files (sorted by
    name) first, and both put it in block `head`."""
    from safetensors.torch import load_file, save_file

    from evomerge.merge.mergekit import mergekit_yaml
    from evomerge.merge.plan import MergePlan
    from evomerge.yaml_io import dump_plain_yaml

    genes = {"weights": {"low": 0, "high": 1, "per": "model_block"}}
    space, seeds = _llama_space(**{**SMOOTH, "genes": genes}, smooth=True)
    paths = []
    for k, seed in enumerate(seeds):
        paths.append(str(tmp_path / f"seed{k}.safetensors"))
        save_file({n: t.contiguous() for n, t in space.layout.views(seed).items()}, paths[-1])
    genome = np.linspace(0.1, 0.9, space.dim).astype(np.float32)
    plan = space.to_plan(genome, paths)
    assert "layer_granularity" not in plan and "layer.3.mlp" in plan["blocks"] and plan["filters"] == ["mlp"]
    (tmp_path / "plan.yaml").write_text(dump_plain_yaml(plan))
    MergePlan.load(tmp_path / "plan.yaml").run(tmp_path / "out")
    decoded, merged = space.decode(genome), load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(torch.equal(decoded[n], merged[n]) for n in space.layout.names)
    (tmp_path / "mergekit.yaml").write_text(mergekit_yaml(plan, space.layout.names))
    MergePlan.load(tmp_path / "mergekit.yaml").run(tmp_path / "again")
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    for name in space.layout.names:
        torch.testing.assert_close(again[name], decoded[name], rtol=1e-6, atol=1e-6)


def test_smooth_with_one_layer_per_group_is_stepwise():
    smooth, _ = _llama_space(**{**SMOOTH, "layer_granularity": 1}, smooth=True)
    plain, _ = _llama_space(**{**SMOOTH, "layer_granularity": 1})
    genome = np.linspace(0.0, 1.0, plain.dim).astype(np.float32)
    assert smooth.engine_blocks.blocks == plain.blockmap.blocks
    assert all(smooth.knobs(genome, i) == plain.knobs(genome, i) for i in range(len(plain.blockmap.blocks)))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"blocks": "tensor", "layer_granularity": 1, "filters": []},
            r"^space\.smooth: interpolates across layers, so",
        ),
        (
            {"genes": {"scale": {"per": "global"}}},
            r"^space\.smooth: interpolates per-block genes across layers, but no",
        ),
    ],
)
def test_bad_smooth_is_one_line(options, message):
    with pytest.raises(SpecError, match=message):
        parse(MergeGenesOptions, {**SMOOTH, "smooth": True, **options}, "space")


# --- Fisher merging in the space ----------------------------------------------------------------------------------


def _fisher_files(tmp_path, layout, count: int, drop: str | None = None, seed: int = 10) -> list[str]:
    """Positive random diagonal Fishers under the layout's names (one tensor left out with `drop`)."""
    from safetensors.torch import save_file

    paths = []
    for k in range(count):
        generator = torch.Generator().manual_seed(seed + k)
        tensors = {n: torch.rand(s, generator=generator) * 4 for n, s in zip(layout.names, layout.shapes) if n != drop}
        paths.append(str(tmp_path / f"fisher{k}.safetensors"))
        save_file(tensors, paths[-1])
    return paths


def test_fisher_is_a_method_of_the_space(tmp_path):
    """Σ λ_i (F_i + ε) θ_i / Σ λ_i (F_i + ε) per entry, λ the per-model `weights` genes, F from the given files."""
    from safetensors.torch import load_file

    fishers = _fisher_files(tmp_path, LAYOUT, 3)
    s = space(
        methods=["fisher"], base=None, fishers=fishers, genes={"weights": {"low": 0.5, "high": 2, "per": "model"}}
    )
    genome = np.array([0.0, 0.5, 1.0], dtype=np.float32)
    lambdas = [0.5, 1.25, 2.0]
    assert s.knobs(genome, 0) == {"weights": lambdas}
    out = s.decode(genome)
    thetas = [LAYOUT.views(x) for x in SEEDS]
    fisher = [load_file(f) for f in fishers]
    for name in LAYOUT.names:
        num, den = torch.zeros_like(out[name]), torch.zeros_like(out[name])
        for lam, f, theta in zip(lambdas, fisher, thetas):
            num += lam * (f[name] + 1e-8) * theta[name]
            den += lam * (f[name] + 1e-8)
        torch.testing.assert_close(out[name], num / den, rtol=1e-6, atol=1e-7)
    plan = space(methods=["linear", "fisher"], base=None, fishers=fishers, genes={"weights": {}}).to_plan
    assert plan(np.array([0.9, 0.5, 0.5, 0.5]), ["a", "b", "c"])["fishers"] == [str(Path(f).resolve()) for f in fishers]
    assert "fishers" not in plan(np.array([0.1, 0.5, 0.5, 0.5]), ["a", "b", "c"])  # linear needs none


def test_fisher_search_runs_and_exports_a_plan_that_reapplies(tmp_path):
    """CMA-ES over the Fisher weights of two random wine MLPs; the exported plan names the Fisher files."""
    fishers = _fisher_files(tmp_path, mlp_layout([13, 8, 3]), 2)
    spec = tiny_spec(tmp_path, name="fisher-genes", budget=8)
    spec["space"] = {
        "name": "merge",
        "methods": ["fisher"],
        "base": None,
        "fishers": fishers,
        "genes": {"weights": {"low": 0.1, "high": 1, "per": "model"}},
    }
    spec["strategy"] = {"name": "cma_es", "population": 4, "sigma0": 0.2}
    assert_export_reapplies(spec, tmp_path)


def test_bad_fisher_files_are_refused_before_the_search(tmp_path, capsys):
    fishers = _fisher_files(tmp_path, LAYOUT, 3)
    bad = [
        ({"methods": ["fisher"]}, r"^space\.fishers: method 'fisher' needs one Fisher file per merged seed model"),
        ({"methods": ["linear"], "fishers": fishers}, r"^space\.fishers: only method 'fisher' uses them"),
        (
            {"methods": ["fisher"], "fishers": [str(tmp_path / "nope")]},
            r"^space\.fishers\[0\]: '.*nope' is not a file$",
        ),
    ]
    for options, message in bad:
        with pytest.raises(SpecError, match=message):
            parse(MergeGenesOptions, {"base": None, "genes": {"weights": {}}, **options}, "space")
    with pytest.raises(SpecError, match=r"^space\.fishers: got 2 Fisher files for 3 merged seed models"):
        space(methods=["fisher"], base=None, fishers=fishers[:2], genes={"weights": {}})
    (tmp_path / "short").mkdir()
    short = _fisher_files(tmp_path / "short", LAYOUT, 1, drop="layers.1.bias")
    with pytest.raises(
        SpecError, match=r"^space\.fishers\[1\]: '.*fisher0.safetensors' has no tensor 'layers.1.bias'$"
    ):
        space(methods=["fisher"], base=None, fishers=[fishers[0], short[0], fishers[2]], genes={"weights": {}})
    # through the command line: one line, and no run left behind
    spec = tiny_spec(tmp_path, name="fisher-bad", budget=4)
    (tmp_path / "wrong").mkdir()
    wrong = _fisher_files(tmp_path / "wrong", mlp_layout([13, 8, 3]), 2, drop="layers.0.weight", seed=3)
    spec["space"] = {"name": "merge", "methods": ["fisher"], "base": None, "fishers": wrong, "genes": {"weights": {}}}
    spec["strategy"] = {"name": "cma_es", "population": 4}
    assert main(["run", str(write_spec(tmp_path / "s.yaml", spec)), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("evomerge: error: space.fishers[0]: ") and err.endswith("has no tensor 'layers.0.weight'")
    assert not (tmp_path / "runs" / "fisher-bad").exists()
