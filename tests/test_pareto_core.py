"""The pure multi-objective building blocks: the quadratic surrogate, non-domination, hypervolume,
IGD+ (checked against pymoo), the first design, the front pickers and named objectives."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pymoo.indicators.hv import HV
from pymoo.indicators.igd_plus import IGDPlus
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

from evomerge.errors import EvomergeError, SpecError
from evomerge.pareto import Objectives, check_objectives, hypervolume, igd_plus, non_dominated
from evomerge.pareto.design import vertices_and_sobol
from evomerge.pareto.solve import hypervolume_greedy, spread_out
from evomerge.pareto.surrogate import QuadraticSurrogate, n_parameters, quadratic_features, require_points


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def softplus(z: np.ndarray) -> np.ndarray:
    return np.log1p(np.exp(z))


LINKS = {"sigmoid": sigmoid, "softplus": softplus, "identity": lambda z: z}


def pymoo_front_mask(F: np.ndarray) -> np.ndarray:
    mask = np.zeros(len(F), dtype=bool)
    mask[NonDominatedSorting().do(F, only_non_dominated_front=True)] = True
    return mask


def dominates(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.all(a <= b) and np.any(a < b))


# quadratic features and the surrogate ---------------------------------------------------------


def test_quadratic_features_columns_of_a_hand_made_point():
    # 1, x0, x1, x0*x0, x0*x1, x1*x1
    np.testing.assert_array_equal(quadratic_features(np.array([2.0, 3.0])), [[1.0, 2.0, 3.0, 4.0, 6.0, 9.0]])
    np.testing.assert_array_equal(
        quadratic_features(np.array([[2.0, 3.0], [-1.0, 0.5]])),
        [[1.0, 2.0, 3.0, 4.0, 6.0, 9.0], [1.0, -1.0, 0.5, 1.0, -0.5, 0.25]],
    )
    # 3 genes: 1, x0..x2, then x0x0 x0x1 x0x2 x1x1 x1x2 x2x2
    np.testing.assert_array_equal(quadratic_features(np.array([1.0, 2.0, 3.0])), [[1, 1, 2, 3, 1, 2, 3, 4, 6, 9]])


@pytest.mark.parametrize("d, expected", [(1, 3), (2, 6), (3, 10), (4, 15), (8, 45)])
def test_parameter_count_is_that_of_a_full_quadratic(d: int, expected: int):
    assert n_parameters(d) == expected == quadratic_features(np.zeros((1, d))).shape[1]


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("link", sorted(LINKS))
def test_surrogate_recovers_the_exact_coefficients_of_noiseless_data(d: int, link: str):
    rng = np.random.default_rng(10 * d + len(link))
    p = n_parameters(d)
    beta = rng.uniform(-1.5, 1.5, p)
    X = rng.uniform(0.0, 1.0, (3 * p, d))
    y = LINKS[link](quadratic_features(X) @ beta)
    surrogate = QuadraticSurrogate(link).fit(X, y)
    assert surrogate.link == link
    np.testing.assert_allclose(surrogate.coef, beta, atol=2e-4)
    grid = rng.uniform(0.0, 1.0, (50, d))
    np.testing.assert_allclose(surrogate.predict(grid), LINKS[link](quadratic_features(grid) @ beta), atol=1e-5)
    assert surrogate.cv_rmse < 1e-5  # leave-one-out on exact data


@pytest.mark.parametrize("link", sorted(LINKS))
def test_cross_validated_error_grows_with_noise(link: str):
    rng = np.random.default_rng(1)
    beta = np.array([0.2, 1.0, -1.0, -0.5, 0.8, 0.3])
    X = rng.uniform(0.0, 1.0, (30, 2))
    clean = LINKS[link](quadratic_features(X) @ beta)
    noisy = clean + rng.normal(0.0, 0.02, len(clean))
    exact = QuadraticSurrogate(link).fit(X, clean).cv_rmse
    rough = QuadraticSurrogate(link).fit(X, noisy).cv_rmse
    assert exact < 1e-5
    assert 0.01 < rough < 0.1  # of the order of the noise
    assert rough > 1000 * exact


def test_cross_validation_is_nan_without_points_to_hold_out_and_can_be_skipped():
    X = vertices_and_sobol(np.zeros(2), np.ones(2), 6, seed=0)
    y = sigmoid(quadratic_features(X) @ np.ones(6))
    assert np.isnan(QuadraticSurrogate("sigmoid").fit(X, y).cv_rmse)  # exactly the parameter count
    X = vertices_and_sobol(np.zeros(2), np.ones(2), 12, seed=0)
    y = sigmoid(quadratic_features(X) @ np.ones(6))
    assert np.isnan(QuadraticSurrogate("sigmoid").fit(X, y, cross_validate=False).cv_rmse)


def test_auto_link_follows_the_range_of_the_metric():
    X = np.random.default_rng(0).uniform(0, 1, (12, 2))
    z = quadratic_features(X) @ np.array([0.1, 1, -1, 0.5, 0.2, -0.3])
    assert QuadraticSurrogate().fit(X, sigmoid(z)).link == "sigmoid"
    assert QuadraticSurrogate().fit(X, 2 + softplus(z)).link == "softplus"
    assert QuadraticSurrogate().fit(X, z - 5).link == "identity"


def test_sigmoid_predictions_stay_inside_the_unit_interval():
    rng = np.random.default_rng(3)
    X = rng.uniform(0, 1, (20, 2))
    y = sigmoid(quadratic_features(X) @ np.array([3.0, 4.0, -4.0, 2.0, -1.0, 1.5]))
    surrogate = QuadraticSurrogate("sigmoid").fit(X, y)
    near = surrogate.predict(rng.uniform(-1.0, 2.0, (500, 2)))
    assert np.all((near > 0) & (near < 1))
    far = surrogate.predict(rng.uniform(-100.0, 100.0, (500, 2)))  # no overflow, no value outside [0, 1]
    assert np.all(np.isfinite(far)) and np.all((far >= 0) & (far <= 1))


@pytest.mark.parametrize("d", [2, 3])
def test_too_few_points_names_the_number_needed(d: int):
    need = (d + 1) * (d + 2) // 2
    X = np.random.default_rng(0).uniform(0, 1, (need - 1, d))
    with pytest.raises(EvomergeError) as err:
        QuadraticSurrogate().fit(X, np.full(need - 1, 0.5))
    message = str(err.value)
    assert f"over {d} genes has {need} parameters" in message
    assert f"needs at least {need} successful evaluations; got {need - 1}" in message
    assert f"strategy.design_points) to at least {need}" in message


def test_require_points_reports_failed_evaluations():
    expected = (
        "needs at least 10 successful evaluations; got 7 (3 evaluations failed: fix what makes them fail, "
        "see journal.jsonl, or raise strategy.design_points to at least 13)"
    )
    with pytest.raises(EvomergeError, match=re.escape(expected)):
        require_points(3, 7, failed=3)
    require_points(3, 10)  # enough: no error


def test_predict_before_fit_is_an_error():
    with pytest.raises(EvomergeError, match="not been fitted"):
        QuadraticSurrogate().predict(np.zeros((1, 2)))


# non-domination, hypervolume, IGD+ ------------------------------------------------------------

STAIRCASE = np.array([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0], [4.0, 0.5]])


def test_non_dominated_on_a_hand_made_set_with_duplicates():
    F = np.array([[1, 3], [2, 2], [3, 1], [2, 2], [3, 3], [4, 0.5], [1, 3.5], [5, 5]], dtype=float)
    mask = non_dominated(F)
    np.testing.assert_array_equal(mask, [True, True, True, True, False, True, False, False])  # both (2, 2) stay
    np.testing.assert_array_equal(mask, pymoo_front_mask(F))


def test_non_dominated_single_point_all_equal_and_shape_check():
    np.testing.assert_array_equal(non_dominated(np.array([[3.0, 1.0, 2.0]])), [True])
    np.testing.assert_array_equal(non_dominated(np.ones((4, 3))), [True] * 4)
    with pytest.raises(ValueError, match="shape"):
        non_dominated(np.array([1.0, 2.0]))


@pytest.mark.parametrize(
    "F",
    [
        np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0], [1, 1, 1], [0.5, 0.5, 0.5], [0, 0, 1]]),
        np.array([[1, 2, 3, 4], [4, 3, 2, 1], [2, 2, 3, 4], [1, 2, 3, 4], [0, 9, 9, 9], [1, 2, 3, 5]]),
    ],
)
def test_non_dominated_matches_pymoo_in_three_and_four_objectives(F: np.ndarray):
    np.testing.assert_array_equal(non_dominated(F.astype(float)), pymoo_front_mask(F.astype(float)))


def test_hypervolume_of_a_two_dimensional_staircase_by_hand():
    # columns of width (5 - x) and height (previous y - y): 4*1 + 3*1 + 2*1 + 1*0.5
    assert hypervolume(STAIRCASE, np.array([5.0, 4.0])) == pytest.approx(9.5, abs=1e-12)
    assert HV(ref_point=np.array([5.0, 4.0]))(STAIRCASE) == pytest.approx(9.5, abs=1e-12)
    # dominated points, duplicates and a shuffled order change nothing
    noisy = np.vstack([STAIRCASE[::-1], STAIRCASE[:2], [[4.5, 3.5], [3.0, 3.0]]])
    assert hypervolume(noisy, np.array([5.0, 4.0])) == pytest.approx(9.5, abs=1e-12)


def test_hypervolume_single_point_empty_set_and_points_beyond_the_reference():
    assert hypervolume(np.array([[1.0, 2.0, 3.0]]), np.array([2.0, 4.0, 7.0])) == pytest.approx(1 * 2 * 4)
    assert hypervolume(np.zeros((0, 2)), np.array([1.0, 1.0])) == 0.0
    beyond = np.array([[2.0, 0.5], [0.5, 2.0], [1.0, 1.0]])  # only (1, 1) is inside; it touches the reference
    assert hypervolume(beyond, np.array([1.0, 1.0])) == 0.0
    assert HV(ref_point=np.array([1.0, 1.0]))(beyond) == 0.0
    mixed = np.array([[2.0, 0.5], [0.5, 0.5], [0.25, 3.0]])  # one point inside, two past the reference
    assert hypervolume(mixed, np.array([1.0, 1.0])) == pytest.approx(0.25)
    assert HV(ref_point=np.array([1.0, 1.0]))(mixed) == pytest.approx(0.25)


def test_hypervolume_in_three_and_four_objectives_by_hand_and_against_pymoo():
    # three unit corners of a 2-cube: union of three 1x2x2 slabs = 8 - 1 (the far corner box)
    F3 = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    ref3 = np.full(3, 2.0)
    assert hypervolume(F3, ref3) == pytest.approx(7.0)
    assert HV(ref_point=ref3)(F3) == pytest.approx(7.0)
    F4 = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0.5, 0.5, 0.5, 0.5]], dtype=float)
    ref4 = np.full(4, 2.0)
    assert hypervolume(F4, ref4) == pytest.approx(HV(ref_point=ref4)(F4), abs=1e-12)
    # four corners alone: 16 - 1 (everything is dominated except the box [1,2]^4)
    assert hypervolume(F4[:4], ref4) == pytest.approx(15.0)


def test_igd_plus_by_hand_and_against_pymoo():
    Z = np.array([[0.0, 3.0], [1.0, 1.0]])
    # to (0,3): nearest is (1,3) at +distance 1; to (1,1): (2,2) at sqrt(2), (3,1) at 2, (1,3) at 2 -> sqrt(2)
    expected = (1.0 + np.sqrt(2.0)) / 2
    assert igd_plus(STAIRCASE, Z) == pytest.approx(expected)
    assert IGDPlus(Z)(STAIRCASE) == pytest.approx(expected)
    assert igd_plus(Z, Z) == 0.0  # a front is at distance 0 from itself
    assert igd_plus(np.array([[-1.0, -1.0]]), Z) == 0.0  # better everywhere: only being worse counts
    assert igd_plus(np.zeros((0, 2)), Z) == float("inf")
    F4 = np.array([[1, 2, 3, 4], [4, 3, 2, 1], [2, 2, 2, 2]], dtype=float)
    Z4 = np.array([[1, 1, 1, 1], [0, 3, 3, 0], [2, 0, 2, 0]], dtype=float)
    assert igd_plus(F4, Z4) == pytest.approx(IGDPlus(Z4)(F4))


objective_sets = st.integers(2, 4).flatmap(
    lambda m: arrays(np.float64, st.tuples(st.integers(1, 25), st.just(m)), elements=st.integers(0, 6).map(float))
)


@settings(max_examples=120, deadline=None)
@given(objective_sets)
def test_property_non_dominated_rows_are_a_front_and_cover_the_rest(F: np.ndarray):
    mask = non_dominated(F)
    kept, dropped = F[mask], F[~mask]
    assert mask.any()
    for a in kept:
        assert not any(dominates(b, a) for b in kept)
    for a in dropped:
        assert any(dominates(b, a) for b in kept)
    np.testing.assert_array_equal(mask, pymoo_front_mask(F))


@settings(max_examples=80, deadline=None)
@given(objective_sets, st.data())
def test_property_hypervolume_equals_pymoo_and_grows_with_points(F: np.ndarray, data):
    m = F.shape[1]
    reference = np.full(m, 5.0)
    hv = hypervolume(F, reference)
    assert hv == pytest.approx(HV(ref_point=reference)(F), abs=1e-9)
    extra = data.draw(arrays(np.float64, (1, m), elements=st.integers(0, 6).map(float)))
    more = hypervolume(np.vstack([F, extra]), reference)
    assert more >= hv - 1e-12
    assert hypervolume(F[non_dominated(F)], reference) == pytest.approx(hv, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(objective_sets, st.data())
def test_property_igd_plus_equals_pymoo(F: np.ndarray, data):
    Z = data.draw(arrays(np.float64, (data.draw(st.integers(1, 6)), F.shape[1]), elements=st.integers(0, 6).map(float)))
    assert igd_plus(F, Z) == pytest.approx(IGDPlus(Z)(F), abs=1e-9)


# the first design --------------------------------------------------------------------------------


@pytest.mark.parametrize("d, n", [(2, 12), (3, 20), (5, 7)])
def test_design_starts_with_the_one_hot_vertices_and_stays_in_the_box(d: int, n: int):
    low, high = np.linspace(-1.0, 0.0, d), np.linspace(1.0, 3.0, d)
    X = vertices_and_sobol(low, high, n, seed=4)
    assert X.shape == (n, d)
    expected_vertices = np.tile(low, (d, 1))
    expected_vertices[np.arange(d), np.arange(d)] = high
    np.testing.assert_array_equal(X[:d], expected_vertices)
    assert np.all(X >= low) and np.all(X <= high)
    assert len(np.unique(X, axis=0)) == n  # no repeated point


def test_design_is_deterministic_per_seed_and_shorter_than_the_vertices_when_asked():
    low, high = np.zeros(3), np.ones(3)
    np.testing.assert_array_equal(vertices_and_sobol(low, high, 20, seed=1), vertices_and_sobol(low, high, 20, seed=1))
    a, b = vertices_and_sobol(low, high, 20, seed=1), vertices_and_sobol(low, high, 20, seed=2)
    np.testing.assert_array_equal(a[:3], b[:3])  # the vertices do not depend on the seed
    assert not np.array_equal(a[3:], b[3:])
    np.testing.assert_array_equal(vertices_and_sobol(low, high, 2, seed=0), [[1, 0, 0], [0, 1, 0]])


# picking points of a predicted front ----------------------------------------------------------------


def test_spread_out_takes_the_extremes_first_then_the_farthest_points():
    t = np.linspace(0.0, 1.0, 11)
    F = np.stack([t, 1 - t], axis=1)[np.random.default_rng(0).permutation(11)]
    picks = spread_out(F, 3)
    assert len(picks) == len(set(picks.tolist())) == 3
    assert {tuple(F[picks[0]]), tuple(F[picks[1]])} == {(0.0, 1.0), (1.0, 0.0)}
    np.testing.assert_allclose(F[picks[2]], [0.5, 0.5])
    assert len(spread_out(F, 20)) == 11  # fewer points than asked: all of them
    np.testing.assert_array_equal(spread_out(F, 11), np.arange(11))


def test_spread_out_in_three_objectives_keeps_every_extreme():
    F = np.array([[0, 5, 5], [5, 0, 5], [5, 5, 0], [2, 2, 2], [3, 3, 1], [1, 3, 3]], dtype=float)
    picks = spread_out(F, 4)
    assert set(picks[:3].tolist()) == {0, 1, 2}
    assert len(set(picks.tolist())) == 4


def test_hypervolume_greedy_picks_the_biggest_contribution_first():
    known = np.array([[0.0, 4.0], [4.0, 0.0]])
    reference = np.array([5.0, 5.0])
    candidates = np.array([[3.0, 3.0], [1.0, 1.0], [2.0, 3.5], [6.0, 6.0]])
    # gains over the known front: (3,3) -> 1, (1,1) -> 9, (2,3.5) -> 1, (6,6) -> 0 (beyond the reference)
    gains = [hypervolume(np.vstack([known, c]), reference) - hypervolume(known, reference) for c in candidates]
    np.testing.assert_allclose(gains, [1.0, 9.0, 1.0, 0.0])
    picks = hypervolume_greedy(candidates, known, reference, 4)
    assert picks[0] == 1
    # after (1,1) is taken, (3,3) and (2,3.5) add nothing and the useless point is never picked
    np.testing.assert_array_equal(picks, [1])
    picks = hypervolume_greedy(np.array([[3.0, 3.0], [2.0, 3.5], [1.0, 4.5]]), known, reference, 2)
    np.testing.assert_array_equal(picks, [0, 1])  # gains 1, 1 (tie: the first), 0; then 0.5 for (2, 3.5)


def test_hypervolume_greedy_with_no_known_front():
    candidates = np.array([[1.0, 1.0], [0.5, 3.0], [3.0, 0.5]])
    picks = hypervolume_greedy(candidates, np.zeros((0, 2)), np.array([4.0, 4.0]), 1)
    np.testing.assert_array_equal(picks, [0])  # 9 vs 3.5 vs 3.5


# named objectives ----------------------------------------------------------------------------------


def test_objectives_signs_and_round_trip():
    goals = Objectives({"accuracy_low": "max", "distance": "min", "accuracy_high": "max"})
    assert goals.names == ["accuracy_low", "distance", "accuracy_high"] and len(goals) == 3
    np.testing.assert_array_equal(goals.signs, [-1.0, 1.0, -1.0])
    metrics = {"accuracy_high": 0.25, "distance": 0.5, "accuracy_low": 0.75, "loss": 3.0}
    minimised = goals.minimised(metrics)
    np.testing.assert_array_equal(minimised, [-0.75, 0.5, -0.25])
    np.testing.assert_array_equal(goals.natural(minimised), [0.75, 0.5, 0.25])


def test_unknown_objective_lists_the_available_metrics_with_a_suggestion():
    goals = Objectives({"accuracy_lwo": "max", "distance": "min"})
    available = ["accuracy_low", "accuracy_high", "distance"]
    with pytest.raises(SpecError) as err:
        goals.check_names(available)
    assert err.value.path == "strategy.objectives.accuracy_lwo"
    assert "did you mean 'accuracy_low'?" in str(err.value)
    assert "the evaluator returns: accuracy_low, accuracy_high, distance" in str(err.value)
    with pytest.raises(SpecError, match="strategy.objectives.accuracy_lwo"):
        goals.minimised({"accuracy_low": 1.0, "distance": 0.0})


def test_check_objectives_counts_and_goals():
    check_objectives({"a": "max", "b": "min"}, "strategy.objectives")
    with pytest.raises(SpecError, match=r"strategy.objectives: needs at least 2 objectives .* got 1"):
        check_objectives({"a": "max"}, "strategy.objectives")
    with pytest.raises(SpecError, match=r"strategy.objectives.b: got 'maximise', allowed: 'max', 'min'"):
        check_objectives({"a": "max", "b": "maximise"}, "strategy.objectives")
