"""Dense heads give per-pixel outputs at the input resolution, 2D and 3D (abstract evaluation: no
compile)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from emfm.config.schema import HeadConfig, ModelConfig, SegTaskConfig
from emfm.finetune.model import build_model
from emfm.models.seg_heads import default_blocks, up_factors


@pytest.mark.parametrize(
    "model, head, shape",
    [
        (dict(patch_size=[8, 8]), "unetr", (2, 32, 48, 1)),
        (dict(patch_size=[8, 8]), "progressive", (2, 32, 48, 1)),
        (dict(patch_size=[2, 8, 8]), "unetr", (1, 4, 32, 16, 1)),
        (dict(patch_size=[4, 16, 16]), "progressive", (1, 8, 32, 32, 1)),
        (dict(name="unet", patch_size=[1, 1], width=8, depth=2), "unet", (2, 16, 16, 1)),
        (dict(name="unet", patch_size=[1, 1, 1], width=8, depth=2), "unet", (1, 4, 16, 16, 1)),
    ],
)
def test_heads_output_pixel_logits(model, head, shape):
    mcfg = ModelConfig(**{"width": 32, "depth": 3, "heads": 2, **model})
    task = SegTaskConfig(kind="affinity", offsets=[[-1, 0, 0], [0, -1, 0], [0, 0, -1]])
    m = nnx.eval_shape(lambda: build_model(mcfg, HeadConfig(name=head, width=16), task))
    graphdef, state = nnx.split(m)
    out = jax.eval_shape(
        lambda st, x: nnx.merge(graphdef, st)(x), state, jax.ShapeDtypeStruct(shape, jnp.float32)
    )
    assert out.shape == shape[:-1] + (3,)


def test_up_factors_and_block_choice():
    assert up_factors((8, 8)) == [(2, 2)] * 3
    assert up_factors((4, 16, 16)) == [(2, 2, 2)] * 2 + [(1, 2, 2)] * 2
    with pytest.raises(ValueError, match="power-of-two"):
        up_factors((6, 6))
    assert default_blocks(12, 3) == [2, 5, 8] and default_blocks(4, 2) == [0, 2]


def test_head_must_fit_the_encoder():
    with pytest.raises(ValueError, match="head.name='unet'"):
        build_model(
            ModelConfig(width=32, depth=1, heads=2), HeadConfig(name="unet"), SegTaskConfig()
        )
