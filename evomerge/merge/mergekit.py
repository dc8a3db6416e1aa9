"""The mergekit bridge: a mergekit 0.1.5 YAML config read as an evomerge merge plan, and a found merge written back.

`from_mergekit` takes `merge_method`, `base_model`, `models[].parameters`, the top-level `parameters`, `dtype`
and `out_dtype` (or `slices` holding one slice whose sources span every layer), evaluates each parameter per
tensor as mergekit does (a list of numbers is a gradient interpolated over the layers, `filter` conditions match a
substring of the tensor name, the first match wins) and returns the evomerge plan that reproduces the merge under
`conventions: mergekit`: one method, with per-block options only where the values vary. `to_mergekit` goes the
other way for plans whose method mergekit has, and checks its result by evaluating it again.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from evomerge.errors import SpecError
from evomerge.merge.base import MERGE_METHODS
from evomerge.schema import did_you_mean
from evomerge.weights.blocks import BlockMap, block_map, layer_index
from evomerge.weights.checkpoint import Checkpoint
from evomerge.yaml_io import dump_plain_yaml

REQUIRED = "required"  # a parameter without a default
_GTA_GLOBAL = {"int8_mask": False, "normalize": False, "rescale": False, "lambda": 1.0}
_GTA_MODEL = {"weight": REQUIRED, "density": 1.0}
# merge_method -> (global parameters, per-model parameters), with mergekit's defaults
METHODS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "linear": ({"normalize": True}, {"weight": REQUIRED}),
    "task_arithmetic": (_GTA_GLOBAL, _GTA_MODEL),
    "ties": ({**_GTA_GLOBAL, "normalize": True}, _GTA_MODEL),
    "dare_ties": ({**_GTA_GLOBAL, "rescale": True}, _GTA_MODEL),
    "dare_linear": ({**_GTA_GLOBAL, "rescale": True}, _GTA_MODEL),
    "slerp": ({"t": REQUIRED}, {}),
    "model_stock": ({"filter_wise": False}, {}),
}
NEEDS_BASE = {"task_arithmetic", "ties", "dare_ties", "dare_linear", "slerp", "model_stock"}
TOP_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source")
DTYPES = {
    **dict.fromkeys(("float32", "fp32"), "float32"),
    **dict.fromkeys(("float16", "fp16"), "float16"),
    **dict.fromkeys(("bfloat16", "bf16"), "bfloat16"),
}
HEADER = "# written by evomerge export; run with `mergekit-yaml mergekit.yaml OUT` or `evomerge merge mergekit.yaml`\n"


class NotMappable(Exception):
    """A plan mergekit cannot express; the message says why."""


def is_mergekit_config(data: Mapping[str, Any]) -> bool:
    """mergekit configs name `merge_method`; evomerge plans name `method`."""
    return "merge_method" in data and "method" not in data


# --- evaluating parameters as mergekit does ---------------------------------------------------------------------


def evaluate_setting(setting: Any, name: str, t: float) -> Any:
    """A parameter's value at tensor `name` at relative depth `t` (None: no condition matched)."""
    if isinstance(setting, Mapping):
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if not setting:
        return None
    if all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):  # a gradient over depth
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    if all(isinstance(e, (bool, int, float, str)) for e in setting):  # discrete values are picked, not blended
        return setting[int(t * (len(setting) - 1))]
    for cond in setting:
        if cond.get("filter") in (None, "*") or (name and cond["filter"] in name):
            return evaluate_setting(cond["value"], name, t)
    return None


