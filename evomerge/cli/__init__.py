"""Command-line interface."""

from evomerge.cli.main import main

__all__ = ["main"]
