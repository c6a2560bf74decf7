"""Masked autoencoder objective (He et al. 2022, "Masked Autoencoders Are Scalable Vision
Learners").

The encoder sees the visible 1 - r of the patch tokens only; a light transformer decoder receives
the encoded visible tokens plus a shared mask token at every masked position (with position
embeddings) and predicts each patch's pixels. The loss is the MSE on masked patches only, against
per-patch normalised pixels (`norm_pix_loss`: each target patch minus its mean, over sqrt(var +
1e-6), var unbiased=False as in the reference code).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from emfm.errors import UserError
from emfm.models.layers import Block, dense, gather_tokens, layer_norm, run_blocks
from emfm.models.patch_embed import patchify, unpatchify
from emfm.models.pos_embed import sincos_embedding
from emfm.models.vit import DTYPES, ViT
from emfm.objectives.base import ObjectiveDef
from emfm.objectives.masking import Masking, random_masking


class MAEDecoder(nnx.Module):
    def __init__(
        self,
        *,
        enc_width: int,
        width: int,
        depth: int,
        heads: int,
        patch_dim: int,
        num_prefix: int,
        mlp_ratio: float = 4.0,
        dtype: str = "float32",
        rngs: nnx.Rngs,
    ):
        dt = DTYPES[dtype]
        self.num_prefix = num_prefix
        self.width = width
        self.embed = dense(enc_width, width, dtype=dt, rngs=rngs)
        self.mask_token = nnx.Param(
            nnx.initializers.normal(0.02)(rngs.params(), (1, 1, width), jnp.float32)
        )
        self.blocks = nnx.List(
            [Block(width, heads, mlp_ratio, dtype=dt, rngs=rngs) for _ in range(depth)]
        )
        self.norm = layer_norm(width, dtype=dt, rngs=rngs)
        self.pred = dense(width, patch_dim, dtype=dt, rngs=rngs)

    def __call__(
        self, tokens: Float[Array, "b t d"], ids_restore, grid: Sequence[int]
    ) -> Float[Array, "b n p"]:
        x = self.embed(tokens)
        b, n = ids_restore.shape
        prefix, vis = x[:, : self.num_prefix], x[:, self.num_prefix :]
        masked = jnp.broadcast_to(
            self.mask_token[...].astype(x.dtype), (b, n - vis.shape[1], self.width)
        )
        full = gather_tokens(jnp.concatenate([vis, masked], axis=1), ids_restore)
        full = full + jnp.asarray(sincos_embedding(self.width, grid))[None].astype(x.dtype)
        x = jnp.concatenate([prefix, full], axis=1)
        x, _ = run_blocks(self.blocks, x)
        return self.pred(self.norm(x))[:, self.num_prefix :].astype(jnp.float32)


class MAE(nnx.Module):
    """Pretraining model: a ViT encoder (what is kept and reused) and the MAE decoder."""

    def __init__(
        self,
        encoder: ViT,
        *,
        decoder_width: int,
        decoder_depth: int,
        decoder_heads: int,
        rngs: nnx.Rngs,
    ):
        self.encoder = encoder
        spec = encoder.spec
        patch_dim = math.prod(spec.patch_size) * spec.in_channels
        self.decoder = MAEDecoder(
            enc_width=spec.width,
            width=decoder_width,
            depth=decoder_depth,
            heads=decoder_heads,
            patch_dim=patch_dim,
            num_prefix=encoder.num_prefix,
            mlp_ratio=spec.mlp_ratio,
            dtype=spec.dtype,
            rngs=rngs,
        )

    def __call__(self, images, masking: Masking):
        grid = self.encoder.grid(images.shape[1:-1])
        tokens, _ = self.encoder(images, ids_keep=masking.ids_keep)
        return self.decoder(tokens, masking.ids_restore, grid)


TARGET_NORMS = ("patch", "image", "none")


def blur_in_plane(images: Float[Array, "b *sp c"], sigma: float) -> Float[Array, "b *sp c"]:
    """Gaussian smoothing of each y-x plane (sigma in pixels, mirrored borders, separable)."""
    if sigma <= 0:
        return images
    r = max(1, int(math.ceil(3 * sigma)))
    k = jnp.exp(-0.5 * (jnp.arange(-r, r + 1, dtype=jnp.float32) / sigma) ** 2)
    k = k / k.sum()
    x = images.astype(jnp.float32)
    for axis in (-3, -2):  # y, x (the last axis is channels)
        pad = [(0, 0)] * x.ndim
        pad[axis] = (r, r)
        xp = jnp.pad(x, pad, mode="symmetric")
        n = x.shape[axis]
        x = sum(
            k[i] * jax.lax.slice_in_dim(xp, i, i + n, axis=x.ndim + axis) for i in range(2 * r + 1)
        )
    return x


def patch_targets(
    images: Float[Array, "b *sp c"], patch: Sequence[int], norm_pix: bool | str, blur: float = 0.0
) -> Float[Array, "b n p"]:
    """Reconstruction targets `[b, n, prod(patch) * c]`.

    `blur` > 0 smooths the target in plane first (Gaussian, sigma in pixels): a denoising target,
    so that the loss is not dominated by the shot noise of the masked pixels, which no context
    can predict (the encoder still sees the raw visible patches).

    "patch" (= True, MAE's norm_pix_loss): each patch minus its mean over sqrt(var + 1e-6).
    "image": each example's pixels standardised together (mean 0, variance 1 over the whole
    crop): global brightness is removed but patch means stay, so the coarse layout of dark
    membranes and organelles remains to be predicted. "none" (= False): raw input values.
    """
    mode = {True: "patch", False: "none"}.get(norm_pix, norm_pix)
    target = patchify(blur_in_plane(images, blur), patch)
    if mode == "patch":
        mean = target.mean(axis=-1, keepdims=True)
        var = target.var(axis=-1, keepdims=True)
        target = (target - mean) / jnp.sqrt(var + 1e-6)
    elif mode == "image":
        mean = target.mean(axis=(1, 2), keepdims=True)
        var = target.var(axis=(1, 2), keepdims=True)
        target = (target - mean) / jnp.sqrt(var + 1e-6)
    elif mode != "none":
        raise UserError(f"target normalisation {norm_pix!r}: use one of {TARGET_NORMS}")
    return target


def masked_mse(
    pred: Float[Array, "b n p"], target: Float[Array, "b n p"], mask: Float[Array, "b n"]
):
    per_patch = ((pred - target) ** 2).mean(axis=-1)
    return (per_patch * mask).sum() / mask.sum()


def loss(
    model: MAE,
    batch: dict,
    rng: jax.Array,
    *,
    mask_ratio: float = 0.75,
    norm_pix_loss: bool | str = True,
    tube: bool = False,
    target_blur: float = 0.0,
) -> tuple[jax.Array, dict]:
    """`batch["image"]`: `[b, y, x, c]` or `[b, z, y, x, c]`. Returns (loss, metrics)."""
    images = batch["image"]
    grid = model.encoder.grid(images.shape[1:-1])
    masking = random_masking(rng, images.shape[0], grid, mask_ratio, tube=tube)
    pred = model(images, masking)
    target = patch_targets(images, model.encoder.spec.patch_size, norm_pix_loss, target_blur)
    value = masked_mse(pred, target, masking.mask)
    return value, {"loss": value, "mask_ratio": masking.mask.mean()}


def reconstruct(model: MAE, images, rng, *, mask_ratio: float = 0.75, norm_pix_loss: bool = True):
    """(masked input, reconstruction) in image space, for figures. With norm_pix_loss the
    prediction is de-normalised with each visible-or-not patch's true mean/std, as MAE's demo
    does."""
    patch = model.encoder.spec.patch_size
    grid = model.encoder.grid(images.shape[1:-1])
    masking = random_masking(rng, images.shape[0], grid, mask_ratio)
    pred = model(images, masking)
    raw = patchify(images.astype(jnp.float32), patch)
    mode = {True: "patch", False: "none"}.get(norm_pix_loss, norm_pix_loss)
    if mode == "patch":
        pred = pred * jnp.sqrt(raw.var(-1, keepdims=True) + 1e-6) + raw.mean(-1, keepdims=True)
    elif mode == "image":
        pred = pred * jnp.sqrt(raw.var((1, 2), keepdims=True) + 1e-6) + raw.mean(
            (1, 2), keepdims=True
        )
    m = masking.mask[:, :, None]
    masked_in = unpatchify(raw * (1 - m), patch, grid)
    recon = unpatchify(raw * (1 - m) + pred * m, patch, grid)
    return masked_in, recon


def build(encoder: ViT, cfg, rngs: nnx.Rngs) -> MAE:
    return MAE(
        encoder,
        decoder_width=cfg.decoder_width,
        decoder_depth=cfg.decoder_depth,
        decoder_heads=cfg.decoder_heads,
        rngs=rngs,
    )


def objective_loss(model: MAE, batch: dict, rng: jax.Array, cfg, teacher=None):
    norm = cfg.target_norm or ("patch" if cfg.norm_pix_loss else "none")
    return loss(
        model,
        batch,
        rng,
        mask_ratio=cfg.mask_ratio,
        norm_pix_loss=norm,
        tube=cfg.tube_masking,
        target_blur=cfg.target_blur,
    )


DEFINITION = ObjectiveDef(name="mae", build=build, loss=objective_loss)
