"""A Hugging Face model kept resident in an evaluator: loaded once, candidates written into its parameters.

Shared by the transformers-based evaluators (`lm_eval`, `sequence_classification`): the parameters are keyed by
the names the checkpoint's safetensors files use (what evomerge's seeds and merges carry), not by the names of
the instantiated module, which may differ by the base-model prefix (`bert.` for a backbone saved from a
classification model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from evomerge.errors import EvomergeError, ShapeMismatchError
from evomerge.weights import Layout
from evomerge.weights.checkpoint import Checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on a GPU (half the memory, tensor cores) and float32 on the CPU (bf16 matmuls are slow)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def model_folder(path: str, field: str) -> Path:
    """The HF model folder a spec names, refused in one line when it is not a folder with a config."""
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise EvomergeError(f"{field}: {str(folder)!r} is not a Hugging Face model folder (no config.json in it)")
    return folder


def load_tokenizer(folder: Path, field: str) -> Any:
    """The folder's own tokenizer: a model scored with another tokenizer's ids would be meaningless."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise EvomergeError(f"{field}: cannot load a tokenizer from {str(folder)!r}: {first}") from err


def load_model(auto_class: Any, folder: Path, dtype: torch.dtype, device: torch.device, field: str) -> torch.nn.Module:
    """Instantiate once, in eval mode on `device`, without gradients; an architecture transformers cannot load is
    one line."""
    try:
        model = auto_class.from_pretrained(str(folder), dtype=dtype)
    except (OSError, ValueError, KeyError, ImportError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise EvomergeError(f"{field}: transformers cannot load the model in {str(folder)!r}: {first}") from err
    # inference only: no autograd on the parameters, so that evomerge can write candidates into them in place
    return model.to(device).eval().requires_grad_(False)


def checkpoint_parameters(model: torch.nn.Module, folder: Path, field: str) -> dict[str, torch.Tensor]:
    """The model's live parameters keyed by the checkpoint's tensor names, in the files' order.

    A checkpoint tensor that is no parameter of this model (a buffer such as `position_ids`, another task's
    head) is left out; a parameter no checkpoint tensor fills (it would be randomly initialised) is refused.
    A tied output head is a parameter once, under the name the files use."""
    params = dict(model.named_parameters())
    prefix = getattr(model, "base_model_prefix", "") or ""
    resident: dict[str, torch.Tensor] = {}
    filled: set[int] = set()
    for name in Checkpoint.open(folder).names():
        own = name if name in params or not prefix else name.removeprefix(f"{prefix}.")
        if own in params and params[own].is_floating_point() and id(params[own]) not in filled:
            resident[name] = params[own]
            filled.add(id(params[own]))
    missing = [name for name, p in params.items() if id(p) not in filled]
    if missing:
        raise EvomergeError(
            f"{field}: the checkpoint in {str(folder)!r} has no tensor for the model's parameter {missing[0]!r}"
            f" ({len(missing)} parameters in all)"
        )
    return resident


def layout_of(resident: dict[str, torch.Tensor]) -> Layout:
    return Layout(tuple(resident), tuple(tuple(p.shape) for p in resident.values()))


@torch.no_grad()
def write_into(resident: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> None:
    """Copy a candidate into the resident model, tensor by tensor; the resident tensors themselves (evomerge
    already wrote into them) are left alone, so the usual path costs nothing."""
    for name, target in resident.items():
        source = params.get(name)
        if source is None or tuple(source.shape) != tuple(target.shape):
            got = None if source is None else tuple(source.shape)
            raise ShapeMismatchError(f"parameter {name!r} has shape {got}, the model needs {tuple(target.shape)}")
        if source is not target:
            target.copy_(source)
