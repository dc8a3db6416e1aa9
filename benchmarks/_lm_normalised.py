"""A `causal_lm` evaluator with one more metric, `norm_score`, for the language-model benchmark's three-task searches.

`causal_lm`'s own `score` averages per-example scores: exp(mean token loglik) for a text domain (about 0.02 on
the tiny Llama) next to 1/0 for a multiple-choice question, so on code + prose + arith it is almost all arith
accuracy. `norm_score` weighs the tasks equally, as normalised accuracy (merged / fine-tuned) does on the MNIST
benchmark: per text domain the perplexity ratio exp(loglik - reference loglik) (the domain's fine-tune's), per
multiple-choice task accuracy / reference accuracy, averaged. The references are given per split, so a
fine-tune scores 1 on its own task on validation and on test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from evomerge.evaluate.base import EvalResult
from evomerge.evaluate.causal_lm import CausalLMEvaluator, CausalLMOptions
from evomerge.schema import require


def normalised_score(metrics: dict[str, float], reference: dict[str, float]) -> float:
    """Mean over `reference`'s metrics (`loglik_<d>` or `acc_<d>`) of the candidate's value relative to it."""
    parts = []
    for name, ref in reference.items():
        if name.startswith("loglik_"):
            parts.append(math.exp(metrics[name] - ref))
        else:
            parts.append(metrics[name] / ref if ref > 0 else float("nan"))
    return float(np.mean(parts))


@dataclass
class NormalisedOptions(CausalLMOptions):
    reference: dict[str, dict[str, float]] = field(default_factory=dict)  # split (search, test) -> metric -> value

    def check(self, path: str) -> None:
        super().check(path)
        require(set(self.reference) == {"search", "test"}, f"{path}.reference", "needs a search and a test mapping")


class NormalisedCausalLM(CausalLMEvaluator):
    def metric_names(self) -> list[str]:
        return [*super().metric_names(), "norm_score"]

    def evaluate(self, params) -> EvalResult:
        result = super().evaluate(params)
        objectives = dict(result.objectives)
        objectives["norm_score"] = normalised_score(objectives, self.options.reference["search"])
        return EvalResult(objectives, result.per_example, result.info)

    def test(self, params) -> dict[str, float]:
        metrics = super().test(params)
        return {**metrics, "norm_score": normalised_score(metrics, self.options.reference["test"])}


def build(options: NormalisedOptions) -> NormalisedCausalLM:
    return NormalisedCausalLM(options)


build.options = NormalisedOptions  # the registry parses a user evaluator's options with this dataclass
