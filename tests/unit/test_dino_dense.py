"""Dense self-distillation: the student-to-teacher correspondence is exact (a zoomed, turned view's
pixels land on the teacher's grid where they came from), and a few steps train on real EM."""

import json

import jax
import jax.numpy as jnp
import numpy as np

from emfm.objectives.contrastive import dihedral, dihedral_codes
from emfm.objectives.dino_dense import bilinear, zoom_crops


def _smooth_image(b=3, h=64):
    yy, xx = np.meshgrid(np.arange(h), np.arange(h), indexing="ij")
    imgs = [np.sin(yy / (5 + k)) * np.cos(xx / (7 + k)) + 0.01 * yy for k in range(b)]
    return jnp.asarray(np.stack(imgs)[..., None], jnp.float32)


def test_zoomed_view_maps_back_onto_the_teacher_grid():
    x = _smooth_image()
    view, (y0, x0, side) = zoom_crops(jax.random.PRNGKey(0), x, (0.4, 0.9))
    h = x.shape[1]
    iy, ix = np.meshgrid(np.arange(8, 56, 5), np.arange(8, 56, 5), indexing="ij")
    iy, ix = jnp.asarray(iy.ravel())[None].repeat(3, 0), jnp.asarray(ix.ravel())[None].repeat(3, 0)
    f = (side / h)[:, None]
    ty = y0[:, None] + (iy + 0.5) * f - 0.5  # stride 1: grid coordinate = pixel coordinate
    tx = x0[:, None] + (ix + 0.5) * f - 0.5
    want = bilinear(x, ty, tx)[..., 0]
    got = jax.vmap(lambda v, a, b: v[a, b, 0])(view, iy, ix)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-3)
    # and the turn: a turned view's map turned back is the view's map
    code = dihedral_codes(jax.random.PRNGKey(1), 3, square=True)
    np.testing.assert_array_equal(
        np.asarray(dihedral(dihedral(view, code), code, inverse=True)), np.asarray(view)
    )


def test_dino_dense_trains_on_real_em(tmp_path):
    from emfm.config.schema import compose
    from emfm.train.pretrain import pretrain

    for model in (["model=unet2d", "model.width=8"], ["model=vit_ti_p8"]):
        d = tmp_path / model[0].split("=")[1]
        cfg = compose(
            "pretrain",
            [
                "debug=tiny",
                *model,
                "objective=dino_dense",
                "trainer.steps=6",
                "trainer.log_every=2",
                "trainer.progress=false",
                "objective.prototypes=32",
                "objective.proj_hidden=32",
                "objective.proj_dim=16",
                "data.batch_size=4",
            ],
            run_dir=str(d),
        )
        pretrain(cfg)
        rows = [json.loads(ln) for ln in open(d / "metrics.jsonl")]
        assert len(rows) == 3 and all(np.isfinite(r["loss"]) for r in rows)
        assert all(1.0 <= r["prototypes_used"] <= 32.0 + 1e-3 for r in rows)
        from emfm.train.state import load_encoder

        # the teacher / centre state does not get in the way of loading
        enc, _ = load_encoder(str(d))
        assert enc is not None


def test_dino_dense_with_masked_image_modelling(tmp_path):
    """mim_weight > 0 adds the masked-pixel MSE to the distillation loss (logged apart), the pixel
    head is dropped with the other heads on loading, and a patch encoder is refused."""
    import pytest

    from emfm.config.schema import ConfigError, compose
    from emfm.train.pretrain import pretrain
    from emfm.train.state import load_encoder

    args = [
        "debug=tiny",
        "objective=dino_dense",
        "trainer.steps=4",
        "trainer.log_every=2",
        "trainer.progress=false",
        "objective.prototypes=32",
        "objective.proj_hidden=32",
        "objective.proj_dim=16",
        "objective.mim_weight=0.5",
        "objective.target_norm=image",
        "data.batch_size=4",
    ]
    cfg = compose("pretrain", ["model=unet2d", "model.width=8", *args], run_dir=str(tmp_path))
    pretrain(cfg)
    rows = [json.loads(ln) for ln in open(tmp_path / "metrics.jsonl")]
    assert len(rows) == 2
    for r in rows:
        assert r["mim_loss"] > 0 and np.isfinite(r["dino_loss"])
        np.testing.assert_allclose(r["loss"], r["dino_loss"] + 0.5 * r["mim_loss"], rtol=1e-4)
    enc, _ = load_encoder(str(tmp_path))
    assert enc.spec.width == 8
    with pytest.raises(ConfigError, match="mim_weight"):
        compose("pretrain", ["model=vit_ti_p8", *args], run_dir=str(tmp_path / "vit"))


