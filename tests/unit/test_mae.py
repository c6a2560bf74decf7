"""MAE: masking exactness and the loss against an independent numpy computation."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emfm.models.vit import ViT, ViTSpec
from emfm.objectives import mae
from emfm.objectives.masking import random_masking


def test_masking_ratio_and_restore_order():
    m = random_masking(jax.random.PRNGKey(0), 4, (8, 8), 0.75)
    assert m.ids_keep.shape == (4, 16)
    np.testing.assert_array_equal(m.mask.sum(1), 48)
    for b in range(4):
        keep = np.asarray(m.ids_keep[b])
        assert len(set(keep.tolist())) == 16
        assert (np.asarray(m.mask[b])[keep] == 0).all()  # kept tokens are exactly the visible ones
        # ids_restore unshuffles [kept, dropped] into raster order
        shuffle = np.argsort(np.asarray(m.ids_restore[b]))
        np.testing.assert_array_equal(shuffle[:16], keep)


def test_tube_masking_repeats_along_z():
    m = random_masking(jax.random.PRNGKey(1), 2, (4, 4, 4), 0.75, tube=True)
    mask = np.asarray(m.mask).reshape(2, 4, 16)
    assert (mask == mask[:, :1]).all()
    np.testing.assert_array_equal(mask.sum((1, 2)), 4 * 12)


def test_norm_pix_masked_mse_against_numpy():
    rng = np.random.default_rng(0)
    images = rng.random((2, 16, 16, 1)).astype(np.float32)
    pred = rng.normal(size=(2, 4, 64)).astype(np.float32)
    mask = np.array([[1, 0, 1, 1], [0, 0, 1, 0]], np.float32)
    # numpy: patches in raster order, pixels in raster order
    patches = images[..., 0].reshape(2, 2, 8, 2, 8).transpose(0, 1, 3, 2, 4).reshape(2, 4, 64)
    mu = patches.mean(-1, keepdims=True)
    var = patches.var(-1, keepdims=True)
    target = (patches - mu) / np.sqrt(var + 1e-6)
    per = ((pred - target) ** 2).mean(-1)
    want = (per * mask).sum() / mask.sum()
    got = mae.masked_mse(
        jnp.asarray(pred), mae.patch_targets(jnp.asarray(images), (8, 8), True), jnp.asarray(mask)
    )
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_loss_runs_and_encoder_sees_only_visible_tokens():
    enc = ViT(ViTSpec(patch_size=(8, 8), width=32, depth=1, heads=2), rngs=nnx.Rngs(0))
    model = mae.MAE(enc, decoder_width=16, decoder_depth=1, decoder_heads=2, rngs=nnx.Rngs(1))
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 32, 32, 1))
    loss, metrics = mae.loss(model, {"image": x}, jax.random.PRNGKey(3), mask_ratio=0.75)
    assert np.isfinite(float(loss)) and abs(float(metrics["mask_ratio"]) - 0.75) < 1e-6
    # changing only masked pixels must not change the encoder output on visible tokens
    masking = random_masking(jax.random.PRNGKey(3), 2, (4, 4), 0.75)
    tok_a, _ = enc(x, ids_keep=masking.ids_keep)
    pix_mask = np.asarray(masking.mask).reshape(2, 4, 4).repeat(8, 1).repeat(8, 2)[..., None]
    tok_b, _ = enc(x + jnp.asarray(pix_mask) * 5.0, ids_keep=masking.ids_keep)
    np.testing.assert_allclose(tok_a, tok_b, atol=1e-5)


def test_blurred_targets_match_scipy_gaussian_filter():
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(1)
    images = rng.random((2, 16, 24, 1)).astype(np.float32)
    want = np.stack(
        [gaussian_filter(im[..., 0], 1.5, mode="reflect", truncate=3.0) for im in images]
    )[..., None]
    np.testing.assert_allclose(
        np.asarray(mae.blur_in_plane(jnp.asarray(images), 1.5)), want, atol=1e-5
    )
    # 3D crops are smoothed per section (in plane only)
    vol = rng.random((1, 3, 16, 16, 1)).astype(np.float32)
    got = np.asarray(mae.blur_in_plane(jnp.asarray(vol), 1.0))
    for z in range(3):
        np.testing.assert_allclose(
            got[0, z, ..., 0],
            gaussian_filter(vol[0, z, ..., 0], 1.0, mode="reflect", truncate=3.0),
            atol=1e-5,
        )
    # the target is the smoothed crop, patchified, then normalised as configured
    t = mae.patch_targets(jnp.asarray(images), (8, 8), "none", blur=1.5)
    np.testing.assert_allclose(
        np.asarray(t), np.asarray(mae.patch_targets(jnp.asarray(want), (8, 8), "none")), atol=1e-5
    )
