"""MoCo v3 (Chen, Xie, He 2021, "An Empirical Study of Training Self-Supervised Vision
Transformers").

The student encodes both views, projects (MLP) and predicts (MLP); the momentum teacher (the EMA
copy the training state keeps, `ObjectiveDef.teacher=True`) encodes and projects them without
gradient. Symmetric InfoNCE with in-batch negatives: ctr(q1, k2) + ctr(q2, k1), each scaled by
2T as in the paper's code, so the gradient scale does not depend on the temperature.
"""

from __future__ import annotations

import jax
from flax import nnx

from emfm.models.heads import MLP, global_feature
from emfm.objectives.contrastive import info_nce, momentum_teacher, two_view_definition


class Heads(nnx.Module):
    def __init__(self, width: int, cfg, rngs: nnx.Rngs):
        self.projector = MLP(width, cfg.proj_hidden, cfg.proj_dim, layers=3, rngs=rngs)
        self.predictor = MLP(cfg.proj_dim, cfg.pred_hidden, cfg.proj_dim, layers=2, rngs=rngs)


def _project(encoder, heads: Heads, x):
    _, aux = encoder(x)
    return heads.projector(global_feature(aux))


def symmetric_loss(q1, q2, k1, k2, temperature: float):
    """MoCo v3's loss given predictions q and (stop-gradient) teacher keys k of the two views."""
    return 2 * temperature * (info_nce(q1, k2, temperature) + info_nce(q2, k1, temperature))


def pair_loss(encoder, heads: Heads, x1, x2, rng, cfg, teacher):
    t_enc, t_heads = momentum_teacher(teacher, "MoCo v3")
    q1 = heads.predictor(_project(encoder, heads, x1))
    q2 = heads.predictor(_project(encoder, heads, x2))
    k1 = jax.lax.stop_gradient(_project(t_enc, t_heads, x1))
    k2 = jax.lax.stop_gradient(_project(t_enc, t_heads, x2))
    value = symmetric_loss(q1, q2, k1, k2, cfg.temperature)
    return value, {"loss": value}


DEFINITION = two_view_definition("moco", Heads, pair_loss, teacher=True)
