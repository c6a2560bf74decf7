"""The device half of the input pipeline: grey-value normalisation and grey-value augmentation,
run inside the jitted train step.

The loader (emfm.data.loader) hands over each image in the volume's native dtype (uint8 for most
EM), so the host thread never makes a float32 copy of a batch; beside image `NAME` it passes
`NAME_norm` `[b, 2]` (lo, scale: `clip((x - lo) * scale, 0, 1)`, the source's grey range), and
where those augmentations are on, `NAME_grey` `[b, 4]` (contrast, brightness, gamma, noise sigma,
drawn on the host by the example's seeded generator) and `NAME_seed` `[b]` (the example's noise
seed). `finish` turns such a batch into float32 images in one fused pass; on an accelerator the
transfer is 4x smaller too. It works on any image layout with the batch first (`[b, z, y, x]` or
channel-last model input).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

SUFFIXES = ("_norm", "_grey", "_seed")


def image(
    x: jax.Array, norm: jax.Array, grey: jax.Array | None = None, seed: jax.Array | None = None
) -> jax.Array:
    """One image entry: `[b, ...]` native dtype -> float32, normalised, grey values jittered
    (as emfm.data.augment.per_example: contrast about the example's mean, brightness, clip, gamma,
    additive Gaussian noise)."""
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    col = lambda a, j: a[:, j].astype(jnp.float32).reshape(shape)  # noqa: E731
    y = jnp.clip((x.astype(jnp.float32) - col(norm, 0)) * col(norm, 1), 0.0, 1.0)
    if grey is None:
        return y
    mean = y.mean(axis=tuple(range(1, y.ndim)), keepdims=True)
    y = jnp.clip((y - mean) * (1.0 + col(grey, 0)) + mean + col(grey, 1), 0.0, 1.0) ** jnp.exp(
        col(grey, 2)
    )
    if seed is not None:
        # drawn flat and reshaped: the same numbers, and XLA compiles a multi-dimensional draw
        # under vmap about 10x slower on CPU
        n = math.prod(x.shape[1:])
        noise = jax.vmap(lambda s: jax.random.normal(jax.random.key(s), (n,), jnp.float32))(seed)
        y = y + noise.reshape(x.shape) * col(grey, 3)
    return y


def finish(batch: dict) -> dict:
    """The batch the model sees: every image entry with a `_norm` companion made float32 and
    augmented (companions dropped); other entries (labels, targets) unchanged. Jittable."""
    out = {}
    for k, v in batch.items():
        if k.endswith(SUFFIXES) and k.rsplit("_", 1)[0] in batch:
            continue
        if f"{k}_norm" in batch:
            v = image(v, batch[f"{k}_norm"], batch.get(f"{k}_grey"), batch.get(f"{k}_seed"))
        out[k] = v
    return out


_finish_jit = jax.jit(finish)


def finish_host(batch: dict) -> dict:
    """`finish` on the default device, back as numpy (figures, tests, host consumers)."""
    import numpy as np

    return {k: np.asarray(v) for k, v in _finish_jit(batch).items()}
