"""Masked image modelling for the U-Net (as SimMIM, Xie et al. 2022, for a convolutional encoder).

The input is cut into `mim_patch x mim_patch` in-plane squares (one section deep in 3D; tube masking
repeats the mask along z), a `mask_ratio` fraction of them is set to zero, and a 1x1 convolution on
the U-Net's full-resolution features predicts the pixels. The loss is the MSE on masked pixels only,
against targets normalised as for MAE (`target_norm`: per mask patch, per image, or raw).
"""

from __future__ import annotations

from flax import nnx

from emfm.models import conv3d
from emfm.models.patch_embed import grid_shape, patchify
from emfm.models.unet import upsample
from emfm.objectives.base import ObjectiveDef
from emfm.objectives.mae import masked_mse, patch_targets
from emfm.objectives.masking import random_masking


def pixel_head(spec, rngs: nnx.Rngs) -> nnx.Conv:
    """1x1 convolution from the encoder's full-resolution features to its input channels."""
    extra = {"conv_general_dilated": conv3d.conv_general_dilated} if spec.ndim == 3 else {}
    return nnx.Conv(spec.width, spec.in_channels, (1,) * spec.ndim, rngs=rngs, **extra)


class MIMUNet(nnx.Module):
    def __init__(self, encoder, *, rngs: nnx.Rngs):
        self.encoder = encoder
        self.pred = pixel_head(encoder.spec, rngs)

    def __call__(self, x):
        return self.pred(self.encoder(x)[1]["patch_map"])


def mask_patch(ndim: int, side: int) -> tuple[int, ...]:
    return (side, side) if ndim == 2 else (1, side, side)


def masked_pixel_loss(predict, x, rng, cfg, mask_ratio: float):
    """MSE of `predict(masked x)` on the masked pixels: a `mask_ratio` fraction of the
    `mim_patch`-pixel squares of `x` `[b, (z,) y, x, c]` zeroed; returns (loss, fraction masked)."""
    patch = mask_patch(x.ndim - 2, cfg.mim_patch)
    grid = grid_shape(x.shape[1:-1], patch)
    masking = random_masking(rng, x.shape[0], grid, mask_ratio, tube=cfg.tube_masking)
    pixel_mask = upsample(masking.mask.reshape(x.shape[0], *grid, 1), patch)  # 1 = masked
    pred = predict(x * (1.0 - pixel_mask))
    norm = cfg.target_norm or ("patch" if cfg.norm_pix_loss else "none")
    target = patch_targets(x, patch, norm)
    return masked_mse(patchify(pred, patch), target, masking.mask), masking.mask.mean()


def loss(model: MIMUNet, batch: dict, rng, cfg, teacher=None):
    value, frac = masked_pixel_loss(model, batch["image"], rng, cfg, cfg.mask_ratio)
    return value, {"loss": value, "mask_ratio": frac}


def build(encoder, cfg, rngs: nnx.Rngs) -> MIMUNet:
    return MIMUNet(encoder, rngs=rngs)


DEFINITION = ObjectiveDef(name="mim_unet", build=build, loss=loss)
