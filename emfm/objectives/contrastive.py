"""What the contrastive objectives share: the InfoNCE family of losses, the student/teacher wrapper
model, and on-device view making (photometric jitter, known flips / rot90, crop + resize).

Each objective file (simclr.py, moco.py, dino.py, dense.py) defines its heads and a
`pair_loss(encoder, heads, x1, x2, rng, cfg, teacher)` on two views, so the same loss runs alone
(`batch["image"]`, `batch["image2"]`) or inside a combination with MAE (combo.py).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from emfm.errors import UserError
from emfm.objectives.base import ObjectiveDef

# ----------------------------------------------------------------------------------------------
# losses


def l2_normalize(x, eps: float = 1e-6):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def info_nce(q: Float[Array, "n d"], k: Float[Array, "n d"], temperature: float) -> jax.Array:
    """Cross-entropy of cosine similarities `q_i . k_j / T` with the positive on the diagonal:
    every other key of the batch is a negative (MoCo v3 / CPC form)."""
    logits = l2_normalize(q) @ l2_normalize(k).T / temperature
    return -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=-1)))


def nt_xent(z1: Float[Array, "b d"], z2: Float[Array, "b d"], temperature: float) -> jax.Array:
    """SimCLR's NT-Xent (Chen et al. 2020): 2b anchors, each with its other view as the positive and
    the remaining 2b - 2 embeddings as negatives; cosine similarity over T."""
    b = z1.shape[0]
    z = l2_normalize(jnp.concatenate([z1, z2], axis=0))
    logits = z @ z.T / temperature
    logits = jnp.where(jnp.eye(2 * b, dtype=bool), -jnp.inf, logits)
    pos = jnp.concatenate([jnp.arange(b, 2 * b), jnp.arange(b)])
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, pos[:, None], axis=1))


# ------------------------------------------------------------------------------------------ the
# model


class ContrastiveModel(nnx.Module):
    """Pretraining model of a contrastive objective: the encoder (kept) and its heads (dropped)."""

    def __init__(self, encoder: nnx.Module, heads: nnx.Module):
        self.encoder = encoder
        self.heads = heads


def two_view_loss(pair_loss: Callable) -> Callable:
    """`loss(model, batch, rng, cfg, teacher)` of a ContrastiveModel from a pair loss."""

    def loss(model, batch: dict, rng, cfg, teacher=None):
        t = None if teacher is None else (teacher.encoder, teacher.heads)
        return pair_loss(model.encoder, model.heads, batch["image"], batch["image2"], rng, cfg, t)

    return loss


def momentum_teacher(teacher, method: str) -> tuple:
    """The momentum (EMA) teacher's `(encoder, heads)` a pair loss was given, or an error naming
    the `method` that needs it when the objective runs without one."""
    if teacher is None:
        raise UserError(f"{method} needs the momentum teacher (ObjectiveDef.teacher=True)")
    return teacher


def two_view_definition(
    name: str, heads: Callable, pair_loss: Callable, *, teacher: bool = False
) -> ObjectiveDef:
    """The registry entry of a two-view objective: its model is the encoder with
    `heads(encoder width, cfg, rngs)`, its loss `two_view_loss(pair_loss)`; `teacher` keeps the
    momentum (EMA) teacher in the training state."""

    def build(encoder, cfg, rngs: nnx.Rngs) -> ContrastiveModel:
        return ContrastiveModel(encoder, heads(encoder.spec.width, cfg, rngs))

    return ObjectiveDef(
        name=name, build=build, loss=two_view_loss(pair_loss), views=2, teacher=teacher
    )


# ---------------------------------------------------------------------------------- on-device views


def photometric(
    rng,
    x: Float[Array, "b *sp c"],
    *,
    brightness: float = 0.1,
    contrast: float = 0.2,
    gamma: float = 0.2,
    noise: float = 0.03,
) -> Float[Array, "b *sp c"]:
    """Grey-value jitter per example (as emfm.data.augment_ops.intensity, for images in about [0,
    1])."""
    kc, kb, kg, kn, ks = jax.random.split(rng, 5)
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    c = 1.0 + jax.random.uniform(kc, shape, minval=-contrast, maxval=contrast)
    br = jax.random.uniform(kb, shape, minval=-brightness, maxval=brightness)
    g = jnp.exp(jax.random.uniform(kg, shape, minval=-gamma, maxval=gamma))
    mean = x.mean(axis=tuple(range(1, x.ndim)), keepdims=True)
    y = jnp.clip((x - mean) * c + mean + br, 0.0, 1.0) ** g
    return y + jax.random.normal(kn, x.shape) * jax.random.uniform(ks, shape, maxval=noise)


def _dihedral(a, k, flip: bool, inverse: bool):
    """One of the 8 in-plane flips / rotations of `[(z,) y, x, c]` (y, x are axes -3, -2);
    `inverse` undoes it. Forward: optional y-flip, then k quarter turns."""
    if not inverse:
        a = jnp.flip(a, axis=-3) if flip else a
        return jnp.rot90(a, k, axes=(-3, -2))
    a = jnp.rot90(a, -k, axes=(-3, -2))
    return jnp.flip(a, axis=-3) if flip else a


def dihedral(
    x: Float[Array, "b *sp c"], code: jax.Array, *, inverse: bool = False
) -> Float[Array, "b *sp c"]:
    """Per-example flip / rot90 chosen by `code[b]` in 0..7 (bit 0 = y-flip, bits 1-2 = quarter
    turns)."""
    square = x.shape[-3] == x.shape[-2]
    turns = range(4) if square else (0, 2)  # switch branches must agree in shape
    branches = [
        lambda a, k=k, f=f: _dihedral(a, k, f, inverse) for k in turns for f in (False, True)
    ]
    index = code if square else code % 2 + 2 * (code // 4)
    return jax.vmap(lambda a, c: jax.lax.switch(c, branches, a))(x, index)


def dihedral_codes(rng, batch: int, square: bool) -> jax.Array:
    """Random codes for `dihedral`; non-square planes keep their shape only under 0 / 180 degree
    turns."""
    code = jax.random.randint(rng, (batch,), 0, 8)
    return code if square else code % 2 + 4 * (code // 4)


def random_resized_crops(
    rng, x: Float[Array, "b *sp c"], out_plane: int, scale: tuple[float, float]
) -> Float[Array, "b *sp2 c"]:
    """Per example, a random square in-plane crop of side `s * min(y, x)` with s ~ U(scale), resized
    (bilinear, antialiased) to `out_plane x out_plane`; z (3D) is kept whole. DINO's local crops."""
    b, sp = x.shape[0], x.shape[1:-1]
    h, w = sp[-2], sp[-1]
    ks, ky, kx = jax.random.split(rng, 3)
    side = jax.random.uniform(ks, (b,), minval=scale[0], maxval=scale[1]) * min(h, w)
    oy = jax.random.uniform(ky, (b,)) * (h - side)
    ox = jax.random.uniform(kx, (b,)) * (w - side)
    out_shape = (*sp[:-2], out_plane, out_plane, x.shape[-1])
    nd = len(sp)

    def one(img, s, y0, x0):
        f = out_plane / s
        scale_v = jnp.concatenate([jnp.ones((nd - 2,)), jnp.stack([f, f])])
        trans_v = jnp.concatenate([jnp.zeros((nd - 2,)), jnp.stack([-y0 * f, -x0 * f])])
        return jax.image.scale_and_translate(
            img, out_shape, tuple(range(nd)), scale_v, trans_v, method="linear", antialias=True
        )

    return jax.vmap(one)(x, side, oy, ox)