def _check_setting(value: Any, path: str) -> None:
    if isinstance(value, (bool, int, float, str)):
        return
    items = [value] if isinstance(value, Mapping) else value
    if not isinstance(items, list) or not items:
        raise SpecError(path, f"got {value!r}, expected a value, a list of values or a list of {{filter, value}}")
    if all(isinstance(e, (bool, int, float, str)) for e in items):
        return
    for i, cond in enumerate(items):
        where = f"{path}[{i}]"
        if not isinstance(cond, Mapping) or "value" not in cond or set(cond) - {"filter", "value"}:
            raise SpecError(where, f"got {cond!r}, expected a mapping with `value` and an optional `filter`")
        if cond.get("filter") is not None and not isinstance(cond["filter"], str):
            raise SpecError(f"{where}.filter", f"got {cond['filter']!r}, expected a string")
        _check_setting(cond["value"], f"{where}.value")


def depth_of(names: Sequence[str]) -> dict[str, float]:
    """mergekit's `t` per tensor: layer i of L at i/(L − 1) (1 for a single layer), tensors outside layers at 0."""
    n_layers = BlockMap.by_layer(list(names)).n_layers
    out = {}
    for name in names:
        index = layer_index(name)
        out[name] = 0.0 if index is None else (index / (n_layers - 1) if n_layers > 1 else 1.0)
    return out


class _Levels:
    """Where parameters are looked up, most specific first: the model's, the slice's, the top level's."""

    def __init__(self, method: str, models: list[tuple[str, dict[str, Any]]], shared: list[dict[str, Any]]):
        """`models`: (where the model was given, its parameters) per input; `shared`: the slice's, the top's."""
        self.method, self.models, self.shared = method, models, shared
        self.global_defaults, self.model_defaults = METHODS[method]

    def where(self, model: int | None) -> str:
        return "parameters" if model is None else f"{self.models[model][0]}.parameters"

    def value(self, key: str, name: str, t: float, model: int | None = None) -> Any:
        for params in self.shared if model is None else [self.models[model][1], *self.shared]:
            if key in params:
                value = evaluate_setting(params[key], name, t)
                if value is not None:
                    return value
        default = (self.global_defaults if model is None else self.model_defaults)[key]
        if default == REQUIRED:
            raise SpecError(f"{self.where(model)}.{key}", f"missing; merge_method {self.method!r} needs it" + _at(name))
        return default

    def number(self, key: str, name: str, t: float, model: int | None = None) -> float:
        value = self.value(key, name, t, model)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SpecError(f"{self.where(model)}.{key}", f"got {value!r}, expected a finite number" + _at(name))
        return float(value)


def _at(name: str) -> str:
    return f" (tensor {name!r})" if name else ""


# --- mergekit config -> evomerge plan ---------------------------------------------------------------------------


