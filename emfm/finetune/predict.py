"""`emfm predict`: a trained segmentation model over a volume of any size, block by block.

Windows of `window` voxels on one global grid (stride = window - overlap, the last window of an
axis flush with the end) are predicted and blended with a weight that tapers over the overlap
(cosine: sin^2 ramps that sum to 1 where two windows meet; gaussian; constant). The output is
produced per `chunk` (one zarr chunk each): a chunk gathers the windows that touch it, so every
voxel is the same weighted mean whatever the chunking (no seams at chunk borders), memory is one
chunk plus one batch of windows, and an interrupted run resumes by skipping chunks already stored.
Output: `[z, y, x, c]` zarr v3 (emfm's axis order) of probabilities (softmax classes, sigmoid
affinities / distance / heatmap; offsets in voxels), channel names and offsets in its attributes.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from emfm.data.volume import Volume, VolumeError, create_volume, written_chunks
from emfm.errors import UserError
from emfm.train import distributed
from emfm.train.logging import progress

log = logging.getLogger("emfm")

FLOOR = 1e-4  # smallest blend weight: voxels at the volume edge are covered by one window's rim


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


def _read_padded(
    read: Callable, shape: Sequence[int], origin: Sequence[int], window: Sequence[int]
) -> np.ndarray:
    """The window at `origin` of a region of `shape`, mirrored where it runs past the end."""
    box = tuple(slice(o, min(o + w, n)) for o, w, n in zip(origin, window, shape))
    a = read(box)
    pad = [(0, w - (b.stop - b.start)) for w, b in zip(window, box)]
    if any(p[1] for p in pad):
        mode = "reflect" if all(s > p[1] for s, p in zip(a.shape, pad)) else "symmetric"
        a = np.pad(a, pad, mode=mode)
    return a


class Blender:
    """Blockwise prediction of a region `shape` (z, y, x) with `fn(windows [b, *window]) -> [b,
    *window, c]`."""

    def __init__(
        self,
        fn: Callable,
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
            x = np.stack([_read_padded(read, self.shape, o, self.window) for o in part])
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


def model_fn(model, lay, *, ndim: int, batch_size: int) -> Callable:
    """Jitted `windows [b, z, y, x] in [0, 1] -> probabilities [b, z, y, x, c]` (padded to one batch
    shape)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from emfm.finetune.losses import probabilities

    graphdef, state = nnx.split(model)

    @jax.jit
    def fwd(st, x):
        m = nnx.merge(graphdef, st)
        inp = x[:, 0, ..., None] if ndim == 2 else x[..., None]
        p = probabilities(m(inp), lay)
        return p[:, None] if ndim == 2 else p

    def fn(x: np.ndarray) -> np.ndarray:
        n = len(x)
        if n < batch_size:
            x = np.concatenate([x, np.zeros((batch_size - n,) + x.shape[1:], x.dtype)])
        return np.asarray(fwd(state, jnp.asarray(x, jnp.float32)))[:n]

    return fn


def normaliser(grey_range) -> Callable:
    lo, hi = grey_range
    return lambda a: np.clip((a.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)


def predict_array(
    fn: Callable, channels: int, image: np.ndarray, *, window, overlap, blend="cosine", batch_size=4
) -> np.ndarray:
    """Blended prediction `[z, y, x, c]` of an in-memory normalised image `[z, y, x]`
    (evaluation)."""
    bl = Blender(
        fn,
        channels,
        image.shape,
        window=window,
        overlap=overlap,
        blend=blend,
        batch_size=batch_size,
    )
    return bl.chunk(lambda box: image[box], tuple(slice(0, n) for n in image.shape))


def predict_volume(
    fn: Callable,
    channels: int,
    vol: Volume,
    out_path: str | Path,
    *,
    grey_range,
    window,
    overlap,
    chunk,
    roi=None,
    blend: str = "cosine",
    batch_size: int = 4,
    dtype: str = "float16",
    resume: bool = True,
    attributes: dict | None = None,
    show_progress: bool = True,
    stop_after: int | None = None,
) -> dict:
    """Predict `vol` (or its `roi`) chunk by chunk into a zarr v3 `[z, y, x, c]` at `out_path`.

    `stop_after` ends after that many chunks (to simulate an interruption in tests)."""
    if vol.ndim != 3:
        raise VolumeError(f"volume {vol.path} has {vol.ndim} dimensions; predict expects z, y, x")
    box = [(0, s) for s in vol.shape] if roi is None else [tuple(int(v) for v in r) for r in roi]
    for (a, b), s, ax in zip(box, vol.shape, "zyx"):
        if not 0 <= a < b <= s:
            raise VolumeError(
                f"predict.roi {roi} lies outside volume {vol.path} of shape {vol.shape} (axis {ax})"
            )
    shape = tuple(b - a for a, b in box)
    chunk = tuple(min(c, n) for c, n in zip(chunk, shape))
    norm = normaliser(grey_range)
    origin = [a for a, _ in box]
    attrs = {
        "source": vol.path,
        "roi": [list(b) for b in box],
        "axes": "zyxc",
        "window": list(window),
        "overlap": list(overlap),
        "blend": blend,
        "grey_range": list(grey_range),
        **(attributes or {}),
    }
    pid, nproc = distributed.process()

    def make(ok):
        return create_volume(
            out_path,
            shape + (channels,),
            np.dtype(dtype),
            chunks=chunk + (channels,),
            voxel_size=vol.voxel_size,
            attributes=attrs,
            exist_ok=ok,
        )

    out = make(resume) if pid == 0 else None
    distributed.barrier("predict: output created")
    out = out if out is not None else make(True)
    bl = Blender(
        fn, channels, shape, window=window, overlap=overlap, blend=blend, batch_size=batch_size
    )

    def read(b):
        return norm(vol.read(tuple(slice(s.start + o, s.stop + o) for s, o in zip(b, origin))))

    done = written_chunks(out) if resume else set()
    todo = [
        b for b in bl.chunks(chunk) if tuple(s.start // c for s, c in zip(b, chunk)) not in done
    ]
    distributed.barrier("predict: chunks to do listed")  # before any process writes one
    n_all = len(todo)
    todo = todo[pid::nproc]  # several processes: each writes its own chunks (disjoint zarr chunks)
    bar = progress(
        len(todo), desc="predict" if nproc == 1 else f"predict {pid}/{nproc}", enabled=show_progress
    )
    t0 = time.perf_counter()
    voxels = 0
    for i, b in enumerate(todo):
        if stop_after is not None and i >= stop_after:
            break
        pred = bl.chunk(read, b)
        out.array[tuple(b) + (slice(None),)].write(pred.astype(dtype)).result()
        voxels += math.prod(s.stop - s.start for s in b)
        bar.update(1)
    bar.close()
    secs = time.perf_counter() - t0
    distributed.barrier("predict: all chunks written")
    return {
        "path": str(out_path),
        "shape": list(out.shape),
        "processes": nproc,
        "chunks_all": n_all,
        "chunks_written": min(len(todo), stop_after or len(todo)),
        "chunks_skipped": len(done),
        "seconds": secs,
        "voxels_per_s": voxels / secs if secs > 0 else None,
    }
