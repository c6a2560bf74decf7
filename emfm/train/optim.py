"""Optimizers: AdamW with linear warmup and cosine decay, decay masks, gradient clipping (optax)."""
from __future__ import annotations

import jax
import optax

NO_DECAY_NAMES = ("cls_token", "registers", "mask_token", "pos_embed", "bias", "scale")


def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def decay_mask(params):
    """True where weight decay applies: matrices only; never norms, biases, tokens or embeddings."""
    def keep(path, x):
        names = _path_names(path)
        return x.ndim >= 2 and not any(n in NO_DECAY_NAMES for n in names)

    return jax.tree_util.tree_map_with_path(keep, params)


def schedule(lr: float, steps: int, warmup: int, min_ratio: float = 0.0) -> optax.Schedule:
    warmup = min(warmup, max(steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), end_value=lr * min_ratio)


def build(cfg, *, steps: int, batch_size: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """From an OptimConfig. With `scale_lr_by_batch`, lr = base lr * batch / 256 (MAE, Goyal et al.)."""
    if cfg.name != "adamw":
        raise ValueError(f"optim.name={cfg.name!r}: known optimizers are 'adamw'")
    lr = cfg.lr * batch_size / 256.0 if cfg.scale_lr_by_batch else cfg.lr
    sched = schedule(lr, steps, cfg.warmup_steps, cfg.min_lr_ratio)
    parts = []
    if cfg.clip_norm:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts), sched
