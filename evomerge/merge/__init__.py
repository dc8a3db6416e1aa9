"""Merge operators on parameter vectors and state dicts."""

from evomerge.merge.slerp import slerp, slerp_coefficients, split_point_slerp

__all__ = ["slerp", "slerp_coefficients", "split_point_slerp"]
