"""Transformer building blocks shared by encoders and decoders (pre-norm, as in ViT / MAE)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx
from jaxtyping import Array, Float

from emfm.errors import UserError

xavier = nnx.initializers.xavier_uniform()
zeros = nnx.initializers.zeros_init()


def _linear_fwd(x, kernel, bias):
    return linear(x, kernel, bias), (x, kernel)


def _linear_bwd(res, d_y):
    x, kernel = res
    # The input gradient as a plain product with a transposed copy of the kernel. Left to
    # itself, XLA folds the transpose into the product (contracting the kernel's output axis),
    # and its CPU library (YNNPACK) ran that form at about half the speed of the plain one in
    # the MAE step. The barrier keeps the copy (one pass over the kernel).
    kernel_t = jax.lax.optimization_barrier(kernel.T)
    d_x = jnp.einsum("...o,oi->...i", d_y, kernel_t)
    x2, d_y2 = x.reshape(-1, x.shape[-1]), d_y.reshape(-1, d_y.shape[-1])
    return d_x, jnp.einsum("ni,no->io", x2, d_y2), d_y2.sum(axis=0).astype(d_y.dtype)


@jax.custom_vjp
def linear(x: Float[Array, "*n i"], kernel: Float[Array, "i o"], bias: Float[Array, " o"]):
    """`x @ kernel + bias` whose backward avoids products against a transposed operand."""
    return jnp.einsum("...i,io->...o", x, kernel) + bias


linear.defvjp(_linear_fwd, _linear_bwd)


class Dense(nnx.Linear):
    """`nnx.Linear` (same parameters, same arithmetic) that runs through `linear` on the CPU."""

    def __call__(self, inputs, out_sharding=None):
        if jax.default_backend() != "cpu" or self.bias is None or out_sharding is not None:
            return super().__call__(inputs, out_sharding)
        inputs, kernel, bias = self.promote_dtype(
            (inputs, self.kernel[...], self.bias[...]), dtype=self.dtype
        )
        return linear(inputs, kernel, bias)


def dense(din: int, dout: int, *, dtype, rngs: nnx.Rngs, cpu_form: bool = True) -> nnx.Linear:
    """MAE / timm init: xavier-uniform weights, zero bias; parameters always float32.
    `cpu_form`: a `Dense` (the transformer's layers) or a plain `nnx.Linear` (small heads, where
    the barrier cost more than it saved: the U-Net recipe's DINO head pretrained at a median of
    31.6 img/s with `Dense` against 36.5 without, 4 runs each, 2-core CPU)."""
    return (Dense if cpu_form else nnx.Linear)(
        din,
        dout,
        kernel_init=xavier,
        bias_init=zeros,
        dtype=dtype,
        param_dtype=jnp.float32,
        rngs=rngs,
    )


def layer_norm(dim: int, *, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(dim, epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def _attention_fwd(q, k, v):
    """Softmax attention on `[b, h, t, d]` (heads before tokens, so that every matrix product is a
    plain batched one) with `jax.nn.dot_product_attention`'s arithmetic: logits in float32 (at
    least), scaled after the product, softmax in float32, probabilities cast to v's dtype."""
    scale = q.shape[-1] ** -0.5
    f32 = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=f32) * scale
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bhkd->bhqd", probs, v)
    return out, (q, k, v, probs, out)


def _attention_bwd(res, d_out):
    # FlashAttention's backward (Dao et al. 2022): the softmax's row term sum_k P dP equals
    # sum_d dO * O, a pass over [b, h, t, d] instead of two over the [b, h, t, t] matrices.
    q, k, v, probs, out = res
    scale = q.shape[-1] ** -0.5
    f32 = jnp.promote_types(q.dtype, jnp.float32)
    d_probs = jnp.einsum("bhqd,bhkd->bhqk", d_out, v, preferred_element_type=f32)
    row = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1, keepdims=True)
    d_logits = (probs.astype(f32) * (d_probs - row) * scale).astype(q.dtype)
    d_q = jnp.einsum("bhqk,bhkd->bhqd", d_logits, k)
    # d_v = P^T dO and d_k = dS^T Q contract over queries, the major axis of P and dS, which
    # XLA's CPU dot runs slowly; as (dO^T P)^T and (Q^T dS)^T only the small [t, d] operands
    # and results are transposed. The barriers stop XLA from folding the transposes back.
    bar = jax.lax.optimization_barrier
    d_out_t, q_t = bar(jnp.swapaxes(d_out, -1, -2)), bar(jnp.swapaxes(q, -1, -2))
    d_v = jnp.swapaxes(bar(jnp.einsum("bhdq,bhqk->bhdk", d_out_t, probs)), -1, -2)
    d_k = jnp.swapaxes(bar(jnp.einsum("bhdq,bhqk->bhdk", q_t, d_logits)), -1, -2)
    return d_q, d_k, d_v


