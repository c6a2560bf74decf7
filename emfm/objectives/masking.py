"""Random token masking as a pure function of `(rng, batch, grid)` (MAE, He et al. 2022)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


class Masking(NamedTuple):
    ids_keep: Int[Array, "b k"]  # indices of visible tokens, in order of the random shuffle
    # argsort of the shuffle: unshuffles [visible, masked] back to raster order
    ids_restore: Int[Array, "b n"]
    mask: Float[Array, "b n"]  # 1 = masked (to reconstruct), 0 = visible, in raster order


def num_visible(n: int, mask_ratio: float) -> int:
    return max(1, int(n * (1.0 - mask_ratio)))


def random_masking(
    rng: jax.Array, batch: int, grid: Sequence[int], mask_ratio: float, *, tube: bool = False
) -> Masking:
    """Keep `int(n * (1 - ratio))` tokens per example, chosen uniformly without replacement.

    `tube=True` (3D grids) draws one in-plane mask and repeats it along z, so a masked patch cannot
    be copied from the section above or below.
    """
    n = math.prod(grid)
    if tube and len(grid) == 3:
        gz, plane = grid[0], grid[1] * grid[2]
        keep_plane = num_visible(plane, mask_ratio)
        noise = jax.random.uniform(rng, (batch, plane))
        shuffle = jnp.argsort(noise, axis=1)
        # token index = z * plane + in-plane index; keep the same in-plane set for every z
        keep = (jnp.arange(gz)[None, :, None] * plane + shuffle[:, None, :keep_plane]).reshape(
            batch, -1
        )
        drop = (jnp.arange(gz)[None, :, None] * plane + shuffle[:, None, keep_plane:]).reshape(
            batch, -1
        )
        ids_shuffle = jnp.concatenate([keep, drop], axis=1)
        k = gz * keep_plane
    else:
        k = num_visible(n, mask_ratio)
        noise = jax.random.uniform(rng, (batch, n))
        ids_shuffle = jnp.argsort(noise, axis=1)
    ids_restore = jnp.argsort(ids_shuffle, axis=1)
    mask = jnp.ones((batch, n), jnp.float32).at[:, :k].set(0.0)
    mask = jnp.take_along_axis(mask, ids_restore, axis=1)
    return Masking(ids_keep=ids_shuffle[:, :k], ids_restore=ids_restore, mask=mask)
