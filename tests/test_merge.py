"""SLERP and M2N2's split-point crossover: exact values on hand-made vectors, properties on random ones."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from evomerge.merge import slerp, slerp_coefficients, split_point_slerp

R3 = math.sqrt(3) / 2


def test_split_point_slerp_on_orthogonal_vectors():
    x = np.array([1, 0, 1, 0], dtype=np.float32)
    y = np.array([0, 1, 0, 1], dtype=np.float32)
    # angle pi/2: weights sin((1-t)pi/2), sin(t pi/2); t = 1/3 before the split, 2/3 after
    child = split_point_slerp(x, y, split=2, w=1 / 3)
    np.testing.assert_allclose(child, [R3, 0.5, 0.5, R3], rtol=1e-6)


def test_split_at_ends_is_plain_slerp():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal(7).astype(np.float32), rng.standard_normal(7).astype(np.float32)
    np.testing.assert_allclose(split_point_slerp(x, y, 7, 0.3), slerp(x, y, 0.3), rtol=1e-5)
    np.testing.assert_allclose(split_point_slerp(x, y, 0, 0.3), slerp(x, y, 0.7), rtol=1e-5)


def test_parallel_and_opposite_vectors_fall_back_to_linear():
    x = np.array([1.0, 2.0], dtype=np.float32)
    np.testing.assert_allclose(slerp(x, 2 * x, 0.25), [1.25, 2.5])
    np.testing.assert_allclose(slerp(np.array([1.0, 0.0]), np.array([-1.0, 0.0]), 0.5), [0.0, 0.0], atol=1e-12)
    assert slerp_coefficients(0.3, 0.0, 0.0, 1.0) == (0.7, 0.3)


def test_slerp_matches_textbook_formula():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal(50), rng.standard_normal(50)
    t = 0.37
    omega = np.arccos(np.clip(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)), -1, 1))
    expected = np.sin((1 - t) * omega) / np.sin(omega) * x + np.sin(t * omega) / np.sin(omega) * y
    np.testing.assert_allclose(slerp(x, y, t), expected, rtol=1e-10)


vectors = arrays(np.float64, 8, elements=st.floats(-10, 10, allow_nan=False, width=64))


@settings(max_examples=60, deadline=None)
@given(x=vectors, y=vectors)
def test_slerp_endpoints(x: np.ndarray, y: np.ndarray):
    np.testing.assert_allclose(slerp(x, y, 0.0), x, atol=1e-9)
    np.testing.assert_allclose(slerp(x, y, 1.0), y, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(x=vectors, y=vectors, t=st.floats(0, 1))
def test_slerp_keeps_unit_norm(x: np.ndarray, y: np.ndarray, t: float):
    nx, ny = np.linalg.norm(x), np.linalg.norm(y)
    if nx < 1e-3 or ny < 1e-3:
        return
    u, v = x / nx, y / ny
    if abs(u @ v) > 0.999:
        return
    assert np.linalg.norm(slerp(u, v, t)) == pytest.approx(1.0, rel=1e-6)
