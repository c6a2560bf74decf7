"""Seeded watershed on boundary maps: final segments, or over-segmented fragments for the graph.

`boundary` is a float map in [0, 1] (1 = membrane / boundary), `z y x` or `y x`. With
`two_d=True` each section is segmented on its own and ids are made unique over the volume.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.segmentation import relabel_sequential, watershed


def _per_section(fn, boundary: np.ndarray, two_d: bool) -> np.ndarray:
    """Apply `fn(volume) -> labels` to the whole volume, or per section with ids offset to stay
    unique."""
    if not two_d or boundary.ndim == 2:
        return fn(boundary)
    out = np.zeros(boundary.shape, np.uint64)
    nxt = 0
    for z in range(boundary.shape[0]):
        lab = fn(boundary[z]).astype(np.uint64)
        out[z] = np.where(lab > 0, lab + nxt, 0)
        nxt += int(lab.max())
    return out


def drop_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Set segments with fewer than `min_size` voxels to 0 (in place) and return the array."""
    if min_size > 1 and labels.max() > 0:
        sizes = np.bincount(labels.ravel())
        small = sizes < min_size
        small[0] = False
        labels[small[labels]] = 0
    return labels


def threshold_seeds(boundary: np.ndarray, threshold: float = 0.5, min_size: int = 16) -> np.ndarray:
    """Seeds = connected regions of confident interior (`boundary < threshold`) of at least
    `min_size` voxels (face connectivity), consecutively numbered."""
    seeds, _ = ndimage.label(boundary < threshold)
    return relabel_sequential(drop_small(seeds, min_size))[0]


def distance_seeds(
    boundary: np.ndarray,
    threshold: float = 0.5,
    sigma: float = 2.0,
    min_distance: float = 1.0,
    sampling=None,
) -> np.ndarray:
    """Seeds for over-segmentation (distance-transform watershed): the maxima of the smoothed
    distance to the nearest `boundary >= threshold` voxel, each plateau one seed."""
    dist = ndimage.distance_transform_edt(boundary < threshold, sampling=sampling).astype(
        np.float32
    )
    if sigma > 0:
        dist = ndimage.gaussian_filter(dist, sigma)
    peaks = (dist == ndimage.maximum_filter(dist, size=3)) & (dist >= min_distance)
    seeds, _ = ndimage.label(peaks)
    return seeds


def seeded_watershed(
    boundary: np.ndarray, seeds: np.ndarray, mask: np.ndarray | None = None
) -> np.ndarray:
    """Flood `boundary` from `seeds` (skimage watershed, face connectivity); uint64 labels. A map
    with no seed at all is one segment (no interior was found)."""
    if seeds.max() == 0:
        out = np.ones(boundary.shape, np.uint64)
        return out if mask is None else out * mask
    return watershed(boundary, seeds, mask=mask).astype(np.uint64)


def watershed_segmentation(
    boundary: np.ndarray, *, threshold: float = 0.5, min_seed: int = 16, two_d: bool = False
) -> np.ndarray:
    """Final segments: seeds from thresholded interior, grown over the boundary map."""
    boundary = np.asarray(boundary, np.float32)
    return _per_section(
        lambda b: seeded_watershed(b, threshold_seeds(b, threshold, min_seed)), boundary, two_d
    )


def fragments(
    boundary: np.ndarray,
    *,
    threshold: float = 0.5,
    sigma: float = 2.0,
    two_d: bool = False,
    min_size: int = 0,
) -> np.ndarray:
    """Over-segmentation (supervoxels) for the region adjacency graph: distance-transform seeds
    grown over the boundary map; fragments under `min_size` voxels are re-flooded by their
    neighbours. Consecutive ids 1..N."""
    boundary = np.asarray(boundary, np.float32)

    def one(b):
        lab = seeded_watershed(b, distance_seeds(b, threshold, sigma))
        if min_size > 1:
            lab = seeded_watershed(b, drop_small(lab, min_size))
        return lab

    return relabel_sequential(_per_section(one, boundary, two_d))[0].astype(np.uint64)
