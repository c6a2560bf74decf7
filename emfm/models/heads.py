"""Small heads on encoder features: projection MLPs (SimCLR, MoCo v3, dense) and DINO's prototype
head.

Heads act on the last axis, so the same head maps pooled features `[b, d]` and feature maps
`[b, (z,) y, x, d]` alike.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from emfm.models.layers import dense, layer_norm


def global_feature(aux: dict) -> Float[Array, "b d"]:
    """One vector per example: the cls token of a ViT, else the spatial mean of the feature map
    (U-Net)."""
    if "cls" in aux:
        return aux["cls"]
    fmap = aux["patch_map"]
    return fmap.mean(axis=tuple(range(1, fmap.ndim - 1)))


class MLP(nnx.Module):
    """`layers` linear layers with LayerNorm + GELU between them (SimCLR / MoCo v3 projector and
    predictor; LayerNorm instead of BatchNorm keeps the step free of cross-example state)."""

    def __init__(self, din: int, hidden: int, dout: int, *, layers: int = 2, rngs: nnx.Rngs):
        dims = [din] + [hidden] * (layers - 1) + [dout]
        self.linears = nnx.List(
            [
                dense(a, b, dtype=jnp.float32, rngs=rngs, cpu_form=False)
                for a, b in zip(dims[:-1], dims[1:])
            ]
        )
        self.norms = nnx.List([layer_norm(d, dtype=jnp.float32, rngs=rngs) for d in dims[1:-1]])

    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... o"]:
        for i, lin in enumerate(self.linears):
            x = lin(x)
            if i < len(self.norms):
                x = jax.nn.gelu(self.norms[i](x))
        return x


class DINOHead(nnx.Module):
    """DINO projection head (Caron et al. 2021): 3-layer MLP to a bottleneck, l2-normalise, then a
    weight-normalised linear layer (unit-norm columns, no bias) onto `prototypes` logits."""

    def __init__(self, din: int, hidden: int, bottleneck: int, prototypes: int, *, rngs: nnx.Rngs):
        self.mlp = MLP(din, hidden, bottleneck, layers=3, rngs=rngs)
        self.prototypes = nnx.Param(
            nnx.initializers.normal(0.02)(rngs.params(), (bottleneck, prototypes), jnp.float32)
        )

    def __call__(self, x: Float[Array, "b d"]) -> Float[Array, "b k"]:
        h = self.mlp(x)
        h = h / jnp.maximum(jnp.linalg.norm(h, axis=-1, keepdims=True), 1e-6)
        w = self.prototypes[...]
        return h @ (w / jnp.linalg.norm(w, axis=0, keepdims=True))
