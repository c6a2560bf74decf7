"""Deterministic, resumable streams of random patches from tensorstore volumes.

The origins of batch `step` are a pure function of `(seed, step, process_index)`, so a resumed run
sees the same batches, and JAX processes draw disjoint streams. All patches of a batch are read with
asynchronous tensorstore reads issued together, and a background thread keeps `prefetch` batches
ready ahead of the training step. Arrays are `[b, z, y, x]` float32, normalised to [0, 1] by the
volume's estimated grey-value range.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from emfm.data import augment
from emfm.data.volume import Volume, VolumeError


@dataclass(frozen=True)
class Region:
    """A volume restricted to a box `[[z0, z1], [y0, y1], [x0, x1]]`."""

    volume: Volume
    box: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, volume: Volume, roi: Sequence[Sequence[int]] | None = None) -> "Region":
        shape = volume.spatial_shape
        if len(shape) == 2:
            raise VolumeError(f"volume {volume.path} is 2D {shape}; store it as z, y, x with z = 1")
        if roi is None:
            return cls(volume, tuple((0, s) for s in shape))
        if len(roi) != 3 or any(len(r) != 2 for r in roi):
            raise VolumeError(f"roi {roi} for volume {volume.path}: give [[z0, z1], [y0, y1], [x0, x1]]")
        box = tuple((int(a), int(b)) for a, b in roi)
        for (a, b), s, ax in zip(box, shape, "zyx"):
            if not 0 <= a < b <= s:
                raise VolumeError(f"roi {roi} lies outside volume {volume.path} of shape {shape} (axis {ax})")
        return cls(volume, box)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in self.box)


def estimate_range(region: Region, *, samples: int = 64, seed: int = 0) -> tuple[float, float]:
    """Robust grey-value range (0.5 and 99.5 percentiles) from a few random crops."""
    rng = np.random.default_rng(seed)
    crop = [min(s, c) for s, c in zip(region.shape, (1, 128, 128))]
    futures = []
    for _ in range(samples):
        o = [a + int(rng.integers(0, s - c + 1)) for (a, _), s, c in zip(region.box, region.shape, crop)]
        futures.append(region.volume.read_async(tuple(slice(x, x + c) for x, c in zip(o, crop))))
    vals = np.concatenate([np.asarray(f.result()).ravel() for f in futures]).astype(np.float32)
    lo, hi = np.percentile(vals, [0.5, 99.5])
    if hi <= lo:
        raise VolumeError(f"volume {region.volume.path}: constant grey values ({lo}) in the sampled region")
    return float(lo), float(hi)


class PatchSampler:
    """Random patch origins as a pure function of `(seed, step, process_index)`."""

    def __init__(self, regions: Sequence[Region], patch_shape: Sequence[int], batch_size: int, *,
                 weights: Sequence[float] | None = None, seed: int = 0, process_index: int = 0):
        self.regions = list(regions)
        self.patch = tuple(int(p) for p in patch_shape)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.process_index = int(process_index)
        w = np.ones(len(self.regions)) if weights is None else np.asarray(weights, float)
        if len(w) != len(self.regions) or (w < 0).any() or w.sum() <= 0:
            raise VolumeError(f"mixture weights {list(w)} must be {len(self.regions)} non-negative numbers with a positive sum")
        self.p = w / w.sum()
        for r in self.regions:
            if any(p > s for p, s in zip(self.patch, r.shape)):
                raise VolumeError(f"patch shape {self.patch} is larger than volume {r.volume.path} "
                                  f"(region shape {r.shape})")

    def origins(self, step: int) -> list[tuple[int, tuple[int, ...]]]:
        rng = np.random.default_rng([self.seed, int(step), self.process_index])
        which = rng.choice(len(self.regions), size=self.batch_size, p=self.p)
        out = []
        for v in which:
            r = self.regions[v]
            o = tuple(a + int(rng.integers(0, s - p + 1)) for (a, _), s, p in zip(r.box, r.shape, self.patch))
            out.append((int(v), o))
        return out


class PatchLoader:
    """Iterator of `{"image": float32 [b, z, y, x]}` batches, prefetched in a background thread.

    `state()` / `start_step` make it resumable: the batch after a restore is the one that would
    have come next.
    """

    def __init__(self, sampler: PatchSampler, ranges: Sequence[tuple[float, float]], *, augment_batches: bool = True,
                 prefetch: int = 4, start_step: int = 0):
        self.sampler = sampler
        self.ranges = list(ranges)
        self.augment = augment_batches
        self.step = int(start_step)
        self.wait_s = 0.0  # time the consumer spent blocked on data
        self._q: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(self.step,), daemon=True)
        self._thread.start()

    def state(self) -> dict:
        return {"step": self.step, "seed": self.sampler.seed}

    def load(self, step: int) -> dict:
        """The batch of a given step (deterministic; used by the thread and by tests)."""
        picks = self.sampler.origins(step)
        patch = self.sampler.patch
        futures = [self.sampler.regions[v].volume.read_async(tuple(slice(a, a + p) for a, p in zip(o, patch)))
                   for v, o in picks]
        out = np.empty((len(picks),) + patch, np.float32)
        for i, ((v, o), f) in enumerate(zip(picks, futures)):
            try:
                arr = np.asarray(f.result(), np.float32)
            except Exception as e:  # noqa: BLE001
                raise VolumeError(f"reading patch at {o} of volume {self.sampler.regions[v].volume.path} "
                                  f"failed: {e}") from e
            lo, hi = self.ranges[v]
            out[i] = np.clip((arr - lo) / (hi - lo), 0.0, 1.0)
        if self.augment:
            rng = np.random.default_rng([self.sampler.seed, int(step), self.sampler.process_index, 1])
            (out,) = augment.geometric(rng, out)
            out = augment.intensity(rng, out)
        return {"image": out}

    def _fill(self, step: int) -> None:
        try:
            while not self._stop.is_set():
                batch = self.load(step)
                while not self._stop.is_set():
                    try:
                        self._q.put((step, batch), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                step += 1
        except Exception as e:  # noqa: BLE001 - hand the error to the consumer
            self._q.put((step, e))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        import time

        t0 = time.perf_counter()
        step, batch = self._q.get()
        self.wait_s += time.perf_counter() - t0
        if isinstance(batch, Exception):
            raise batch
        assert step == self.step, (step, self.step)
        self.step += 1
        return batch

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
