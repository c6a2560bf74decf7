"""Affinity conventions, affinities from labels, and boundary maps from affinities.

An affinity volume is channel-first `[c, z, y, x]` (2D: `[c, y, x]`); channel `c` belongs to an
offset `o_c` (z, y, x) and holds the probability that voxel `v` and voxel `v + o_c` lie in the same
object. Offsets are usually negative (each voxel looks back), e.g. `DEFAULT_OFFSETS`: the three
nearest neighbours, then long-range offsets of 3 sections and 9 pixels. Where `v + o_c` falls
outside the volume the affinity is undefined (`affinity_mask` is False there; the value is 0).
On disk (zarr) the channel axis is last (`z y x c`, see emfm.data.volume); the blockwise reader
(emfm.instances.reader.volume_reader) moves it first.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from emfm.errors import UserError

DEFAULT_OFFSETS = ((-1, 0, 0), (0, -1, 0), (0, 0, -1), (-3, 0, 0), (0, -9, 0), (0, 0, -9))


def check_offsets(offsets: Sequence[Sequence[int]], ndim: int) -> np.ndarray:
    """Offsets as an int array `[c, ndim]`; a ValueError names a malformed one."""
    out = []
    for o in offsets:
        o = tuple(int(v) for v in o)
        if len(o) != ndim or not any(o):
            raise UserError(f"affinity offset {list(o)}: give {ndim} integers, not all 0")
        out.append(o)
    if not out:
        raise UserError("affinities need at least one offset")
    return np.asarray(out, np.int64).reshape(len(out), ndim)


def is_nearest(offset: Sequence[int]) -> bool:
    """A nearest-neighbour (attractive, in mutex watershed) offset: one axis, distance 1."""
    return int(np.abs(np.asarray(offset)).sum()) == 1


def offset_slices(
    shape: Sequence[int], offset: Sequence[int]
) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """(src, dst) slices with `dst` voxel = `src` voxel + offset, both inside `shape`."""
    src, dst = [], []
    for n, o in zip(shape, offset):
        o = int(o)
        src.append(slice(max(0, -o), max(max(0, -o), n - max(0, o))))
        dst.append(slice(max(0, o), max(max(0, o), n - max(0, -o))))
    return tuple(src), tuple(dst)


def affinity_mask(shape: Sequence[int], offsets) -> np.ndarray:
    """bool `[c, *shape]`: True where `v + offset` lies inside the volume."""
    offsets = check_offsets(offsets, len(shape))
    mask = np.zeros((len(offsets), *shape), bool)
    for c, o in enumerate(offsets):
        mask[c][offset_slices(shape, o)[0]] = True
    return mask


def affinities_from_labels(
    labels: np.ndarray, offsets=DEFAULT_OFFSETS, *, background: int | None = 0
) -> np.ndarray:
    """float32 `[c, *labels.shape]`: 1 where `labels[v] == labels[v + o_c]`, else 0.

    Voxels labelled `background` (boundary / unassigned) have affinity 0 to everything, so they
    separate objects; `background=None` treats 0 as an ordinary label. Out-of-volume edges are 0.
    """
    labels = np.asarray(labels)
    offsets = check_offsets(offsets, labels.ndim)
    affs = np.zeros((len(offsets), *labels.shape), np.float32)
    for c, o in enumerate(offsets):
        src, dst = offset_slices(labels.shape, o)
        a, b = labels[src], labels[dst]
        same = a == b
        if background is not None:
            same &= a != background
        affs[c][src] = same
    return affs


def boundaries_from_labels(
    labels: np.ndarray, *, background: int | None = 0, axes: Sequence[int] | None = None
) -> np.ndarray:
    """float32 boundary map of a label volume: 1 on `background` voxels and on both voxels of each
    face between two different labels, 0 inside objects. `axes` limits the faces considered, e.g.
    (1, 2) for in-plane boundaries of each section (what a 2D network predicts)."""
    labels = np.asarray(labels)
    out = np.zeros(labels.shape, bool) if background is None else labels == background
    for d in range(labels.ndim) if axes is None else axes:
        o = tuple(1 if a == d else 0 for a in range(labels.ndim))
        src, dst = offset_slices(labels.shape, o)
        cut = labels[src] != labels[dst]
        out[src] |= cut
        out[dst] |= cut
    return out.astype(np.float32)


def boundaries_from_affinities(
    affs: np.ndarray, offsets, *, mask: np.ndarray | None = None
) -> np.ndarray:
    """float32 boundary probability per voxel from the nearest-neighbour channels of `affs`: the
    largest cut probability `1 - a` of the nearest-neighbour edges touching the voxel (edges with
    `mask` False, e.g. out of the volume, are left out)."""
    affs = np.asarray(affs, np.float32)
    offsets = check_offsets(offsets, affs.ndim - 1)
    shape = affs.shape[1:]
    nn = [c for c, o in enumerate(offsets) if is_nearest(o)]
    if not nn:
        raise UserError(
            f"offsets {offsets.tolist()} hold no nearest-neighbour offset to derive boundaries from"
        )
    if mask is None:
        mask = affinity_mask(shape, offsets)
    out = np.zeros(shape, np.float32)
    for c in nn:
        cut = np.where(mask[c], 1.0 - affs[c], 0.0)
        src, dst = offset_slices(shape, offsets[c])
        np.maximum(out, cut, out=out)  # the voxel v that holds the edge
        np.maximum(out[dst], cut[src], out=out[dst])  # its partner v + o
    return out