def test_dino_dense_distils_the_unet_hypercolumn(tmp_path):
    """dense_features=hypercolumn distils the U-Net's levels (upsampled, normalised per pixel) and
    its decoder output; a patch encoder is refused as the config is composed."""
    import pytest
    from flax import nnx

    from emfm.config.schema import ConfigError, compose
    from emfm.models.unet import UNet, UNetSpec
    from emfm.objectives.dino_dense import dense_map
    from emfm.train.pretrain import pretrain

    spec = UNetSpec(ndim=2, in_channels=1, widths=(8, 16, 32), dtype="float32")
    enc = UNet(spec, rngs=nnx.Rngs(0))
    x = _smooth_image(b=2, h=32)
    hc = dense_map(enc, x, "hypercolumn")
    assert hc.shape == (2, 32, 32, 8 + 16 + 32 + 8)
    _, aux = enc(x, return_blocks=(2,))
    coarse = aux["blocks"][2]  # [2, 8, 8, 32]: pooled 4x
    level = np.asarray(hc[..., 24:56])
    np.testing.assert_allclose(level[:, ::4, ::4], level[:, 3::4, 3::4], atol=1e-6)  # nearest
    c = np.asarray(coarse)
    c = (c - c.mean(-1, keepdims=True)) / np.sqrt(c.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(level[:, ::4, ::4], c, atol=1e-4)
    np.testing.assert_allclose(
        np.asarray(dense_map(enc, x, "output")), np.asarray(enc(x)[1]["patch_map"])
    )

    args = [
        "debug=tiny",
        "objective=dino_dense",
        "objective.dense_features=hypercolumn",
        "trainer.steps=2",
        "trainer.log_every=1",
        "trainer.progress=false",
        "objective.prototypes=32",
        "objective.proj_hidden=32",
        "objective.proj_dim=16",
        "data.batch_size=4",
    ]
    cfg = compose("pretrain", ["model=unet2d", "model.width=8", *args], run_dir=str(tmp_path))
    pretrain(cfg)
    rows = [json.loads(ln) for ln in open(tmp_path / "metrics.jsonl")]
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)
    with pytest.raises(ConfigError, match="dense_features"):
        compose("pretrain", ["model=vit_ti_p8", *args], run_dir=str(tmp_path / "vit"))


