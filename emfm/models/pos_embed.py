"""Fixed sin-cos position embeddings for 2D and 3D token grids (MAE, He et al. 2022, Sec. A.1).

Positions are in units of patches, so a grid larger than the pretraining one extends the same
embedding (each token keeps the meaning "this far from the origin"), which is what dense EM
inference over large tiles wants. `ref_grid` instead resamples positions onto a reference grid
(the usual "interpolate" behaviour when changing resolution).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from emfm.errors import UserError


def _axis_embed(pos: np.ndarray, dim: int) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    o = np.einsum("m,d->md", pos, omega)
    return np.concatenate([np.sin(o), np.cos(o)], axis=1)


def sincos_embedding(
    dim: int, grid: Sequence[int], ref_grid: Sequence[int] | None = None
) -> np.ndarray:
    """Embedding of shape `(prod(grid), dim)` in raster order (first axis slowest).

    2D: half the channels encode y, half x (as `shared/bench/sincos.py` and MAE). 3D: a third for
    each of z, y, x (each an even count), the remainder zero-padded.
    """
    nd = len(grid)
    per_axis = (dim // (2 * nd)) * 2
    if per_axis == 0:
        raise UserError(f"embedding width {dim} too small for a {nd}D sin-cos embedding")
    axes = []
    for i, g in enumerate(grid):
        pos = np.arange(g, dtype=np.float64)
        if ref_grid is not None:
            pos = pos * (ref_grid[i] / g)
        axes.append(pos)
    mesh = np.meshgrid(*axes, indexing="ij")
    emb = np.concatenate([_axis_embed(m.reshape(-1), per_axis) for m in mesh], axis=1)
    if emb.shape[1] < dim:
        emb = np.pad(emb, ((0, 0), (0, dim - emb.shape[1])))
    return emb.astype(np.float32)
