"""The encoder of a feature export: random init of the model config, or a checkpoint's encoder
whose recorded architecture must be the model config's."""

from __future__ import annotations

from dataclasses import asdict

ARCH_IGNORED = ("dtype", "remat")  # compute settings; the parameters do not depend on them


def _arch(model_cfg) -> dict:
    from emfm.models.unet import UNetSpec
    from emfm.models.vit import ViTSpec

    spec = (UNetSpec if model_cfg.name == "unet" else ViTSpec).from_config(model_cfg)
    return {
        "name": model_cfg.name,
        **{k: v for k, v in asdict(spec).items() if k not in ARCH_IGNORED},
    }


def load_export_encoder(model_cfg, checkpoint: str = "", *, seed: int = 0):
    """`(encoder, checkpoint meta)`: a random-init encoder of `model_cfg` without a checkpoint, else
    the checkpoint's encoder, whose recorded architecture must be `model_cfg`'s (checked from the
    meta record before any array is loaded; a mismatch is a CheckpointError naming the differing
    keys)."""
    from emfm.config.common import ModelConfig
    from emfm.train import checkpoint as ckpt
    from emfm.train.state import build_encoder, load_encoder

    if not checkpoint:
        return build_encoder(model_cfg, seed=seed), {}
    run = ckpt.find_checkpoint_dir(checkpoint)
    meta = ckpt.read_meta(run)
    try:
        have = _arch(ModelConfig(**meta["model"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ckpt.CheckpointError(
            f"checkpoint {checkpoint} has no usable model record: {e}"
        ) from e
    want = _arch(model_cfg)
    diff = [k for k in want if have.get(k) != want[k]]
    if diff:
        raise ckpt.CheckpointError(
            f"checkpoint {checkpoint} does not match the model config: "
            + ", ".join(
                f"model.{k}={want[k]} in the config but {have.get(k)} in the checkpoint"
                for k in diff
            )
            + " (choose the checkpoint's model, e.g. the model=/debug= overrides it was trained "
            "with)"
        )
    return load_encoder(str(run))
