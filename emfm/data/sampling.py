"""Where the patches of a batch come from: regions of volumes, their grey-value ranges, and random
patch origins as a pure function of `(seed, step, process_index)` (emfm.data.loader reads them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from emfm.data.volume import Volume, VolumeError


@dataclass(frozen=True)
class Region:
    """A volume restricted to a box `[[z0, z1], [y0, y1], [x0, x1]]`."""

    volume: Volume
    box: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, volume: Volume, roi: Sequence[Sequence[int]] | None = None) -> Region:
        shape = volume.spatial_shape
        if len(shape) == 2:
            raise VolumeError(f"volume {volume.path} is 2D {shape}; store it as z, y, x with z = 1")
        if roi is None:
            return cls(volume, tuple((0, s) for s in shape))
        if len(roi) != 3 or any(len(r) != 2 for r in roi):
            raise VolumeError(
                f"roi {roi} for volume {volume.path}: give [[z0, z1], [y0, y1], [x0, x1]]"
            )
        box = tuple((int(a), int(b)) for a, b in roi)
        for (a, b), s, ax in zip(box, shape, "zyx"):
            if not 0 <= a < b <= s:
                raise VolumeError(
                    f"roi {roi} lies outside volume {volume.path} of shape {shape} (axis {ax})"
                )
        return cls(volume, box)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in self.box)


def estimate_range(
    region: Region, *, samples: int = 64, seed: int = 0, mask: Volume | None = None
) -> tuple[float, float]:
    """Robust grey-value range (0.5 and 99.5 percentiles) from a few random crops; with a `mask`
    (the volume's shape, or dividing it by an integer per axis) only voxels inside it count, so
    padding or resin outside the tissue does not widen the range."""
    rng = np.random.default_rng(seed)
    crop = [min(s, c) for s, c in zip(region.shape, (1, 128, 128))]
    boxes = []
    for _ in range(samples):
        o = [
            a + int(rng.integers(0, s - c + 1))
            for (a, _), s, c in zip(region.box, region.shape, crop)
        ]
        boxes.append(tuple(slice(x, x + c) for x, c in zip(o, crop)))
    futures = [region.volume.read_async(b) for b in boxes]
    crops = [region.volume.result(f, b) for f, b in zip(futures, boxes)]
    vals = np.concatenate([c.ravel() for c in crops]).astype(np.float32)
    vs = region.volume.spatial_shape
    if mask is not None and (
        len(mask.spatial_shape) != len(vs)
        or any(a < b or a % b for a, b in zip(vs, mask.spatial_shape))
    ):
        mask = None  # the loader names the mismatch
    if mask is not None:
        inside = np.concatenate([_mask_of(mask, region.volume, b).ravel() for b in boxes])
        if inside.any():
            vals = vals[inside]
    lo, hi = np.percentile(vals, [0.5, 99.5])
    if hi <= lo:
        raise VolumeError(
            f"volume {region.volume.path}: constant grey values ({lo}) in the sampled region"
        )
    return float(lo), float(hi)


def _mask_of(mask: Volume, volume: Volume, box: tuple[slice, ...]) -> np.ndarray:
    """`mask > 0` over `box` of `volume`, the mask read at its own (integer-divided) scale."""
    f = [a // b for a, b in zip(volume.spatial_shape, mask.spatial_shape)]
    mbox = tuple(slice(s.start // k, -(-s.stop // k)) for s, k in zip(box, f))
    m = np.asarray(mask.read(mbox)) > 0
    for ax, k in enumerate(f):
        m = np.repeat(m, k, axis=ax) if k > 1 else m
    off = [s.start - ms.start * k for s, ms, k in zip(box, mbox, f)]
    return m[tuple(slice(o, o + s.stop - s.start) for o, s in zip(off, box))]


def grey_range_for(region: Region, trained: Sequence[float] | None) -> tuple[float, float]:
    """The grey range that maps `region`'s volume to [0, 1] for a model trained with `trained`
    (the checkpoint's range): that range, as the model saw its data, unless less than half of the
    volume's own range (estimate_range) lies inside it, as for 16-bit or float EM under a
    checkpoint of 8-bit data; then the volume's own range, logged, since the checkpoint's would
    clip most voxels to black or white. None: the volume's own range."""
    import logging

    if trained is None:
        return estimate_range(region)
    lo, hi = (float(v) for v in trained)
    vlo, vhi = estimate_range(region)
    inside = max(0.0, min(hi, vhi) - max(lo, vlo)) / (vhi - vlo)
    if inside >= 0.5:
        return lo, hi
    logging.getLogger("emfm").warning(
        "volume %s: grey values %.4g-%.4g (0.5-99.5 percentiles), of which %.0f %% lie inside the "
        "checkpoint's range %.4g-%.4g: normalised by its own range instead",
        region.volume.path,
        vlo,
        vhi,
        100 * inside,
        lo,
        hi,
    )
    return vlo, vhi


def normalise_into(arr: np.ndarray, lo: float, hi: float, out: np.ndarray) -> np.ndarray:
    """`clip((arr - lo) / (hi - lo), 0, 1)` written into the float32 array `out` in place: one
    cast-and-subtract pass and two in-place passes, no temporaries (about 8x faster than the
    expression on 32x128x128 uint8 patches)."""
    np.subtract(arr, np.float32(lo), out=out, dtype=np.float32, casting="unsafe")
    out *= np.float32(1.0 / (hi - lo))
    np.clip(out, 0.0, 1.0, out=out)
    return out


class PatchSampler:
    """Random patch origins as a pure function of `(seed, step)`.

    The global batch of a step (`batch_size * process_count` patches) is drawn identically on every
    JAX process, and process `i` takes its own disjoint slice `[i * batch_size, (i + 1) *
    batch_size)`, so a run on 2 processes sees exactly the global batches of a run on 1 process.
    """

    def __init__(
        self,
        regions: Sequence[Region],
        patch_shape: Sequence[int],
        batch_size: int,
        *,
        weights: Sequence[float] | None = None,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
    ):
        self.regions = list(regions)
        self.patch = tuple(int(p) for p in patch_shape)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.process_index = int(process_index)
        self.process_count = int(process_count)
        if not 0 <= self.process_index < self.process_count:
            raise VolumeError(f"process_index {process_index} outside [0, {process_count})")
        w = np.ones(len(self.regions)) if weights is None else np.asarray(weights, float)
        if len(w) != len(self.regions) or (w < 0).any() or w.sum() <= 0:
            raise VolumeError(
                f"mixture weights {list(w)} must be {len(self.regions)} non-negative numbers with "
                "a positive sum"
            )
        self.p = w / w.sum()
        for r in self.regions:
            if any(p > s for p, s in zip(self.patch, r.shape)):
                raise VolumeError(
                    f"patch shape {self.patch} is larger than volume {r.volume.path} "
                    f"(region shape {r.shape})"
                )

    def global_index(self, i: int) -> int:
        """Position in the global batch of this process's `i`-th patch."""
        return self.process_index * self.batch_size + int(i)

    def origins(self, step: int) -> list[tuple[int, tuple[int, ...]]]:
        allp = self._draw(
            np.random.default_rng([self.seed, int(step)]), self.batch_size * self.process_count
        )
        lo = self.process_index * self.batch_size
        return allp[lo : lo + self.batch_size]

    def redraw(
        self, step: int, attempt: int, local_indices: Sequence[int]
    ) -> list[tuple[int, tuple[int, ...]]]:
        """Replacement origins for the rejected patches `local_indices` of batch `step` (attempt 1,
        2, ...); each a pure function of `(seed, step, attempt, its global index)`."""
        return [
            self._draw(
                np.random.default_rng(
                    [self.seed, int(step), 2, int(attempt), self.global_index(i)]
                ),
                1,
            )[0]
            for i in local_indices
        ]

    def _draw(self, rng: np.random.Generator, n: int) -> list[tuple[int, tuple[int, ...]]]:
        which = rng.choice(len(self.regions), size=n, p=self.p)
        out = []
        for v in which:
            r = self.regions[v]
            o = tuple(
                a + int(rng.integers(0, s - p + 1))
                for (a, _), s, p in zip(r.box, r.shape, self.patch)
            )
            out.append((int(v), o))
        return out
