"""Multi-objective building blocks shared by the Pareto strategies and the front report.

Pure numpy (pymoo only where a strategy runs an optimiser): objectives and their directions,
non-domination, hypervolume, IGD+, the quadratic surrogate and the space-filling design.
"""

from evomerge.pareto.front import hypervolume, igd_plus, non_dominated
from evomerge.pareto.objectives import Objectives, check_objectives

__all__ = ["Objectives", "check_objectives", "hypervolume", "igd_plus", "non_dominated"]
