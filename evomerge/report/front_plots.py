"""Front plots: objectives in their own directions, with the region the front dominates shaded."""

from __future__ import annotations

from itertools import combinations
from typing import TYPE_CHECKING

import numpy as np

from evomerge.pareto import non_dominated
from evomerge.report.plots import pyplot, save_figure

if TYPE_CHECKING:
    from evomerge.report.front import RunFront
    from evomerge.store import RunDir


def shade_dominated(ax, front: np.ndarray, reference: np.ndarray, signs: np.ndarray, **style) -> None:
    """Staircase of a 2-objective front (natural values) and the region it dominates, bounded by `reference`."""
    if not len(front):
        return
    M = front * signs  # minimised
    M = M[non_dominated(M)]
    M = M[np.argsort(M[:, 0])]
    ref = reference
    xs, ys = [M[0, 0]], [ref[1]]
    for i, (x, y) in enumerate(M):
        xs += [x, x]
        ys += [ys[-1], y]
        nxt = M[i + 1, 0] if i + 1 < len(M) else ref[0]
        xs.append(nxt)
        ys.append(y)
    xs, ys = np.array(xs) * signs[0], np.array(ys) * signs[1]
    ax.fill_between(xs, ys, ref[1] * signs[1], step=None, alpha=style.pop("alpha", 0.15), color=style.get("color"))
    ax.plot(xs, ys, **style)


def plot_front(run: RunDir, front: RunFront, reference_front: np.ndarray | None = None) -> list[str]:
    """plots/front.png (2-D scatter per objective pair, or parallel coordinates beyond 3 objectives) and,
    when the front has surrogate predictions, plots/predicted_vs_real.png."""
    plt = pyplot()
    if plt is None or not front.evaluated:
        return []
    run.plots_dir.mkdir(exist_ok=True)
    names, signs = front.objectives.names, front.objectives.signs
    everything = np.array([[p.values[n] for n in names] for p in front.evaluated])
    on_front = np.array([[p.values[n] for n in names] for p in front.points]).reshape(-1, len(names))
    out = []
    if len(names) == 1:  # one objective: every evaluation in order, the best ones marked
        fig, ax = plt.subplots(figsize=(7, 4.2))
        ax.scatter([p.id for p in front.evaluated], everything[:, 0], s=10, color="0.6", label="evaluated")
        ax.scatter([p.id for p in front.points], on_front[:, 0], s=28, color="tab:blue", label="best")
        ax.set_xlabel("candidate id")
        ax.set_ylabel(f"{names[0]} ({front.objectives.goals[names[0]]})")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    elif len(names) <= 3:
        pairs = list(combinations(range(len(names)), 2))
        fig, axes = plt.subplots(1, len(pairs), figsize=(5.2 * len(pairs), 4.6), squeeze=False)
        for ax, (i, j) in zip(axes[0], pairs):
            pair_signs = signs[[i, j]]
            ax.scatter(everything[:, i], everything[:, j], s=12, color="0.6", label="evaluated")
            shade_dominated(
                ax, on_front[:, [i, j]], front.reference[[i, j]], pair_signs, color="tab:blue", label="front"
            )
            ax.scatter(on_front[:, i], on_front[:, j], s=28, color="tab:blue", zorder=3)
            if reference_front is not None:
                shade_dominated(
                    ax,
                    reference_front[:, [i, j]],
                    front.reference[[i, j]],
                    pair_signs,
                    color="k",
                    alpha=0.0,
                    linestyle="--",
                    label="reference front",
                )
            ax.set_xlabel(f"{names[i]} ({front.objectives.goals[names[i]]})")
            ax.set_ylabel(f"{names[j]} ({front.objectives.goals[names[j]]})")
            ax.grid(alpha=0.3)
            ax.legend(loc="best", fontsize=8)
    else:
        fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 4.6))
        low, high = everything.min(axis=0), everything.max(axis=0)
        scaled = (everything - low) / np.where(high > low, high - low, 1.0)
        front_scaled = (on_front - low) / np.where(high > low, high - low, 1.0)
        for row in scaled:
            ax.plot(range(len(names)), row, color="0.8", linewidth=0.6)
        for row in front_scaled:
            ax.plot(range(len(names)), row, color="tab:blue", linewidth=1.2)
        ax.set_xticks(range(len(names)), [f"{n}\n({front.objectives.goals[n]})" for n in names], fontsize=8)
        ax.set_ylabel("scaled to the run's range")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{run.path.name}: {len(front.points)} front points of {len(front.evaluated)} evaluated")
    fig.tight_layout()
    path = run.plots_dir / "front.png"
    save_figure(fig, path)
    plt.close(fig)
    out.append(str(path))

    predicted = [p for p in front.evaluated if p.predicted]
    if predicted:
        fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4), squeeze=False)
        for ax, name in zip(axes[0], names):
            real = [p.values[name] for p in predicted]
            guess = [p.predicted[name] for p in predicted]
            ax.scatter(guess, real, s=18)
            lo, hi = min(real + guess), max(real + guess)
            ax.plot([lo, hi], [lo, hi], color="k", linewidth=0.8, linestyle="--")
            rmse = float(np.sqrt(np.mean((np.array(real) - np.array(guess)) ** 2)))
            ax.set_title(f"{name}: RMSE {rmse:.4f}")
            ax.set_xlabel("surrogate prediction")
            ax.set_ylabel("real")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        path = run.plots_dir / "predicted_vs_real.png"
        save_figure(fig, path)
        plt.close(fig)
        out.append(str(path))
    return out
