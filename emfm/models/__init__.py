"""Encoder families, one file each, registered by `model.name`."""

from __future__ import annotations

from collections.abc import Callable

from flax import nnx

from emfm.errors import UserError


def _vit(cfg, rngs: nnx.Rngs):
    from emfm.models.vit import ViT, ViTSpec

    return ViT(ViTSpec.from_config(cfg), rngs=rngs)


def _unet(cfg, rngs: nnx.Rngs):
    from emfm.models.unet import UNet, UNetSpec

    return UNet(UNetSpec.from_config(cfg), rngs=rngs)


ENCODERS: dict[str, Callable] = {
    "vit": _vit,
    "unet": _unet,
}


def build_encoder(cfg, *, seed: int = 0):
    """The encoder named by `cfg.name` (a ModelConfig), initialised from `seed`."""
    if cfg.name not in ENCODERS:
        raise UserError(
            f"model.name={cfg.name!r}: known encoders are {', '.join(sorted(ENCODERS))}"
        )
    return ENCODERS[cfg.name](cfg, nnx.Rngs(seed))
