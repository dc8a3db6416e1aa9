"""MAP's surrogate: a full quadratic in the genes through a link, fitted by non-linear least squares.

A quadratic in d genes has (d+1)(d+2)/2 parameters (constant, linear, squares, cross terms). The
link keeps predictions in the metric's range: sigmoid for accuracies in [0, 1], softplus for
non-negative losses. Each fit reports its cross-validated error so a user can see when the
predicted front is not to be trusted.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy.optimize import least_squares

from evomerge.errors import EvomergeError

Link = Literal["auto", "sigmoid", "softplus", "identity"]


def n_parameters(d: int) -> int:
    return (d + 1) * (d + 2) // 2


def quadratic_features(X: np.ndarray) -> np.ndarray:
    """Columns: 1, x_i, then x_i x_j for i <= j."""
    X = np.atleast_2d(np.asarray(X, dtype=np.float64))
    n, d = X.shape
    rows, cols = np.triu_indices(d)
    return np.hstack([np.ones((n, 1)), X, X[:, rows] * X[:, cols]])


def choose_link(y: np.ndarray) -> str:
    if np.all((y >= 0) & (y <= 1)):
        return "sigmoid"
    if np.all(y >= 0):
        return "softplus"
    return "identity"


def _forward(link: str, z: np.ndarray) -> np.ndarray:
    if link == "sigmoid":
        return 0.5 * (1 + np.tanh(0.5 * z))  # a sigmoid that never overflows
    if link == "softplus":
        return np.logaddexp(0.0, z)
    return z


def _inverse(link: str, y: np.ndarray) -> np.ndarray:
    if link == "sigmoid":
        y = np.clip(y, 1e-3, 1 - 1e-3)
        return np.log(y / (1 - y))
    if link == "softplus":
        y = np.maximum(y, 1e-3)
        return y + np.log(-np.expm1(-y))
    return y


def _derivative(link: str, z: np.ndarray) -> np.ndarray:
    if link == "sigmoid":
        s = _forward("sigmoid", z)
        return s * (1 - s)
    if link == "softplus":
        return _forward("sigmoid", z)
    return np.ones_like(z)


def require_points(d: int, n: int, failed: int = 0, what: str = "the quadratic surrogate") -> None:
    need = n_parameters(d)
    if n < need:
        advice = (
            f" ({failed} evaluations failed: fix what makes them fail, see journal.jsonl, or raise "
            f"strategy.design_points to at least {need + failed})"
            if failed
            else f". Raise the design size (strategy.design_points) to at least {need}"
        )
        raise EvomergeError(
            f"{what} over {d} genes has {need} parameters and needs at least {need} successful evaluations; "
            f"got {n}{advice}"
        )


class QuadraticSurrogate:
    def __init__(self, link: Link = "auto", ridge: float = 1e-8):
        self.link = link
        self.ridge = ridge
        self.coef: np.ndarray | None = None
        self.cv_rmse = float("nan")

    def fit(
        self, X: np.ndarray, y: np.ndarray, cross_validate: bool = True, weights: np.ndarray | None = None
    ) -> QuadraticSurrogate:
        """`weights` (one per point, > 0) make the fit more accurate where they are large, e.g. near the front."""
        X, y = np.atleast_2d(np.asarray(X, dtype=np.float64)), np.asarray(y, dtype=np.float64)
        require_points(X.shape[1], len(y))
        if self.link == "auto":
            self.link = choose_link(y)
        w = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=np.float64)
        self.coef = self._solve(quadratic_features(X), y, w)
        if cross_validate:
            self.cv_rmse = self._cross_validated_rmse(X, y, w)
        return self

    def _solve(self, Phi: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Least squares on the link's inverse as a start, then Gauss-Newton-type refinement on the real residuals."""
        reg = np.sqrt(self.ridge) * np.eye(Phi.shape[1])
        root = np.sqrt(w)
        start, *_ = np.linalg.lstsq(
            np.vstack([Phi * root[:, None], reg]), np.concatenate([_inverse(self.link, y) * root, np.zeros(len(reg))])
        )
        if self.link == "identity":
            return start

        def residuals(beta: np.ndarray) -> np.ndarray:
            return np.concatenate([(_forward(self.link, Phi @ beta) - y) * root, reg @ beta])

        def jacobian(beta: np.ndarray) -> np.ndarray:
            return np.vstack([Phi * (_derivative(self.link, Phi @ beta) * root)[:, None], reg])

        return least_squares(residuals, start, jac=jacobian, method="lm" if len(y) >= Phi.shape[1] else "trf").x

    def _cross_validated_rmse(self, X: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
        """Leave-one-out up to 40 points, 10-fold beyond; NaN when too few points to hold any out."""
        n, need = len(y), n_parameters(X.shape[1])
        if n <= need:
            return float("nan")
        folds = np.arange(n) if n <= 40 else np.arange(n) % 10
        errors = np.empty(n)
        Phi = quadratic_features(X)
        for fold in np.unique(folds):
            held = folds == fold
            if (~held).sum() < need:
                return float("nan")
            coef = self._solve(Phi[~held], y[~held], w[~held])
            errors[held] = _forward(self.link, Phi[held] @ coef) - y[held]
        return float(np.sqrt(np.mean(errors**2)))

    def predict(self, X: np.ndarray) -> np.ndarray:
        if self.coef is None:
            raise EvomergeError("the surrogate has not been fitted")
        return _forward(self.link, quadratic_features(X) @ self.coef)
