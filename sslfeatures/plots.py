"""Pictures: loss curves and nearest-neighbour grids (matplotlib, headless)."""
from __future__ import annotations

import os
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curve(metrics: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Loss (and learning rate) against step from a run's metrics rows."""
    plt = _plt()
    rows = [m for m in metrics if "loss" in m]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if rows:
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="loss", color="C0")
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in rows], [r["lr"] for r in rows], color="C1", alpha=0.5, label="lr")
        ax2.set_ylabel("learning rate")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.set_title("training loss")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_neighbours(queries: Sequence[np.ndarray], neighbours: Sequence[Sequence[np.ndarray]],
                    path: str | os.PathLike, query_labels: Sequence[str] | None = None,
                    neighbour_labels: Sequence[Sequence[str]] | None = None,
                    title: str = "nearest neighbours") -> Path:
    """A grid: each row a query image followed by its nearest neighbours (HWC uint8)."""
    plt = _plt()
    rows, cols = len(queries), 1 + max(len(n) for n in neighbours)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.2, rows * 1.3), dpi=100, squeeze=False)
    for r in range(rows):
        imgs = [queries[r]] + list(neighbours[r])
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(imgs):
                ax.imshow(imgs[c])
                lab = (query_labels[r] if c == 0 else neighbour_labels[r][c - 1]) if (
                    query_labels is not None and neighbour_labels is not None) else None
                if lab is not None:
                    ax.set_title(lab, fontsize=6, color="black" if c == 0 else
                                 ("green" if lab == query_labels[r] else "red"))
        axes[r][0].set_title((query_labels[r] if query_labels else "query"), fontsize=6, fontweight="bold")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
