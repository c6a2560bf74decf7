"""Depth-folded 3D convolution (emfm.models.conv3d): the same numbers as XLA's native 3D
convolution, forward and both gradients; the U-Net and heads use it on CPU and keep their
parameter trees."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from emfm.models import conv3d, seg_heads, unet
from emfm.models.unet import UNet, UNetSpec
from emfm.train import checkpoint


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _loss(fn, x, w, bias, t):
    return jnp.sum((fn(x, w) + bias) * t)


@pytest.mark.parametrize("impl", ["fold", "fold_sum"])
@pytest.mark.parametrize(
    "shape,kernel,cin,cout",
    [
        ((2, 5, 9, 7), (3, 3, 3), 3, 4),  # odd sizes
        ((1, 4, 8, 8), (1, 3, 3), 4, 5),  # anisotropic 1x3x3
        ((2, 3, 6, 5), (3, 1, 1), 2, 3),  # depth only
        ((1, 6, 7, 6), (5, 3, 3), 2, 2),  # kz > 3
        ((1, 4, 6, 6), (2, 2, 2), 3, 2),  # even kernel: 'SAME' pads 0 before, 1 after
        ((2, 3, 5, 5), (1, 1, 1), 6, 4),  # pointwise
    ],
)
def test_folded_equals_native_forward_and_gradients(impl, shape, kernel, cin, cout):
    kx, kw, kb, kt = jax.random.split(jax.random.PRNGKey(sum(shape) + sum(kernel)), 4)
    x = jax.random.normal(kx, shape + (cin,))
    w = jax.random.normal(kw, kernel + (cin, cout))
    bias = jax.random.normal(kb, (cout,))
    t = jax.random.normal(kt, shape + (cout,))
    fold = conv3d.FORMULATIONS[impl]
    ref = conv3d.conv3d_native(x, w) + bias
    assert _rel_err(fold(x, w) + bias, ref) <= 1e-5
    grads = jax.jit(jax.grad(lambda *a: _loss(fold, *a), argnums=(0, 1, 2)))(x, w, bias, t)
    native = jax.grad(lambda *a: _loss(conv3d.conv3d_native, *a), argnums=(0, 1, 2))
    for g, r in zip(grads, native(x, w, bias, t)):
        assert g.shape == r.shape
        assert _rel_err(g, r) <= 1e-5


def test_drop_in_dispatch_and_fallback():
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 6, 6, 2))
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 2, 3))
    dn = ("NDHWC", "DHWIO", "NDHWC")
    cpu = jax.default_backend() == "cpu"
    assert conv3d.current_impl(16) == ("fold" if cpu else "native")
    assert conv3d.current_impl(conv3d.FOLD_SUM_FROM) == ("fold_sum" if cpu else "native")
    ref = jax.lax.conv_general_dilated(x, w, (1, 1, 1), "SAME", dimension_numbers=dn)
    for pad in ("SAME", [(1, 1)] * 3):
        out = conv3d.conv_general_dilated(x, w, (1, 1, 1), pad, dimension_numbers=dn)
        assert _rel_err(out, ref) <= 1e-5
    # strides, VALID padding, 2D: lax unchanged
    for args in [((2, 2, 2), "SAME"), ((1, 1, 1), "VALID")]:
        np.testing.assert_array_equal(
            conv3d.conv_general_dilated(x, w, *args, dimension_numbers=dn),
            jax.lax.conv_general_dilated(x, w, *args, dimension_numbers=dn),
        )
    with pytest.raises(ValueError, match="impl"), conv3d.use_impl("fast"):
        pass


def _unet3d(seed=0):
    spec = UNetSpec(ndim=3, widths=(8, 16), pool_z_from_level=1)
    return UNet(spec, rngs=nnx.Rngs(seed))


def _conv_ranks(fn, *args) -> list[int]:
    """The number of dimensions of every convolution's input in the trace of `fn`."""
    # a new function object each time: jax reuses the trace of a function it has traced before
    specs = re.findall(r"lhs_spec=\(([\d, ]+)\)", str(jax.make_jaxpr(lambda *a: fn(*a))(*args)))
    return [len(s.split(",")) for s in specs]


