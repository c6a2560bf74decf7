"""Window geometry shared by every windowed pass over a volume: feature encoding
(emfm.export.encode), feature export and segmentation prediction (emfm.finetune.predict).

A window is read with mirrored voxels where it runs past the volume (`read_window`); batches are
padded to one fixed shape (`pad_batch`) so a jitted forward compiles once. Blended passes put
windows on one global grid (stride = window - overlap, the last window of an axis flush with the
end) and weight each with a ramp that tapers over the overlap (`Blender`: cosine = sin^2 ramps that
sum to 1 where two windows meet; gaussian; constant), so every voxel is the same weighted mean
whatever the output chunking.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np

from emfm.errors import UserError

FLOOR = 1e-4  # smallest blend weight: voxels at the volume edge are covered by one window's rim


def window_region(
    lo: Sequence[int], size: Sequence[int], shape: Sequence[int]
) -> tuple[tuple[slice, ...], list[tuple[int, int]]]:
    """The part of the window `[lo, lo + size)` (may start before 0 or end past `shape`) that lies
    inside an array of `shape`, and the padding `(before, after)` per axis that completes it."""
    hi = [a + w for a, w in zip(lo, size)]
    region = tuple(slice(max(0, a), min(s, h)) for a, h, s in zip(lo, hi, shape))
    return region, [(max(0, -a), max(0, h - s)) for a, h, s in zip(lo, hi, shape)]


def pad_window(a: np.ndarray, pad) -> np.ndarray:
    """Mirror padding: "reflect" (edge voxel not repeated) where every axis is longer than its
    padding, else "symmetric"."""
    if not any(p0 or p1 for p0, p1 in pad):
        return a
    mode = "reflect" if all(n > max(p) for n, p in zip(a.shape, pad)) else "symmetric"
    return np.pad(a, pad, mode=mode)


def read_window(read: Callable, shape: Sequence[int], lo: Sequence[int], size) -> np.ndarray:
    """The window `[lo, lo + size)` of an array of `shape`, mirrored where it runs past its ends;
    `read(region)` returns the voxels of a region (tuple of slices)."""
    region, pad = window_region(lo, size, shape)
    return pad_window(read(region), pad)


def pad_batch(x: np.ndarray, batch_size: int) -> np.ndarray:
    """`x` `[n, ...]` completed with zeros to `batch_size` entries (one compiled shape)."""
    if len(x) >= batch_size:
        return x
    return np.concatenate([x, np.zeros((batch_size - len(x),) + x.shape[1:], x.dtype)])


def block_origins(shape: Sequence[int], block: Sequence[int]) -> list[tuple[int, int, int]]:
    """Origins of the blocks that tile a region of `shape` (z, y, x), in raster order."""
    return [
        (z, y, x)
        for z in range(0, shape[0], block[0])
        for y in range(0, shape[1], block[1])
        for x in range(0, shape[2], block[2])
    ]


def ramp(n: int, overlap: int, kind: str) -> np.ndarray:
    """1D blend weights of a window of `n` voxels."""
    t = np.arange(n, dtype=np.float64)
    if kind == "constant" or n == 1:
        w = np.ones(n)
    elif kind == "cosine":
        w = np.ones(n)
        if overlap > 0:
            r = np.sin(0.5 * np.pi * (np.arange(overlap) + 0.5) / overlap) ** 2
            w[:overlap] = r
            w[n - overlap :] = r[::-1]
    elif kind == "gaussian":
        w = np.exp(-0.5 * ((t - (n - 1) / 2) / (n / 4)) ** 2)
    else:
        raise UserError(f"blend {kind!r}: use cosine, gaussian or constant")
    return np.maximum(w, FLOOR).astype(np.float32)


def blend_weights(window: Sequence[int], overlap: Sequence[int], kind: str) -> np.ndarray:
    ws = [ramp(n, o, kind) for n, o in zip(window, overlap)]
    return ws[0][:, None, None] * ws[1][None, :, None] * ws[2][None, None, :]


def starts(n: int, w: int, stride: int) -> list[int]:
    """Window origins along an axis of `n` voxels: every `stride`, the last flush with the end."""
    if n <= w:
        return [0]
    s = list(range(0, n - w + 1, stride))
    if s[-1] != n - w:
        s.append(n - w)
    return s


class Blender:
    """Blockwise prediction of a region `shape` (z, y, x) with `fn(windows [b, *window]) -> [b,
    *window, c]`."""

    def __init__(
        self,
        fn: Callable | None,
        channels: int,
        shape: Sequence[int],
        *,
        window: Sequence[int],
        overlap: Sequence[int],
        blend: str = "cosine",
        batch_size: int = 4,
    ):
        self.fn, self.c, self.shape = fn, channels, tuple(int(s) for s in shape)
        self.window, self.overlap = tuple(window), tuple(overlap)
        self.batch_size = batch_size
        self.weight = blend_weights(window, overlap, blend)
        self.grid = [starts(n, w, w - o) for n, w, o in zip(self.shape, window, overlap)]

    def windows_touching(self, box: Sequence[slice]) -> list[tuple[int, ...]]:
        per_axis = [
            [s for s in g if s < b.stop and s + w > b.start]
            for g, b, w in zip(self.grid, box, self.window)
        ]
        return list(itertools.product(*per_axis))

    def chunk(self, read: Callable, box: Sequence[slice]) -> np.ndarray:
        """Blended prediction `[*box shape, c]` of the output box, from the windows that touch
        it."""
        size = tuple(b.stop - b.start for b in box)
        acc = np.zeros(size + (self.c,), np.float32)
        wsum = np.zeros(size, np.float32)
        origins = self.windows_touching(box)
        for i in range(0, len(origins), self.batch_size):
            part = origins[i : i + self.batch_size]
            x = np.stack([read_window(read, self.shape, o, self.window) for o in part])
            for o, p in zip(part, self.fn(x)):
                self.add(acc, wsum, box, o, p)
        return acc / wsum[..., None]

    def add(
        self,
        acc: np.ndarray,
        wsum: np.ndarray,
        box: Sequence[slice],
        origin: Sequence[int],
        pred: np.ndarray,
    ) -> None:
        """Add the window at `origin`'s prediction `[*window, c]`, weighted, to the accumulators
        `acc` `[*box shape, c]` and `wsum` `[*box shape]` of the output box (the blend is acc /
        wsum)."""
        src, dst = [], []
        for oa, w, n, b in zip(origin, self.window, self.shape, box):
            # overlap of window [o, o + w) (clipped to the region) with the box
            lo, hi = max(oa, b.start), min(oa + w, n, b.stop)
            src.append(slice(lo - oa, hi - oa))
            dst.append(slice(lo - b.start, hi - b.start))
        wt = self.weight[tuple(src)]
        acc[tuple(dst)] += pred[tuple(src)] * wt[..., None]
        wsum[tuple(dst)] += wt

    def chunks(self, chunk: Sequence[int]) -> list[tuple[slice, ...]]:
        ranges = [range(0, n, c) for n, c in zip(self.shape, chunk)]
        return [
            tuple(slice(a, min(a + c, n)) for a, c, n in zip(o, chunk, self.shape))
            for o in itertools.product(*ranges)
        ]
