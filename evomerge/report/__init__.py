"""Plots and tables from run directories (never from a live search)."""

from evomerge.report.plots import compare_runs, plot_run
from evomerge.report.tables import format_table, run_rows

__all__ = ["compare_runs", "format_table", "plot_run", "run_rows"]
