"""U-Net encoder-decoder: parameter counts from an independent formula, 2D / anisotropic 3D shapes,
the encoder interface (tokens, aux) and the encoder half alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emfm.config.schema import ModelConfig
from emfm.models import build_encoder
from emfm.models.unet import UNet, UNetSpec
from emfm.models.vit import count_params


def resblock_params(cin, cout, k):
    """Pre-activation residual block: 2 norms (scale + bias), 2 convs with bias, 1x1 skip on width
    change."""
    n = 2 * cin + k * cin * cout + cout + 2 * cout + k * cout * cout + cout
    return n + (cin * cout + cout if cin != cout else 0)


def unet_param_count(widths, ndim=2, in_ch=1, blocks=1):
    k = 3**ndim
    n = k * in_ch * widths[0] + widths[0]  # stem
    for i, w in enumerate(widths):  # encoder stages
        n += resblock_params(widths[max(i - 1, 0)], w, k) + (blocks - 1) * resblock_params(w, w, k)
    for i in range(
        len(widths) - 1
    ):  # decoder: 1x1 projection of the level below, then a stage on the concat
        n += widths[i + 1] * widths[i] + widths[i]
        n += resblock_params(2 * widths[i], widths[i], k) + (blocks - 1) * resblock_params(
            widths[i], widths[i], k
        )
    return n + 2 * widths[0]  # final norm


@pytest.mark.parametrize(
    "widths,ndim,blocks,norm",
    [
        ((32, 64, 128, 256), 2, 1, "group"),
        ((16, 32, 64), 3, 2, "group"),
        ((32, 64, 128, 256, 512), 2, 2, "layer"),
    ],
)
def test_param_count_matches_formula(widths, ndim, blocks, norm):
    spec = UNetSpec(ndim=ndim, widths=widths, blocks_per_level=blocks, norm=norm)
    model = nnx.eval_shape(lambda: UNet(spec, rngs=nnx.Rngs(0)))
    assert count_params(model) == unet_param_count(widths, ndim, blocks=blocks)


def test_config_sizes():
    # the shipped configs (configs/model/unet2d.yaml, unet3d.yaml): 4 levels of 32..256 channels
    m2 = nnx.eval_shape(
        lambda: build_encoder(ModelConfig(name="unet", patch_size=[1, 1], width=32, depth=4))
    )
    assert (
        m2.spec.widths == (32, 64, 128, 256)
        and m2.spec.width == 32
        and m2.spec.patch_size == (1, 1)
    )
    assert count_params(m2) == unet_param_count((32, 64, 128, 256)) == 1_894_784
    m3 = nnx.eval_shape(
        lambda: build_encoder(
            ModelConfig(name="unet", patch_size=[1, 1, 1], width=16, depth=4, pool_z_from_level=3)
        )
    )
    assert count_params(m3) == unet_param_count((16, 32, 64, 128), ndim=3)


def test_2d_interface_shapes():
    m = UNet(UNetSpec(ndim=2, widths=(8, 16, 32)), rngs=nnx.Rngs(0))
    tokens, aux = m(jnp.ones((2, 32, 48, 1)), return_blocks=(0, -1))
    assert aux["patch_map"].shape == (2, 32, 48, 8)
    assert tokens.shape == (2, 32 * 48, 8)
    np.testing.assert_allclose(tokens, aux["patch_map"].reshape(2, -1, 8))
    assert sorted(aux["blocks"]) == [0, 2]
    assert aux["blocks"][0].shape == (2, 32, 48, 8) and aux["blocks"][2].shape == (2, 8, 12, 32)


def test_3d_anisotropic_pooling():
    # z pooled only from level 2 on: 8 sections -> 8, 8, 4 ; 32 px -> 32, 16, 8, 4
    spec = UNetSpec(ndim=3, widths=(8, 16, 16, 32), pool_z_from_level=2)
    assert [spec.pool_window(i) for i in (1, 2, 3)] == [(1, 2, 2), (2, 2, 2), (2, 2, 2)]
    m = UNet(spec, rngs=nnx.Rngs(0))
    feats = m.encode(jnp.ones((1, 8, 32, 32, 1)))
    assert [f.shape[1:] for f in feats] == [
        (8, 32, 32, 8),
        (8, 16, 16, 16),
        (4, 8, 8, 16),
        (2, 4, 4, 32),
    ]
    _, aux = m(jnp.ones((1, 8, 32, 32, 1)))
    assert aux["patch_map"].shape == (1, 8, 32, 32, 8)


def test_encode_matches_call_blocks_and_decoder_uses_skips():
    m = UNet(UNetSpec(ndim=2, widths=(8, 16)), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 1))
    feats = m.encode(x)
    _, aux = m(x, return_blocks=(0, 1))
    for i in (0, 1):
        np.testing.assert_allclose(aux["blocks"][i], feats[i], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m.decode(feats), aux["patch_map"], rtol=1e-5, atol=1e-5)
    # full-resolution skips: one changed input pixel changes its own output pixel far more than a
    # distant one (group norm spreads a small change everywhere)
    y = x.at[0, 3, 5, 0].add(5.0)
    diff = np.abs(np.asarray(m(y)[1]["patch_map"] - aux["patch_map"])).sum(-1)[0]
    assert diff[3, 5] > 10 * diff[15, 15]


def test_errors_name_the_problem():
    m = UNet(UNetSpec(ndim=2, widths=(8, 16, 32)), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="divisible"):
        m(jnp.ones((1, 30, 32, 1)))
    with pytest.raises(ValueError, match="ids_keep"):
        m(jnp.ones((1, 32, 32, 1)), ids_keep=jnp.zeros((1, 4), jnp.int32))
    with pytest.raises(ValueError, match="norm_groups"):
        UNetSpec(widths=(12, 24))


def test_remat_gives_identical_outputs():
    a = UNet(UNetSpec(ndim=2, widths=(8, 16)), rngs=nnx.Rngs(0))
    b = UNet(UNetSpec(ndim=2, widths=(8, 16), remat=True), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 16, 16, 1))
    np.testing.assert_allclose(a(x)[0], b(x)[0], rtol=1e-5, atol=1e-5)