def test_unet3d_uses_folded_conv_and_matches_native():
    m = _unet3d()
    assert m.stem.conv_general_dilated is conv3d.conv_general_dilated
    x = jax.random.normal(jax.random.PRNGKey(2), (1, 4, 16, 16, 1))

    def fwd(x):
        return m(x)[1]["patch_map"]

    def loss(m):
        return jnp.sum(m(x)[1]["patch_map"] ** 2)

    with conv3d.use_impl("auto"):
        ranks = _conv_ranks(fwd, x)
        out, grads = fwd(x), nnx.jit(nnx.grad(loss))(m)
    with conv3d.use_impl("native"):
        native_ranks = _conv_ranks(fwd, x)
        ref, ref_grads = fwd(x), nnx.jit(nnx.grad(loss))(m)
    assert len(native_ranks) == len(ranks) == 10 and set(native_ranks) == {5}
    assert set(ranks) == ({4} if jax.default_backend() == "cpu" else {5})
    assert _rel_err(out, ref) <= 1e-5
    # parameter gradients, relative to the largest one (biases before a norm get next to none)
    leaves, ref_leaves = jax.tree.leaves(grads), jax.tree.leaves(ref_grads)
    scale = max(float(jnp.abs(g).max()) for g in ref_leaves)
    assert max(float(jnp.abs(a - b).max()) for a, b in zip(leaves, ref_leaves)) <= 1e-5 * scale


def _old_conv(spec, cin, cout, k, rngs):
    """The U-Net's convolution as built before the folded formulation: a plain nnx.Conv."""
    return nnx.Conv(
        cin,
        cout,
        (k,) * spec.ndim,
        padding="SAME",
        param_dtype=jnp.float32,
        kernel_init=unet.he_uniform,
        rngs=rngs,
    )


def test_old_parameter_tree_loads(monkeypatch, tmp_path):
    """A checkpoint of a 3D U-Net built with plain nnx.Conv restores into the current U-Net."""
    with monkeypatch.context() as mp:
        mp.setattr(unet, "_conv", _old_conv)
        old = _unet3d(seed=3)
    assert old.stem.conv_general_dilated is jax.lax.conv_general_dilated
    mngr = checkpoint.manager(tmp_path)
    checkpoint.save(mngr, 1, {"params": nnx.state(old, nnx.Param)}, {}, force=True)
    mngr.wait_until_finished()
    mngr.close()
    abstract = nnx.eval_shape(lambda: _unet3d(seed=4))
    graphdef, abstract_params = nnx.split(abstract, nnx.Param)
    mngr = checkpoint.manager(tmp_path, create=False)  # restored as emfm.train.state.load_encoder
    restored = mngr.restore(
        1, args=ocp.args.Composite(state=checkpoint.params_restore_args(abstract_params))
    )
    mngr.close()
    new = nnx.merge(graphdef, restored.state["params"])
    assert new.stem.conv_general_dilated is conv3d.conv_general_dilated
    assert new.stem.kernel[...].shape == (3, 3, 3, 1, 8) and new.stem.bias[...].shape == (8,)
    x = jax.random.normal(jax.random.PRNGKey(5), (1, 2, 8, 8, 1))
    assert _rel_err(new(x)[0], old(x)[0]) <= 1e-5


@pytest.mark.parametrize("factor", [(2, 2, 2), (1, 2, 2)])
def test_transposed_blocks_equal_conv_transpose(factor):
    up = seg_heads.UpConv(3, 4, factor, rngs=nnx.Rngs(0))
    up.conv.bias[...] = jax.random.normal(jax.random.PRNGKey(1), (4,))
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 3, 4, 5, 3))
    t = jax.random.normal(jax.random.PRNGKey(3), (2, 3 * factor[0], 8, 10, 4))

    graphdef, params = nnx.split(up)

    def loss(x, params, impl):
        with conv3d.use_impl(impl):
            return jnp.sum(nnx.merge(graphdef, params)(x) * t)

    ref = jax.value_and_grad(loss, argnums=(0, 1))(x, params, "native")
    out = jax.value_and_grad(loss, argnums=(0, 1))(x, params, "fold")
    assert len(jax.tree.leaves(out)) == 4  # loss, d/dx, d/dkernel, d/dbias
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
        assert _rel_err(a, b) <= 1e-5
