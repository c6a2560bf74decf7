"""Dense segmentation heads on encoder features, 2D and 3D, and the `SegModel` that joins them.

All heads return per-pixel logits `[b, (z,) y, x, out]` at the input's resolution.
  "unetr": for a ViT (Hatamizadeh et al. 2022, UNETR): the final tokens are upsampled by
      transposed convolutions stage by stage (x2 per stage, per axis while the patch is not yet
      covered), and at each stage fused with an earlier encoder block's tokens (upsampled to the
      same scale) or, at full resolution, with a convolution of the input image.
  "progressive": for a ViT (Zheng et al. 2021, SETR-PUP): final tokens only, x2 nearest
      upsampling + conv per stage, then a 1x1 conv. Fewer parameters, no skips.
  "unet": for the U-Net: its own decoder already gives full-resolution features; a 1x1 conv.
Parameter paths are `encoder/...` and `head/...`, so the optimizer's freeze regexes and layer-wise
lr decay (emfm.train.optim) address the encoder.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from emfm.errors import UserError
from emfm.models import conv3d
from emfm.models.unet import he_uniform, upsample


def _conv(nd: int, cin: int, cout: int, k: int, rngs: nnx.Rngs) -> nnx.Conv:
    extra = {"conv_general_dilated": conv3d.conv_general_dilated} if nd == 3 else {}
    return nnx.Conv(
        cin, cout, (k,) * nd, padding="SAME", kernel_init=he_uniform, rngs=rngs, **extra
    )


class ConvNormAct(nnx.Module):
    """conv k -> GroupNorm -> GELU."""

    def __init__(self, nd: int, cin: int, cout: int, k: int = 3, *, rngs: nnx.Rngs):
        self.conv = _conv(nd, cin, cout, k, rngs)
        self.norm = nnx.GroupNorm(cout, num_groups=min(8, cout), epsilon=1e-5, rngs=rngs)

    def __call__(self, x):
        return jax.nn.gelu(self.norm(self.conv(x)))


def up_factors(patch: Sequence[int]) -> list[tuple[int, ...]]:
    """Per-stage upsampling factors that take a token grid back to pixels: x2 along each axis whose
    patch size is not yet covered, e.g. (8, 8) -> [(2, 2)] * 3 and (4, 16, 16) -> [(2, 2, 2)] * 2 +
    [(1, 2, 2)] * 2. Patch sizes must be powers of two."""
    for p in patch:
        if p & (p - 1):
            raise UserError(f"dense heads need power-of-two patch sizes; got {tuple(patch)}")
    stages = max(int(math.log2(p)) for p in patch)
    return [tuple(2 if (p >> s) > 1 else 1 for p in patch) for s in range(stages)]


class UpConv(nnx.Module):
    """Transposed convolution with kernel = stride = factor (no overlap, no checkerboard)."""

    def __init__(self, cin: int, cout: int, factor: Sequence[int], *, rngs: nnx.Rngs):
        f = tuple(factor)
        self.conv = nnx.ConvTranspose(cin, cout, f, strides=f, padding="VALID", rngs=rngs)

    def __call__(self, x):
        c = self.conv
        if x.ndim == 5 and conv3d.current_impl() != "native":  # CPU: XLA's 3D version is slow
            bias = None if c.bias is None else c.bias[...]
            return conv3d.conv3d_transpose_blocks(x, c.kernel[...], bias)
        return c(x)


def _token_map(tokens: Float[Array, "b n d"], grid: Sequence[int]) -> Float[Array, "b *g d"]:
    return tokens.reshape(tokens.shape[0], *grid, tokens.shape[-1])


def default_blocks(depth: int, n: int) -> list[int]:
    """`n` intermediate blocks spread evenly over a `depth`-block encoder, excluding the last."""
    return sorted({max(0, round(depth * (i + 1) / (n + 1)) - 1) for i in range(n)}) if n else []


class UNETRHead(nnx.Module):
    def __init__(
        self,
        *,
        patch: Sequence[int],
        enc_width: int,
        enc_depth: int,
        in_channels: int,
        width: int,
        out: int,
        blocks: Sequence[int] = (),
        rngs: nnx.Rngs,
    ):
        nd = len(patch)
        self.factors = up_factors(patch)
        s = len(self.factors)
        blocks = list(blocks) or default_blocks(enc_depth, s - 1)
        if len(blocks) < s - 1:  # a shallow encoder: reuse its blocks for the remaining stages
            blocks = (blocks * (s - 1))[: s - 1] if blocks else [enc_depth - 1] * (s - 1)
        self.blocks = tuple(int(b) % enc_depth for b in blocks[: s - 1])
        self.bottom = ConvNormAct(nd, enc_width, width, 3, rngs=rngs)
        self.ups = nnx.List([UpConv(width, width, f, rngs=rngs) for f in self.factors])
        # skip of stage k (k < s - 1): block tokens upsampled by stages 0..k
        self.skip_ups = nnx.List(
            [
                nnx.List(
                    [
                        UpConv(enc_width if j == 0 else width, width, self.factors[j], rngs=rngs)
                        for j in range(k + 1)
                    ]
                )
                for k in range(s - 1)
            ]
        )
        self.stem = nnx.List(
            [
                ConvNormAct(nd, in_channels, width, 3, rngs=rngs),
                ConvNormAct(nd, width, width, 3, rngs=rngs),
            ]
        )
        self.fuse = nnx.List([ConvNormAct(nd, 2 * width, width, 3, rngs=rngs) for _ in range(s)])
        self.out = _conv(nd, width, out, 1, rngs)

    def __call__(self, aux: dict, x: Float[Array, "b *sp c"]) -> Float[Array, "b *sp o"]:
        h = self.bottom(aux["patch_map"])
        grid = aux["patch_map"].shape[1:-1]
        for k, up in enumerate(self.ups):
            h = up(h)
            if k < len(self.ups) - 1:
                skip = _token_map(aux["blocks"][self.blocks[k]], grid)
                for u in self.skip_ups[k]:
                    skip = u(skip)
            else:
                skip = self.stem[1](self.stem[0](x))
            h = self.fuse[k](jnp.concatenate([h, skip], axis=-1))
        return self.out(h)


class ProgressiveHead(nnx.Module):
    def __init__(
        self, *, patch: Sequence[int], enc_width: int, width: int, out: int, rngs: nnx.Rngs
    ):
        nd = len(patch)
        self.factors = up_factors(patch)
        self.convs = nnx.List(
            [
                ConvNormAct(nd, enc_width if i == 0 else width, width, 3, rngs=rngs)
                for i in range(len(self.factors))
            ]
        )
        self.out = _conv(nd, width, out, 1, rngs)

    def __call__(self, aux: dict, x) -> Float[Array, "b *sp o"]:
        h = aux["patch_map"]
        for f, conv in zip(self.factors, self.convs):
            h = conv(upsample(h, f))
        return self.out(h)


class PixelHead(nnx.Module):
    """1x1 conv on full-resolution features (the U-Net's own decoder output)."""

    def __init__(self, *, nd: int, enc_width: int, out: int, rngs: nnx.Rngs):
        self.out = _conv(nd, enc_width, out, 1, rngs)

    def __call__(self, aux: dict, x) -> Float[Array, "b *sp o"]:
        return self.out(aux["patch_map"])


HEADS = ("unetr", "progressive", "unet")


def build_head(
    name: str, encoder, *, out: int, width: int = 32, blocks: Sequence[int] = (), seed: int = 0
):
    """The head `name` for `encoder` (a ViT or U-Net) with `out` output channels."""
    spec = encoder.spec
    rngs = nnx.Rngs(seed + 7)
    is_unet = type(encoder).__name__ == "UNet"
    if name not in HEADS:
        raise UserError(f"head.name={name!r}: known heads are {', '.join(HEADS)}")
    if is_unet != (name == "unet"):
        raise UserError(
            f"head.name={name!r} does not fit a {type(encoder).__name__} encoder: "
            "use head=unet for the U-Net and head=unetr or head=progressive for a ViT"
        )
    if name == "unet":
        return PixelHead(nd=spec.ndim, enc_width=spec.width, out=out, rngs=rngs)
    vit = dict(patch=spec.patch_size, enc_width=spec.width, width=width, out=out, rngs=rngs)
    if name == "progressive":
        return ProgressiveHead(**vit)
    return UNETRHead(enc_depth=spec.depth, in_channels=spec.in_channels, blocks=blocks, **vit)


class SegModel(nnx.Module):
    """Encoder + dense head: `__call__(x) -> logits [b, *sp, out]`. With `frozen_encoder` no
    gradient flows into the encoder (a frozen-encoder regime then skips its backward pass)."""

    def __init__(self, encoder, head):
        self.encoder = encoder
        self.head = head

    def __call__(
        self, x: Float[Array, "b *sp c"], *, frozen_encoder: bool = False
    ) -> Float[Array, "b *sp o"]:
        blocks = getattr(self.head, "blocks", ())
        _, aux = self.encoder(x, return_blocks=tuple(blocks))
        if frozen_encoder:
            aux = jax.tree.map(jax.lax.stop_gradient, aux)
        return self.head(aux, x).astype(jnp.float32)
