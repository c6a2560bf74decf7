"""Segmentation losses (pure jax): cross-entropy, soft Dice, focal, class weights, ignore masks.

Softmax terms take logits `[..., k]` and int labels `[...]` with -1 = ignore; sigmoid terms take
logits and targets `[..., k]` with a validity mask of the same shape. Every term is a mean over
valid voxels, so sparsely labelled patches (mostly ignored) train with the right scale; a batch
with no valid voxel contributes 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from emfm.errors import UserError

EPS = 1e-6


def _mean(x, w):
    return (x * w).sum() / jnp.maximum(w.sum(), EPS)


def class_weight_map(labels, num_classes: int, class_weights=None, balance: bool = False):
    """Per-voxel weights: 0 where ignored, else `class_weights[label]` (and/or inverse class
    frequency in this batch with `balance`, normalised so that a balanced batch gets 1)."""
    valid = labels >= 0
    safe = jnp.where(valid, labels, 0)
    w = valid.astype(jnp.float32)
    if class_weights is not None and len(class_weights):
        w = w * jnp.asarray(class_weights, jnp.float32)[safe]
    if balance:
        onehot = jax.nn.one_hot(safe, num_classes) * valid[..., None]
        freq = onehot.reshape(-1, num_classes).sum(0) / jnp.maximum(valid.sum(), 1)
        inv = jnp.where(freq > 0, 1.0 / (num_classes * jnp.maximum(freq, EPS)), 0.0)
        w = w * inv[safe]
    return w


def cross_entropy(logits, labels, weights):
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(labels >= 0, labels, 0))
    return _mean(ce, weights)


def focal(logits, labels, weights, gamma: float = 2.0):
    """Focal loss (Lin et al. 2017): cross-entropy scaled by (1 - p_true)^gamma."""
    logp = jax.nn.log_softmax(logits)
    lp = jnp.take_along_axis(logp, jnp.where(labels >= 0, labels, 0)[..., None], axis=-1)[..., 0]
    return _mean(-((1.0 - jnp.exp(lp)) ** gamma) * lp, weights)


def soft_dice(probs, onehot, mask):
    """1 - mean over channels of the soft Dice coefficient (Milletari et al. 2016), masked voxels
    excluded; channels absent from both prediction and target count as perfect."""
    axes = tuple(range(probs.ndim - 1))
    m = mask[..., None] if mask.ndim == probs.ndim - 1 else mask
    inter = (probs * onehot * m).sum(axes)
    denom = (probs * m).sum(axes) + (onehot * m).sum(axes)
    return 1.0 - jnp.mean((2 * inter + EPS) / (denom + EPS))


def softmax_terms(
    logits, labels, terms, term_weights, *, class_weights=None, balance=False, gamma=2.0
):
    """Weighted sum of the named softmax terms and each term's value."""
    k = logits.shape[-1]
    w = class_weight_map(labels, k, class_weights, balance)
    out = {}
    for t in terms:
        if t == "ce":
            out[t] = cross_entropy(logits, labels, w)
        elif t == "focal":
            out[t] = focal(logits, labels, w, gamma)
        elif t == "dice":
            valid = (labels >= 0).astype(jnp.float32)
            out[t] = soft_dice(
                jax.nn.softmax(logits), jax.nn.one_hot(jnp.where(labels >= 0, labels, 0), k), valid
            )
        else:
            raise UserError(f"loss term {t!r}: use ce, dice or focal")
    total = sum(wt * out[t] for t, wt in zip(terms, term_weights))
    return total, out


def sigmoid_terms(logits, targets, mask, terms, term_weights, *, gamma=2.0, balance=False):
    """Binary (per-channel sigmoid) versions of the terms, for affinities."""
    w = mask
    if balance:  # per channel: positives and negatives weigh alike
        axes = tuple(range(targets.ndim - 1))
        pos = (targets * mask).sum(axes) / jnp.maximum(mask.sum(axes), 1)
        w = mask * jnp.where(
            targets > 0.5, 0.5 / jnp.maximum(pos, EPS), 0.5 / jnp.maximum(1 - pos, EPS)
        )
    out = {}
    for t in terms:
        if t == "ce":
            out[t] = _mean(optax.sigmoid_binary_cross_entropy(logits, targets), w)
        elif t == "focal":
            out[t] = _mean(optax.sigmoid_focal_loss(logits, targets, alpha=None, gamma=gamma), w)
        elif t == "dice":
            out[t] = soft_dice(jax.nn.sigmoid(logits), targets, mask)
        else:
            raise UserError(f"loss term {t!r}: use ce, dice or focal")
    total = sum(wt * out[t] for t, wt in zip(terms, term_weights))
    return total, out


def task_loss(out, targets: dict, lay, loss_cfg):
    """Loss of a model output `[b, *sp, channels]` against `make_targets` arrays (same spatial
    shape); returns (loss, metrics)."""
    terms = list(loss_cfg.terms)
    tw = list(loss_cfg.weights) or [1.0] * len(terms)
    metrics = {}
    total = 0.0
    c0 = lay.classes
    if lay.classes:
        term, parts = softmax_terms(
            out[..., :c0],
            targets["classes"],
            terms,
            tw,
            class_weights=loss_cfg.class_weights,
            balance=loss_cfg.balance,
            gamma=loss_cfg.focal_gamma,
        )
        total += term
        metrics.update({f"loss_{k}": v for k, v in parts.items()})
    if lay.sigmoid:
        sl = out[..., c0 : c0 + lay.sigmoid]
        term, parts = sigmoid_terms(
            sl,
            targets["sigmoid"],
            targets["sigmoid_mask"],
            terms,
            tw,
            gamma=loss_cfg.focal_gamma,
            balance=loss_cfg.balance,
        )
        total += term
        metrics.update({f"loss_aff_{k}": v for k, v in parts.items()})
    if lay.regress:
        r = out[..., c0 + lay.sigmoid :]
        # distance / heatmap in [0, 1] through a sigmoid; offsets (voxels) linear, smooth-L1
        first = jax.nn.sigmoid(r[..., :1])
        reg = _mean((first - targets["regress"][..., :1]) ** 2, targets["regress_mask"][..., :1])
        if lay.regress > 1:
            d = r[..., 1:] - targets["regress"][..., 1:]
            reg = reg + 0.01 * _mean(
                optax.huber_loss(d, delta=1.0), targets["regress_mask"][..., 1:]
            )
        total += loss_cfg.aux_weight * reg
        metrics["loss_regress"] = reg
    metrics["loss_supervised"] = total
    return total, metrics


def probabilities(out, lay):
    """Model output to what `emfm predict` writes: softmax over the class channels, sigmoid over
    affinities and the distance / heatmap channel, offsets unchanged (voxels)."""
    parts = []
    c0 = lay.classes
    if lay.classes:
        parts.append(jax.nn.softmax(out[..., :c0]))
    if lay.sigmoid:
        parts.append(jax.nn.sigmoid(out[..., c0 : c0 + lay.sigmoid]))
    if lay.regress:
        r = out[..., c0 + lay.sigmoid :]
        parts.append(jax.nn.sigmoid(r[..., :1]))
        if lay.regress > 1:
            parts.append(r[..., 1:])
    return jnp.concatenate(parts, axis=-1)
