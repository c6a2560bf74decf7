"""Dense contrastive learning: InfoNCE between corresponding locations of two views (in the spirit
of DenseCL, Wang et al. 2021, and PixPro, Xie et al. 2021, but with exact correspondence).

Both views are made on-device from `batch["image"]`: independent grey-value jitter, and for the
second a random in-plane flip / rot90 that is known, so its feature map is turned back exactly onto
the first's grid (ViT patch tokens: patches map onto patches; U-Net: pixels onto pixels). At
`dense_samples` random locations per example the projected features of the two views are positives;
every other sampled location of the batch is a negative. Symmetric in the two views.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from emfm.models.heads import MLP
from emfm.objectives.base import ObjectiveDef
from emfm.objectives.contrastive import (
    ContrastiveModel,
    dihedral,
    dihedral_codes,
    info_nce,
    photometric,
)


class Heads(nnx.Module):
    def __init__(self, width: int, cfg, rngs: nnx.Rngs):
        self.projector = MLP(width, cfg.proj_hidden, cfg.proj_dim, layers=2, rngs=rngs)


def aligned_views(rng, x):
    """(view 1, view 2, codes): view 2 = dihedral(jitter(x), codes); view 1 = jitter(x)
    untransformed."""
    kc, k1, k2 = jax.random.split(rng, 3)
    code = dihedral_codes(kc, x.shape[0], square=x.shape[-3] == x.shape[-2])
    return photometric(k1, x), dihedral(photometric(k2, x), code), code


def dense_loss(encoder, heads: Heads, x, rng, cfg):
    ks, kv = jax.random.split(rng)
    v1, v2, code = aligned_views(kv, x)
    f1 = encoder(v1)[1]["patch_map"]
    f2 = dihedral(encoder(v2)[1]["patch_map"], code, inverse=True)  # back onto view 1's grid
    b, d = f1.shape[0], f1.shape[-1]
    n = math.prod(f1.shape[1:-1])
    s = min(cfg.dense_samples, n)
    idx = jnp.argsort(jax.random.uniform(ks, (b, n)), axis=1)[:, :s, None]
    q = jnp.take_along_axis(f1.reshape(b, n, d), idx, axis=1)
    k = jnp.take_along_axis(f2.reshape(b, n, d), idx, axis=1)
    q, k = heads.projector(q).reshape(b * s, -1), heads.projector(k).reshape(b * s, -1)
    value = 0.5 * (info_nce(q, k, cfg.temperature) + info_nce(k, q, cfg.temperature))
    return value, {"loss": value}


def loss(model, batch: dict, rng, cfg, teacher=None):
    return dense_loss(model.encoder, model.heads, batch["image"], rng, cfg)


def build(encoder, cfg, rngs: nnx.Rngs) -> ContrastiveModel:
    return ContrastiveModel(encoder, Heads(encoder.spec.width, cfg, rngs))


DEFINITION = ObjectiveDef(name="dense", build=build, loss=loss, views=1)
