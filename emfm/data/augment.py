"""Seeded, vectorised augmentation of patch batches `[b, z, y, x]` (numpy).

In-plane flips and 90-degree rotations (labels move with images), and grey-value changes
(brightness, contrast, gamma, Gaussian noise) that apply to images only.
"""
from __future__ import annotations

import numpy as np


def geometric(rng: np.random.Generator, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """The same random in-plane flip / rot90 for each example, applied to every array given."""
    b = arrays[0].shape[0]
    k = rng.integers(0, 4, b)
    if arrays[0].shape[-1] != arrays[0].shape[-2]:
        k = 2 * (k % 2)  # non-square patches keep their shape only under 0 / 180 degree turns
    fy = rng.random(b) < 0.5
    out = [a.copy() for a in arrays]
    for i in range(b):  # per-example ops on views; b is small and each op is a memory view
        for a in out:
            v = a[i]
            if fy[i]:
                v = v[..., ::-1, :]
            a[i] = np.rot90(v, k[i], axes=(-2, -1))
    return tuple(out)


def intensity(rng: np.random.Generator, x: np.ndarray, *, brightness: float = 0.1, contrast: float = 0.2,
              gamma: float = 0.2, noise: float = 0.03) -> np.ndarray:
    """Grey-value augmentation of float images in [0, 1]; per example."""
    b = x.shape[0]
    shape = (b,) + (1,) * (x.ndim - 1)
    c = 1.0 + rng.uniform(-contrast, contrast, shape)
    br = rng.uniform(-brightness, brightness, shape)
    g = np.exp(rng.uniform(-gamma, gamma, shape))
    mean = x.mean(axis=tuple(range(1, x.ndim)), keepdims=True)
    y = np.clip((x - mean) * c + mean + br, 0.0, 1.0) ** g
    if noise > 0:
        y = y + rng.normal(0.0, 1.0, x.shape).astype(np.float32) * rng.uniform(0, noise, shape)
    return y.astype(np.float32)
