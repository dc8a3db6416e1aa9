"""Search strategies: ask/tell objects with state_dict()/load_state_dict(), testable without Ray."""

from __future__ import annotations

from typing import TYPE_CHECKING

from evomerge.errors import SpecError
from evomerge.registry import Registry
from evomerge.search.base import Candidate, Proposal, Strategy

if TYPE_CHECKING:
    from evomerge.spec import SearchSpec

STRATEGIES: Registry = Registry("strategy")

from evomerge.search import (  # noqa: E402,F401  (registers the built-ins)
    cma_es,
    grid,
    m2n2,
    map,
    map_elites,
    nested_map,
    nsga,
    optuna_search,
    random_search,
)

_NEEDS = {"variation": "crossover and mutation (space 'weights')", "box": "bounded genes (space 'slerp')"}


def check_compatible(spec: SearchSpec) -> None:
    """Refuse a strategy whose space lacks what it needs, before anything is built."""
    from evomerge.space import SPACES

    needs = STRATEGIES.entry(spec.strategy.name, "strategy.name").tags
    offers = SPACES.entry(spec.space.name, "space.name").tags
    for need in sorted(needs - offers):
        raise SpecError(
            "space.name",
            f"strategy {spec.strategy.name!r} needs a space with {_NEEDS[need]}; space {spec.space.name!r} has none",
        )


__all__ = ["STRATEGIES", "Candidate", "Proposal", "Strategy", "check_compatible"]
