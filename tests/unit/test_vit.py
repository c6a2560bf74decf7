"""ViT encoder: shapes, parameter counts from the size table, position embeddings, masking path."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emfm.config.schema import ModelConfig
from emfm.models.patch_embed import patchify, unpatchify
from emfm.models.pos_embed import sincos_embedding
from emfm.models.vit import SIZES, ViT, ViTSpec, count_params


def vit_param_count(width, depth, patch_pixels, mlp_ratio=4.0):
    """Independent count: patch embedding, cls token, per block (2 LN, qkv, proj, 2 MLP), final
    LN."""
    hidden = int(width * mlp_ratio)
    embed = patch_pixels * width + width
    block = (
        2 * 2 * width
        + (width * 3 * width + 3 * width)
        + (width * width + width)
        + (width * hidden + hidden)
        + (hidden * width + width)
    )
    return embed + width + depth * block + 2 * width


@pytest.mark.parametrize("size", list(SIZES))
def test_param_count_matches_size_table(size):
    s = SIZES[size]
    spec = ViTSpec(patch_size=(16, 16), width=s["width"], depth=s["depth"], heads=s["heads"])
    model = nnx.eval_shape(lambda: ViT(spec, rngs=nnx.Rngs(0)))
    assert count_params(model) == vit_param_count(s["width"], s["depth"], 256)


def test_vit_b16_is_85m():
    # ViT-B/16, one input channel: 85.25 M trainable (+0.15 M fixed sin-cos position embedding)
    model = nnx.eval_shape(
        lambda: ViT(ViTSpec(patch_size=(16, 16), width=768, depth=12, heads=12), rngs=nnx.Rngs(0))
    )
    assert abs(count_params(model) / 1e6 - 85.25) < 0.01


def tiny(patch, registers=0):
    return ViT(
        ViTSpec(patch_size=patch, width=32, depth=2, heads=2, num_registers=registers),
        rngs=nnx.Rngs(0),
    )


def test_2d_shapes_and_aux():
    m = tiny((8, 8), registers=2)
    tokens, aux = m(jnp.ones((3, 32, 48, 1)), return_blocks=(0, -1))
    assert tokens.shape == (3, 1 + 2 + 4 * 6, 32)
    assert aux["cls"].shape == (3, 32) and aux["registers"].shape == (3, 2, 32)
    assert aux["patch_tokens"].shape == (3, 24, 32)
    assert aux["patch_map"].shape == (3, 4, 6, 32)
    assert sorted(aux["blocks"]) == [0, 1]
    np.testing.assert_allclose(aux["patch_map"].reshape(3, 24, 32), aux["patch_tokens"])


def test_3d_anisotropic_shapes():
    m = tiny((4, 16, 16))
    _, aux = m(jnp.ones((2, 8, 32, 32, 1)))
    assert aux["patch_map"].shape == (2, 2, 2, 2, 32)


def test_visible_subset_equals_gather_of_embeddings():
    m = tiny((8, 8))
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 1))
    keep = jnp.array([[0, 5, 9], [15, 3, 1]])
    _, aux = m(x, ids_keep=keep)
    assert aux["patch_tokens"].shape == (2, 3, 32)
    assert "patch_map" not in aux


def test_wrong_input_rank_and_channels_are_named():
    m = tiny((8, 8))
    with pytest.raises(ValueError, match="input"):
        m(jnp.ones((2, 4, 32, 32, 1)))
    with pytest.raises(ValueError, match="channel"):
        m(jnp.ones((2, 32, 32, 3)))
    with pytest.raises(ValueError, match="divisible"):
        m(jnp.ones((2, 30, 32, 1)))


def test_sincos_2d_matches_definition():
    emb = sincos_embedding(16, (3, 5))
    d4 = 4
    omega = 1.0 / 10000 ** (np.arange(d4) / d4)
    y, x = 2, 3
    want = np.concatenate(
        [np.sin(y * omega), np.cos(y * omega), np.sin(x * omega), np.cos(x * omega)]
    )
    np.testing.assert_allclose(emb[y * 5 + x], want, rtol=1e-6, atol=1e-6)
    assert sincos_embedding(18, (2, 3, 4)).shape == (24, 18)


def test_patchify_roundtrip_2d_3d():
    x = np.random.default_rng(0).normal(size=(2, 8, 16, 24, 1)).astype(np.float32)
    t = patchify(jnp.asarray(x), (2, 8, 8))
    assert t.shape == (2, 4 * 2 * 3, 2 * 8 * 8)
    np.testing.assert_array_equal(unpatchify(t, (2, 8, 8), (4, 2, 3)), x)
    # first token holds the first patch's pixels in raster order
    np.testing.assert_array_equal(t[0, 0], x[0, :2, :8, :8, 0].reshape(-1))


def test_config_overrides_size_table():
    spec = ViTSpec.from_config(ModelConfig(size="S", depth=3))
    assert (spec.width, spec.depth, spec.heads) == (384, 3, 6)
    with pytest.raises(ValueError, match="model.size"):
        ViTSpec.from_config(ModelConfig(size="XXL"))
    assert math.prod(spec.patch_size) == 64


def test_encode_with_embedding_hypercolumn():
    """probe.embed: the patch embedding (tokens before the first block) comes first, then the final
    tokens; with one window covering the section both equal a direct forward pass."""
    from emfm.export.encode import encode

    enc = ViT(ViTSpec(patch_size=(8, 8), width=32, depth=1, heads=2), rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).random((2, 32, 32)).astype(np.float32)
    f = encode(enc, x, tile=32, margin=0, batch_size=2, embed=True)
    assert f.shape == (2, 4, 4, 64)
    want_embed = np.asarray(enc.embed(jnp.asarray(x)[..., None])).reshape(2, 4, 4, 32)
    _, aux = enc(jnp.asarray(x)[..., None])
    np.testing.assert_allclose(f[..., :32], want_embed, atol=1e-5)
    np.testing.assert_allclose(f[..., 32:], np.asarray(aux["patch_map"]), atol=1e-5)
    np.testing.assert_allclose(
        encode(enc, x, tile=32, margin=0, batch_size=2), f[..., 32:], atol=1e-6
    )
