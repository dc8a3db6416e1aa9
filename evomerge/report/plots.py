"""Accuracy-over-evaluations and archive-diversity plots (matplotlib, headless)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

from evomerge.errors import EvomergeError
from evomerge.report.tables import read_curve
from evomerge.store import RunDir
from evomerge.store.atomic import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DIVERSITY_KEYS = ("archive_size", "coverage", "mean_distance", "mean_disagreement")


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig: Figure, path: Path) -> None:
    """Render in memory, then write atomically: a full disk leaves the old plot, never half a PNG."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=Path(path).suffix.lstrip(".") or "png", dpi=110)
    atomic_write_bytes(path, buffer.getvalue())


def plot_run(run: RunDir) -> list[str]:
    """plots/accuracy.png and plots/diversity.png for one run; [] without matplotlib or data."""
    plt = pyplot()
    curve = read_curve(run)
    if plt is None or not curve:
        return []
    run.plots_dir.mkdir(exist_ok=True)
    x = [p["evaluations"] for p in curve]
    out = []

    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(x, [p["best_train"] for p in curve], label="best train (search split)")
    if "test_accuracy" in curve[0]:
        ax.plot(x, [p.get("test_accuracy") for p in curve], label="test accuracy of best-on-train")
    ax.set_xlabel("evaluations (forward passes over the train split)")
    ax.set_ylabel("accuracy")
    summary = run.summary() or {}
    ax.set_title(f"{run.path.name} ({summary.get('strategy', '?')}, {summary.get('evaluations', 0):,} evaluations)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = run.plots_dir / "accuracy.png"
    save_figure(fig, path)
    plt.close(fig)
    out.append(str(path))

    keys = [k for k in DIVERSITY_KEYS if k in curve[-1]]
    if keys:
        fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.2), squeeze=False)
        for ax, key in zip(axes[0], keys):
            ax.plot(x, [p.get(key) for p in curve])
            ax.set_title(key.replace("_", " "))
            ax.set_xlabel("evaluations")
            ax.grid(alpha=0.3)
        fig.suptitle(f"archive diversity: {run.path.name}")
        fig.tight_layout()
        path = run.plots_dir / "diversity.png"
        save_figure(fig, path)
        plt.close(fig)
        out.append(str(path))
    return out


def compare_runs(runs: list[RunDir], out: Path, metric: str = "test_accuracy") -> str | None:
    """Several runs' curves of one metric on one plot."""
    curves = {run.path.name: read_curve(run) for run in runs}
    columns = sorted({k for curve in curves.values() for point in curve for k in point})
    if metric not in columns:
        raise EvomergeError(f"--metric: no run has a {metric!r} column in curve.csv; columns: {', '.join(columns)}")
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for run in runs:
        curve = curves[run.path.name]
        if curve and metric in curve[0]:
            ax.plot([p["evaluations"] for p in curve], [p.get(metric) for p in curve], label=run.path.name)
    ax.set_xlabel("evaluations")
    ax.set_ylabel(metric.replace("_", " "))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, out)
    plt.close(fig)
    return str(out)
