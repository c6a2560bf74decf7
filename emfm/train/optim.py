"""Optimizers (optax): AdamW with linear warmup and cosine decay, weight-decay masks, gradient
clipping, gradient accumulation, layer-wise learning-rate decay and frozen parameter groups."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax

from emfm.errors import UserError

NO_DECAY_NAMES = ("cls_token", "registers", "mask_token", "pos_embed", "bias", "scale")


def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def path_str(path) -> str:
    return "/".join(n for n in _path_names(path) if n != "value")


def decay_mask(params):
    """True where weight decay applies: matrices only; never norms, biases, tokens or embeddings."""

    def keep(path, x):
        names = _path_names(path)
        return x.ndim >= 2 and not any(n in NO_DECAY_NAMES for n in names)

    return jax.tree_util.tree_map_with_path(keep, params)


def schedule(lr: float, steps: int, warmup: int, min_ratio: float = 0.0) -> optax.Schedule:
    warmup = min(warmup, max(steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup, max(steps, warmup + 1), end_value=lr * min_ratio
    )


def update_scales(params, *, layer_decay: float = 1.0, freeze: list[str] | tuple[str, ...] = ()):
    """Per-parameter multipliers of the update: 0 for paths matching a `freeze` regex; with
    `layer_decay` d < 1, layer i of the encoder's L gets d^(L - i), everything after them 1
    (BEiT / MAE fine-tuning). A ViT's layers are its blocks (the patch embedding and tokens get
    d^(L + 1); the final norm, heads and decoders 1). A U-Net's are its stages in the order the
    input passes them: the stem, the encoder levels, then the decoder levels from the coarsest
    (`up_proj` with its level); its final norm and the heads get 1."""
    pats = [re.compile(p) for p in freeze]
    paths = {}
    unet_depth = 0  # encoder levels of a U-Net (encoder/down/i); 0 for any other encoder

    def depth_of(names):
        if "blocks" in names and "encoder" in names[: names.index("blocks") + 1]:
            return int(names[names.index("blocks") + 1])
        if unet_depth and len(names) > 1 and names[0] == "encoder":
            part = names[1]
            if part == "stem":
                return 0
            if part == "down":
                return 1 + int(names[2])
            if part in ("up", "up_proj"):  # decoder level i runs after level i + 1
                return unet_depth + (unet_depth - 1 - int(names[2]))
        return None

    def collect(path, x):
        paths[path_str(path)] = _path_names(path)
        return x

    jax.tree_util.tree_map_with_path(collect, params)
    downs = [int(n[2]) for n in paths.values() if len(n) > 2 and n[:2] == ["encoder", "down"]]
    if downs and not any(n[:2] == ["encoder", "blocks"] for n in paths.values()):
        unet_depth = 1 + max(downs)
    n_blocks = 1 + max([d for n in paths.values() if (d := depth_of(n)) is not None], default=-1)

    def scale(path, x):
        s = path_str(path)
        if any(p.search(s) for p in pats):
            return 0.0
        if layer_decay == 1.0:
            return 1.0
        names = _path_names(path)
        d = depth_of(names)
        if d is not None:
            return layer_decay ** (n_blocks - d)
        if "encoder" in names and any(
            k in names for k in ("patch_embed", "cls_token", "registers")
        ):
            return layer_decay ** (n_blocks + 1)
        return 1.0

    return jax.tree_util.tree_map_with_path(scale, params)


def scale_by_tree(scales) -> optax.GradientTransformation:
    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, c: u * c, updates, scales), state

    return optax.GradientTransformation(init, update)


def hold_until(scales, steps: int) -> optax.GradientTransformation:
    """Multiply the updates by `scales` (a tree of 0 / 1 like update_scales gives) during the
    first `steps` updates, pass them unchanged afterwards: parameters held at the start of
    training (e.g. a pretrained encoder while a fresh head fits to it) that train from then on."""

    def init(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        del params
        hold = state.count < steps
        out = jax.tree.map(lambda u, c: jnp.where(hold, u * c, u), updates, scales)
        return out, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def build(
    cfg, *, steps: int, batch_size: int, params=None, hold: tuple[list[str], int] | None = None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """From an OptimConfig. With `scale_lr_by_batch`, lr = base lr * batch / 256 (MAE, Goyal et
    al.). `params` (or an abstract tree of them) is needed for layer decay and freezing, and for
    `hold = (regexes, n)`: the parameters whose paths match are held for the first n updates."""
    if cfg.name != "adamw":
        raise UserError(f"optim.name={cfg.name!r}: known optimizers are 'adamw'")
    lr = cfg.lr * batch_size / 256.0 if cfg.scale_lr_by_batch else cfg.lr
    # with accumulation the schedule counts optimizer updates, not micro-batches
    sched = schedule(lr, max(1, steps // cfg.accumulate_steps), cfg.warmup_steps, cfg.min_lr_ratio)
    parts = []
    if cfg.clip_norm:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(
        optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask)
    )
    if cfg.layer_decay != 1.0 or cfg.freeze:
        if params is None:
            raise UserError("optim.layer_decay / optim.freeze need the parameter tree")
        parts.append(
            scale_by_tree(update_scales(params, layer_decay=cfg.layer_decay, freeze=cfg.freeze))
        )
    if hold is not None and hold[1] > 0:
        if params is None:
            raise UserError("holding parameters at the start needs the parameter tree")
        parts.append(hold_until(update_scales(params, freeze=hold[0]), hold[1]))
    tx = optax.chain(*parts)
    if cfg.accumulate_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.accumulate_steps)
    return tx, sched
