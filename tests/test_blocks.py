"""Blocks of real checkpoints' tensor names: layers of Llama/Mistral/Qwen, GPT-2 and BERT, groups of layers,
filters by tensor name, and these options in merge plans and the `merge` space."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from evomerge.errors import SpecError
from evomerge.merge import merge_state_dicts
from evomerge.merge.plan import MergePlan
from evomerge.schema import parse
from evomerge.space.merge_genes import MergeGenesOptions, MergeGenesSpace
from evomerge.space.recipe import RecipeOptions
from evomerge.weights import Layout
from evomerge.weights.blocks import BlockMap

LLAMA_LAYER = [
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
]
LLAMA = (
    ["model.embed_tokens.weight"]
    + [f"model.layers.{i}.{p}" for i in range(5) for p in LLAMA_LAYER]
    + ["model.norm.weight", "lm_head.weight"]
)
GPT2 = (
    ["transformer.wte.weight", "transformer.wpe.weight"]
    + [f"transformer.h.{i}.{p}" for i in range(3) for p in ("ln_1.weight", "attn.c_attn.weight", "mlp.c_fc.weight")]
    + ["transformer.ln_f.weight"]
)
BERT = (
    ["bert.embeddings.word_embeddings.weight"]
    + [f"bert.encoder.layer.{i}.{p}" for i in range(2) for p in ("attention.self.query.weight", "output.dense.weight")]
    + ["bert.pooler.dense.weight", "classifier.weight"]
)
NEOX = (  # GPT-NeoX (Pythia): the output head is `embed_out`
    ["gpt_neox.embed_in.weight"]
    + [f"gpt_neox.layers.{i}.{p}" for i in range(2) for p in ("attention.dense.weight", "mlp.dense_4h_to_h.weight")]
    + ["gpt_neox.final_layer_norm.weight", "embed_out.weight"]
)


@pytest.mark.parametrize(
    ("names", "layers", "first_layer_tensor", "head"),
    [
        (LLAMA, 5, "model.layers.0.mlp.up_proj.weight", "lm_head.weight"),
        (GPT2, 3, "transformer.h.0.attn.c_attn.weight", "transformer.ln_f.weight"),
        (BERT, 2, "bert.encoder.layer.0.output.dense.weight", "classifier.weight"),
        (NEOX, 2, "gpt_neox.layers.0.attention.dense.weight", "embed_out.weight"),
    ],
    ids=["llama", "gpt2", "bert", "neox"],
)
def test_layers_of_common_architectures(names, layers, first_layer_tensor, head):
    """In the model's order and in the files' (sorted by name, `lm_head` and `embed_out` first, GPT-2's `wte` last)
    alike: the search and a merge plan read the same model in these two orders."""
    blocks = BlockMap.by_layer(names)
    assert BlockMap.by_layer(sorted(names)) == blocks
    assert blocks.blocks == ("embed", *(f"layer.{i}" for i in range(layers)), "head")
    assert blocks.n_layers == layers
    assert blocks.tensor_blocks[names[0]] == "embed" and blocks.tensor_blocks[head] == "head"
    assert blocks.tensor_blocks[first_layer_tensor] == "layer.0" and blocks.layers[first_layer_tensor] == 0


def test_groups_of_layers_split_by_filters():
    blocks = BlockMap.by_layer(LLAMA, granularity=2, filters=["self_attn", "mlp"])
    groups = ("layers.0-1", "layers.2-3", "layers.4-4")
    assert blocks.blocks == ("embed", *(f"{g}.{p}" for g in groups for p in ("self_attn", "mlp", "other")), "head")
    assert blocks.tensor_blocks["model.layers.3.self_attn.k_proj.weight"] == "layers.2-3.self_attn"
    assert blocks.tensor_blocks["model.layers.4.mlp.down_proj.weight"] == "layers.4-4.mlp"
    assert blocks.tensor_blocks["model.layers.1.post_attention_layernorm.weight"] == "layers.0-1.other"
    assert blocks.layers["model.layers.3.mlp.up_proj.weight"] == 3 and blocks.n_layers == 5  # depth stays per layer


def small_llama(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(3, 2, generator=g).to(torch.bfloat16) for n in LLAMA}


def test_plan_overrides_a_filtered_group(tmp_path):
    paths = []
    for k in range(2):
        (tmp_path / f"m{k}").mkdir()
        save_file(small_llama(k), str(tmp_path / f"m{k}" / "model.safetensors"))
        paths.append(str(tmp_path / f"m{k}"))
    plan = {
        "method": {"name": "linear", "weights": [0.5, 0.5]},
        "models": paths,
        "layer_granularity": 2,
        "filters": ["self_attn", "mlp"],
        "blocks": {"layers.2-3.mlp": {"weights": [1.0, 0.0]}},
    }
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    MergePlan.load(tmp_path / "plan.yaml").run(tmp_path / "out")
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    a, b = small_llama(0), small_llama(1)
    mean = merge_state_dicts({"name": "linear", "weights": [0.5, 0.5]}, None, [a, b])
    for name in LLAMA:
        overridden = name.startswith(("model.layers.2.mlp", "model.layers.3.mlp"))
        assert torch.equal(merged[name], a[name] if overridden else mean[name]), name


def test_merge_space_genes_per_filtered_group():
    shapes = tuple((3, 2) for _ in LLAMA)
    layout = Layout(tuple(LLAMA), shapes)
    seeds = [np.random.default_rng(k).standard_normal(layout.size).astype(np.float32) for k in range(3)]
    options = {
        "methods": ["task_arithmetic"],
        "layer_granularity": 3,
        "filters": ["self_attn", "mlp"],
        "genes": {"scale": {"low": 0.0, "high": 1.0, "per": "block"}},
    }
    space = MergeGenesSpace(parse(MergeGenesOptions, options, "space"), layout, seeds)
    assert space.dim == 2 + 2 * 3  # embed, head and 2 groups x (self_attn, mlp, other)
    genome = np.linspace(0.0, 1.0, space.dim).astype(np.float32)
    out = space.decode(genome)
    base, a, b = (layout.views(s) for s in seeds)
    name = "model.layers.4.mlp.up_proj.weight"  # group layers.3-4, its mlp block
    block = space.blockmap.index(name)
    assert space.blockmap.blocks[block] == "layers.3-4.mlp"
    expected = merge_state_dicts({"name": "task_arithmetic", "scale": float(genome[block])}, base, [a, b])
    assert torch.equal(out[name], expected[name])
    plan = space.to_plan(genome, ["s0", "s1", "s2"])
    assert plan["layer_granularity"] == 3 and plan["filters"] == ["self_attn", "mlp"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"blocks": "tensor", "filters": ["mlp"]}, r"space\.filters: split layer blocks, so they need blocks by layer"),
        ({"layer_granularity": 0}, r"space\.layer_granularity: got 0, must be >= 1"),
        ({"filters": ["mlp", "mlp"]}, r"space\.filters: got \['mlp', 'mlp'\], need distinct names"),
        ({"filters": ["other"]}, r"space\.filters: 'other' is the block of the tensors no filter matches"),
    ],
)
def test_bad_block_options_name_the_field(options, message):
    with pytest.raises(SpecError, match=message):
        parse(MergeGenesOptions, {"methods": ["linear"], "genes": {"weights": {}}, **options}, "space")


def test_recipe_groups_layers_but_refuses_granularity_without_layers():
    with pytest.raises(SpecError, match=r"space\.layer_granularity: groups layers, so it needs blocks by layer"):
        parse(RecipeOptions, {"blocks": "tensor", "layer_granularity": 2}, "space")
    assert parse(RecipeOptions, {"blocks": "layer", "layer_granularity": 2}, "space").layer_granularity == 2


def test_recipe_blocks_by_groups_of_layers():
    from evomerge.space.recipe import named_blocks

    layout = Layout(tuple(LLAMA), tuple((3, 2) for _ in LLAMA))
    blocks = named_blocks(layout, RecipeOptions(blocks="layer", layer_granularity=2))
    assert [name for name, _, _ in blocks] == ["embed", "layers.0-1", "layers.2-3", "layers.4-4", "head"]
    assert [end - start for _, start, end in blocks] == [6, 2 * 9 * 6, 2 * 9 * 6, 9 * 6, 2 * 6]
