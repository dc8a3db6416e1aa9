"""The one per-block merge engine: the same tensors as the per-tensor loop it replaced, for every method and
dtype; model-wide passes (`scope: model`) in the `merge` space and per block in merge plans; one layer count."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from evomerge.merge import MERGE_METHODS, MergeContext, MergeEngine, TensorGroup, as_merger, merge_state_dicts
from evomerge.merge.plan import MergePlan
from evomerge.schema import parse
from evomerge.space.merge_genes import MergeGenesOptions, MergeGenesSpace
from evomerge.weights import Layout
from evomerge.weights.blocks import BlockMap, layer_index

NAMES = ["embed.weight", "layers.0.w", "layers.0.b", "layers.1.w", "layers.2.w", "head.weight"]
SHAPES = [(6, 4), (4, 4), (4,), (4, 5), (5, 4), (4, 3)]
OPTIONS = {
    "linear": {"weights": [0.3, 0.7]},
    "slerp": {"t": 0.3},
    "task_arithmetic": {"scale": 0.8},
    "task_vectors": {"sparsify": "magnitude", "density": 0.5},
    "ties": {"density": 0.4},
    "dare": {"drop_rate": 0.3, "seed": 3},
    "breadcrumbs": {},
    "lines": {"alpha": 0.3, "beta": 0.6},
    "model_stock": {},
    "fisher": {},
}


def state_dict(seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g).to(dtype) for n, s in zip(NAMES, SHAPES)}


def per_tensor_loop(method: dict, base, sds, fishers=None) -> dict[str, torch.Tensor]:
    """The loop every caller had before the engine: prepare, then each tensor with its layer and max index + 1."""
    merger = as_merger(method)
    layers = {n: layer_index(n) for n in NAMES}
    num_layers = max(v for v in layers.values() if v is not None) + 1
    groups = [TensorGroup(n, None if base is None else base[n], [sd[n] for sd in sds]) for n in NAMES]
    stats = merger.prepare(groups)
    out = {}
    for name, b, tensors in groups:
        fisher = None if fishers is None else [f[name] for f in fishers]
        out[name] = merger(name, b, tensors, MergeContext(layers[name], num_layers, fisher, stats))
    return out


def test_every_registered_method_has_a_case_here():
    assert set(MERGE_METHODS.names()) == set(OPTIONS)


CASES = [(name, "tensor") for name in sorted(OPTIONS)] + [
    (name, "model")
    for name in sorted(OPTIONS)
    if "scope" in MERGE_METHODS.entry(name, "method").options.__dataclass_fields__
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("name", "scope"), CASES)
def test_engine_equals_the_per_tensor_loop(name: str, scope: str, dtype: torch.dtype):
    method = {"name": name, **OPTIONS[name]}
    if scope == "model":
        method["scope"] = "model"
    merger = as_merger(method)
    base = state_dict(0, dtype) if merger.needs_base or name in ("task_arithmetic", "ties") else None
    sds = [state_dict(k, dtype) for k in (1, 2)]
    fishers = [{n: t.float().abs() + 0.1 for n, t in state_dict(k, dtype).items()} for k in (3, 4)]
    fishers = fishers if name == "fisher" else None
    got = merge_state_dicts(method, base, sds, fishers=fishers)
    expected = per_tensor_loop(method, base, sds, fishers)
    assert list(got) == NAMES
    for n in NAMES:
        assert got[n].dtype == dtype and torch.equal(got[n], expected[n]), n


def flat_seeds(count: int) -> tuple[Layout, list[np.ndarray]]:
    layout = Layout(tuple(NAMES), tuple(SHAPES))
    return layout, [np.random.default_rng(k).standard_normal(layout.size).astype(np.float32) for k in range(count)]


def test_merge_space_with_scope_model_is_the_model_wide_merge():
    """TIES with `scope: model` in a `merge` space: thresholds over the whole model, as merge_state_dicts has it."""
    layout, seeds = flat_seeds(3)
    options = {"methods": ["ties"], "fixed": {"scope": "model"}, "genes": {"density": {"low": 0.1, "high": 0.9}}}
    space = MergeGenesSpace(parse(MergeGenesOptions, options, "space"), layout, seeds)
    out = space.decode(np.array([0.5], dtype=np.float32))
    base, a, b = (layout.views(s) for s in seeds)
    expected = merge_state_dicts({"name": "ties", "density": 0.5, "scope": "model"}, base, [a, b])
    assert all(torch.equal(out[n], expected[n]) for n in NAMES)
    per_tensor = merge_state_dicts({"name": "ties", "density": 0.5}, base, [a, b])
    assert not all(torch.equal(out[n], per_tensor[n]) for n in NAMES)  # the model-wide pass made a difference


def test_merge_space_per_block_density_with_scope_model():
    """Each block's thresholds come from the whole model at that block's density."""
    layout, seeds = flat_seeds(3)
    options = {
        "methods": ["ties"],
        "fixed": {"scope": "model"},
        "genes": {"density": {"low": 0.0, "high": 1.0, "per": "block"}},
    }
    space = MergeGenesSpace(parse(MergeGenesOptions, options, "space"), layout, seeds)
    assert space.blockmap.blocks == ("embed", "layer.0", "layer.1", "layer.2", "head")
    densities = np.array([0.2, 0.4, 0.6, 0.8, 1.0], dtype=np.float32)
    out = space.decode(densities)
    base, a, b = (layout.views(s) for s in seeds)
    for block, density in zip(space.blockmap.blocks, densities):
        whole = merge_state_dicts({"name": "ties", "density": float(density), "scope": "model"}, base, [a, b])
        for n in NAMES:
            if space.blockmap.tensor_blocks[n] == block:
                assert torch.equal(out[n], whole[n]), (block, n)


def test_plan_with_a_block_merged_with_model_wide_thresholds(tmp_path):
    paths = []
    for k in range(3):
        folder = tmp_path / f"m{k}"
        folder.mkdir()
        save_file(state_dict(k, torch.bfloat16), str(folder / "model.safetensors"))
        paths.append(folder)
    plan = {
        "method": {"name": "ties", "density": 0.5},
        "base": str(paths[0]),
        "models": [str(p) for p in paths[1:]],
        "blocks": {"layer.1": {"scope": "model"}},
    }
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    MergePlan.load(tmp_path / "plan.yaml").run(tmp_path / "out")
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    base, a, b = (load_file(str(p / "model.safetensors")) for p in paths)
    model_wide = merge_state_dicts({"name": "ties", "density": 0.5, "scope": "model"}, base, [a, b])
    per_tensor = merge_state_dicts({"name": "ties", "density": 0.5}, base, [a, b])
    for n in NAMES:
        assert torch.equal(merged[n], (model_wide if n == "layers.1.w" else per_tensor)[n]), n


def test_one_layer_count_for_a_selection_of_layers():
    """Layers 0, 1 and 5 of a model: 6 layers deep, for the engine, merge plans' block maps and LiNeS alike."""
    names = ["layers.0.w", "layers.1.w", "layers.5.w"]
    blocks = BlockMap.by_layer(names)
    assert blocks.n_layers == 6 and blocks.blocks == ("layer.0", "layer.1", "layer.5")
    engine = MergeEngine({"name": "lines", **OPTIONS["lines"]}, names)
    assert [engine.context(n).num_layers for n in names] == [6, 6, 6]
    assert [engine.context(n).layer for n in names] == [0, 1, 5]
    sds = [{n: torch.full((2,), float(k + 1)) for n in names} for k in range(3)]
    got = merge_state_dicts({"name": "lines", **OPTIONS["lines"]}, sds[0], sds[1:])
    assert torch.equal(got["layers.5.w"], per_layer_lines(sds, 5, 6))


