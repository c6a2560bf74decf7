"""The block geometry of blockwise instance segmentation (emfm.instances.blockwise): a regular
grid of core boxes, each grown by a halo of context, and the halo slabs a block shares with its
face neighbours' cores.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from emfm.errors import UserError

Box = tuple[slice, ...]


def block_grid(shape: Sequence[int], block: Sequence[int]) -> list[Box]:
    """Core boxes of a regular grid over `shape` (last blocks clipped), in C order."""
    if len(block) != len(shape) or any(b <= 0 for b in block):
        raise UserError(f"block={list(block)}: give {len(shape)} positive sizes (z, y, x)")
    ranges = [[slice(s, min(s + b, n)) for s in range(0, n, b)] for n, b in zip(shape, block)]
    return [tuple(r) for r in itertools.product(*ranges)]


def grow(box: Box, halo: Sequence[int], shape: Sequence[int]) -> Box:
    """`box` with `halo` more on every side, clipped to `shape`."""
    return tuple(
        slice(max(0, s.start - h), min(n, s.stop + h)) for s, h, n in zip(box, halo, shape)
    )


def rel(inner: Box, outer: Box) -> Box:
    """`inner` in the coordinates of `outer`."""
    return tuple(slice(i.start - o.start, i.stop - o.start) for i, o in zip(inner, outer))


def halo_slabs(core: Box, ext: Box) -> list[tuple[int, int, Box]]:
    """(axis, side, box) of the inner half of the parts of `ext` beyond `core` along one axis
    (the half next to the core, where this block still had context), within the core's extent
    along the others: each lies inside the face neighbour's core."""
    out = []
    for d in range(len(core)):
        w_lo = -(-(core[d].start - ext[d].start) // 2)
        w_hi = -(-(ext[d].stop - core[d].stop) // 2)
        for side, (a, b) in (
            (-1, (core[d].start - w_lo, core[d].start)),
            (1, (core[d].stop, core[d].stop + w_hi)),
        ):
            if b > a:
                out.append((d, side, core[:d] + (slice(a, b),) + core[d + 1 :]))
    return out


def box_key(box: Box) -> list[list[int]]:
    return [[s.start, s.stop] for s in box]