def from_mergekit(data: Mapping[str, Any], allow_pickle: bool = False) -> dict[str, Any]:
    """The evomerge plan (a plain dict for `MergePlan`) equal to mergekit's merge `data` under its conventions."""
    for key in data:
        if key not in TOP_KEYS:
            hint = did_you_mean(str(key), TOP_KEYS)
            raise SpecError(str(key), f"not a mergekit field the bridge reads{hint}; it reads: {', '.join(TOP_KEYS)}")
    method = data["merge_method"]
    if not isinstance(method, str) or method not in METHODS:
        hint = did_you_mean(str(method), METHODS)
        raise SpecError(
            "merge_method", f"{method!r} is not one the bridge translates{hint}; it translates: " + ", ".join(METHODS)
        )
    if data.get("tokenizer_source") not in (None, "base"):
        raise SpecError("tokenizer_source", "only `base` (the tokenizer files of the base model are copied)")
    sources, slice_params, base = _sources(data, allow_pickle)
    top = data.get("parameters") or {}
    if not isinstance(top, Mapping):
        raise SpecError("parameters", f"got {top!r}, expected a mapping")
    global_defaults, model_defaults = METHODS[method]
    for where, params in [("parameters", top), ("slices[0].parameters", slice_params)]:
        _check_names(method, where, params, {**global_defaults, **model_defaults})
    for where, _, params in sources:
        _check_names(method, f"{where}.parameters", params, model_defaults, global_defaults)
    if method in NEEDS_BASE and base is None:
        raise SpecError("base_model", f"missing; merge_method {method!r} needs a base model")
    paths = [p for _, p, _ in sources]
    if method in ("linear", "slerp") and base is not None and base not in paths:
        sources.append(("base_model", base, {}))  # mergekit merges the base as one more input here
    if method == "slerp":
        if len(sources) != 2:
            raise SpecError("models", f"slerp merges 2 models (the base included), got {len(sources)}")
        sources.sort(key=lambda s: s[1] != base)  # the base is t = 0
    inputs = [(where, p, params) for where, p, params in sources if method in ("linear", "slerp") or p != base]
    levels = _Levels(method, [(where, params) for where, _, params in inputs], [slice_params, top])
    every = [v for params in [*(m for _, m in levels.models), slice_params, top] for v in params.values()]
    varying = any(not isinstance(v, (bool, int, float, str)) for v in every)
    names = Checkpoint.open(paths[0], allow_pickle).names() if varying else [""]
    depth = depth_of(names) if varying else {"": 0.0}
    per_tensor = {name: _options_at(levels, name, depth[name]) for name in names}
    plan: dict[str, Any] = {"conventions": "mergekit"}
    plan.update(_compact(per_tensor, names if varying else None))
    plan["models"] = [p for _, p, _ in inputs]
    if method not in ("linear", "slerp"):
        plan["base"] = base
    for key in ("dtype", "out_dtype"):
        if data.get(key) is not None:
            if data[key] not in DTYPES:
                raise SpecError(key, f"got {data[key]!r}; the bridge reads {', '.join(DTYPES)}")
            plan[key] = DTYPES[data[key]]
    return plan


def _sources(data: Mapping[str, Any], allow_pickle: bool) -> tuple[list[tuple[str, str, dict]], dict, str | None]:
    """(where it was given, model path, its parameters) per input, the one slice's parameters, the base's path."""
    base = data.get("base_model")
    if ("models" in data) == ("slices" in data):
        raise SpecError("models", "give exactly one of `models` and `slices`")
    if "models" in data:
        entries, where, slice_params = data["models"], "models", {}
    else:
        slices = data["slices"]
        if not isinstance(slices, list) or len(slices) != 1 or not isinstance(slices[0], Mapping):
            raise SpecError("slices", "only one slice whose sources span every layer is translated (no layer stacking)")
        entries, where, slice_params = slices[0].get("sources"), "slices[0].sources", slices[0].get("parameters") or {}
        base = slices[0].get("base_model", base)
    if not isinstance(entries, list) or not entries:
        raise SpecError(where, "expected a list of {model: PATH, parameters: {...}}")
    out = []
    for i, entry in enumerate(entries):
        at = f"{where}[{i}]"
        if not isinstance(entry, Mapping) or not isinstance(entry.get("model"), str):
            raise SpecError(f"{at}.model", "expected a model path (a string)")
        _check_path(entry["model"], f"{at}.model")
        params = entry.get("parameters") or {}
        if not isinstance(params, Mapping):
            raise SpecError(f"{at}.parameters", f"got {params!r}, expected a mapping")
        if "layer_range" in entry:
            _check_full_range(entry["model"], entry["layer_range"], f"{at}.layer_range", allow_pickle)
        out.append((at, entry["model"], dict(params)))
    if base is not None:
        if not isinstance(base, str):
            raise SpecError("base_model", "expected a model path (a string)")
        _check_path(base, "base_model")
    return out, dict(slice_params), base


def _check_path(path: str, where: str) -> None:
    if not Path(path).exists():
        raise SpecError(where, f"model path {path!r} does not exist (hub ids are not downloaded; give a local folder)")


def _check_full_range(path: str, layer_range: Any, where: str, allow_pickle: bool) -> None:
    n_layers = BlockMap.by_layer(Checkpoint.open(path, allow_pickle).names()).n_layers
    if list(layer_range) != [0, n_layers]:
        raise SpecError(where, f"got {layer_range}; only full-depth slices ([0, {n_layers}]) are translated")


