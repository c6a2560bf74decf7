"""DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers").

Self-distillation without labels: the momentum teacher (the EMA state, `teacher=True`) sees the two
global views; the student sees them plus `local_crops` small crops, made here on-device by random
crop + resize of the global views (the loader gives two views). Teacher logits are centred (a
running mean kept in `heads.center`, an `nnx.Variable` that is not a parameter, updated in place)
and sharpened with `teacher_temp`; the student's with `student_temp`. The loss is the cross-entropy
between teacher and student distributions over all pairs of different views, averaged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from emfm.models.heads import DINOHead, global_feature
from emfm.objectives.contrastive import (
    momentum_teacher,
    random_resized_crops,
    two_view_definition,
)


class Center(nnx.Variable):
    """Running mean of the teacher's logits: state, not a parameter (no gradient, no optimizer)."""


class Heads(nnx.Module):
    def __init__(self, width: int, cfg, rngs: nnx.Rngs):
        self.head = DINOHead(width, cfg.proj_hidden, cfg.proj_dim, cfg.prototypes, rngs=rngs)
        self.center = Center(jnp.zeros((1, cfg.prototypes), jnp.float32))


def dino_cross_entropy(
    student: list, teacher: list, center, student_temp: float, teacher_temp: float
):
    """Mean over pairs (teacher view i, student view v != i) of H(softmax((t_i - c)/T_t),
    softmax(s_v/T_s)); teacher view i is student view i (the first len(teacher) student views are
    the global ones)."""
    t_probs = [jax.nn.softmax((t - center) / teacher_temp, axis=-1) for t in teacher]
    s_logp = [jax.nn.log_softmax(s / student_temp, axis=-1) for s in student]
    total, pairs = 0.0, 0
    for i, tp in enumerate(t_probs):
        for v, lp in enumerate(s_logp):
            if v == i:
                continue
            total = total + jnp.mean(-jnp.sum(tp * lp, axis=-1))
            pairs += 1
    return total / pairs


def local_views(rng, x1, x2, cfg, multiple: int):
    """`cfg.local_crops` local crops, alternately from each global view; side a multiple of
    `multiple`."""
    side = max(multiple, int(round(x1.shape[-2] * cfg.local_crop_size / multiple)) * multiple)
    keys = jax.random.split(rng, max(cfg.local_crops, 1))
    return [
        random_resized_crops(keys[i], (x1, x2)[i % 2], side, tuple(cfg.local_crop_scale))
        for i in range(cfg.local_crops)
    ]


def _logits(encoder, heads: Heads, x):
    _, aux = encoder(x)
    return heads.head(global_feature(aux))


def pair_loss(encoder, heads: Heads, x1, x2, rng, cfg, teacher):
    t_enc, t_heads = momentum_teacher(teacher, "DINO")
    spec = encoder.spec
    multiple = spec.total_pool()[-1] if hasattr(spec, "total_pool") else spec.patch_size[-1]
    crops = [x1, x2] + local_views(rng, x1, x2, cfg, multiple)
    student = [_logits(encoder, heads, c) for c in crops]
    t_out = [jax.lax.stop_gradient(_logits(t_enc, t_heads, c)) for c in (x1, x2)]
    center = heads.center[...]
    value = dino_cross_entropy(student, t_out, center, cfg.student_temp, cfg.teacher_temp)
    batch_mean = jnp.concatenate(t_out, axis=0).mean(axis=0, keepdims=True)
    # a fresh Variable rather than `center[...] = `: the state merged into the step's model was
    # created outside the gradient trace, and NNX refuses to mutate it from inside
    heads.center = Center(center * cfg.center_momentum + batch_mean * (1 - cfg.center_momentum))
    t_probs = jax.nn.softmax((t_out[0] - center) / cfg.teacher_temp, axis=-1)
    entropy = -jnp.mean(jnp.sum(t_probs * jnp.log(t_probs + 1e-12), axis=-1))
    return value, {"loss": value, "teacher_entropy": entropy}


DEFINITION = two_view_definition("dino", Heads, pair_loss, teacher=True)
