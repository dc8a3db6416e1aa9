"""The `merge` space: operator and knobs as genes, decoded through the operator library."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evomerge.cli import main
from evomerge.errors import SpecError
from evomerge.evaluate.classification import mlp_layout
from evomerge.merge.engine import merge_state_dicts
from evomerge.schema import parse
from evomerge.space.merge_genes import MergeGenesOptions, MergeGenesSpace
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
