"""Residual U-Net encoder-decoder for 2D and 3D EM (Ronneberger et al. 2015; anisotropic pooling as
in Lee et al. 2017, "Superhuman accuracy on the SNEMI3D connectomics challenge"), NNX.

Input is channel-last `[b, y, x, c]` (2D) or `[b, z, y, x, c]` (3D). Level 0 runs at full
resolution; each further level halves y and x, and z too from level `pool_z_from_level` on, so thick
serial sections are pooled in-plane first until the voxels are roughly isotropic. Every level is
`blocks_per_level` pre-activation residual blocks (norm, GELU, conv, norm, GELU, conv, plus skip).

It conforms to the encoder interface: `__call__(x) -> (tokens, aux)` with
  tokens: `[b, n, width]` the full-resolution decoder features, one "token" per pixel (raster
  order); aux: {"patch_map": [b, (z,) y, x, width] the same as a map, "patch_tokens": tokens,
        "blocks": {level: [b, (z,) y_l, x_l, widths[level]] encoder features}}.
So `spec.patch_size` is all ones and `spec.width` the output channels. `encode(x)` is the encoder
half alone (the per-level features a segmentation decoder reuses); `decode(feats)` the decoder half.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from emfm.errors import UserError
from emfm.models import conv3d

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
NORMS = ("group", "layer")


@dataclass(frozen=True)
class UNetSpec:
    """Resolved U-Net architecture. `widths[l]` is the channel count of level l (l = 0 full
    resolution)."""

    ndim: int = 2
    in_channels: int = 1
    widths: tuple[int, ...] = (32, 64, 128, 256)
    blocks_per_level: int = 1
    # 3D: the downsampling into level l pools z only when l >= this value
    pool_z_from_level: int = 1
    norm: str = "group"
    groups: int = 8
    dtype: str = "float32"
    remat: bool = False

    @classmethod
    def from_config(cls, cfg) -> UNetSpec:
        """`cfg` a ModelConfig: `patch_size` of length 2 or 3 gives ndim; `widths` lists the levels,
        else `depth` levels (default 4) of `width * 2**l` channels (width default 32)."""
        if cfg.widths:
            widths = tuple(int(w) for w in cfg.widths)
        else:
            base, levels = cfg.width or 32, cfg.depth or 4
            widths = tuple(base * 2**i for i in range(levels))
        return cls(
            ndim=len(cfg.patch_size),
            in_channels=cfg.in_channels,
            widths=widths,
            blocks_per_level=cfg.blocks_per_level,
            pool_z_from_level=cfg.pool_z_from_level,
            norm=cfg.norm,
            groups=cfg.norm_groups,
            dtype=cfg.dtype,
            remat=cfg.remat,
        )

    def __post_init__(self):
        if self.ndim not in (2, 3):
            raise UserError(f"U-Net ndim={self.ndim}: 2 or 3")
        if self.norm not in NORMS:
            raise UserError(f"U-Net norm={self.norm!r}: use one of {NORMS}")
        if self.norm == "group" and any(w % self.groups for w in self.widths):
            raise UserError(
                f"U-Net widths {self.widths} must be divisible by norm_groups={self.groups}"
            )

    @property
    def patch_size(self) -> tuple[int, ...]:
        return (1,) * self.ndim

    @property
    def width(self) -> int:
        return self.widths[0]

    @property
    def depth(self) -> int:
        return len(self.widths)

    def pool_window(self, level: int) -> tuple[int, ...]:
        """Window of the downsampling from level `level - 1` into `level` (level >= 1)."""
        if self.ndim == 2:
            return (2, 2)
        return (2 if level >= self.pool_z_from_level else 1, 2, 2)

    def total_pool(self) -> tuple[int, ...]:
        tot = [1] * self.ndim
        for lvl in range(1, self.depth):
            tot = [t * w for t, w in zip(tot, self.pool_window(lvl))]
        return tuple(tot)


def _norm(spec: UNetSpec, ch: int, rngs: nnx.Rngs) -> nnx.Module:
    dt = DTYPES[spec.dtype]
    if spec.norm == "group":
        return nnx.GroupNorm(ch, num_groups=spec.groups, epsilon=1e-5, dtype=dt, rngs=rngs)
    return nnx.LayerNorm(ch, epsilon=1e-6, dtype=dt, rngs=rngs)  # over channels, per pixel


def he_uniform(key, shape, dtype=jnp.float32):
    """He (fan-in, gain 2) uniform init for GELU convs. Drawn with numpy from the key's bits when
    the key is concrete: jax's samplers compile one XLA program per kernel shape, which made
    building even a small U-Net take 10+ s on a 2-core CPU. Under tracing (eval_shape, jit) jax
    draws it (same distribution, other numbers), so build eagerly where exact values must repeat."""
    bound = math.sqrt(6.0 / math.prod(shape[:-1]))
    if isinstance(key, jax.core.Tracer):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    bits = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    rng = np.random.default_rng(np.asarray(bits).ravel().tolist())
    return jnp.asarray(rng.uniform(-bound, bound, shape).astype(dtype))


def _conv(spec: UNetSpec, cin: int, cout: int, k: int, rngs: nnx.Rngs) -> nnx.Conv:
    # 3D: depth-folded onto XLA's faster 2D convolution on CPU (emfm.models.conv3d); same parameters
    extra = {"conv_general_dilated": conv3d.conv_general_dilated} if spec.ndim == 3 else {}
    return nnx.Conv(
        cin,
        cout,
        (k,) * spec.ndim,
        padding="SAME",
        dtype=DTYPES[spec.dtype],
        param_dtype=jnp.float32,
        kernel_init=he_uniform,
        rngs=rngs,
        **extra,
    )


class ResBlock(nnx.Module):
    """Pre-activation residual block (He et al. 2016, "Identity mappings"), 1x1 conv skip on width
    change."""

    def __init__(self, spec: UNetSpec, cin: int, cout: int, *, rngs: nnx.Rngs):
        self.norm1 = _norm(spec, cin, rngs)
        self.conv1 = _conv(spec, cin, cout, 3, rngs)
        self.norm2 = _norm(spec, cout, rngs)
        self.conv2 = _conv(spec, cout, cout, 3, rngs)
        self.skip = _conv(spec, cin, cout, 1, rngs) if cin != cout else None

    def __call__(self, x):
        h = self.conv1(jax.nn.gelu(self.norm1(x)))
        h = self.conv2(jax.nn.gelu(self.norm2(h)))
        return (x if self.skip is None else self.skip(x)) + h


def _stage(spec: UNetSpec, cin: int, cout: int, rngs: nnx.Rngs) -> nnx.List:
    return nnx.List(
        [
            ResBlock(spec, cin if i == 0 else cout, cout, rngs=rngs)
            for i in range(spec.blocks_per_level)
        ]
    )


def _run(blocks, x, remat: bool):
    for blk in blocks:
        x = nnx.remat(lambda b, h: b(h))(blk, x) if remat else blk(x)
    return x


def max_pool(x: Float[Array, "b *sp c"], window: Sequence[int]) -> Float[Array, "b *sp2 c"]:
    w = tuple(window)
    return nnx.max_pool(x, window_shape=w, strides=w, padding="VALID")


def upsample(x: Float[Array, "b *sp c"], factor: Sequence[int]) -> Float[Array, "b *sp2 c"]:
    """Nearest-neighbour upsampling by integer factors per spatial axis."""
    for axis, f in enumerate(factor, start=1):
        if f > 1:
            x = jnp.repeat(x, f, axis=axis)
    return x


class UNet(nnx.Module):
    def __init__(self, spec: UNetSpec, *, rngs: nnx.Rngs):
        self.spec = spec
        w = spec.widths
        self.stem = _conv(spec, spec.in_channels, w[0], 3, rngs)
        self.down = nnx.List(
            [_stage(spec, w[max(i - 1, 0)], w[i], rngs) for i in range(spec.depth)]
        )
        # decoder level i (< depth-1): upsample level i+1, 1x1 conv to w[i], concat skip, residual
        # stage
        self.up_proj = nnx.List(
            [_conv(spec, w[i + 1], w[i], 1, rngs) for i in range(spec.depth - 1)]
        )
        self.up = nnx.List([_stage(spec, 2 * w[i], w[i], rngs) for i in range(spec.depth - 1)])
        self.norm = _norm(spec, w[0], rngs)

    def _check(self, x) -> None:
        s = self.spec
        if x.ndim != s.ndim + 2:
            raise UserError(
                f"{s.ndim}D U-Net takes [b, {'z, ' * (s.ndim == 3)}y, x, c] input; got shape "
                f"{x.shape}"
            )
        if x.shape[-1] != s.in_channels:
            raise UserError(f"U-Net expects {s.in_channels} channel(s); input has {x.shape[-1]}")
        tot = s.total_pool()
        if any(d % t for d, t in zip(x.shape[1:-1], tot)):
            raise UserError(
                f"U-Net with {s.depth} levels pools by {tot}: input spatial shape "
                f"{tuple(x.shape[1:-1])} must be divisible by it"
            )

    def encode(self, x: Float[Array, "b *sp c"]) -> list[Float[Array, "b *sp_l c_l"]]:
        """The encoder half alone: features of every level, full resolution first."""
        self._check(x)
        h = self.stem(x.astype(DTYPES[self.spec.dtype]))
        feats = []
        for lvl, stage in enumerate(self.down):
            if lvl:
                h = max_pool(h, self.spec.pool_window(lvl))
            h = _run(stage, h, self.spec.remat)
            feats.append(h)
        return feats

    def decode(self, feats: Sequence[Float[Array, "b *sp_l c_l"]]) -> Float[Array, "b *sp w"]:
        """The decoder half: full-resolution features `[b, (z,) y, x, widths[0]]` (normed,
        float32)."""
        h = feats[-1]
        for lvl in range(self.spec.depth - 2, -1, -1):
            h = upsample(self.up_proj[lvl](h), self.spec.pool_window(lvl + 1))
            h = _run(self.up[lvl], jnp.concatenate([feats[lvl], h], axis=-1), self.spec.remat)
        return self.norm(h).astype(jnp.float32)

    def __call__(
        self, x: Float[Array, "b *sp c"], *, ids_keep=None, return_blocks: Sequence[int] = ()
    ) -> tuple[Float[Array, "b n w"], dict]:
        if ids_keep is not None:
            raise UserError(
                "the U-Net has no tokens to drop (ids_keep); mask the input image instead"
            )
        feats = self.encode(x)
        fmap = self.decode(feats)
        tokens = fmap.reshape(fmap.shape[0], -1, fmap.shape[-1])
        n = self.spec.depth
        blocks = {i % n: feats[i % n].astype(jnp.float32) for i in return_blocks}
        return tokens, {"patch_map": fmap, "patch_tokens": tokens, "blocks": blocks}
