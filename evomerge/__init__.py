"""evomerge: evolutionary and multi-objective search for model merging."""

__version__ = "0.1.0"
