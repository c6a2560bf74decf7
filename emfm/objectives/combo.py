"""MAE plus a contrastive loss in one run: `w_mae * MAE(batch["image"]) + w_c * contrastive(image,
image2)` (weights `combo_weights`). One ViT encoder is shared; the MAE decoder and the contrastive
heads sit beside it. The model is called like an MAE model, so `mae.reconstruct` draws its figure.
"""

from __future__ import annotations

import math

import jax
from flax import nnx

from emfm.objectives import dino, simclr
from emfm.objectives.base import ObjectiveDef
from emfm.objectives.mae import MAEDecoder, masked_mse, patch_targets
from emfm.objectives.masking import Masking, random_masking

CONTRASTIVE = {"simclr": simclr, "dino": dino}


class ComboModel(nnx.Module):
    def __init__(self, encoder, decoder: MAEDecoder, heads: nnx.Module):
        self.encoder = encoder
        self.decoder = decoder
        self.heads = heads

    def __call__(self, images, masking: Masking):
        grid = self.encoder.grid(images.shape[1:-1])
        tokens, _ = self.encoder(images, ids_keep=masking.ids_keep)
        return self.decoder(tokens, masking.ids_restore, grid)


def make(name: str) -> ObjectiveDef:
    """The registry entry `mae_<name>` for a contrastive objective `name`."""
    part = CONTRASTIVE[name]

    def build(encoder, cfg, rngs: nnx.Rngs) -> ComboModel:
        spec = encoder.spec
        decoder = MAEDecoder(
            enc_width=spec.width,
            width=cfg.decoder_width,
            depth=cfg.decoder_depth,
            heads=cfg.decoder_heads,
            patch_dim=math.prod(spec.patch_size) * spec.in_channels,
            num_prefix=encoder.num_prefix,
            mlp_ratio=spec.mlp_ratio,
            dtype=spec.dtype,
            rngs=rngs,
        )
        return ComboModel(encoder, decoder, part.Heads(spec.width, cfg, rngs))

    def loss(model: ComboModel, batch: dict, rng, cfg, teacher=None):
        k_mae, k_c = jax.random.split(rng)
        images = batch["image"]
        masking = random_masking(
            k_mae,
            images.shape[0],
            model.encoder.grid(images.shape[1:-1]),
            cfg.mask_ratio,
            tube=cfg.tube_masking,
        )
        norm = cfg.target_norm or ("patch" if cfg.norm_pix_loss else "none")
        target = patch_targets(images, model.encoder.spec.patch_size, norm)
        l_mae = masked_mse(model(images, masking), target, masking.mask)
        t = None if teacher is None else (teacher.encoder, teacher.heads)
        l_c, m_c = part.pair_loss(model.encoder, model.heads, images, batch["image2"], k_c, cfg, t)
        w_mae, w_c = cfg.combo_weights
        value = w_mae * l_mae + w_c * l_c
        extra = {f"{name}_{k}": v for k, v in m_c.items() if k != "loss"}
        return value, {"loss": value, "mae_loss": l_mae, f"{name}_loss": l_c, **extra}

    return ObjectiveDef(
        name=f"mae_{name}", build=build, loss=loss, views=2, teacher=part.DEFINITION.teacher
    )
