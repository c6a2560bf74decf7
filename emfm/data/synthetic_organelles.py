"""Organelles of a synthetic EM image: ellipsoids placed wholly inside one cell, off membranes.

Candidates are drawn from one global random stream in a fixed order, so the organelles do not
depend on how the volume is later rendered (see emfm.data.synthetic).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from emfm.data.synthetic_scene import ORGANELLES, SceneParams


@dataclass(frozen=True, eq=False)
class Organelle:
    lo: tuple[int, ...]  # corner of the bounding box, in pixels
    mask: np.ndarray  # bool, the bounding box
    rim: np.ndarray  # bool, mask pixels with a face neighbour outside the organelle


def _ellipsoid(center, radii, rot, spacing, shape) -> tuple[np.ndarray, np.ndarray]:
    """Pixels whose centres lie in the ellipsoid with semi-axes `radii` along `rot`'s columns."""
    sp = np.asarray(spacing)
    half = np.sqrt((rot**2) @ (radii**2))  # exact half extent of the rotated ellipsoid per axis
    lo = np.maximum(np.ceil((center - half) / sp), 0).astype(int)
    hi = np.minimum(np.floor((center + half) / sp) + 1, shape).astype(int)
    if np.any(hi <= lo):
        return lo, np.zeros((0,) * len(shape), bool)
    axes = [np.arange(a, b) * s - c for a, b, s, c in zip(lo, hi, sp, center)]
    local = np.stack(np.meshgrid(*axes, indexing="ij"), -1) @ rot
    return lo, np.sum((local / radii) ** 2, axis=-1) <= 1.0


def _rotation(rng: np.random.Generator, ndim: int) -> np.ndarray:
    """A uniformly random rotation; its columns are the ellipsoid's axes."""
    if ndim == 2:
        a = rng.uniform(0, 2 * np.pi)
        return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    w, x, y, z = (q := rng.standard_normal(4)) / np.linalg.norm(q)  # unit quaternion
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


Lookup = Callable[[tuple[slice, ...]], tuple[np.ndarray, np.ndarray]]


def place_organelles(p: SceneParams, lookup: Lookup) -> list[Organelle]:
    """Draw up to `p.n_organelles` ellipsoids; keep those wholly inside one cell, off membranes.

    `lookup(region)` returns (cells, membranes) on a region; candidates are drawn from one global
    stream in a fixed order, so the result does not depend on how the volume is later rendered.
    Bounding spheres kept a diagonal step apart mean no two organelles touch.
    """
    rng = np.random.default_rng([p.seed, ORGANELLES])
    sp = np.asarray(p.spacing)
    upper = (np.asarray(p.shape) - 1) * sp
    gap = 1.01 * float(np.linalg.norm(sp))
    face = ndimage.generate_binary_structure(p.ndim, 1)
    placed: list[Organelle] = []
    centers, reach = np.empty((0, p.ndim)), np.empty(0)
    for _ in range(20 * p.n_organelles):
        if len(placed) == p.n_organelles:
            break
        # draw every number every time so one rejection does not shift the others
        center = rng.random(p.ndim) * upper
        minor = rng.uniform(*p.organelle_radius)
        elongation, flatten = rng.uniform(1.3, 2.4), rng.uniform(0.75, 1.0)
        rot = _rotation(rng, p.ndim)
        radii = minor * np.array([elongation, 1.0, flatten][: p.ndim])
        if np.any(np.linalg.norm(centers - center, axis=1) < reach + radii.max() + gap):
            continue
        lo, mask = _ellipsoid(center, radii, rot, sp, p.shape)
        if mask.sum() < 4:
            continue
        cells, membranes = lookup(tuple(slice(a, a + n) for a, n in zip(lo, mask.shape)))
        inside = cells[mask]
        if inside.min() != inside.max() or membranes[mask].any():
            continue
        if ndimage.label(mask, face)[1] != 1:  # a thin, tilted ellipsoid can fall apart on the grid
            continue
        rim = mask & ~ndimage.binary_erosion(np.pad(mask, 1), face)[(slice(1, -1),) * p.ndim]
        placed.append(Organelle(tuple(int(a) for a in lo), mask, rim))
        centers = np.vstack([centers, center])
        reach = np.append(reach, radii.max())
    return placed


def paint(organelles: Sequence[Organelle], region: tuple[slice, ...]):
    """Organelle ids and rim flags on a region."""
    shape = tuple(sl.stop - sl.start for sl in region)
    ids, rim = np.zeros(shape, np.uint32), np.zeros(shape, bool)
    for k, o in enumerate(organelles, start=1):
        src, dst = [], []
        for a, n, sl in zip(o.lo, o.mask.shape, region):
            start, stop = max(a, sl.start), min(a + n, sl.stop)
            if start >= stop:
                break
            src.append(slice(start - a, stop - a))
            dst.append(slice(start - sl.start, stop - sl.start))
        else:
            m = o.mask[tuple(src)]
            ids[tuple(dst)][m] = k
            rim[tuple(dst)] |= o.rim[tuple(src)]
    return ids, rim
