"""Seam check of exported feature arrays: mean feature change between neighbouring cells across
block boundaries over the same within blocks (1.0 = boundaries look like anywhere else), and the
worst phase: the same ratio for every position modulo the block (a blended export has no hard
boundary, but a tile-periodic pattern would show up at some phase).

    python experiments/feature_export/seams.py RUN_DIR/features.zarr [MORE.zarr ...]
"""

import json
import sys

import numpy as np

from emfm.data.volume import open_volume


def phase_profile(f: np.ndarray, cells: int, axis: int) -> np.ndarray:
    """Mean |f[i + 1] - f[i]| (over channels and the other axes) by phase (i + 1) mod cells; phase 0
    is the step across a block boundary."""
    d = np.moveaxis(np.abs(np.diff(f, axis=axis)).mean(-1), axis, 0)
    phase = (np.arange(d.shape[0]) + 1) % cells
    return np.array([d[phase == p].mean() for p in range(cells)])


def ratios(prof: np.ndarray) -> tuple[float, float]:
    """(block-boundary ratio, worst-phase ratio): a phase's mean step over the mean of the other
    phases."""
    r = [prof[p] / np.delete(prof, p).mean() for p in range(len(prof))]
    return float(r[0]), float(max(r))


def seam_report(path: str) -> dict:
    vol = open_volume(path)
    f = vol.read().astype(np.float32)
    cy, cx = vol.chunks[1:3]
    ry, wy = ratios(phase_profile(f, cy, 1))
    rx, wx = ratios(phase_profile(f, cx, 2))
    return {
        "features": path,
        "shape": list(f.shape),
        "block_cells": [cy, cx],
        "blend": vol.attributes.get("export", {}).get("blend", "none"),
        "seam_ratio_y": ry,
        "seam_ratio_x": rx,
        "worst_phase_y": wy,
        "worst_phase_x": wx,
    }


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(json.dumps(seam_report(p)))
