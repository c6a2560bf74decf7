"""Patchify / unpatchify for 2D and 3D images (anisotropic patches allowed), one einops call each.

Images are channel-last: 2D `[b, y, x, c]`, 3D `[b, z, y, x, c]`. Tokens are in raster order of the
patch grid (z slowest), each holding its pixels in raster order with channels last; this is also the
order of MAE's reconstruction targets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax.numpy as jnp
from einops import rearrange
from flax import nnx
from jaxtyping import Array, Float

from emfm.errors import UserError
from emfm.models.layers import dense


def grid_shape(spatial: Sequence[int], patch: Sequence[int]) -> tuple[int, ...]:
    if len(spatial) != len(patch):
        raise UserError(
            f"image of spatial shape {tuple(spatial)} does not match patch size {tuple(patch)}"
        )
    for s, p in zip(spatial, patch):
        if s % p:
            raise UserError(
                f"image of spatial shape {tuple(spatial)} is not divisible by patch size "
                f"{tuple(patch)}"
            )
    return tuple(s // p for s, p in zip(spatial, patch))


def patchify(x: Float[Array, "b *sp c"], patch: Sequence[int]) -> Float[Array, "b n pd"]:
    grid_shape(x.shape[1:-1], patch)
    if len(patch) == 2:
        return rearrange(x, "b (gy py) (gx px) c -> b (gy gx) (py px c)", py=patch[0], px=patch[1])
    return rearrange(
        x,
        "b (gz pz) (gy py) (gx px) c -> b (gz gy gx) (pz py px c)",
        pz=patch[0],
        py=patch[1],
        px=patch[2],
    )


def unpatchify(
    t: Float[Array, "b n pd"], patch: Sequence[int], grid: Sequence[int]
) -> Float[Array, "b *sp c"]:
    if len(patch) == 2:
        return rearrange(
            t,
            "b (gy gx) (py px c) -> b (gy py) (gx px) c",
            gy=grid[0],
            gx=grid[1],
            py=patch[0],
            px=patch[1],
        )
    return rearrange(
        t,
        "b (gz gy gx) (pz py px c) -> b (gz pz) (gy py) (gx px) c",
        gz=grid[0],
        gy=grid[1],
        gx=grid[2],
        pz=patch[0],
        py=patch[1],
        px=patch[2],
    )


class PatchEmbed(nnx.Module):
    """Linear embedding of non-overlapping patches (equal to a strided convolution)."""

    def __init__(
        self, patch: Sequence[int], in_channels: int, dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs
    ):
        self.patch = tuple(int(p) for p in patch)
        self.proj = dense(math.prod(self.patch) * in_channels, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: Float[Array, "b *sp c"]) -> Float[Array, "b n d"]:
        return self.proj(patchify(x, self.patch))