def _check_names(method: str, where: str, params: Mapping, allowed: Mapping, global_only: Mapping = {}) -> None:
    for key, value in params.items():
        if key in global_only:
            raise SpecError(f"{where}.{key}", f"{key!r} is a global parameter of {method}; give it under `parameters`")
        if key not in allowed:
            hint = did_you_mean(str(key), allowed)
            takes = ", ".join(allowed) or "none"
            raise SpecError(
                f"{where}.{key}", f"merge_method {method!r} takes no parameter {key!r}{hint}; it takes: " + takes
            )
        _check_setting(value, f"{where}.{key}")


def _options_at(levels: _Levels, name: str, t: float) -> dict[str, Any]:
    """The evomerge method options that do at tensor `name` what mergekit's method does."""
    method, n = levels.method, len(levels.models)
    if method == "slerp":
        return {"name": "slerp", "t": levels.number("t", name, t)}
    if method == "model_stock":
        if levels.value("filter_wise", name, t):
            raise SpecError("parameters.filter_wise", "per-row Model Stock (filter_wise: true) is not translated")
        return {"name": "model_stock"}
    weights = [levels.number("weight", name, t, i) for i in range(n)]
    normalize = bool(levels.value("normalize", name, t))
    if method == "linear":
        return {"name": "linear", "weights": weights, "normalize": normalize}
    rescale = levels.value("rescale", name, t)
    if bool(rescale) != METHODS[method][0]["rescale"]:
        raise SpecError("parameters.rescale", f"got {rescale!r}; only {method}'s default is translated" + _at(name))
    densities = []
    for i in range(n):
        density = levels.number("density", name, t, i)
        if density <= 0:
            raise SpecError(f"{levels.where(i)}.density", f"got {density}, must be > 0" + _at(name))
        densities.append(min(density, 1.0))
    scale = levels.number("lambda", name, t)
    consensus = method in ("ties", "dare_ties")
    if normalize and not consensus and abs(sum(weights)) >= 1e-8:
        weights = [w / sum(weights) for w in weights]  # mergekit divides Σ w_i τ_i by Σ w_i
    options: dict[str, Any] = {"weights": weights, "scale": scale}
    if method == "task_arithmetic":
        return {"name": "task_arithmetic", **options}
    if method == "ties":
        return {"name": "ties", **options, "density": densities, "aggregate": "mean" if normalize else "sum"}
    aggregate = "disjoint_mean" if normalize and consensus else "sum"
    drop_rates = [1.0 - d for d in densities]
    return {
        "name": "dare",
        **options,
        "drop_rate": drop_rates,
        "consensus": "elect" if consensus else "none",
        "aggregate": aggregate,
    }


def _compact(per_tensor: dict[str, dict[str, Any]], names: list[str] | None) -> dict[str, Any]:
    """`method` (the commonest options) and `blocks` where others apply: layer blocks when every tensor of a layer
    block agrees, else one block per tensor."""
    keys = {name: repr(sorted(options.items())) for name, options in per_tensor.items()}
    common = Counter(keys.values()).most_common(1)[0][0]
    method = next(options for name, options in per_tensor.items() if keys[name] == common)
    if names is None or len(set(keys.values())) == 1:
        return {"method": method}
    layers = block_map(names, "layer")
    by_block: dict[str, set[str]] = {}
    for name in names:
        by_block.setdefault(layers.tensor_blocks[name], set()).add(keys[name])
    if all(len(v) == 1 for v in by_block.values()):
        first = {layers.tensor_blocks[name]: per_tensor[name] for name in reversed(names)}
        blocks = {b: first[b] for b in layers.blocks if by_block[b] != {common}}
        return {"method": method, "blocks": blocks, "block_by": "layer"}
    blocks = {name: per_tensor[name] for name in names if keys[name] != common}
    return {"method": method, "blocks": blocks, "block_by": "tensor"}


