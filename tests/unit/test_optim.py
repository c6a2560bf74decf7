"""Optimizer pieces: weight-decay mask, freezing, layer-wise lr decay, accumulation, half-written
checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from emfm.config.objective import MAEConfig
from emfm.config.schema import ModelConfig, OptimConfig
from emfm.train import checkpoint, optim
from emfm.train.optim import path_str
from emfm.train.state import build_pretraining_model


@pytest.fixture(scope="module")
def params():
    m = build_pretraining_model(
        ModelConfig(width=32, depth=3, heads=2),
        MAEConfig(decoder_width=16, decoder_depth=1, decoder_heads=2),
    )
    return nnx.state(m, nnx.Param)


def by_path(tree):
    out = {}
    jax.tree_util.tree_map_with_path(lambda p, x: out.__setitem__(path_str(p), x), tree)
    return out


def test_decay_mask_spares_norms_biases_tokens(params):
    m = by_path(optim.decay_mask(params))
    assert m["encoder/blocks/0/attn/qkv/kernel"] and m["decoder/pred/kernel"]
    for k in [
        "encoder/blocks/0/norm1/scale",
        "encoder/blocks/0/attn/qkv/bias",
        "encoder/cls_token",
        "decoder/mask_token",
    ]:
        assert not m[k], k


def test_layer_decay_and_freeze_scales(params):
    s = by_path(optim.update_scales(params, layer_decay=0.5, freeze=[r"^encoder/patch_embed"]))
    assert s["encoder/patch_embed/proj/kernel"] == 0.0
    assert s["encoder/cls_token"] == 0.5**4
    assert s["encoder/blocks/0/attn/qkv/kernel"] == 0.5**3
    assert s["encoder/blocks/2/mlp/fc1/kernel"] == 0.5
    assert s["decoder/pred/kernel"] == 1.0


def test_layer_decay_follows_a_unet_from_input_to_output():
    """A U-Net's layers for layer decay are its stages in the order the input passes them: stem,
    encoder levels 0..D-1, decoder levels D-2..0 (each with its up-projection); the final norm and
    the head train at the full rate."""
    from emfm.models.unet import UNet, UNetSpec

    class Seg(nnx.Module):
        def __init__(self):
            self.encoder = UNet(UNetSpec(widths=(8, 16, 32)), rngs=nnx.Rngs(0))
            self.head = nnx.Conv(8, 2, (1, 1), rngs=nnx.Rngs(1))

    s = by_path(optim.update_scales(nnx.state(Seg(), nnx.Param), layer_decay=0.5))
    order = ["stem", "down/0", "down/1", "down/2", "up/1", "up/0"]  # 2 x 3 levels in all
    for k, part in enumerate(order):
        got = {v for p, v in s.items() if p.startswith(f"encoder/{part}/")}
        assert got == {0.5 ** (6 - k)}, (part, got)
    assert s["encoder/up_proj/1/kernel"] == s["encoder/up/1/0/conv1/kernel"] == 0.5**2
    assert s["encoder/up_proj/0/kernel"] == 0.5
    assert s["encoder/norm/scale"] == s["head/kernel"] == 1.0
    assert set(by_path(optim.update_scales(nnx.state(Seg(), nnx.Param))).values()) == {1.0}


def test_frozen_parameters_do_not_move(params):
    cfg = OptimConfig(lr=0.1, scale_lr_by_batch=False, warmup_steps=0, freeze=[r"^encoder/"])
    tx, _ = optim.build(cfg, steps=10, batch_size=1, params=params)
    grads = jax.tree.map(jnp.ones_like, params)
    upd, _ = tx.update(grads, tx.init(params), params)
    new = by_path(optax.apply_updates(params, upd))
    old = by_path(params)
    assert all(np.array_equal(new[k], old[k]) for k in old if k.startswith("encoder/"))
    assert any(not np.array_equal(new[k], old[k]) for k in old if k.startswith("decoder/"))


def test_held_parameters_move_only_after_the_hold(params):
    """`hold=(regexes, n)` (LP-FT): the matching parameters stay put for n updates, then train like
    the others; the rest train from the first update."""
    cfg = OptimConfig(lr=0.1, scale_lr_by_batch=False, warmup_steps=0)
    tx, _ = optim.build(cfg, steps=10, batch_size=1, params=params, hold=([r"^encoder/"], 2))
    grads = jax.tree.map(jnp.ones_like, params)
    state, p = tx.init(params), params
    moved = []
    for _ in range(3):
        upd, state = jax.jit(tx.update)(grads, state, p)
        new = optax.apply_updates(p, upd)
        a, b = by_path(p), by_path(new)
        moved.append(
            (
                any(not np.array_equal(a[k], b[k]) for k in a if k.startswith("encoder/")),
                any(not np.array_equal(a[k], b[k]) for k in a if k.startswith("decoder/")),
            )
        )
        p = new
    assert moved == [(False, True), (False, True), (True, True)]


def unit_lr(**kw) -> OptimConfig:
    """Learning rate 1 from the first step, no batch scaling, no weight decay: updates that are
    easy to predict by hand."""
    return OptimConfig(lr=1.0, scale_lr_by_batch=False, warmup_steps=0, weight_decay=0.0, **kw)


def test_gradient_accumulation_averages_micro_batches():
    p = {"w": jnp.zeros(3)}
    cfg = unit_lr(clip_norm=None, accumulate_steps=2)
    tx, _ = optim.build(cfg, steps=4, batch_size=1)
    st = tx.init(p)
    u1, st = tx.update({"w": jnp.array([1.0, 0, 0])}, st, p)
    assert np.all(np.asarray(u1["w"]) == 0)  # no update after the first micro-batch
    u2, st = tx.update({"w": jnp.array([3.0, 0, 0])}, st, p)
    ref_tx, _ = optim.build(
        unit_lr(clip_norm=None),
        steps=2,
        batch_size=1,
    )
    ref, _ = ref_tx.update({"w": jnp.array([2.0, 0, 0])}, ref_tx.init(p), p)
    np.testing.assert_allclose(u2["w"], ref["w"], rtol=1e-6)


def test_half_written_checkpoint_is_never_restored(tmp_path):
    state = {"x": jnp.arange(3.0)}
    m = checkpoint.manager(tmp_path, keep=3)
    checkpoint.save(m, 10, state, {"k": 1}, force=True)
    m.wait_until_finished()
    m.close()
    # what a process killed mid-save leaves: orbax's temporary directory for step 20
    (tmp_path / "checkpoints" / "20.orbax-checkpoint-tmp-1234").mkdir()
    (tmp_path / "checkpoints" / "20.orbax-checkpoint-tmp-1234" / "garbage").write_text("x")
    m = checkpoint.manager(tmp_path, keep=3)
    assert m.latest_step() == 10
    restored, meta = checkpoint.restore(m, jax.eval_shape(lambda: state))
    np.testing.assert_array_equal(restored["x"], np.arange(3.0))
    assert meta == {"k": 1}


def test_clipping_bounds_the_update_direction():
    p = {"w": jnp.zeros(2)}
    cfg = unit_lr(clip_norm=1.0, b1=0.0, b2=0.0)
    tx, _ = optim.build(cfg, steps=2, batch_size=1)
    clip = tx[0] if isinstance(tx, tuple) else None
    clipped, _ = optax.clip_by_global_norm(1.0).update(
        {"w": jnp.array([30.0, 40.0])}, optax.EmptyState()
    )
    np.testing.assert_allclose(clipped["w"], [0.6, 0.8], rtol=1e-6)
    del clip
    # the built chain clips first: a huge gradient gives the same Adam step as its clipped version
    u_big, _ = tx.update({"w": jnp.array([3e6, 4e6])}, tx.init(p), p)
    u_small, _ = tx.update({"w": jnp.array([0.6, 0.8])}, tx.init(p), p)
    np.testing.assert_allclose(u_big["w"], u_small["w"], rtol=1e-5)


def test_warmup_then_cosine_schedule():
    _, sched = optim.build(
        OptimConfig(lr=1.0, scale_lr_by_batch=False, warmup_steps=10, min_lr_ratio=0.1),
        steps=110,
        batch_size=1,
    )
    assert float(sched(0)) == 0.0 and abs(float(sched(10)) - 1.0) < 1e-6
    assert abs(float(sched(60)) - (0.1 + 0.9 * 0.5)) < 1e-3 and abs(float(sched(110)) - 0.1) < 1e-6


def test_bf16_compute_keeps_fp32_master_weights():
    from emfm.objectives import mae

    cfg = ModelConfig(width=32, depth=1, heads=2, dtype="bfloat16")
    m = build_pretraining_model(cfg, MAEConfig(decoder_width=16, decoder_depth=1, decoder_heads=2))
    assert {x.dtype for x in jax.tree.leaves(nnx.state(m, nnx.Param))} == {jnp.dtype("float32")}
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 32, 32, 1))
    tokens, _ = m.encoder(x)
    assert tokens.dtype == jnp.float32  # outputs cast back; blocks compute in bf16
    hidden = m.encoder.blocks[0].mlp.fc1(jnp.ones((1, 32)))
    assert hidden.dtype == jnp.bfloat16
    g, p = nnx.split(m, nnx.Param)
    grads = jax.grad(lambda p: mae.loss(nnx.merge(g, p), {"image": x}, jax.random.PRNGKey(1))[0])(p)
    assert {x.dtype for x in jax.tree.leaves(grads)} == {jnp.dtype("float32")}
