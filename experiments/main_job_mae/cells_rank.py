"""Study (experiments/main_job_mae/README.md). Rank-based seeds: each section's seed threshold is
the q-quantile of its own (smoothed) membrane map (watershed flooding is already rank-invariant), so
a calibration shift between sections does not move the seeds."""

import sys

import numpy as np
from scipy import ndimage

from emfm.eval import metrics
from emfm.eval.cells import cells_from_membranes, gt_cells
from emfm.instances.tune import grid_search

m = np.load(sys.argv[1])
y = m["y"]
grid = {"q": [0.3, 0.4, 0.5, 0.6, 0.7], "min_seed": [16, 64, 256], "sigma": [0.0, 1.0]}


def one(p, q, min_seed, sigma):
    p = ndimage.gaussian_filter(p, sigma) if sigma > 0 else p
    return cells_from_membranes(p, threshold=float(np.quantile(p, q)), min_seed=min_seed)


def cells(maps, **c):
    return np.stack([one(p, **c) for p in maps])


gt_tr = np.stack([gt_cells(s) for s in y[:20]])
gt_te = np.stack([gt_cells(s) for s in y[20:]])
for n in ["pre", "rnd0", "rnd1", "rnd2"]:
    tr = m[f"{n}_B_tr"].astype(np.float32)
    te = m[f"{n}_B_te"].astype(np.float32)
    best, _ = grid_search(
        lambda c, tr=tr: cells(tr, **c),
        gt_tr,
        grid,
        "adapted_rand_error",
        per_section=True,
        ignore_gt=(0,),
    )
    seg = cells(te, **best)
    per = [metrics.region_scores(seg[i], gt_te[i], ignore_gt=(0,)) for i in range(len(te))]
    s = {
        k: float(np.mean([r[k] for r in per]))
        for k in ("adapted_rand_error", "voi", "voi_split", "voi_merge")
    }
    print(
        n,
        best,
        f"ARE {s['adapted_rand_error']:.3f} VOI {s['voi']:.3f} "
        f"({s['voi_split']:.3f} + {s['voi_merge']:.3f})",
        flush=True,
    )
