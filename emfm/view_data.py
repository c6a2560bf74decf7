"""The data `emfm view` serves (emfm.view), read on demand chunk by chunk: a lazy PCA RGB view of
feature volumes, display ranges of grey volumes, and tensorstore views in dtypes neuroglancer
serves.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorstore as ts

from emfm.data.volume import Volume
from emfm.errors import UserError
from emfm.view_plan import spatial_shape

PCA_SAMPLE_VOXELS = 200_000
NG_IMAGE_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")


class PCAProjection:
    """A lazy (z, y, x, 3) uint8 view of a (z, y, x, c) feature volume: the first three principal
    components, each scaled so its 1st..99th percentile over the fitting sample spans 0..255.
    Indexing reads only the requested region of the features (the way neuroglancer asks: one chunk
    at a time)."""

    def __init__(
        self, vol: Volume, mean: np.ndarray, components: np.ndarray, lo: np.ndarray, hi: np.ndarray
    ):
        self.volume = vol
        self.mean = np.asarray(mean, np.float32)
        self.components = np.asarray(components, np.float32)  # (3, c)
        self.lo = np.asarray(lo, np.float32)
        self.scale = np.float32(255.0) / np.maximum(
            np.asarray(hi, np.float32) - self.lo, np.float32(1e-6)
        )
        self.shape = spatial_shape(vol) + (3,)
        self.dtype = np.dtype(np.uint8)

    @property
    def ndim(self) -> int:
        return 4

    def project(self, feats: np.ndarray) -> np.ndarray:
        pcs = (feats.astype(np.float32) - self.mean) @ self.components.T
        return np.clip((pcs - self.lo) * self.scale, 0, 255).astype(np.uint8)

    def __getitem__(self, index: tuple) -> np.ndarray:
        index = tuple(index) + (slice(None),) * (4 - len(index))
        rgb = self.project(self.volume.read(tuple(index[:3]) + (slice(None),)))
        return rgb[..., index[3]]


def fit_pca(vol: Volume, *, n_voxels: int = PCA_SAMPLE_VOXELS, seed: int = 0) -> PCAProjection:
    """Fit the 3-component PCA of a (z, y, x, c) feature volume on voxels of randomly chosen chunks
    (about `n_voxels` in all, so the fit reads a bounded part of any volume)."""
    if vol.ndim != 4:
        raise UserError(
            f"volume {vol.path}: features need axes z, y, x, c; it has shape {vol.shape}"
        )
    rng = np.random.default_rng(seed)
    shape = vol.shape[:3]
    chunk = tuple(max(1, min(int(c), s)) for c, s in zip(vol.chunks[:3], shape))
    grid = [-(-s // c) for s, c in zip(shape, chunk)]
    n_chunks = int(np.prod(grid))
    per_chunk = int(np.prod(chunk))
    want = max(1, min(n_chunks, -(-n_voxels // per_chunk), 64))
    picks = rng.choice(n_chunks, size=want, replace=False)
    rows = []
    for flat in picks:
        idx = np.unravel_index(int(flat), grid)
        box = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(idx, chunk, shape)) + (
            slice(None),
        )
        x = vol.read(box).reshape(-1, vol.shape[3]).astype(np.float32)
        take = max(1, n_voxels // want)
        rows.append(x if len(x) <= take else x[rng.choice(len(x), size=take, replace=False)])
    x = np.concatenate(rows)
    x = x[np.isfinite(x).all(axis=1)]
    c = vol.shape[3]
    mean = x.mean(axis=0) if len(x) else np.zeros(c, np.float32)
    comps = np.zeros((3, c), np.float32)
    if len(x) > 1:
        cov = np.cov(x - mean, rowvar=False).reshape(c, c)
        w, v = np.linalg.eigh(cov)
        order = np.argsort(w)[::-1][: min(3, c)]
        comps[: len(order)] = v[:, order].T
        # a deterministic sign: the largest-magnitude loading of each component is positive
        signs = np.sign(comps[np.arange(3), np.abs(comps).argmax(axis=1)])
        comps *= np.where(signs == 0, 1, signs)[:, None]
    pcs = (x - mean) @ comps.T if len(x) else np.zeros((1, 3), np.float32)
    lo, hi = np.percentile(pcs, 1, axis=0), np.percentile(pcs, 99, axis=0)
    return PCAProjection(vol, mean, comps, lo, hi)


def sample_range(vol: Volume) -> tuple[float, float]:
    """A display range for a grey volume: the 0.5..99.5 percentiles of its central chunk (EM grey
    values seldom fill their dtype's range)."""
    box = tuple(
        slice(max(0, n // 2 - c // 2), min(n, max(0, n // 2 - c // 2) + max(c, 1)))
        for n, c in zip(vol.shape, vol.chunks)
    )
    x = vol.read(box).astype(np.float64)
    x = x[np.isfinite(x)]
    if not x.size:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(x, [0.5, 99.5]))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def as_zyx(arr: Any) -> Any:
    """A rank-2 (y, x) tensorstore as (1, y, x); anything else as it is."""
    return arr[ts.newaxis, ...] if arr.rank == 2 else arr


def image_source(arr: Any) -> Any:
    """A tensorstore view neuroglancer can serve as an image (float16 / bfloat16 / int64 cast to
    float32)."""
    return arr if arr.dtype.name in NG_IMAGE_DTYPES else ts.cast(arr, ts.float32)


def label_source(arr: Any, path: str) -> Any:
    """A tensorstore view neuroglancer can serve as segmentation: unsigned integers (signed ones as
    the unsigned type of the same width)."""
    name = arr.dtype.name
    if name.startswith("uint"):
        return arr
    if name.startswith("int"):
        return ts.cast(arr, getattr(ts, "u" + name))
    raise UserError(f"label volume {path} holds {name}; labels must be integers")