def per_layer_lines(sds, layer: int, num_layers: int) -> torch.Tensor:
    merger = as_merger({"name": "lines", **OPTIONS["lines"]})
    name = "layers.5.w"
    return merger(name, sds[0][name], [sd[name] for sd in sds[1:]], MergeContext(layer, num_layers))


def tied_models(count: int, untie: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Llama-like state dicts whose lm_head is the input embedding (saved under both names), but in `untie`."""
    out = []
    for k in range(count):
        g = torch.Generator().manual_seed(k)
        embed = torch.randn(10, 4, generator=g)
        head = torch.randn(10, 4, generator=g) if k == untie else embed.clone()
        layer = torch.randn(4, 4, generator=g)
        out.append({"model.embed_tokens.weight": embed, "model.layers.0.mlp.weight": layer, "lm_head.weight": head})
    return out


def test_tied_embeddings_are_merged_once_and_stay_tied(tmp_path):
    """DARE draws its masks per tensor name: merged separately, a tied head would come out untied."""
    dare = {"name": "dare", "drop_rate": 0.5, "seed": 1}
    base, *models = tied_models(3)
    out = merge_state_dicts(dare, base, models)
    assert torch.equal(out["lm_head.weight"], out["model.embed_tokens.weight"])
    base, *models = tied_models(3, untie=2)  # one model has its own head: nothing is tied
    out = merge_state_dicts(dare, base, models)
    assert not torch.equal(out["lm_head.weight"], out["model.embed_tokens.weight"])
    # the same through `evomerge merge` on checkpoints
    paths = []
    for k, sd in enumerate(tied_models(3)):
        (tmp_path / f"m{k}").mkdir()
        save_file(sd, str(tmp_path / f"m{k}" / "model.safetensors"))
        paths.append(str(tmp_path / f"m{k}"))
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump({"method": dare, "base": paths[0], "models": paths[1:]}))
    MergePlan.load(tmp_path / "plan.yaml").run(tmp_path / "out")
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(merged["lm_head.weight"], merged["model.embed_tokens.weight"])
    assert torch.equal(
        merged["lm_head.weight"], merge_state_dicts(dare, *tied_models(1), tied_models(3)[1:])["lm_head.weight"]
    )
