"""The augmentation ops on patch batches `[b, z, y, x]` (numpy), each seeded by a generator.

Geometric ops move labels with images: in-plane flips and 90-degree rotations, elastic deformation
(images linear, labels nearest, one field). Image-only ops: grey values (brightness, contrast,
gamma, Gaussian noise), Gaussian blur, and serial-section artefacts of z-stacks (missing,
duplicated, misaligned, dark / bright sections). emfm.data.augment composes them.
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


def intensity(
    rng: np.random.Generator,
    x: np.ndarray,
    *,
    brightness: float = 0.1,
    contrast: float = 0.2,
    gamma: float = 0.2,
    noise: float = 0.03,
) -> np.ndarray:
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


def _gaussian_kernels(sigma: np.ndarray, radius: int) -> np.ndarray:
    """`[b, 2r+1]` normalised 1D Gaussians; sigma 0 gives a delta."""
    t = np.arange(-radius, radius + 1, dtype=np.float32)
    s = np.maximum(sigma, 1e-6)[:, None].astype(np.float32)
    k = np.exp(-0.5 * (t / s) ** 2)
    return k / k.sum(axis=1, keepdims=True)


def _conv1d(x: np.ndarray, k: np.ndarray, axis: int) -> np.ndarray:
    """Per-example 1D convolution of `[b, z, y, x]` along `axis` (2 or 3), reflect-padded."""
    r = k.shape[1] // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (r, r)
    win = np.lib.stride_tricks.sliding_window_view(
        np.pad(x, pad, mode="reflect"), k.shape[1], axis=axis
    )
    return np.einsum("bzyxk,bk->bzyx", win, k, optimize=True)


def gaussian_blur(
    rng: np.random.Generator,
    x: np.ndarray,
    *,
    sigma: tuple[float, float] = (0.0, 1.5),
    p: float = 0.5,
) -> np.ndarray:
    """In-plane Gaussian blur of `[b, z, y, x]` images, sigma ~ U(sigma) for a fraction p of
    examples."""
    b = x.shape[0]
    s = np.where(rng.random(b) < p, rng.uniform(*sigma, b), 0.0)
    if not s.any():
        return x.astype(np.float32, copy=True)
    radius = max(1, min(int(np.ceil(3 * s.max())), (min(x.shape[-2:]) - 1)))
    k = _gaussian_kernels(s, radius)
    return _conv1d(_conv1d(x.astype(np.float32), k, 2), k, 3).astype(np.float32)


def _smooth_field(
    rng: np.random.Generator, b: int, h: int, w: int, grid: int, strength: float
) -> np.ndarray:
    """`[b, 2, h, w]` displacements in pixels: a `grid x grid` random lattice, bilinearly
    upsampled."""
    coarse = rng.normal(0.0, strength, (b, 2, grid, grid)).astype(np.float32)
    gy, gx = np.linspace(0, grid - 1, h), np.linspace(0, grid - 1, w)
    y0, x0 = np.minimum(gy.astype(int), grid - 2), np.minimum(gx.astype(int), grid - 2)
    wy, wx = (gy - y0)[:, None], (gx - x0)[None, :]
    c = lambda dy, dx: coarse[:, :, (y0 + dy)[:, None], (x0 + dx)[None, :]]  # noqa: E731
    return (
        (1 - wy) * (1 - wx) * c(0, 0)
        + (1 - wy) * wx * c(0, 1)
        + wy * (1 - wx) * c(1, 0)
        + wy * wx * c(1, 1)
    ).astype(np.float32)


def elastic(
    rng: np.random.Generator,
    *arrays: np.ndarray,
    strength: float = 3.0,
    grid: int = 4,
    p: float = 0.5,
) -> tuple[np.ndarray, ...]:
    """Smooth in-plane elastic deformation of `[b, z, y, x]` arrays, one field per example shared by
    all arrays and all sections: float arrays are interpolated linearly, integer (label) arrays by
    nearest neighbour, so ids are never mixed."""
    b, z, h, w = arrays[0].shape
    field = (
        _smooth_field(rng, b, h, w, max(2, grid), strength)
        * (rng.random(b) < p)[:, None, None, None]
    )
    yy = np.clip(np.arange(h, dtype=np.float32)[None, :, None] + field[:, 0], 0, h - 1)  # [b, h, w]
    xx = np.clip(np.arange(w, dtype=np.float32)[None, None, :] + field[:, 1], 0, w - 1)
    bi = np.arange(b)[:, None, None, None]
    zi = np.arange(z)[None, :, None, None]
    out = []
    for a in arrays:
        if np.issubdtype(a.dtype, np.floating):
            y0 = np.minimum(np.floor(yy).astype(int), h - 2 if h > 1 else 0)
            x0 = np.minimum(np.floor(xx).astype(int), w - 2 if w > 1 else 0)
            fy, fx = (yy - y0)[:, None], (xx - x0)[:, None]
            y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)

            def g(ya, xa, a=a):
                return a[bi, zi, ya[:, None], xa[:, None]]

            r = (
                (1 - fy) * (1 - fx) * g(y0, x0)
                + (1 - fy) * fx * g(y0, x1)
                + fy * (1 - fx) * g(y1, x0)
                + fy * fx * g(y1, x1)
            )
            out.append(r.astype(a.dtype))
        else:
            out.append(
                a[bi, zi, np.rint(yy).astype(int)[:, None], np.rint(xx).astype(int)[:, None]]
            )
    return tuple(out)


def sections(
    rng: np.random.Generator,
    x: np.ndarray,
    *,
    p_missing: float = 0.02,
    p_duplicate: float = 0.02,
    p_shift: float = 0.05,
    max_shift: int = 8,
    p_contrast: float = 0.05,
    contrast: float = 0.3,
) -> np.ndarray:
    """Serial-section artefacts of `[b, z, y, x]` images in [0, 1], drawn independently per section:
    missing sections (zeros), duplicated sections (a copy of the one before), misaligned sections
    (an in-plane shift, edges repeated) and dark / bright sections. Images only: labels stay where
    the tissue is, which is what a network should learn to recover."""
    b, z, h, w = x.shape
    y = x.astype(np.float32, copy=True)
    shape = (b, z)
    dup = (rng.random(shape) < p_duplicate) & (np.arange(z) > 0)
    src = np.where(dup, np.arange(z) - 1, np.arange(z))
    y = np.take_along_axis(y, src[:, :, None, None], axis=1)
    shift = (
        rng.integers(-max_shift, max_shift + 1, (b, z, 2))
        * (rng.random(shape) < p_shift)[..., None]
    )
    if shift.any():
        yi = np.clip(np.arange(h)[None, None, :] - shift[..., 0:1], 0, h - 1)  # [b, z, h]
        xi = np.clip(np.arange(w)[None, None, :] - shift[..., 1:2], 0, w - 1)
        y = y[
            np.arange(b)[:, None, None, None],
            np.arange(z)[None, :, None, None],
            yi[..., :, None],
            xi[..., None, :],
        ]
    gain = np.where(
        rng.random(shape) < p_contrast, 1.0 + rng.uniform(-contrast, contrast, shape), 1.0
    )
    y = np.clip(y * gain[..., None, None].astype(np.float32), 0.0, 1.0)
    y[rng.random(shape) < p_missing] = 0.0
    return y
