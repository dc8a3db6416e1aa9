"""The mergekit bridge: mergekit YAML merged by `evomerge merge` equals hand-computed values under mergekit 0.1.5's
conventions, an exported mergekit.yaml re-applies to the same tensors, and bad configs fail with one line."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from evomerge.cli import main
from evomerge.merge import merge_tensor
from evomerge.merge.mergekit import NotMappable, mergekit_yaml
from evomerge.merge.task_vectors import dare_mask, keep_count


def model(tmp_path: Path, name: str, tensors: dict[str, list[float]]) -> str:
    folder = tmp_path / name
    folder.mkdir()
    save_file({k: torch.tensor(v, dtype=torch.float32) for k, v in tensors.items()}, str(folder / "model.safetensors"))
    return str(folder)


def merge(tmp_path: Path, config: dict, out: str = "out") -> dict[str, torch.Tensor]:
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    assert main(["merge", str(path), "--out", str(tmp_path / out)]) == 0
    return load_file(str(tmp_path / out / "model.safetensors"))


def test_ties_keep_count_sign_ties_and_weighted_normalisation(tmp_path: Path):
    base = model(tmp_path, "base", {"w": [0.0] * 4})
    a = model(tmp_path, "a", {"w": [4.0, -3.0, 2.0, 1.0]})
    b = model(tmp_path, "b", {"w": [-2.0, 1.0, 3.0, -0.5]})
    config = {
        "merge_method": "ties",
        "base_model": base,
        "models": [
            {"model": base},
            {"model": a, "parameters": {"weight": 1.0, "density": 0.6}},
            {"model": b, "parameters": {"weight": 2.0, "density": 0.6}},
        ],
        "parameters": {"normalize": True},
        "dtype": "float32",
    }
    # mergekit keeps int(0.6 · 4) = 2 entries: 1·[4, -3, 0, 0] and 2·[-2, 0, 3, 0]; the sign sums [0, -3, 6, 0]
    # elect + where 0; agreeing entries are divided by their weights' sum: [4/1, -3/1, 6/2, 0]
    assert torch.equal(merge(tmp_path, config)["w"], torch.tensor([4.0, -3.0, 3.0, 0.0]))
    # evomerge keeps ceil(2.4) = 3 entries, elects no sign at a zero sum and divides by the count: [0, -3, 8/2, 0]
    tensors = [torch.tensor([4.0, -3.0, 2.0, 1.0]), torch.tensor([-2.0, 1.0, 3.0, -0.5])]
    ours = merge_tensor({"name": "ties", "density": 0.6, "weights": [1.0, 2.0]}, "w", torch.zeros(4), tensors)
    assert torch.equal(ours, torch.tensor([0.0, -3.0, 4.0, 0.0]))
    assert [keep_count(d, 10, "mergekit") for d in (0.05, 0.35, 1.0)] == [1, 3, 10]
    assert [keep_count(d, 10) for d in (0.05, 0.35, 1.0)] == [1, 4, 10]


def test_dare_rescales_to_the_l1_norm(tmp_path: Path):
    tau = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    base = model(tmp_path, "base", {"w": [0.0] * 8})
    a = model(tmp_path, "a", {"w": tau})
    config = {
        "merge_method": "dare_ties",
        "base_model": base,
        "models": [{"model": a, "parameters": {"weight": 1.0, "density": 0.5}}],
    }
    keep = dare_mask((8,), 0.5, 0, 0, "w").tolist()  # evomerge's seeded mask (mergekit draws its own)
    kept = sum(x for x, k in zip(tau, keep) if k)
    expected = torch.tensor([x * (36.0 / kept) if k else 0.0 for x, k in zip(tau, keep)])
    torch.testing.assert_close(merge(tmp_path, config)["w"], expected, rtol=1e-7, atol=0)
    ours = merge_tensor({"name": "dare", "drop_rate": 0.5}, "w", torch.zeros(8), [torch.tensor(tau)])
    assert torch.equal(ours, torch.tensor([x * 2.0 if k else 0.0 for x, k in zip(tau, keep)]))


def test_slerp_gradient_and_straight_line_fallback(tmp_path: Path):
    x = {"model.embed.weight": [1.0, 0.0], **{f"model.layers.{i}.w": [1.0, 0.0] for i in range(3)}}
    y = {"model.embed.weight": [0.0, 1.0], "model.layers.0.w": [0.0, 1.0], "model.layers.1.w": [1.0, 0.02]}
    y["model.layers.2.w"] = [0.0, 1.0]
    a, b = model(tmp_path, "x", x), model(tmp_path, "y", y)
    config = {
        "merge_method": "slerp",
        "base_model": a,
        "models": [{"model": a}, {"model": b}],
        "parameters": {"t": [{"filter": "embed", "value": 0.5}, {"value": [0.0, 0.5, 1.0]}]},
    }
    out = merge(tmp_path, config)
    half = math.sin(math.pi / 4)
    assert torch.equal(out["model.embed.weight"], torch.tensor([half, half]))
    assert torch.equal(out["model.layers.0.w"], torch.tensor([1.0, 0.0]))  # t = 0 at the first layer
    assert torch.equal(out["model.layers.2.w"], torch.tensor([0.0, 1.0]))  # t = 1 at the last
    # cos = 1/√1.0004 ≈ 0.9998 > 0.9995: mergekit interpolates on the straight line, evomerge on the arc
    assert torch.equal(out["model.layers.1.w"], torch.tensor([1.0, 0.01]))
    arc = merge_tensor({"name": "slerp", "t": 0.5}, "w", None, [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.02])])
    assert not torch.equal(arc, torch.tensor([1.0, 0.01]))


def test_one_full_depth_slice_reads_as_models(tmp_path: Path):
    x = {f"model.layers.{i}.w": [1.0, 0.0] for i in range(2)}
    y = {f"model.layers.{i}.w": [0.0, 1.0] for i in range(2)}
    a, b = model(tmp_path, "x", x), model(tmp_path, "y", y)
    sources = [{"model": a, "layer_range": [0, 2]}, {"model": b, "layer_range": [0, 2]}]
    config = {"merge_method": "slerp", "base_model": a, "slices": [{"sources": sources}], "parameters": {"t": 0.5}}
    half = math.sin(math.pi / 4)
    assert torch.equal(merge(tmp_path, config)["model.layers.1.w"], torch.tensor([half, half]))
    sources[1]["layer_range"] = [0, 1]
    (tmp_path / "partial.yaml").write_text(yaml.safe_dump(config))
    assert main(["merge", str(tmp_path / "partial.yaml"), "--out", str(tmp_path / "p")]) == 2


def test_model_stock_t_is_not_clamped(tmp_path: Path):
    base = model(tmp_path, "base", {"w": [0.0, 0.0]})
    a, b = model(tmp_path, "a", {"w": [1.0, 0.0]}), model(tmp_path, "b", {"w": [-1.0, 1.0]})
    config = {"merge_method": "model_stock", "base_model": base, "models": [{"model": a}, {"model": b}]}
    cos = -1 / math.sqrt(2)
    t = 2 * cos / (1 + cos)  # ≈ -4.83: mergekit extrapolates away from the mean
    torch.testing.assert_close(merge(tmp_path, config)["w"], torch.tensor([0.0, 0.5]) * t, rtol=1e-6, atol=0)
    ours = merge_tensor("model_stock", "w", torch.zeros(2), [torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])])
    assert torch.equal(ours, torch.zeros(2))  # cos clamped to 0: t = 0, the base


def test_conventions_in_an_evomerge_plan(tmp_path: Path):
    base = model(tmp_path, "base", {"w": [0.0] * 4})
    a = model(tmp_path, "a", {"w": [4.0, -3.0, 2.0, 1.0]})
    b = model(tmp_path, "b", {"w": [-2.0, 1.0, 3.0, -0.5]})
    plan = {"method": {"name": "ties", "density": 0.6, "weights": [1.0, 2.0]}, "base": base, "models": [a, b]}
    assert torch.equal(merge(tmp_path, {**plan, "conventions": "mergekit"}, "mk")["w"], torch.tensor([4, -3, 3, 0.0]))
    assert torch.equal(merge(tmp_path, plan, "ours")["w"], torch.tensor([0, -3, 4, 0.0]))


def llama_like(tmp_path: Path, name: str, seed: int, layers: int = 4) -> str:
    g = torch.Generator().manual_seed(seed)
    sd = {"model.embed_tokens.weight": torch.randn(5, 4, generator=g)}
    for i in range(layers):
        sd[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(4, 4, generator=g)
        sd[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(6, 4, generator=g)
        sd[f"model.layers.{i}.input_layernorm.weight"] = torch.randn(4, generator=g)
    sd["model.norm.weight"] = torch.randn(4, generator=g)
    sd["lm_head.weight"] = torch.randn(5, 4, generator=g)
    folder = tmp_path / name
    folder.mkdir()
    save_file(sd, str(folder / "model.safetensors"))
    return str(folder)


@pytest.mark.parametrize(
    "method, extra",
    [
        ({"name": "linear"}, {}),
        ({"name": "task_arithmetic", "scale": 0.8}, {}),
        ({"name": "ties", "density": 0.5, "conventions": "mergekit"}, {"filters": ["self_attn", "mlp"]}),
        ({"name": "dare", "drop_rate": 0.3, "consensus": "elect", "conventions": "mergekit"}, {}),
    ],
)
def test_exported_mergekit_yaml_reapplies(tmp_path: Path, method: dict, extra: dict):
    base = llama_like(tmp_path, "base", 0)
    models = [llama_like(tmp_path, "a", 1), llama_like(tmp_path, "b", 2)]
    blocks = {f"layer.{i}": {"weights": [0.1 * i + 0.2, 0.9 - 0.2 * i]} for i in range(4)}
    blocks["head"] = {"weights": [0.7, 0.4]}
    if extra:
        blocks = {
            f"layer.{i}.{part}": {"weights": [0.3 + 0.1 * i, 0.5 - k / 10]}
            for i in range(4)
            for k, part in enumerate(["self_attn", "mlp", "other"])
        }
    plan = {"method": {**method, "weights": [0.5, 0.5]}, "models": models, "blocks": blocks, "block_by": "layer"}
    if method["name"] != "linear":
        plan["base"] = base
    plan.update(extra)
    names = list(load_file(str(Path(base) / "model.safetensors")))
    (tmp_path / "mergekit.yaml").write_text(mergekit_yaml(plan, names))
    config = yaml.safe_load((tmp_path / "mergekit.yaml").read_text())
    assert (
        config["merge_method"]
        == {"linear": "linear", "task_arithmetic": "task_arithmetic", "ties": "ties", "dare": "dare_ties"}[
            method["name"]
        ]
    )
    assert main(["merge", str(tmp_path / "mergekit.yaml"), "--out", str(tmp_path / "from-mergekit")]) == 0
    direct = merge(tmp_path, plan, "direct")
    again = load_file(str(tmp_path / "from-mergekit" / "model.safetensors"))
    assert sorted(direct) == sorted(again)
    for name in direct:
        assert torch.equal(direct[name], again[name]), name
    assert (tmp_path / "from-mergekit" / "mergekit.yaml").exists()


def test_unmappable_plans_say_why(tmp_path: Path):
    base = llama_like(tmp_path, "base", 0)
    names = list(load_file(str(Path(base) / "model.safetensors")))
    plan = {"method": {"name": "breadcrumbs"}, "base": base, "models": [base, base]}
    with pytest.raises(NotMappable, match="no mergekit counterpart"):
        mergekit_yaml(plan, names)
    plan = {"method": {"name": "ties"}, "base": base, "models": [base], "blocks": {"head": {"name": "linear"}}}
    with pytest.raises(NotMappable, match="one merge_method"):
        mergekit_yaml(plan, names)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"merge_method": "tie"}, "merge_method: 'tie' is not one the bridge translates (did you mean 'ties'?)"),
        ({"models": [{"model": "no/such/model", "parameters": {"weight": 1.0}}]}, "models[0].model: model path"),
        ({"parameters": {"t": 0.5}}, "parameters.t: merge_method 'ties' takes no parameter 't'"),
        ({"models": None}, "models: give exactly one of"),
        ({"models": None, "slices": [{"sources": []}, {"sources": []}]}, "slices: only one slice"),
        ({"parameters": {"rescale": True}}, "parameters.rescale: got True"),
    ],
)
def test_bad_configs_fail_with_one_line(tmp_path: Path, capsys, change: dict, message: str):
    base = model(tmp_path, "base", {"w": [0.0, 1.0]})
    a = model(tmp_path, "a", {"w": [1.0, 1.0]})
    config = {"merge_method": "ties", "base_model": base, "models": [{"model": a, "parameters": {"weight": 1.0}}]}
    config.update(change)
    config = {k: v for k, v in config.items() if v is not None}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["merge", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "space, method",
    [
        ({}, "task_arithmetic"),
        ({"methods": ["ties"], "fixed": {"conventions": "mergekit"}, "genes": {"density": {"per": "block"}}}, "ties"),
    ],
)
def test_export_writes_a_mergekit_yaml_that_rebuilds_the_model(tmp_path: Path, space: dict, method: str):
    from tests.conftest import tiny_spec, write_spec

    spec = tiny_spec(tmp_path, name="mk-export", budget=12)
    spec["models"] = {"init": "specialists", "specialists": [[0], [1, 2]], "shared_init": True, "train_steps": 5}
    genes = {"weights": {"low": 0, "high": 1.5, "per": "model_block"}, **space.pop("genes", {})}
    spec["space"] = {"name": "merge", "genes": genes, **space}
    spec["strategy"] = {"name": "cma_es", "population": 6, "sigma0": 0.3}
    assert main(["run", str(write_spec(tmp_path / "spec.yaml", spec)), "--quiet"]) == 0
    run = tmp_path / "runs" / "mk-export"
    assert main(["export", str(run)]) == 0
    exported = run / "export" / "best"
    assert yaml.safe_load((exported / "mergekit.yaml").read_text())["merge_method"] == method
    assert main(["merge", str(exported / "mergekit.yaml"), "--out", str(tmp_path / "again")]) == 0
    a, b = load_file(str(exported / "model.safetensors")), load_file(str(tmp_path / "again" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
