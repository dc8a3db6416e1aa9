"""MAP (Li et al., ICLR 2025): the trade-off front from few real evaluations, through quadratic surrogates.

Rounds, each started once the previous one is fully told: a space-filling design; optional
acquisition batches (`residual`: the paper's Bayesian MAP, more points in the directions where
the surrogate fits worst; `hypervolume`: points of the predicted front that add the most
hypervolume to the real front, a front-aware variant); finally the predicted front is evaluated
for real. Every fit uses every point gathered so far.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from evomerge.errors import SpecError
from evomerge.evaluate.base import EvalResult
from evomerge.pareto import check_objectives, non_dominated
from evomerge.pareto.design import vertices_and_sobol
from evomerge.pareto.solve import front_of, hypervolume_greedy, spread_out
from evomerge.pareto.surrogate import Link, QuadraticSurrogate, n_parameters, require_points
from evomerge.schema import require
from evomerge.search import STRATEGIES
from evomerge.search.base import Candidate, ParetoStrategy, Proposal
from evomerge.space.base import BoxSpace

Acquisition = Literal["none", "residual", "hypervolume"]
TWO_TASKS = {"accuracy_low": "max", "accuracy_high": "max"}


@dataclass
class MapOptions:
    objectives: dict[str, Literal["max", "min"]] = field(default_factory=lambda: dict(TWO_TASKS))
    links: dict[str, Link] = field(default_factory=dict)  # per objective; auto: sigmoid in [0, 1], softplus >= 0
    design_points: int | None = None  # default (d+1)(d+2), twice the surrogate's parameters
    acquisition: Acquisition = "none"
    batches: list[int] = field(default_factory=list)  # acquisition batch sizes, e.g. [3, 3]
    front_points: int = 10  # predicted-front points evaluated for real at the end
    bins: int = 8  # direction bins of the residual acquisition
    temperature: float = 0.07
    pop_size: int = 100  # NSGA on the surrogates
    generations: int = 100

    def check(self, path: str) -> None:
        check_objectives(self.objectives, f"{path}.objectives")
        for name in self.links:
            require(
                name in self.objectives,
                f"{path}.links.{name}",
                f"not an objective; objectives: {', '.join(self.objectives)}",
            )
        if self.design_points is not None:
            require(self.design_points >= 1, f"{path}.design_points", f"got {self.design_points}, must be >= 1")
        require(self.front_points >= 1, f"{path}.front_points", f"got {self.front_points}, must be >= 1")
        for i, size in enumerate(self.batches):
            require(size >= 1, f"{path}.batches[{i}]", f"got {size}, must be >= 1")
        require(
            self.acquisition != "none" or not self.batches,
            f"{path}.batches",
            "batches need an acquisition ('residual' or 'hypervolume'); plain MAP has a design and a front round",
        )
        require(
            self.acquisition == "none" or bool(self.batches),
            f"{path}.batches",
            f"acquisition {self.acquisition!r} needs at least one batch size, e.g. [3, 3]",
        )
        require(self.bins >= 1, f"{path}.bins", f"got {self.bins}, must be >= 1")
        require(self.temperature > 0, f"{path}.temperature", f"got {self.temperature}, must be > 0")
        require(self.pop_size >= 4, f"{path}.pop_size", f"got {self.pop_size}, must be >= 4")
        require(self.generations >= 1, f"{path}.generations", f"got {self.generations}, must be >= 1")


def directions(d: int, bins: int, seed: int) -> np.ndarray:
    """Unit directions in the positive orthant: evenly spaced angles for d = 2, seeded ones beyond."""
    if d == 1:
        return np.ones((1, 1))
    if d == 2:
        angles = (np.arange(bins) + 0.5) * (np.pi / 2) / bins
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)
    raw = np.abs(np.random.default_rng(seed).standard_normal((bins, d)))
    return raw / np.linalg.norm(raw, axis=1, keepdims=True)


def front_weights(F: np.ndarray) -> np.ndarray:
    """1 / (1 + non-domination rank): the front-aware variant fits best where the front is."""
    rank = np.zeros(len(F))
    remaining = np.arange(len(F))
    level = 0
    while len(remaining):
        mask = non_dominated(F[remaining])
        rank[remaining[mask]] = level
        remaining = remaining[~mask]
        level += 1
    return 1.0 / (1.0 + rank)


class MapRounds:
    """The round engine in its own box, reused by nested MAP: points in, natural objective values back."""

    def __init__(self, options: MapOptions, low: np.ndarray, high: np.ndarray, signs: np.ndarray, seed: int):
        self.options = options
        self.low, self.high = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
        self.signs = np.asarray(signs, dtype=np.float64)
        self.seed = seed
        d, m = len(self.low), len(self.signs)
        self.design_points = options.design_points or 2 * n_parameters(d)
        if self.design_points < n_parameters(d):
            raise SpecError(
                "strategy.design_points",
                f"got {self.design_points}; the quadratic surrogate over {d} genes has {n_parameters(d)} parameters, "
                f"so the design needs at least {n_parameters(d)} points (default {2 * n_parameters(d)})",
            )
        self.rounds = ["design", *("acquire" for _ in options.batches), "front"]
        self.round = -1
        self.X = np.zeros((0, d))
        self.Y = np.zeros((0, m))
        self.keys = np.zeros(0, dtype=np.int64)  # the point key of each row of X, Y
        self.failed = 0
        self.queue = np.zeros((0, d))
        self.queue_predicted = np.zeros((0, m))
        self.pending: dict[int, np.ndarray] = {}
        self.next_point = 0
        self.cv_rmse = np.full(m, np.nan)
        self.surrogates: list[QuadraticSurrogate] = []
        self.fitted_points = 0  # the last fit used the first `fitted_points` rows of X, Y (tell order)

    @property
    def finished(self) -> bool:
        return self.round == len(self.rounds) - 1 and not len(self.queue) and not self.pending

    def ask(self, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]] | None:
        if not len(self.queue):
            if self.pending or self.finished:
                return None  # a round is told completely before the next is planned
            while not len(self.queue) and self.round < len(self.rounds) - 1:
                self._plan_next_round(rng)  # a round can come out empty (nothing new on the predicted front)
            if not len(self.queue):
                return None
        x, predicted = self.queue[0], self.queue_predicted[0]
        self.queue, self.queue_predicted = self.queue[1:], self.queue_predicted[1:]
        key = self.next_point
        self.next_point += 1
        self.pending[key] = x
        meta: dict[str, Any] = {"point": key, "phase": self.rounds[self.round], "round": self.round}
        if not np.isnan(predicted).any():
            meta["predicted"] = [round(float(v), 6) for v in predicted]
        return x, meta

    def tell(self, key: int, values: np.ndarray | None) -> None:
        x = self.pending.pop(key)
        if values is None:
            self.failed += 1
            return
        at = int(np.searchsorted(self.keys, key))  # rows in point order, so fits do not depend on arrival order
        self.keys = np.insert(self.keys, at, key)
        self.X = np.insert(self.X, at, x, axis=0)
        self.Y = np.insert(self.Y, at, values, axis=0)

    # planning ---------------------------------------------------------------------------
    def fit(self) -> None:
        require_points(self.X.shape[1], len(self.X), self.failed)
        links = list(self.options.links.get(name, "auto") for name in self._names())
        weights = front_weights(self.Y * self.signs) if self.options.acquisition == "hypervolume" else None
        self.surrogates = [
            QuadraticSurrogate(links[j]).fit(self.X, self.Y[:, j], weights=weights) for j in range(self.Y.shape[1])
        ]
        self.cv_rmse = np.array([s.cv_rmse for s in self.surrogates])
        self.fitted_points = len(self.X)

    def _names(self) -> list[str]:
        names = list(self.options.objectives)
        return names if len(names) == len(self.signs) else [str(j) for j in range(len(self.signs))]

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Natural-direction predictions, one column per objective."""
        return np.stack([s.predict(X) for s in self.surrogates], axis=1)

    def _minimised_prediction(self, X: np.ndarray) -> np.ndarray:
        return self.predict(X) * self.signs

    def _plan_next_round(self, rng: np.random.Generator) -> None:
        self.round += 1
        phase = self.rounds[self.round]
        if phase == "design":
            points = vertices_and_sobol(self.low, self.high, self.design_points, self.seed)
            self._enqueue(points, np.full((len(points), len(self.signs)), np.nan))
            return
        self.fit()
        size = self.options.batches[self.round - 1] if phase == "acquire" else self.options.front_points
        if phase == "acquire" and self.options.acquisition == "residual":
            points = np.array([self._residual_point(rng) for _ in range(size)])
            self._enqueue(points, self.predict(points))
            return
        candidates, F = front_of(
            self._minimised_prediction,
            len(self.signs),
            self.low,
            self.high,
            seed=self.seed + self.round,
            pop_size=self.options.pop_size,
            generations=self.options.generations,
            extra=self.X,
        )
        gaps = np.abs(candidates[:, None, :] - self.X[None, :, :]) / (self.high - self.low)
        fresh = gaps.max(axis=2).min(axis=1) > 1e-3  # not a (near) repeat of an evaluated point
        candidates, F = candidates[fresh], F[fresh]
        if self.options.acquisition == "hypervolume":
            known = self.Y * self.signs
            reference = known.max(axis=0) + 0.1 * np.maximum(np.ptp(known, axis=0), 1e-9)
            picks = list(hypervolume_greedy(F, known, reference, size))
            if len(picks) < size:
                rest = np.setdiff1d(np.arange(len(F)), picks)
                picks += [int(rest[i]) for i in spread_out(F[rest], size - len(picks))]
            picks = np.array(picks, dtype=np.int64)
        else:
            picks = spread_out(F, size)
        self._enqueue(candidates[picks], F[picks] * self.signs)

    def _enqueue(self, points: np.ndarray, predicted: np.ndarray) -> None:
        self.queue = np.asarray(points, dtype=np.float64).reshape(-1, len(self.low))
        self.queue_predicted = np.asarray(predicted, dtype=np.float64).reshape(len(self.queue), -1)

    def _residual_point(self, rng: np.random.Generator) -> np.ndarray:
        """Bayesian MAP: a point in a direction bin drawn by softmax of (mean squared residual + 0.5 std)."""
        span = self.high - self.low
        units = directions(len(self.low), self.options.bins, self.seed)
        scale = np.maximum(self.Y.std(axis=0), 1e-9)
        squared = np.mean(((self.predict(self.X) - self.Y) / scale) ** 2, axis=1)
        relative = (self.X - self.low) / span
        norms = np.linalg.norm(relative, axis=1)
        owner = np.argmax((relative / np.maximum(norms, 1e-12)[:, None]) @ units.T, axis=1)
        scores = np.full(len(units), np.nan)
        for b in range(len(units)):
            mine = squared[(owner == b) & (norms > 1e-12)]
            if len(mine):
                scores[b] = mine.mean() + 0.5 * mine.std()
        top = np.nanmax(scores) if np.any(~np.isnan(scores)) else 1.0
        scores = np.where(np.isnan(scores), top, scores) / max(top, 1e-12)  # unexplored bins rank with the worst
        weights = np.exp((scores - scores.max()) / self.options.temperature)
        b = int(rng.choice(len(units), p=weights / weights.sum()))
        direction = np.abs(units[b] + 0.1 * rng.standard_normal(len(self.low)) / np.sqrt(len(self.low)))
        direction /= np.linalg.norm(direction)
        reach = 1.0 / np.max(direction)  # where the ray from the low corner leaves the unit box
        return self.low + span * direction * reach * rng.uniform(0.2, 1.0)

    # state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        keys = sorted(self.pending)
        return {
            "round": self.round,
            "X": self.X,
            "keys": self.keys,
            "Y": self.Y,
            "failed": self.failed,
            "queue": self.queue,
            "queue_predicted": self.queue_predicted,
            "pending_keys": keys,
            "pending_points": np.array([self.pending[k] for k in keys]).reshape(len(keys), len(self.low)),
            "next_point": self.next_point,
            "fitted_points": self.fitted_points,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.round = int(state["round"])
        self.X, self.Y = np.asarray(state["X"]), np.asarray(state["Y"])
        self.keys = np.asarray(state["keys"], dtype=np.int64)
        self.failed = int(state["failed"])
        self.queue, self.queue_predicted = np.asarray(state["queue"]), np.asarray(state["queue_predicted"])
        self.pending = {int(k): np.asarray(x) for k, x in zip(state["pending_keys"], state["pending_points"])}
        self.next_point = int(state["next_point"])
        self.seed = int(state["seed"])
        fitted = int(state["fitted_points"])
        if fitted:  # the surrogates are a function of the points they saw, so they are refitted, not stored
            everything = self.X, self.Y
            self.X, self.Y = self.X[:fitted], self.Y[:fitted]
            self.fit()
            self.X, self.Y = everything

    def stats(self) -> dict[str, float]:
        out: dict[str, float] = {"round": self.round, "points": len(self.X), "failed": self.failed}
        for name, err in zip(self._names(), self.cv_rmse):
            if np.isfinite(err):  # NaN until a fit has points to hold out
                out[f"cv_rmse_{name}"] = float(err)
        return out


class MapSearch(ParetoStrategy):
    def __init__(self, options: MapOptions, space: BoxSpace, seed: int):
        super().__init__(options.objectives, seed)
        self.engine = MapRounds(options, np.asarray(space.low), np.asarray(space.high), self.objectives.signs, seed)

    @property
    def finished(self) -> bool:
        return self.engine.finished

    def ask(self) -> Proposal | None:
        asked = self.engine.ask(self.rng)
        if asked is None:
            return None
        x, meta = asked
        if "predicted" in meta:
            meta["predicted"] = dict(zip(self.objectives.names, meta["predicted"]))
        meta["genes"] = [float(v) for v in x]
        return Proposal(x.copy(), meta)

    def tell(self, candidate: Candidate, result: EvalResult | None) -> None:
        if result is None:
            self.engine.tell(int(candidate.meta["point"]), None)
            return
        minimised = self.objectives.minimised(result.objectives)
        self.engine.tell(int(candidate.meta["point"]), self.objectives.natural(minimised))
        self.record(candidate.genome, minimised)

    def stats(self) -> dict[str, float]:
        return self.engine.stats()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "engine": self.engine.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.engine.load_state_dict(state["engine"])


@STRATEGIES.register(
    "map", MapOptions, "MAP: quadratic surrogates, NSGA on them, the predicted front evaluated", {"box"}
)
def build_map(options: MapOptions, space: BoxSpace, seed: int) -> MapSearch:
    return MapSearch(options, space, seed)
