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


def _layouts(nd: int) -> tuple[str, str]:
    """The einops patterns of an image (`b (gz pz) (gy py) (gx px) c`, 2D without z) and of its
    tokens (`b (gz gy gx) (pz py px c)`): grid axes g*, pixels within a patch p*."""
    axes = "zyx"[-nd:]
    image = " ".join(f"(g{a} p{a})" for a in axes)
    grid, pixels = " ".join(f"g{a}" for a in axes), " ".join(f"p{a}" for a in axes)
    return f"b {image} c", f"b ({grid}) ({pixels} c)"


def _sizes(prefix: str, sizes: Sequence[int]) -> dict[str, int]:
    return dict(zip((f"{prefix}{a}" for a in "zyx"[-len(sizes) :]), sizes))


def patchify(x: Float[Array, "b *sp c"], patch: Sequence[int]) -> Float[Array, "b n pd"]:
    grid_shape(x.shape[1:-1], patch)
    image, tokens = _layouts(len(patch))
    return rearrange(x, f"{image} -> {tokens}", **_sizes("p", patch))


def unpatchify(
    t: Float[Array, "b n pd"], patch: Sequence[int], grid: Sequence[int]
) -> Float[Array, "b *sp c"]:
    image, tokens = _layouts(len(patch))
    return rearrange(t, f"{tokens} -> {image}", **_sizes("g", grid), **_sizes("p", patch))


class PatchEmbed(nnx.Module):
    """Linear embedding of non-overlapping patches (equal to a strided convolution)."""

    def __init__(
        self, patch: Sequence[int], in_channels: int, dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs
    ):
        self.patch = tuple(int(p) for p in patch)
        self.proj = dense(math.prod(self.patch) * in_channels, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: Float[Array, "b *sp c"]) -> Float[Array, "b n d"]:
        return self.proj(patchify(x, self.patch))
