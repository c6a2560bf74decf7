"""Transformer layers' CPU forms (emfm.models.layers): the same values and gradients as the plain
JAX formulations they replace."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emfm.models import layers


def _grads(f, *args):
    """Value and gradients of sum(f(*args) * w) for a fixed random w (not a symmetric loss)."""
    w = jax.random.normal(jax.random.PRNGKey(9), f(*args).shape, jnp.float32)
    return jax.value_and_grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32) * w), range(len(args)))(
        *args
    )


@pytest.mark.parametrize("b,h,t,d", [(2, 3, 17, 8), (1, 16, 50, 32)])
def test_attention_matches_dot_product_attention(b, h, t, d):
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (2 * jax.random.normal(kk, (b, h, t, d), jnp.float32) for kk in ks)

    def ref(q, k, v):  # jax's attention takes [b, t, h, d]
        bthd = [x.transpose(0, 2, 1, 3) for x in (q, k, v)]
        return jax.nn.dot_product_attention(*bthd).transpose(0, 2, 1, 3)

    val, grads = _grads(layers.attention_bhtd, q, k, v)
    val_ref, grads_ref = _grads(ref, q, k, v)
    np.testing.assert_allclose(val, val_ref, rtol=1e-5)
    np.testing.assert_allclose(layers.attention_bhtd(q, k, v), ref(q, k, v), atol=1e-5)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        np.testing.assert_allclose(g, g_ref, atol=1e-5 * float(jnp.abs(g_ref).max()))


def test_attention_bfloat16_runs_close_to_float32():
    ks = jax.random.split(jax.random.PRNGKey(1), 3)
    q, k, v = (jax.random.normal(kk, (2, 4, 33, 16), jnp.float32) for kk in ks)
    lo = layers.attention_bhtd(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
    assert lo.dtype == jnp.bfloat16
    hi = layers.attention_bhtd(q, k, v)
    np.testing.assert_allclose(np.asarray(lo, np.float32), hi, atol=0.05)
    _, grads = _grads(layers.attention_bhtd, *(x.astype(jnp.bfloat16) for x in (q, k, v)))
    assert all(g.dtype == jnp.bfloat16 and bool(jnp.isfinite(g).all()) for g in grads)


def test_linear_matches_matmul_and_its_gradients():
    ks = jax.random.split(jax.random.PRNGKey(2), 3)
    x = jax.random.normal(ks[0], (3, 5, 12), jnp.float32)
    w = jax.random.normal(ks[1], (12, 7), jnp.float32)
    b = jax.random.normal(ks[2], (7,), jnp.float32)
    (val, grads), (val_ref, grads_ref) = (
        _grads(layers.linear, x, w, b),
        _grads(lambda x, w, b: x @ w + b, x, w, b),
    )
    np.testing.assert_allclose(val, val_ref, rtol=1e-5)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert g.shape == g_ref.shape
        np.testing.assert_allclose(g, g_ref, atol=1e-4)


def test_dense_is_nnx_linear_with_the_same_parameters():
    dense = layers.dense(12, 7, dtype=jnp.float32, rngs=nnx.Rngs(0))
    plain = nnx.Linear(12, 7, rngs=nnx.Rngs(1))
    nnx.update(plain, nnx.state(dense))  # the same parameter tree, so it loads as is
    x = jax.random.normal(jax.random.PRNGKey(3), (4, 12), jnp.float32)
    np.testing.assert_allclose(dense(x), plain(x), atol=1e-5)


def test_gelu_is_exact_gelu():
    x = jnp.linspace(-10.0, 10.0, 20001, dtype=jnp.float32)
    np.testing.assert_allclose(layers.gelu(x), jax.nn.gelu(x, approximate=False), atol=2e-6)
    g = jax.vmap(jax.grad(layers.gelu))(x)
    g_ref = jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(x)
    np.testing.assert_allclose(g, g_ref, atol=2e-6)


def test_attention_module_splits_heads_as_before():
    """The CPU path reads q, k, v and the heads from the same channels of the qkv projection as
    the `jax.nn.dot_product_attention` path, so saved ViT weights mean the same."""
    from einops import rearrange

    att = layers.Attention(24, 3, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 9, 24), jnp.float32)
    q, k, v = rearrange(att.qkv(x), "b t (three h d) -> three b t h d", three=3, h=3)
    want = att.proj(rearrange(jax.nn.dot_product_attention(q, k, v), "b t h d -> b t (h d)"))
    np.testing.assert_allclose(att(x), want, atol=1e-5)
