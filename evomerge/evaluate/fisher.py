"""Per-example gradients for evaluators that estimate a diagonal Fisher (`evomerge.evaluate.base.EstimatesFisher`).

For each example, `torch.func.jacrev` gives the gradient of every label's log-probability at once, weighted by the
model's own probability of that label (the Fisher of the model's predictive distribution, as Matena & Raffel's
Fisher merging takes it) and squared; `vmap` does a chunk of examples per call, so memory stays bounded whatever
the number of examples.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from evomerge.errors import EvomergeError

# Gradient entries held at once (examples in a chunk × labels × parameters): 64 MiB of float32.
CHUNK_ENTRIES = 1 << 24

LogProbs = Callable[[dict[str, Tensor], Tensor], Tensor]  # (params, one input) -> log p(label | input), [labels]


def pick_examples(n: int, examples: int | None, seed: int) -> Tensor:
    """Indices of the examples a Fisher is estimated on: all `n`, or `examples` of them drawn without replacement
    with `seed` (in increasing order), so a capped estimate is the same every time it is asked for."""
    if examples is not None and examples < 1:
        raise EvomergeError(f"examples: got {examples}, must be >= 1")
    if n == 0:
        raise EvomergeError("no examples to estimate the Fisher information on")
    if examples is None or examples >= n:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator)[:examples].sort().values


def sum_fisher(log_probs: LogProbs, params: dict[str, Tensor], x: Tensor, n_labels: int) -> dict[str, Tensor]:
    """Σ_i Σ_y p(y | x_i) (∂ log p(y | x_i) / ∂θ)², entry by entry, in float32 on the params' device: the exact
    expectation over the model's predictive distribution (no sampling), one backward pass per label."""
    leaves = {k: v.detach().to(torch.float32) for k, v in params.items()}

    def with_probs(p: dict[str, Tensor], xi: Tensor) -> tuple[Tensor, Tensor]:
        out = log_probs(p, xi)
        return out, out.detach().exp()

    def per_example(p: dict[str, Tensor], xi: Tensor) -> dict[str, Tensor]:
        jacobian, probs = torch.func.jacrev(with_probs, has_aux=True)(p, xi)  # name -> [labels, *shape]
        return {name: torch.tensordot(probs, j.square(), dims=1) for name, j in jacobian.items()}

    batched = torch.func.vmap(per_example, in_dims=(None, 0))
    total = {k: torch.zeros_like(v) for k, v in leaves.items()}
    chunk = max(1, CHUNK_ENTRIES // max(1, n_labels * sum(v.numel() for v in leaves.values())))
    for start in range(0, len(x), chunk):
        for name, value in batched(leaves, x[start : start + chunk]).items():
            total[name] += value.sum(0)
    return total
