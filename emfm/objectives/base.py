"""What an objective is: how it wraps an encoder into a pretraining model, and its pure loss."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp


@dataclass(frozen=True)
class ObjectiveDef:
    """An entry of the objective registry (emfm.objectives.OBJECTIVES).

    build(encoder, cfg, rngs) -> nnx.Module: the pretraining model; it must expose the encoder as
        `.encoder` (what is kept, probed and fine-tuned afterwards).
    loss(model, batch, rng, cfg, teacher) -> (loss, metrics): pure; `batch["image"]` is the
        channel-last model input `[b, y, x, c]` / `[b, z, y, x, c]`, plus `batch["image2"]` (a
        second augmented view of the same patches) when `views == 2`; `teacher` is the EMA copy of
        the model (same structure) when `teacher` is True, else None. Non-parameter state (e.g.
        DINO's centre, an `nnx.Variable` that is not an `nnx.Param`) may be updated in place on
        `model`.
    views: 1 or 2 augmented views per patch.
    teacher: keep an exponential moving average of the parameters (momentum from
        `cfg.ema_momentum`, raised to 1 on a cosine schedule) as part of the training state.
    """

    name: str
    build: Callable[..., Any]
    loss: Callable[..., tuple[jax.Array, dict]]
    views: int = 1
    teacher: bool = False


def ema_momentum(base: float, step, total_steps: int):
    """Cosine schedule from `base` at step 0 to 1 at the last step (BYOL, DINO, MoCo v3)."""
    frac = jnp.clip(step / max(total_steps, 1), 0.0, 1.0)
    return 1.0 - (1.0 - base) * (jnp.cos(jnp.pi * frac) + 1.0) / 2.0
