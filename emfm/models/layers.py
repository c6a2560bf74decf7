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


def dense(din: int, dout: int, *, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    # MAE / timm init: xavier-uniform weights, zero bias; parameters always float32.
    return nnx.Linear(
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


class Attention(nnx.Module):
    """Multi-head self-attention through `jax.nn.dot_product_attention` (fused kernels on GPU)."""

    def __init__(self, dim: int, heads: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        if dim % heads:
            raise UserError(f"attention width {dim} is not divisible by heads={heads}")
        self.heads = heads
        self.qkv = dense(dim, 3 * dim, dtype=dtype, rngs=rngs)
        self.proj = dense(dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: Float[Array, "b t d"]) -> Float[Array, "b t d"]:
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b t h d", three=3, h=self.heads)
        y = jax.nn.dot_product_attention(q, k, v)
        return self.proj(rearrange(y, "b t h d -> b t (h d)"))


class Mlp(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.fc1 = dense(dim, hidden, dtype=dtype, rngs=rngs)
        self.fc2 = dense(hidden, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        # exact (erf) GELU, as torch.nn.GELU in the reference MAE
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


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
