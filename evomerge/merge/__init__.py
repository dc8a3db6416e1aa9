"""Merge operators on parameter vectors and state dicts."""

from evomerge.merge.base import (
    MERGE_METHODS,
    MergeContext,
    Merger,
    TensorGroup,
    as_merger,
    layer_index_from_name,
    merge_tensor,
)
from evomerge.merge.engine import MergeEngine, merge_state_dicts
from evomerge.merge.methods import fisher_merge, linear, model_stock, slerp_model_stats, slerp_tensors
from evomerge.merge.slerp import slerp, slerp_coefficients, slerp_stats, split_point_slerp
from evomerge.merge.task_vectors import Pipeline, dare_mask, global_magnitude_thresholds

__all__ = [
    "MERGE_METHODS",
    "MergeContext",
    "MergeEngine",
    "Merger",
    "Pipeline",
    "TensorGroup",
    "as_merger",
    "dare_mask",
    "fisher_merge",
    "global_magnitude_thresholds",
    "layer_index_from_name",
    "linear",
    "merge_state_dicts",
    "merge_tensor",
    "model_stock",
    "slerp",
    "slerp_coefficients",
    "slerp_model_stats",
    "slerp_stats",
    "slerp_tensors",
    "split_point_slerp",
]
