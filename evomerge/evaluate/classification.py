"""Built-in evaluator: an MLP classifier on an offline dataset, scored by per-example correctness."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from evomerge.data import DATASETS, load_dataset
from evomerge.errors import EvomergeError, ShapeMismatchError
from evomerge.evaluate import EVALUATORS
from evomerge.evaluate.base import EvalResult
from evomerge.evaluate.fisher import pick_examples, sum_fisher
from evomerge.schema import did_you_mean, require
from evomerge.weights import Layout


@dataclass
class ClassificationOptions:
    dataset: str = "digits"
    train_fraction: float = 0.8
    hidden: list[int] = field(default_factory=lambda: [256])
    device: Literal["cpu", "cuda", "auto"] = "auto"
    groups: dict[str, list[int]] = field(default_factory=lambda: {"odd": [1, 3, 5, 7, 9], "even": [0, 2, 4, 6, 8]})

    def check(self, path: str) -> None:
        require(
            self.dataset in DATASETS,
            f"{path}.dataset",
            f"got {self.dataset!r}{did_you_mean(self.dataset, DATASETS)}, valid: {', '.join(sorted(DATASETS))}",
        )
        require(0 < self.train_fraction < 1, f"{path}.train_fraction", f"got {self.train_fraction}, must be in (0, 1)")
        for i, width in enumerate(self.hidden):
            require(width > 0, f"{path}.hidden[{i}]", f"got {width}, must be > 0")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise EvomergeError("evaluator.device: 'cuda' was asked for but torch sees no CUDA device")
    return torch.device(name)


def mlp_layout(widths: list[int]) -> Layout:
    """Layers `layers.K.weight` and `layers.K.bias`, K = 0, 1, …

    Weights are stored [in, out] (y = x @ W + b) as in the M2N2 paper's reference model, so the
    flat order, and with it what a split point cuts, is the paper's.
    """
    names, shapes = [], []
    for k, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        names += [f"layers.{k}.weight", f"layers.{k}.bias"]
        shapes += [(n_in, n_out), (n_out,)]
    return Layout(tuple(names), tuple(shapes))


def mlp_forward(params: dict[str, torch.Tensor], x: torch.Tensor, n_layers: int) -> torch.Tensor:
    """Narrowing layers are computed transposed, (Wᵀ xᵀ)ᵀ: CPU BLAS is several times slower on a
    product whose right-hand matrix has ten columns (the digits head) than on its transpose."""
    for k in range(n_layers):
        weight, bias = params[f"layers.{k}.weight"], params[f"layers.{k}.bias"]
        if weight.shape[1] < weight.shape[0]:
            x = torch.addmm(bias[:, None], weight.t(), x.t()).t()
        else:
            x = torch.addmm(bias, x, weight)
        if k < n_layers - 1:
            x = x.relu_()
    return x


def predicted_classes(logits: torch.Tensor) -> torch.Tensor:
    """The first highest-scoring class of each example, as argmax gives it but several times faster: `max`'s
    indices (first maximum too), reduced along the contiguous orientation (a narrowing last layer leaves
    classes × examples storage)."""
    if not logits.is_contiguous() and logits.t().is_contiguous():
        return logits.t().max(dim=0).indices
    return logits.max(dim=1).indices


class ClassificationEvaluator:
    """Accuracy on the train split per example; `accuracy_<group>` for each class group."""

    def __init__(self, options: ClassificationOptions):
        self.options = options
        data = load_dataset(options.dataset, options.train_fraction)
        self.device = resolve_device(options.device)
        self.widths = [data.n_features, *options.hidden, data.n_classes]
        self.n_layers = len(self.widths) - 1
        self._layout = mlp_layout(self.widths)
        self.x_train = torch.from_numpy(data.x_train).to(self.device)
        self.y_train = torch.from_numpy(data.y_train).to(self.device)
        self.x_test = torch.from_numpy(data.x_test).to(self.device)
        self.y_test = torch.from_numpy(data.y_test).to(self.device)
        self.n_examples = len(data.y_train)
        self._group_masks = {name: np.isin(data.y_train, classes) for name, classes in options.groups.items()}

    def layout(self) -> Layout:
        return self._layout

    def metric_names(self) -> list[str]:
        """What `evaluate` returns, so a strategy's objectives are checked before the first evaluation."""
        return ["accuracy", *(f"accuracy_{name}" for name in self._group_masks)]

    def _to_device(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for name, shape in zip(self._layout.names, self._layout.shapes):
            got = tuple(params[name].shape) if name in params else None
            if got != shape:
                raise ShapeMismatchError(f"parameter {name!r} has shape {got}, the model needs {shape}")
        if self.device.type == "cpu" and all(v.dtype == torch.float32 for v in params.values()):
            return params
        return {k: v.to(self.device, torch.float32, non_blocking=True) for k, v in params.items()}  # bf16 seeds too

    @torch.no_grad()
    def correct(self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
        logits = mlp_forward(self._to_device(params), x, self.n_layers)
        return (predicted_classes(logits) == y).cpu().numpy()

    def evaluate(self, params: dict[str, torch.Tensor]) -> EvalResult:
        hits = self.correct(params, self.x_train, self.y_train)
        objectives = {"accuracy": np.count_nonzero(hits) / len(hits)}
        for name, mask in self._group_masks.items():  # counts, not means: M2N2 on digits calls this ~1,000 times/s
            total = np.count_nonzero(mask)
            objectives[f"accuracy_{name}"] = np.count_nonzero(hits & mask) / total if total else 0.0
        return EvalResult(objectives, hits.astype(np.float32))

    def test(self, params: dict[str, torch.Tensor]) -> dict[str, float]:
        return {"accuracy": float(self.correct(params, self.x_test, self.y_test).mean())}

    def fisher(
        self, params: dict[str, torch.Tensor], examples: int | None, seed: int, subset: str | None = None
    ) -> dict[str, torch.Tensor]:
        """Diagonal Fisher on the train split (see `EstimatesFisher`); `subset` is one of `groups`."""
        x = self.x_train
        if subset is not None:
            if subset not in self._group_masks:
                valid = ", ".join(self._group_masks) or "none (the evaluator has no groups)"
                raise EvomergeError(f"subset: got {subset!r}, the evaluator's groups are: {valid}")
            x = x[torch.from_numpy(self._group_masks[subset]).to(self.device)]
        x = x[pick_examples(len(x), examples, seed).to(self.device)]

        def log_probs(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
            return F.log_softmax(mlp_forward(p, xi[None], self.n_layers), dim=1)[0]

        sums = sum_fisher(log_probs, self._to_device(params), x, self.widths[-1])
        return {k: (v / len(x)).cpu() for k, v in sums.items()}

    def train_specialist(self, flat: np.ndarray, classes: list[int], steps: int, lr: float) -> np.ndarray:
        """Full-batch Adam on the train examples of `classes` only (the paper's pre-trained setting)."""
        mask = torch.isin(self.y_train, torch.tensor(classes, device=self.device))
        if not bool(mask.any()):
            raise EvomergeError(f"models.specialists: no training examples with classes {classes}")
        x, y = self.x_train[mask], self.y_train[mask]
        leaves = {
            k: v.detach().clone().to(self.device).requires_grad_(True) for k, v in self._layout.views(flat).items()
        }
        optimizer = torch.optim.Adam(leaves.values(), lr=lr)
        for _ in range(steps):
            optimizer.zero_grad()
            loss = F.cross_entropy(mlp_forward(leaves, x, self.n_layers), y)
            loss.backward()
            optimizer.step()
        return self._layout.flatten({k: v.detach().cpu() for k, v in leaves.items()})


@EVALUATORS.register("classification", ClassificationOptions, "MLP classifier on an offline dataset")
def build_classification(options: ClassificationOptions) -> ClassificationEvaluator:
    return ClassificationEvaluator(options)