def test_hypercolumn_read_at_samples_equals_the_full_map():
    """The loss reads the hypercolumn at its sampled cells only (hypercolumn_at, and bilinear_at for
    the teacher, the turn undone on a grid of coordinates): the same features and gradients as
    building the full-resolution map, turning it back and reading it."""
    from flax import nnx

    from emfm.models.unet import UNet, UNetSpec
    from emfm.objectives.dino_dense import (
        bilinear_at,
        dense_map,
        hypercolumn_at,
        hypercolumn_levels,
    )

    spec = UNetSpec(ndim=2, in_channels=1, widths=(8, 16, 32), dtype="float32")
    enc = UNet(spec, rngs=nnx.Rngs(0))
    x = _smooth_image(b=3, h=32)
    b, h, s = 3, 32, 40
    rng = np.random.default_rng(0)
    idx = jnp.asarray(np.stack([rng.choice(h * h, s, replace=False) for _ in range(b)]))
    code = jnp.asarray([1, 6, 3])
    gy = jnp.asarray(rng.uniform(-1, h, (b, s)), jnp.float32)
    gx = jnp.asarray(rng.uniform(-1, h, (b, s)), jnp.float32)
    w = jnp.asarray(rng.normal(size=8 + 16 + 32 + 8), jnp.float32)
    graphdef, params = nnx.split(enc)

    def full(params):
        e = nnx.merge(graphdef, params)
        fs = dihedral(dense_map(e, x, "hypercolumn"), code, inverse=True).reshape(b, h * h, -1)
        q = jnp.take_along_axis(fs, idx[..., None], axis=1)
        k = bilinear(dense_map(e, x, "hypercolumn"), gy, gx)
        return q, k

    def sampled(params):
        e = nnx.merge(graphdef, params)
        lv = hypercolumn_levels(e, x)
        yx = jnp.stack(jnp.meshgrid(jnp.arange(h), jnp.arange(h), indexing="ij"), axis=-1)
        src = dihedral(jnp.broadcast_to(yx, (b, h, h, 2)), code, inverse=True).reshape(b, -1, 2)
        src = jnp.take_along_axis(src, idx[..., None], axis=1)
        q = hypercolumn_at(lv, (h, h), src[..., 0], src[..., 1])
        k = bilinear_at(lambda yy, xx: hypercolumn_at(lv, (h, h), yy, xx), h, h, gy, gx)
        return q, k

    (q0, k0), (q1, k1) = full(params), sampled(params)
    assert q1.shape == (b, s, 64) and k1.shape == (b, s, 64)
    np.testing.assert_allclose(np.asarray(q1), np.asarray(q0), atol=1e-5)
    np.testing.assert_allclose(np.asarray(k1), np.asarray(k0), atol=1e-5)

    def scalar(fn):
        return lambda p: sum(jnp.sum(jnp.tanh(t @ w)) for t in fn(p))

    g0 = jax.grad(scalar(full))(params)
    g1 = jax.grad(scalar(sampled))(params)
    top = max(float(jnp.abs(a).max()) for a in jax.tree.leaves(g0))
    assert top > 1e-3  # not all zero
    for a, c in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        # float32 summation order differs: relative to the largest gradient (a few parameters, e.g.
        # the last normalisation's, have gradients that are zero up to rounding)
        np.testing.assert_allclose(np.asarray(c), np.asarray(a), rtol=1e-4, atol=1e-5 * top)


def test_pretraining_continues_from_a_checkpoint(tmp_path):
    """`emfm pretrain checkpoint=RUN` starts the encoder from that run's (heads fresh); an encoder
    of another shape is refused naming the model keys to set."""
    import jax
    import pytest
    from flax import nnx

    from emfm.config.schema import compose
    from emfm.errors import UserError
    from emfm.train.pretrain import pretrain
    from emfm.train.state import build_encoder, load_encoder

    args = [
        "debug=tiny",
        "model=unet2d",
        "model.width=8",
        "objective=dino_dense",
        "trainer.progress=false",
        "objective.prototypes=32",
        "objective.proj_hidden=32",
        "objective.proj_dim=16",
        "data.batch_size=4",
    ]
    src = tmp_path / "src"
    pretrain(compose("pretrain", [*args, "trainer.steps=2"], run_dir=str(src)))
    cont = tmp_path / "cont"
    cfg = compose("pretrain", [*args, "trainer.steps=1", "optim.lr=1e-12"], run_dir=str(cont))
    pretrain(cfg, init=str(src))

    def leaves(m):
        return [np.asarray(x) for x in jax.tree.leaves(nnx.state(m, nnx.Param))]

    a, b = leaves(load_encoder(str(src))[0]), leaves(load_encoder(str(cont))[0])
    fresh = leaves(build_encoder(cfg.model, seed=cfg.trainer.seed))
    assert all(np.allclose(x, y, atol=1e-6) for x, y in zip(a, b))
    assert not all(np.allclose(x, y, atol=1e-3) for x, y in zip(a, fresh))
    with pytest.raises(UserError, match="model.width=8"):
        other = compose("pretrain", [*args, "model.width=16"], run_dir=str(tmp_path / "other"))
        pretrain(other, init=str(src))
