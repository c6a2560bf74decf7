"""PNG figures (matplotlib, Agg backend): image grids, probe overlays, feature previews."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def image_grid(
    path: str | Path, columns: Sequence[tuple[str, np.ndarray]], *, cmap: str = "gray"
) -> None:
    """One column per (title, [n, y, x] or [n, y, x, 3]) entry, one row per example."""
    plt = _plt()
    n = len(columns[0][1])
    fig, axes = plt.subplots(n, len(columns), figsize=(2.6 * len(columns), 2.6 * n), squeeze=False)
    for j, (title, imgs) in enumerate(columns):
        for i in range(n):
            ax = axes[i, j]
            ax.imshow(imgs[i], cmap=None if imgs[i].ndim == 3 else cmap, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
