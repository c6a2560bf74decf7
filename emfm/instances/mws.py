"""Mutex watershed (Wolf et al. 2018, TPAMI 2020) on affinities, through the `mwatershed` package.

Nearest-neighbour channels are attractive edges of weight `a`, long-range channels repulsive edges
of weight `1 - a`; all edges are visited once in descending weight: an attractive edge joins its
two clusters unless a mutex (repulsive edge) lies between them, a repulsive edge adds a mutex
unless they are already joined. `mwatershed` takes one signed array (positive = attractive,
negative = repulsive, processed by magnitude), which is what `signed_weights` builds.
"""

from __future__ import annotations

import numpy as np
from skimage.segmentation import relabel_sequential

from emfm.errors import UserError
from emfm.instances.affinities import check_offsets, is_nearest

# keep every weight's sign: a zero attractive affinity still joins if nothing forbids it
_EPS = 1e-6


def signed_weights(affs: np.ndarray, offsets) -> np.ndarray:
    """float64 `[c, ...]`: `a` on nearest-neighbour channels, `-(1 - a)` on long-range ones."""
    affs = np.clip(np.asarray(affs, np.float64), 0.0, 1.0)
    offsets = check_offsets(offsets, affs.ndim - 1)
    if len(offsets) != affs.shape[0]:
        raise UserError(
            f"affinity volume has {affs.shape[0]} channels but {len(offsets)} offsets are given"
        )
    out = np.empty_like(affs)
    for c, o in enumerate(offsets):
        out[c] = np.maximum(affs[c], _EPS) if is_nearest(o) else -np.maximum(1.0 - affs[c], _EPS)
    return out


def mutex_watershed(affs: np.ndarray, offsets, *, repulsive_stride: int = 1) -> np.ndarray:
    """Segment affinities `[c, z, y, x]` (or `[c, y, x]`); uint64 labels 1..N.

    `repulsive_stride` > 1 keeps only every stride-th long-range edge along each axis (fewer
    mutexes: less over-segmentation from noisy long-range affinities, and faster)."""
    import mwatershed

    offsets = check_offsets(offsets, np.ndim(affs) - 1)
    if not any(is_nearest(o) for o in offsets):
        raise UserError(f"mutex watershed needs nearest-neighbour offsets; got {offsets.tolist()}")
    w = signed_weights(affs, offsets)
    nd = offsets.shape[1]
    strides = [[1] * nd if is_nearest(o) else [repulsive_stride] * nd for o in offsets]
    lab = mwatershed.agglom(w, offsets.tolist(), strides=strides if repulsive_stride > 1 else None)
    return relabel_sequential(np.asarray(lab).astype(np.uint64))[0]