# --- evomerge plan -> mergekit config ---------------------------------------------------------------------------


def to_mergekit(plan: Mapping[str, Any], names: Sequence[str], out_dtype: str | None = None) -> dict[str, Any]:
    """mergekit's config for the evomerge `plan` over tensors `names`; NotMappable says why there is none."""
    if plan.get("regex"):
        raise NotMappable("blocks found by a regex have no mergekit counterpart")
    names = list(names)
    blocks = block_map(
        names, plan.get("block_by", "layer"), None, plan.get("layer_granularity", 1), plan.get("filters", [])
    )
    method = MERGE_METHODS.resolve(plan["method"], "method").to_plain()
    per_block = {}
    for block, override in (plan.get("blocks") or {}).items():
        if isinstance(override, Mapping) and override.get("name", method["name"]) != method["name"]:
            raise NotMappable(f"block {block!r} uses another method; mergekit applies one merge_method to all")
        per_block[block] = MERGE_METHODS.resolve({**method, **override}, f"blocks.{block}").to_plain()
    has_base = plan.get("base") is not None
    n = len(plan["models"])
    wanted = {name: _mergekit_params(per_block.get(blocks.tensor_blocks[name], method), n, has_base) for name in names}
    kinds = {w[0] for w in wanted.values()}
    if len(kinds) > 1:
        raise NotMappable(f"the blocks map to different mergekit methods ({', '.join(sorted(kinds))})")
    kind = kinds.pop()
    depth = depth_of(names)
    layers = {name: layer_index(name) for name in names}
    global_keys = sorted({k for w in wanted.values() for k in w[1]})
    parameters = {
        k: _encode({nm: wanted[nm][1][k] for nm in names}, layers, plan.get("filters", [])) for k in global_keys
    }
    model_params = [
        {
            k: _encode({nm: wanted[nm][2][i][k] for nm in names}, layers, plan.get("filters", []))
            for k in wanted[names[0]][2][i]
        }
        for i in range(n)
    ]
    models = [str(p) for p in plan["models"]]
    config: dict[str, Any] = {"merge_method": kind}
    if has_base:
        config["base_model"] = str(plan["base"])
    elif kind == "slerp":
        config["base_model"] = models[0]
    config["models"] = [{"model": m, **({"parameters": p} if p else {})} for m, p in zip(models, model_params)]
    if parameters:
        config["parameters"] = parameters
    config["dtype"] = "float32"
    if out_dtype not in (None, "float32"):
        config["out_dtype"] = out_dtype
    _check_round_trip(config, wanted, depth)
    return config


def mergekit_yaml(plan: Mapping[str, Any], names: Sequence[str], out_dtype: str | None = None) -> str:
    """The text of `mergekit.yaml` for an export; NotMappable says why there is none."""
    if out_dtype is None:  # write what `evomerge merge` of the plan writes: the models' dtype
        stored = str(Checkpoint.open(plan["models"][0]).dtype(names[0])).removeprefix("torch.")
        out_dtype = stored if stored in DTYPES else None
    config = to_mergekit(plan, names, out_dtype)
    method = MERGE_METHODS.resolve(plan["method"], "method").to_plain()
    conventions = plan.get("conventions") or method.get("conventions", "evomerge")
    note = ""
    if conventions != "mergekit" and config["merge_method"] not in ("linear", "task_arithmetic"):
        note = "# the run used evomerge's conventions, which differ from mergekit's for this method (README)\n"
    if config["merge_method"].startswith("dare"):
        note += "# DARE's random masks are mergekit's own draws, not evomerge's seeded ones\n"
    return HEADER + note + dump_plain_yaml(config)


