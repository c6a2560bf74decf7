"""Contrastive / distillation / MIM objectives: each loss against an independent numpy computation
on fixed inputs, exact view correspondence for the dense loss, and gradient flow (student yes,
teacher no)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from emfm import objectives
from emfm.config.objective import MIMUNetConfig
from emfm.config.schema import ModelConfig, objective_from_record
from emfm.objectives import dino, moco
from emfm.objectives.contrastive import dihedral, info_nce, nt_xent, random_resized_crops
from emfm.train.state import build_pretraining_model, init_state, make_train_step


def _norm(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _logsumexp(a, axis=-1):
    m = a.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def np_nt_xent(z1, z2, t):
    """Chen et al. 2020, Alg. 1, written as loops: l(i, j) = -log exp(s_ij/t) / sum_{k != i}
    exp(s_ik/t)."""
    z = _norm(np.concatenate([z1, z2]).astype(np.float64))
    n, b = len(z), len(z1)
    total = 0.0
    for i in range(n):
        j = (i + b) % n
        den = sum(np.exp(z[i] @ z[k] / t) for k in range(n) if k != i)
        total += -np.log(np.exp(z[i] @ z[j] / t) / den)
    return total / n


def np_info_nce(q, k, t):
    logits = _norm(q.astype(np.float64)) @ _norm(k.astype(np.float64)).T / t
    return float(np.mean(_logsumexp(logits) - np.diag(logits)))


def np_dino(student, teacher, center, ts, tt):
    def softmax(a):
        e = np.exp(a - a.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    losses = []
    for i, t in enumerate(teacher):
        p = softmax((t.astype(np.float64) - center) / tt)
        for v, s in enumerate(student):
            if v != i:
                logq = s / ts - _logsumexp(s.astype(np.float64) / ts)[:, None]
                losses.append(np.mean(-(p * logq).sum(-1)))
    return float(np.mean(losses))


RNG = np.random.default_rng(0)


def test_nt_xent_matches_numpy():
    z1, z2 = RNG.normal(size=(5, 7)).astype(np.float32), RNG.normal(size=(5, 7)).astype(np.float32)
    for t in (0.1, 0.5):
        np.testing.assert_allclose(
            float(nt_xent(jnp.asarray(z1), jnp.asarray(z2), t)), np_nt_xent(z1, z2, t), rtol=1e-5
        )


def test_info_nce_and_moco_symmetric_loss_match_numpy():
    q1, q2, k1, k2 = (RNG.normal(size=(6, 8)).astype(np.float32) for _ in range(4))
    np.testing.assert_allclose(float(info_nce(q1, k2, 0.2)), np_info_nce(q1, k2, 0.2), rtol=1e-5)
    want = 2 * 0.2 * (np_info_nce(q1, k2, 0.2) + np_info_nce(q2, k1, 0.2))
    np.testing.assert_allclose(float(moco.symmetric_loss(q1, q2, k1, k2, 0.2)), want, rtol=1e-5)


def test_dino_cross_entropy_with_centering_matches_numpy():
    student = [RNG.normal(size=(4, 16)).astype(np.float32) for _ in range(4)]  # 2 global + 2 local
    teacher = [RNG.normal(size=(4, 16)).astype(np.float32) for _ in range(2)]
    center = RNG.normal(size=(1, 16)).astype(np.float32) * 0.1
    got = dino.dino_cross_entropy(
        [jnp.asarray(s) for s in student],
        [jnp.asarray(t) for t in teacher],
        jnp.asarray(center),
        0.1,
        0.04,
    )
    np.testing.assert_allclose(float(got), np_dino(student, teacher, center, 0.1, 0.04), rtol=1e-5)


@pytest.mark.parametrize("shape", [(8, 6, 6, 2), (8, 3, 6, 6, 1), (8, 4, 6, 1)])
def test_dihedral_inverse_and_exact_correspondence(shape):
    x = jnp.asarray(RNG.normal(size=shape).astype(np.float32))
    square = shape[-3] == shape[-2]
    code = jnp.arange(8) if square else jnp.array([0, 1, 4, 5, 0, 1, 4, 5])
    y = dihedral(x, code)
    np.testing.assert_array_equal(dihedral(y, code, inverse=True), x)
    # a per-pixel map commutes with the transform: features of the turned view, turned back, line up
    f = lambda a: jnp.tanh(a * 2.0 + 1.0)  # noqa: E731
    np.testing.assert_allclose(dihedral(f(y), code, inverse=True), f(x), rtol=1e-6)
    if square:  # all 8 transforms differ
        assert len({np.asarray(y[i]).tobytes() for i in range(8)}) == 8 or np.allclose(x[0], x[0].T)


def test_random_resized_crops_full_crop_is_identity():
    x = jnp.asarray(RNG.random((2, 16, 16, 1)).astype(np.float32))
    out = random_resized_crops(jax.random.PRNGKey(0), x, 16, (1.0, 1.0))
    np.testing.assert_allclose(out, x, atol=1e-5)
    assert random_resized_crops(
        jax.random.PRNGKey(0), jnp.ones((2, 4, 16, 16, 1)), 8, (0.3, 0.6)
    ).shape == (2, 4, 8, 8, 1)


TINY_VIT = ModelConfig(width=32, depth=2, heads=2, patch_size=[8, 8])
TINY_UNET = ModelConfig(name="unet", width=8, depth=2, patch_size=[1, 1])
OBJ = dict(
    decoder_width=32,
    decoder_depth=1,
    decoder_heads=2,
    proj_hidden=32,
    proj_dim=16,
    pred_hidden=32,
    prototypes=32,
    dense_samples=8,
    local_crops=2,
)


def _batch(views, shape=(4, 32, 32, 1)):
    x = jnp.asarray(RNG.random(shape).astype(np.float32))
    return {"image": x, "image2": jnp.flip(x, axis=2) * 0.9} if views == 2 else {"image": x}


def _leaf_norms(tree):
    return [float(jnp.abs(v).sum()) for v in jax.tree.leaves(tree)]


@pytest.mark.parametrize(
    "name,model_cfg",
    [
        ("simclr", TINY_VIT),
        ("simclr", TINY_UNET),
        ("moco", TINY_VIT),
        ("dino", TINY_VIT),
        ("dense", TINY_VIT),
        ("dense", TINY_UNET),
        ("mim_unet", TINY_UNET),
        ("mae_simclr", TINY_VIT),
        ("mae_dino", TINY_VIT),
    ],
)
def test_student_gets_gradients_teacher_none(name, model_cfg):
    d = objectives.get(name)
    cfg = objective_from_record(dict(name=name, **OBJ))
    model = build_pretraining_model(model_cfg, cfg)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    teacher_params = jax.tree.map(lambda a: a + 0.01, params)
    batch = _batch(d.views)

    def f(p, tp):
        student = nnx.merge(graphdef, p, rest)
        teacher = nnx.merge(graphdef, tp, rest) if d.teacher else None
        return d.loss(student, batch, jax.random.PRNGKey(0), cfg, teacher)[0]

    value, (g, gt) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(params, teacher_params)
    assert np.isfinite(float(value))
    enc = nnx.state(nnx.merge(graphdef, g, rest).encoder, nnx.Param)
    assert sum(n > 0 for n in _leaf_norms(enc)) >= 0.9 * len(
        jax.tree.leaves(enc)
    )  # nearly every encoder tensor
    assert max(_leaf_norms(gt)) == 0.0  # stop-gradient: nothing reaches the teacher


def test_dino_center_is_state_updated_by_the_step():
    cfg = objective_from_record(dict(name="dino", **OBJ))
    d = objectives.get("dino")
    tx = optax.adamw(1e-3)
    graphdef, state = init_state(build_pretraining_model(TINY_VIT, cfg), tx, 0, teacher=True)
    c0 = np.asarray(state.rest["heads"]["center"][...])
    assert not any(
        "center" in str(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]
    )
    step = make_train_step(graphdef, lambda m, b, r, t: d.loss(m, b, r, cfg, t), tx, total_steps=4)
    state, metrics = jax.jit(step)(state, _batch(2))
    c1 = np.asarray(state.rest["heads"]["center"][...])
    assert np.abs(c1 - c0).max() > 0 and np.abs(c1).max() < 1.0  # moved by (1 - 0.9) * teacher mean
    assert np.isfinite(float(metrics["loss"]))


def test_mim_unet_hides_masked_pixels_from_the_network():
    from emfm.objectives import mim_unet

    cfg = MIMUNetConfig(mim_patch=8, mask_ratio=0.5, target_norm="none", norm_pix_loss=False)
    model = build_pretraining_model(TINY_UNET, cfg)
    seen = {}
    orig = mim_unet.MIMUNet.__call__

    def spy(self, x):
        seen["x"] = x
        return orig(self, x)

    mim_unet.MIMUNet.__call__ = spy
    try:
        batch = _batch(1)
        v, m = mim_unet.loss(model, batch, jax.random.PRNGKey(3), cfg)
    finally:
        mim_unet.MIMUNet.__call__ = orig
    x, seen_x = np.asarray(batch["image"]), np.asarray(seen["x"])
    hidden = seen_x != x
    assert abs(float(m["mask_ratio"]) - 0.5) < 1e-6
    assert 0.45 < (seen_x == 0).mean() < 0.55 and (seen_x[hidden] == 0).all()
    # loss = MSE of the prediction on exactly the zeroed 8x8 squares
    pred = np.asarray(model(jnp.asarray(seen_x)))
    zero = seen_x == 0
    np.testing.assert_allclose(float(v), ((pred - x) ** 2)[zero].mean(), rtol=1e-4)
