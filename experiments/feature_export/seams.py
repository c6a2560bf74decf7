"""Seam check of an exported feature array: mean feature change between neighbouring cells across block
boundaries over the same within blocks (1.0 = boundaries look like anywhere else).

    python experiments/feature_export/seams.py RUN_DIR/features.zarr
"""
import json
import sys

import numpy as np

from emfm.data.volume import open_volume


def seam_ratio(f: np.ndarray, cells: int, axis: int) -> float:
    d = np.abs(np.diff(f, axis=axis)).mean(-1)  # change between cell i and i+1
    d = np.moveaxis(d, axis, 0)
    across = (np.arange(d.shape[0]) + 1) % cells == 0
    return float(d[across].mean() / d[~across].mean())


if __name__ == "__main__":
    vol = open_volume(sys.argv[1])
    f = vol.read().astype(np.float32)
    cy, cx = vol.chunks[1:3]
    print(json.dumps({"features": sys.argv[1], "shape": list(f.shape), "block_cells": [cy, cx],
                      "seam_ratio_y": seam_ratio(f, cy, 1), "seam_ratio_x": seam_ratio(f, cx, 2)}))