def _mergekit_params(options: Mapping[str, Any], n: int, has_base: bool) -> tuple[str, dict, list[dict]]:
    """(merge_method, global parameters, per-model parameters) doing what evomerge's `options` do on one tensor."""
    name = options["name"]
    if name == "linear":
        weights = options["weights"] or [1.0 / n] * n
        return "linear", {"normalize": options["normalize"]}, [{"weight": w} for w in weights]
    if name == "slerp":
        if has_base or options["scope"] != "tensor":
            raise NotMappable("mergekit's slerp is per tensor between two models, not between task vectors")
        return "slerp", {"t": options["t"]}, [{}, {}]
    if name == "model_stock":
        return "model_stock", {}, [{} for _ in range(n)]
    if name not in ("task_arithmetic", "ties", "dare"):
        raise NotMappable(f"method {name!r} has no mergekit counterpart")
    weights = options["weights"] or [1.0] * n
    per_model: list[dict[str, Any]] = [{"weight": w} for w in weights]
    parameters: dict[str, Any] = {"lambda": options["scale"], "normalize": False}
    if name == "task_arithmetic":
        return "task_arithmetic", parameters, per_model
    if name == "ties":
        if options["scope"] != "tensor":
            raise NotMappable("ties with scope 'model' (model-wide thresholds) has no mergekit counterpart")
        for i, entry in enumerate(per_model):
            entry["density"] = _per_task(options["density"], i)
        return "ties", {**parameters, "normalize": options["aggregate"] == "mean"}, per_model
    consensus, aggregate = options["consensus"], options["aggregate"]
    if aggregate not in ("sum", "disjoint_mean") or (consensus == "none" and aggregate != "sum"):
        raise NotMappable(f"dare with consensus {consensus!r} and aggregate {aggregate!r} has no mergekit counterpart")
    for i, entry in enumerate(per_model):
        entry["density"] = 1.0 - _per_task(options["drop_rate"], i)
    kind = "dare_ties" if consensus == "elect" else "dare_linear"
    return kind, {**parameters, "normalize": aggregate == "disjoint_mean"}, per_model


def _per_task(value: float | list[float], i: int) -> float:
    return value[i] if isinstance(value, list) else value


def _encode(values: dict[str, Any], layers: dict[str, int | None], filters: Sequence[str]) -> Any:
    """One mergekit setting with `values` per tensor: a scalar, or conditions: each tensor outside the layers by
    name, then per filter and for the rest a gradient with one entry per layer."""
    if len({repr(v) for v in values.values()}) == 1:
        return next(iter(values.values()))
    n_layers = max((i for i in layers.values() if i is not None), default=-1) + 1
    conditions: list[dict[str, Any]] = [{"filter": nm, "value": v} for nm, v in values.items() if layers[nm] is None]
    claimed: set[str] = set()
    for part in [*filters, None]:
        members = [nm for nm in values if layers[nm] is not None and nm not in claimed and (part is None or part in nm)]
        claimed.update(members)
        per_layer: list[Any] = [None] * n_layers
        for nm in members:
            if per_layer[layers[nm]] is None:
                per_layer[layers[nm]] = values[nm]
        known = [v for v in per_layer if v is not None]
        if not known:
            continue
        filled = [known[0] if v is None else v for v in per_layer]
        value = filled[0] if len({repr(v) for v in filled}) == 1 else filled
        conditions.append({"value": value} if part is None else {"filter": part, "value": value})
    return conditions


def _check_round_trip(config: Mapping[str, Any], wanted: Mapping[str, tuple], depth: Mapping[str, float]) -> None:
    """Every tensor's parameters, evaluated from `config` as mergekit does, equal the wanted ones."""
    for name, (_, parameters, per_model) in wanted.items():
        got = [{k: evaluate_setting(v, name, depth[name]) for k, v in config.get("parameters", {}).items()}]
        got += [
            {k: evaluate_setting(v, name, depth[name]) for k, v in (m.get("parameters") or {}).items()}
            for m in config["models"]
        ]
        for have, want in zip(got, [parameters, *per_model]):
            if any(not _same(have.get(k), v) for k, v in want.items()):
                raise NotMappable(f"tensor {name!r}: its per-block values cannot be written as mergekit gradients")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15)
    return a == b
