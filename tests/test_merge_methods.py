"""Merge-method library: exact values on hand-made tensors, the ALGORITHMS.md formulas on random ones, properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge.errors import EvomergeError, ShapeMismatchError, SpecError
from evomerge.merge import (
    MERGE_METHODS,
    MergeContext,
    TensorGroup,
    as_merger,
    dare_mask,
    global_magnitude_thresholds,
    merge_state_dicts,
    merge_tensor,
)

R2 = math.sqrt(0.5)
FAST = settings(max_examples=30, deadline=None)


def tv(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def close(actual: torch.Tensor, expected: object, atol: float = 1e-6) -> None:
    np.testing.assert_allclose(actual.float().numpy(), np.asarray(expected, dtype=np.float64), rtol=1e-5, atol=atol)


# The TIES example: base 1, τ1 = [1, -2, 3, 0.5], τ2 = [-1, -1, 2, 4].
BASE = tv(1, 1, 1, 1)
THETA1 = BASE + tv(1, -2, 3, 0.5)
THETA2 = BASE + tv(-1, -1, 2, 4)


def test_registry_lists_every_method() -> None:
    names = "linear task_arithmetic slerp ties dare breadcrumbs model_stock lines fisher task_vectors"
    assert set(MERGE_METHODS.names()) == set(names.split())


# --- exact values on hand-made tensors ------------------------------------------------------------------------


def test_linear_exact() -> None:
    a, b = tv(1, 2, 3), tv(3, 2, 1)
    close(merge_tensor({"name": "linear", "weights": [0.25, 0.75]}, "w", None, [a, b]), [2.5, 2.0, 1.5])
    close(merge_tensor({"name": "linear", "weights": [1, 3], "normalize": True}, "w", None, [a, b]), [2.5, 2.0, 1.5])
    close(merge_tensor("linear", "w", None, [a, b]), [2.0, 2.0, 2.0])
    close(merge_tensor({"name": "linear", "weights": [1, 1]}, "w", None, [a, b]), [4.0, 4.0, 4.0])


def test_task_arithmetic_exact() -> None:
    base = tv(1, 1, 1)
    t1, t2 = base + tv(1, 0, -1), base + tv(0, 2, 2)
    close(merge_tensor({"name": "task_arithmetic", "weights": [0.5, -1]}, "w", base, [t1, t2]), [1.5, -1.0, -1.5])
    close(merge_tensor({"name": "task_arithmetic", "scale": 2}, "w", base, [t1, t2]), [3.0, 5.0, 3.0])


def test_ties_exact() -> None:
    # trim to 2 of 4: τ1 -> [0, -2, 3, 0], τ2 -> [0, 0, 2, 4]; signs of the sum [0, -2, 5, 4] -> [0, -, +, +]
    ties = {"name": "ties", "density": 0.5}
    close(merge_tensor(ties, "w", BASE, [THETA1, THETA2]), [1.0, -1.0, 3.5, 5.0])  # disjoint mean [0, -2, 2.5, 4]
    close(merge_tensor({**ties, "aggregate": "sum"}, "w", BASE, [THETA1, THETA2]), [1.0, -1.0, 6.0, 5.0])
    close(merge_tensor({**ties, "scale": 0.5}, "w", BASE, [THETA1, THETA2]), [1.0, 0.0, 2.25, 3.0])
    # weights act after trimming, before the election: 3 · τ2 -> [0, 0, 6, 12]; disjoint mean [0, -2, 4.5, 12]
    close(merge_tensor({**ties, "weights": [1, 3]}, "w", BASE, [THETA1, THETA2]), [1.0, -1.0, 5.5, 13.0])


def test_zero_task_vectors_leave_the_base_and_drop_out_of_the_election() -> None:
    """A tensor no fine-tune changed (a frozen embedding) merges to the base exactly; a model that left one tensor
    unchanged counts as absent there: TIES of [τ1, 0] is τ1 trimmed (the disjoint mean ignores the zero)."""
    for method in ({"name": "ties", "density": 0.5}, {"name": "dare", "drop_rate": 0.5, "consensus": "elect"}):
        merged = merge_tensor(method, "w", BASE, [BASE.clone(), BASE.clone()])
        assert torch.equal(merged, BASE) and merged.data_ptr() != BASE.data_ptr()
    close(merge_tensor({"name": "ties", "density": 0.5}, "w", BASE, [THETA1, BASE.clone()]), [1.0, -1.0, 4.0, 1.0])


def test_ties_model_scope_differs_from_tensor_scope() -> None:
    # the TIES example split over two tensors a, b: over the whole model the top 2 of each τ are the same as above
    base = {"a": tv(1, 1), "b": tv(1, 1)}
    m1 = {"a": tv(2, -1), "b": tv(4, 1.5)}
    m2 = {"a": tv(0, 0), "b": tv(3, 5)}
    model = merge_state_dicts({"name": "ties", "density": 0.5, "scope": "model"}, base, [m1, m2])
    close(model["a"], [1.0, -1.0])
    close(model["b"], [3.5, 5.0])
    # per tensor, τ2 of a = [-1, -1] keeps both (a tie at the threshold) and τ1 of b keeps only the 3
    tensor = merge_state_dicts({"name": "ties", "density": 0.5}, base, [m1, m2])
    close(tensor["a"], [0.0, -0.5])
    close(tensor["b"], [4.0, 5.0])


def test_global_thresholds_are_exact() -> None:
    thresholds = global_magnitude_thresholds([[tv(1, -2), tv(-1, -1)], [tv(3, 0.5), tv(2, 4)]], density=0.5)
    assert thresholds == [2.0, 2.0]
    assert global_magnitude_thresholds([[tv(1, -2, 5, 0)]], density=0.2) == [5.0]


def test_dare_exact() -> None:
    # p = 0 keeps everything: plain task arithmetic; with sign election and sum the TIES sum without trimming
    close(merge_tensor({"name": "dare", "drop_rate": 0}, "w", BASE, [THETA1, THETA2]), [1.0, -2.0, 6.0, 5.5])
    elect = {"name": "dare", "drop_rate": 0, "consensus": "elect"}
    close(merge_tensor(elect, "w", BASE, [THETA1, THETA2]), [1.0, -2.0, 6.0, 5.5])  # coordinate 0: 1 - 1 = 0
    close(merge_tensor({**elect, "aggregate": "disjoint_mean"}, "w", BASE, [THETA1, THETA2]), [1.0, -0.5, 3.5, 3.25])


def test_dare_drops_and_rescales() -> None:
    # p = 0.5: every surviving entry doubles, every dropped one is 0
    base, theta = torch.zeros(64), torch.full((64,), 3.0)
    out = merge_tensor({"name": "dare", "drop_rate": 0.5, "seed": 7}, "layer.w", base, [theta])
    assert set(out.tolist()) == {0.0, 6.0}
    keep = dare_mask((64,), 0.5, seed=7, task=0, name="layer.w")
    close(out, 6.0 * keep.float())


def test_breadcrumbs_exact() -> None:
    base = torch.zeros(10)
    t1 = tv(10, -5, 4, 3, -2, 1, 0.5, 0.1, 0, 0)  # drop the top 1 (10) and keep the next 5
    t2 = tv(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # drop 1.0, keep 0.9 .. 0.5
    out = merge_tensor({"name": "breadcrumbs", "density": 0.5, "gamma": 0.1}, "w", base, [t1, t2])
    close(out, [0, -5, 4, 3, -1.5, 1.6, 0.7, 0.8, 0.9, 0])


def test_model_stock_exact() -> None:
    # τ1 = [1, 1, 0], τ2 = [0, 1, 1]: cos φ = 1/2, t = 2 · 0.5 / 1.5 = 2/3; mean θ = [3.5, 4, 3.5]
    base = tv(3, 3, 3)
    out = merge_tensor("model_stock", "w", base, [tv(4, 4, 3), tv(3, 4, 4)])
    close(out, [10 / 3, 11 / 3, 10 / 3])
    # orthogonal task vectors give t = 0: the base
    close(merge_tensor("model_stock", "w", base, [tv(4, 3, 3), tv(3, 4, 3)]), [3, 3, 3])


def test_lines_exact() -> None:
    # L = 3 layers, α = 0.5, β = 1: λ = 0.5, 1.0, 1.5 by depth; the embedding gets α
    names = ["embed.weight", "model.layers.0.w", "model.layers.1.w", "model.layers.2.w"]
    base = {n: torch.zeros(2) for n in names}
    model = {n: tv(2, -2) for n in names}
    out = merge_state_dicts({"name": "lines", "alpha": 0.5, "beta": 1.0}, base, [model])
    for name, lam in zip(names, [0.5, 0.5, 1.0, 1.5]):
        close(out[name], [2 * lam, -2 * lam])
    # layers passed explicitly
    explicit = {"name": "lines", "alpha": 0, "beta": 2}
    out = merge_state_dicts(explicit, base, [model], layer_of={"embed.weight": 1}, num_layers=2)
    close(out["embed.weight"], [4.0, -4.0])
    close(out["model.layers.0.w"], [0.0, 0.0])


def test_fisher_exact() -> None:
    thetas, fishers = [tv(1, 2), tv(5, 4)], [tv(1, 0), tv(3, 0)]
    # coordinate 1 has no Fisher information: epsilon makes it the plain (λ-weighted) mean
    close(merge_tensor("fisher", "w", None, thetas, MergeContext(fisher=fishers)), [4.0, 3.0])
    out = merge_tensor({"name": "fisher", "weights": [3, 1]}, "w", None, thetas, MergeContext(fisher=fishers))
    close(out, [3.0, 2.5])


def test_slerp_exact() -> None:
    close(merge_tensor({"name": "slerp", "t": 0.5}, "w", None, [tv(1, 0), tv(0, 1)]), [R2, R2])
    # with a base the task vectors are interpolated: τ1 = [1, 0], τ2 = [0, 1]
    close(merge_tensor({"name": "slerp", "t": 0.5}, "w", tv(1, 1), [tv(2, 1), tv(1, 2)]), [1 + R2, 1 + R2])
    # 60 degrees, t = 1/2: sin(30°)/sin(60°) = 1/√3 on each end
    out = merge_tensor({"name": "slerp", "t": 0.5}, "w", None, [tv(1, 0), tv(0.5, math.sqrt(3) / 2)])
    close(out, [1.5 / math.sqrt(3), 0.5])


def test_whole_model_slerp_uses_one_angle() -> None:
    a = {"x": tv(1, 0), "y": tv(0, 0)}
    b = {"x": tv(0, 0), "y": tv(0, 1)}
    per_tensor = merge_state_dicts({"name": "slerp", "t": 0.5}, None, [a, b])
    close(per_tensor["x"], [0.5, 0])  # a zero end makes each tensor linear
    close(per_tensor["y"], [0, 0.5])
    whole = merge_state_dicts({"name": "slerp", "t": 0.5, "scope": "model"}, None, [a, b])
    close(whole["x"], [R2, 0])  # the models [1, 0, 0, 0] and [0, 0, 0, 1] are orthogonal
    close(whole["y"], [0, R2])


def test_streaming_caller_prepares_then_merges() -> None:
    rng = torch.Generator().manual_seed(0)
    base = {n: torch.randn(5, generator=rng) for n in "abc"}
    sds = [{n: torch.randn(5, generator=rng) for n in "abc"} for _ in range(3)]
    merger = as_merger({"name": "ties", "density": 0.3, "scope": "model"})
    stats = merger.prepare(TensorGroup(n, base[n], [sd[n] for sd in sds]) for n in base)
    streamed = {n: merger(n, base[n], [sd[n] for sd in sds], MergeContext(model_stats=stats)) for n in base}
    in_memory = merge_state_dicts(merger, base, sds)
    for n in base:
        torch.testing.assert_close(streamed[n], in_memory[n])


def test_presets_are_pipelines() -> None:
    rng = torch.Generator().manual_seed(1)
    base, ts = torch.randn(40, generator=rng), [torch.randn(40, generator=rng) for _ in range(3)]
    ties = merge_tensor({"name": "ties", "density": 0.3}, "w", base, ts)
    generic = {"name": "task_vectors", "sparsify": "magnitude", "density": 0.3, "consensus": "elect"}
    torch.testing.assert_close(ties, merge_tensor({**generic, "aggregate": "disjoint_mean"}, "w", base, ts))
    lines = merge_tensor({"name": "lines", "alpha": 0.3, "beta": 0.6}, "w", base, ts, MergeContext(2, 5))
    torch.testing.assert_close(lines, merge_tensor({"name": "task_arithmetic", "scale": 0.6}, "w", base, ts))


def test_integer_buffers_pass_through() -> None:
    ids = torch.arange(4)
    out = merge_state_dicts("task_arithmetic", {"w": BASE, "ids": ids}, [{"w": THETA1, "ids": ids.clone()}])
    assert torch.equal(out["ids"], ids) and out["ids"].dtype == torch.int64
    with pytest.raises(EvomergeError, match="'ids' has dtype torch.int64 and differs in models\\[0\\]"):
        merge_state_dicts("task_arithmetic", {"w": BASE, "ids": ids}, [{"w": THETA1, "ids": ids + 1}])


# --- the formulas of ALGORITHMS.md on random tensors -----------------------------------------------------------


def _random(seed: int, n_models: int, shape: tuple[int, ...] = (6, 7)) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape), [rng.standard_normal(shape) for _ in range(n_models)]


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).float()


def _ties_reference(base: np.ndarray, thetas: list[np.ndarray], density: float, lam: float) -> np.ndarray:
    trimmed = []
    for theta in thetas:
        tau = (theta - base).ravel()
        k = math.ceil(density * tau.size)
        cut = np.sort(np.abs(tau))[::-1][k - 1]
        trimmed.append(np.where(np.abs(tau) >= cut, tau, 0.0))
    stacked = np.stack(trimmed)
    sign = np.sign(stacked.sum(0))
    agree = (np.sign(stacked) == sign) & (stacked != 0)
    merged = np.where(agree, stacked, 0).sum(0) / np.maximum(agree.sum(0), 1)
    return base + lam * merged.reshape(base.shape)


def test_formulas_on_random_tensors() -> None:
    base, thetas = _random(0, 3)
    tb, tt = _t(base), [_t(x) for x in thetas]
    lams = [0.3, -0.7, 1.1]
    direct = base + sum(lam * (x - base) for lam, x in zip(lams, thetas))
    close(merge_tensor({"name": "task_arithmetic", "weights": lams}, "w", tb, tt), direct, atol=1e-5)
    close(merge_tensor({"name": "linear", "weights": lams}, "w", None, tt), sum(w * x for w, x in zip(lams, thetas)))
    ties = merge_tensor({"name": "ties", "density": 0.3, "scale": 0.8}, "w", tb, tt)
    close(ties, _ties_reference(base, thetas, 0.3, 0.8), atol=1e-5)

    taus = [(x - base).ravel() for x in thetas]
    cos = np.mean([a @ b / np.linalg.norm(a) / np.linalg.norm(b) for i, a in enumerate(taus) for b in taus[i + 1 :]])
    cos = min(max(cos, 0.0), 1.0)
    t = 3 * cos / (1 + 2 * cos)
    close(merge_tensor("model_stock", "w", tb, tt), t * np.mean(thetas, axis=0) + (1 - t) * base, atol=1e-5)

    fishers = [np.abs(x) for x in _random(1, 3)[1]]
    expected = sum(lam * f * x for lam, f, x in zip([1, 2, 3], fishers, thetas)) / sum(
        lam * f for lam, f in zip([1, 2, 3], fishers)
    )
    ctx = MergeContext(fisher=[_t(f) for f in fishers])
    close(merge_tensor({"name": "fisher", "weights": [1, 2, 3], "epsilon": 1e-12}, "w", None, tt, ctx), expected)

    lines = merge_tensor({"name": "lines", "alpha": 0.2, "beta": 0.9}, "w", tb, tt, MergeContext(3, 7))
    close(lines, base + (0.2 + 0.9 * 3 / 6) * sum(x - base for x in thetas), atol=1e-5)


def test_breadcrumbs_matches_ranked_band() -> None:
    base, thetas = _random(2, 2, (200,))
    out = merge_tensor({"name": "breadcrumbs", "density": 0.3, "gamma": 0.05}, "w", _t(base), [_t(x) for x in thetas])
    expected = base.copy()
    for theta in thetas:
        tau = theta - base
        band = np.argsort(-np.abs(tau), kind="stable")[10:70]
        expected[band] += tau[band]
    close(out, expected, atol=1e-5)


# --- properties --------------------------------------------------------------------------------------------------

finite = st.floats(-100, 100, allow_nan=False, width=32)
vectors = st.lists(finite, min_size=1, max_size=12)


@FAST
@given(vectors, st.lists(st.floats(0.01, 10), min_size=1, max_size=5))
def test_linear_with_unit_sum_weights_returns_the_model(values: list[float], raw: list[float]) -> None:
    theta = tv(*values)
    weights = [w / sum(raw) for w in raw]
    out = merge_tensor({"name": "linear", "weights": weights}, "w", None, [theta.clone() for _ in weights])
    close(out, values, atol=1e-4)


pairs = st.integers(1, 12).flatmap(lambda n: st.tuples(*[st.lists(finite, min_size=n, max_size=n)] * 2))


@FAST
@given(pairs, st.floats(-2, 2))
def test_ties_with_density_one_and_one_model_is_task_arithmetic(pair: tuple[list[float], ...], lam: float) -> None:
    base, theta = tv(*pair[0]), tv(*pair[1])
    ties = merge_tensor({"name": "ties", "density": 1, "scale": lam}, "w", base, [theta])
    torch.testing.assert_close(ties, merge_tensor({"name": "task_arithmetic", "scale": lam}, "w", base, [theta]))


@FAST
@given(st.integers(0, 2**31), st.lists(st.floats(-2, 2), min_size=1, max_size=4), st.integers(1, 30))
def test_dare_with_zero_drop_rate_is_task_arithmetic(seed: int, weights: list[float], n: int) -> None:
    g = torch.Generator().manual_seed(seed)
    base, ts = torch.randn(n, generator=g), [torch.randn(n, generator=g) for _ in weights]
    dare = merge_tensor({"name": "dare", "drop_rate": 0, "seed": seed, "weights": weights}, "w", base, ts)
    torch.testing.assert_close(dare, merge_tensor({"name": "task_arithmetic", "weights": weights}, "w", base, ts))


@FAST
@given(vectors, st.booleans())
def test_slerp_ends_are_the_models(values: list[float], with_base: bool) -> None:
    x = tv(*values)
    y = x.flip(0) * 2 + 1
    base = x / 3 if with_base else None
    for t, end in [(0, x), (1, y)]:
        close(merge_tensor({"name": "slerp", "t": t}, "w", base, [x, y]), end, atol=1e-3)


SPECS = [
    ("linear", None),
    ("task_arithmetic", None),
    ({"name": "slerp", "t": 0.3}, None),
    ({"name": "ties", "density": 0.5}, None),
    ({"name": "dare", "drop_rate": 0.5}, None),
    ({"name": "breadcrumbs", "density": 0.5, "gamma": 0.1}, None),
    ("model_stock", None),
    ({"name": "lines", "alpha": 0.5, "beta": 0.5}, MergeContext(1, 3)),
    ("fisher", "fisher"),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("spec", "ctx"), SPECS, ids=[str(s if isinstance(s, str) else s["name"]) for s, _ in SPECS])
def test_dtype_is_preserved(spec: object, ctx: object, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    base, ts = torch.randn(3, 4, generator=g).to(dtype), [torch.randn(3, 4, generator=g).to(dtype) for _ in range(2)]
    if ctx == "fisher":
        ctx = MergeContext(fisher=[torch.rand(3, 4, generator=g).to(dtype) for _ in ts])
    out = merge_tensor(spec, "w", base, ts, ctx)
    assert out.dtype == dtype and out.shape == (3, 4) and bool(torch.isfinite(out).all())


def test_dare_masks_are_reproducible() -> None:
    first = dare_mask((1000,), 0.5, seed=1, task=0, name="a.weight")
    assert torch.equal(first, dare_mask((1000,), 0.5, seed=1, task=0, name="a.weight"))
    for other in [
        dare_mask((1000,), 0.5, seed=2, task=0, name="a.weight"),
        dare_mask((1000,), 0.5, seed=1, task=1, name="a.weight"),
        dare_mask((1000,), 0.5, seed=1, task=0, name="b.weight"),
    ]:
        assert not torch.equal(first, other)
    base, theta = torch.zeros(200), torch.ones(200)
    spec = {"name": "dare", "drop_rate": 0.5}
    torch.testing.assert_close(
        merge_tensor({**spec, "seed": 4}, "w", base, [theta]), merge_tensor({**spec, "seed": 4}, "w", base, [theta])
    )
    assert not torch.equal(
        merge_tensor({**spec, "seed": 4}, "w", base, [theta]), merge_tensor({**spec, "seed": 5}, "w", base, [theta])
    )


# --- errors ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare", "breadcrumbs", "model_stock"])
def test_task_vector_methods_need_a_base(method: str) -> None:
    with pytest.raises(EvomergeError, match=f"^method '{method}' needs a base model$"):
        merge_tensor(method, "w", None, [THETA1, THETA2])
    with pytest.raises(EvomergeError, match=f"^method '{method}' needs a base model$"):
        merge_state_dicts(method, None, [{"w": THETA1}, {"w": THETA2}])


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"name": "ties", "density": 1.5}, "merge.density: got 1.5, must be in (0, 1]"),
        ({"name": "ties", "density": 0}, "merge.density: got 0.0, must be in (0, 1]"),
        ({"name": "breadcrumbs", "density": -0.1}, "merge.density: got -0.1, must be in (0, 1]"),
        ({"name": "dare", "drop_rate": 1}, "merge.drop_rate: got 1.0, must be in [0, 1)"),
        ({"name": "dare", "drop_rate": -0.5}, "merge.drop_rate: got -0.5, must be in [0, 1)"),
        ({"name": "dare", "seed": -1}, "merge.seed: got -1, must be in [0, inf)"),
        ({"name": "slerp", "t": 2}, "merge.t: got 2.0, must be in [0, 1]"),
        ({"name": "fisher", "epsilon": 0}, "merge.epsilon: got 0.0, must be in (0, inf)"),
        ({"name": "fisher", "weights": [1, 0]}, "merge.weights[1]: got 0.0, must be > 0"),
        ({"name": "task_arithmetic", "weights": [1, float("nan")]}, "merge.weights[1]: got nan, must be a finite"),
        ({"name": "breadcrumbs", "density": 0.995}, "merge.density: got 0.995 with gamma 0.01; density + gamma"),
        ({"name": "task_vectors", "scope": "model"}, "merge.scope: 'model' needs sparsify 'magnitude', got 'none'"),
        ({"name": "ties", "aggregate": "median"}, "merge.aggregate: got 'median', allowed: 'mean', 'sum'"),
        ({"name": "lines", "alpha": 1}, "merge.beta: missing required field"),
        ({"name": "tie"}, "unknown merge method 'tie' (did you mean 'ties'?)"),
    ],
)
def test_bad_options_name_the_field(spec: dict, message: str) -> None:
    with pytest.raises(SpecError) as err:
        merge_state_dicts(spec, {"w": BASE}, [{"w": THETA1}, {"w": THETA2}])
    assert message in str(err.value)


def test_options_built_in_code_are_checked_too() -> None:
    from evomerge.merge.task_vectors import TiesOptions
    from evomerge.registry import Component

    with pytest.raises(SpecError, match=r"^merge\.density: got 2, must be in \(0, 1\]$"):
        as_merger(Component("ties", TiesOptions(density=2)))


def test_non_finite_inputs_name_tensor_and_model() -> None:
    bad = THETA2.clone()
    bad[2] = float("nan")
    with pytest.raises(EvomergeError, match=r"^tensor 'blk\.w' of models\[1\] has a non-finite value \(nan\)$"):
        merge_tensor("task_arithmetic", "blk.w", BASE, [THETA1, bad])
    with pytest.raises(EvomergeError, match=r"tensor 'w' of the base model has a non-finite value \(inf\)"):
        merge_state_dicts("ties", {"w": BASE / 0}, [{"w": THETA1}])
    with pytest.raises(EvomergeError, match=r"tensor 'w' of fishers\[0\] has a non-finite value"):
        merge_tensor("fisher", "w", None, [THETA1], MergeContext(fisher=[BASE * float("inf")]))


def test_mismatched_state_dicts_name_the_first_difference() -> None:
    base = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    expected = r"^tensor 'a': the base model has shape \(2, 3\), models\[1\] has shape \(3, 2\)$"
    with pytest.raises(ShapeMismatchError, match=expected):
        merge_state_dicts("task_arithmetic", base, [base, {"a": torch.zeros(3, 2), "b": torch.zeros(4)}])
    with pytest.raises(ShapeMismatchError, match=r"tensor 'b': the base model has shape \(4,\), models\[0\] has no"):
        merge_state_dicts("task_arithmetic", base, [{"a": torch.zeros(2, 3)}])
    with pytest.raises(ShapeMismatchError, match=r"tensor 'c': models\[1\] has shape \(1,\), models\[0\] has no"):
        merge_state_dicts("linear", None, [{"a": torch.zeros(1)}, {"a": torch.zeros(1), "c": torch.zeros(1)}])
    with pytest.raises(ShapeMismatchError, match=r"tensor 'w': models\[1\] has shape \(3,\), expected \(4,\)"):
        merge_tensor("ties", "w", BASE, [THETA1, torch.zeros(3)])


def test_counts_are_checked() -> None:
    with pytest.raises(EvomergeError, match=r"^method 'task_arithmetic': got 3 weights for 2 models$"):
        merge_state_dicts({"name": "task_arithmetic", "weights": [1, 2, 3]}, {"w": BASE}, [{"w": THETA1}] * 2)
    with pytest.raises(EvomergeError, match=r"^method 'linear': got 1 weights for 2 models$"):
        merge_tensor({"name": "linear", "weights": [1]}, "w", None, [THETA1, THETA2])
    with pytest.raises(EvomergeError, match="method 'slerp' takes at most 2 models, got 3"):
        merge_tensor("slerp", "w", None, [THETA1, THETA2, BASE])
    with pytest.raises(EvomergeError, match="method 'model_stock' needs at least 2 models, got 1"):
        merge_tensor("model_stock", "w", BASE, [THETA1])
    with pytest.raises(EvomergeError, match="method 'fisher' needs one Fisher tensor per model for 'w', got 0"):
        merge_tensor("fisher", "w", None, [THETA1])
    with pytest.raises(EvomergeError, match="method 'ties' with scope 'model' needs model-wide thresholds"):
        merge_tensor({"name": "ties", "scope": "model"}, "w", BASE, [THETA1])
    with pytest.raises(EvomergeError, match="tensor 'w' is in layer 3 but num_layers was not given"):
        merge_tensor({"name": "lines", "alpha": 1, "beta": 1}, "w", BASE, [THETA1], MergeContext(layer=3))
