"""Named objectives with a direction; strategies and fronts work on their minimised form."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np

from evomerge.errors import SpecError
from evomerge.schema import did_you_mean, require

Goal = Literal["max", "min"]


def check_objectives(objectives: Mapping[str, str], path: str, minimum: int = 2) -> None:
    """Validate a `{metric: max|min}` mapping from a spec."""
    require(
        len(objectives) >= minimum,
        path,
        f"needs at least {minimum} objectives as {{metric: max|min}}, got {len(objectives)}",
    )
    for name, goal in objectives.items():
        require(goal in ("max", "min"), f"{path}.{name}", f"got {goal!r}, allowed: 'max', 'min'")


class Objectives:
    """Maps an evaluator's named metrics to a vector to minimise (maximised metrics are negated)."""

    def __init__(self, goals: Mapping[str, str], path: str = "strategy.objectives"):
        self.names = list(goals)
        self.goals = dict(goals)
        self.path = path
        self.signs = np.array([-1.0 if goals[n] == "max" else 1.0 for n in self.names])

    def __len__(self) -> int:
        return len(self.names)

    def check_names(self, available: list[str]) -> None:
        """Refuse a metric the evaluator does not return, naming the ones it does."""
        for name in self.names:
            if name not in available:
                raise SpecError(
                    f"{self.path}.{name}",
                    f"unknown objective {name!r}{did_you_mean(name, available)}; "
                    f"the evaluator returns: {', '.join(available)}",
                )

    def minimised(self, metrics: Mapping[str, float]) -> np.ndarray:
        missing = [n for n in self.names if n not in metrics]
        if missing:
            self.check_names(list(metrics))
        return self.signs * np.array([float(metrics[n]) for n in self.names])

    def natural(self, minimised: np.ndarray) -> np.ndarray:
        """Back from the minimised form to the metrics' own values and directions."""
        return np.asarray(minimised) * self.signs
