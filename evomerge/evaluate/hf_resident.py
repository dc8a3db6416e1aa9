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
    """The model's live parameters keyed by the checkpoint's tensor names, in the module's order (so that split
    points fall between layers). Shared by every evaluator that keeps a transformers model resident.

    A checkpoint name may carry the model's base-model prefix where the module's does not (`bert.` of a backbone
    saved from a classifier) or lack it where the module has it. A checkpoint tensor that is no parameter of this
    model (a buffer such as `position_ids`, another task's head) is left out; a parameter no checkpoint tensor
    fills (it would be randomly initialised) is refused. A tied output head is one parameter, listed once under
    the name the files use. A folder without safetensors files (pickled weights only) keys the parameters by the
    module's own names."""
    saved = set(Checkpoint.open(folder).names()) if any(folder.glob("*.safetensors")) else None
    prefix = getattr(model, "base_model_prefix", "") or ""
    named: dict[int, str] = {}  # id(parameter) -> its checkpoint name
    for own, param in model.named_parameters(remove_duplicate=False):
        if id(param) in named:
            continue
        aliases = [own, own.removeprefix(f"{prefix}."), f"{prefix}.{own}"] if prefix else [own]
        found = next((name for name in aliases if saved is None or name in saved), None)
        if found is not None:
            named[id(param)] = found
    params = dict(model.named_parameters())
    missing = [name for name, p in params.items() if id(p) not in named]
    if missing:
        raise EvomergeError(
            f"{field}: the checkpoint in {str(folder)!r} has no tensor for the model's parameter {missing[0]!r}"
            f" ({len(missing)} parameters in all); transformers would initialise it at random"
        )
    return {named[id(p)]: p for p in params.values()}


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