@jax.custom_vjp
def attention_bhtd(q, k, v):
    """Multi-head softmax attention, `[b, h, t, d]` in and out, with a hand-written backward.

    On the CPU, XLA has no fused attention: `jax.nn.dot_product_attention` there is a chain of
    batched products over `[b, t, h, d]` with transposes around each, and its autodiff takes two
    passes over the `[b, h, t, t]` matrices for the softmax. For the MAE decoder's attention (32 x
    16 heads x 197 tokens, forward and backward, 2-core CPU) it took 195-234 ms against 373-408."""
    return _attention_fwd(q, k, v)[0]


attention_bhtd.defvjp(_attention_fwd, _attention_bwd)


class Attention(nnx.Module):
    """Multi-head self-attention: `jax.nn.dot_product_attention` (fused kernels) on accelerators,
    `attention_bhtd` on the CPU."""

    def __init__(self, dim: int, heads: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        if dim % heads:
            raise UserError(f"attention width {dim} is not divisible by heads={heads}")
        self.heads = heads
        self.qkv = dense(dim, 3 * dim, dtype=dtype, rngs=rngs)
        self.proj = dense(dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: Float[Array, "b t d"]) -> Float[Array, "b t d"]:
        if jax.default_backend() != "cpu":
            q, k, v = rearrange(
                self.qkv(x), "b t (three h d) -> three b t h d", three=3, h=self.heads
            )
            y = jax.nn.dot_product_attention(q, k, v)
            return self.proj(rearrange(y, "b t h d -> b t (h d)"))
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.heads)
        y = attention_bhtd(q, k, v)
        return self.proj(rearrange(y, "b h t d -> b t (h d)"))


def gelu(x: Array) -> Array:
    """Exact GELU, x * Phi(x), written as torch.nn.GELU computes it: 0.5 x (1 + erf(x / sqrt 2)).

    `jax.nn.gelu(approximate=False)` goes through erfc, whose CPU expansion evaluates two branches
    and an exponential: forward and backward over the MAE decoder's hidden layer took 100 ms
    against 52 ms in this form (2-core CPU); the two agree within 1.1e-6 absolute on [-10, 10]."""
    return 0.5 * x * (1 + jax.lax.erf(x * jnp.asarray(0.5**0.5, x.dtype)))


class Mlp(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.fc1 = dense(dim, hidden, dtype=dtype, rngs=rngs)
        self.fc2 = dense(hidden, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.fc2(gelu(self.fc1(x)))


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(
        self, dim: int, heads: int, mlp_ratio: float = 4.0, *, dtype=jnp.float32, rngs: nnx.Rngs
    ):
        self.norm1 = layer_norm(dim, dtype=dtype, rngs=rngs)
        self.attn = Attention(dim, heads, dtype=dtype, rngs=rngs)
        self.norm2 = layer_norm(dim, dtype=dtype, rngs=rngs)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)

    def __call__(self, x: Float[Array, "b t d"]) -> Float[Array, "b t d"]:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def run_blocks(blocks, x, *, remat: bool = False, collect: tuple[int, ...] = ()):
    """Apply blocks in order; return the output and {index: output of that block} for `collect`."""
    outs = {}
    for i, blk in enumerate(blocks):
        x = nnx.remat(lambda b, h: b(h))(blk, x) if remat else blk(x)
        if i in collect or (i - len(blocks)) in collect:
            outs[i] = x
    return x, outs


def gather_tokens(x: Float[Array, "b n d"], idx) -> Float[Array, "b k d"]:
    """`x[b, idx[b, k]]` as a one-hot matmul: on CPU the scatter-add that differentiates a gather is
    serial and dominated the MAE step; the matmul form is fast on every backend and exact."""
    onehot = jax.nn.one_hot(idx, x.shape[1], dtype=x.dtype)
    return jnp.einsum("bkn,bnd->bkd", onehot, x)
