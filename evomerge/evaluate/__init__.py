"""Evaluators: pluggable scoring of candidate models (built-in names or `package.module:attr`)."""

from evomerge.evaluate.base import EvalResult, Evaluator, as_result
from evomerge.registry import Registry

EVALUATORS: Registry = Registry("evaluator", allow_import=True)

from evomerge.evaluate import (  # noqa: E402,F401  (registers the built-ins)
    causal_lm,
    classification,
    faulty,
    lm_eval_tasks,
    multitask,
    sequence_classification,
)

__all__ = ["EVALUATORS", "EvalResult", "Evaluator", "as_result"]
