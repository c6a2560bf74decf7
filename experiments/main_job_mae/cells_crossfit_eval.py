import sys

import numpy as np

from emfm.eval.cells import cell_scores, tune_cells

d = np.load(sys.argv[1])
m = np.load(sys.argv[2])
y = m["y"]
grid = dict(thresholds=[0.3, 0.4, 0.5], min_seeds=[16, 64, 256], sigmas=[0.0, 1.0])
if len(sys.argv) > 3:
    grid = dict(
        thresholds=[0.2, 0.3, 0.4, 0.5, 0.6], min_seeds=[16, 64, 256], sigmas=[0.0, 1.0, 2.0]
    )
for n in ["pre", "rnd0", "rnd1", "rnd2"]:
    c = tune_cells(d[f"{n}_oof"].astype(np.float32), y[:20], **grid)
    s = cell_scores(m[f"{n}_B_te"].astype(np.float32), y[20:], **c)
    print(
        n,
        f"cross-fit: ARE {s['adapted_rand_error']:.3f} VOI {s['voi']:.3f} "
        f"({s['voi_split']:.2f}+{s['voi_merge']:.2f})",
        c,
        flush=True,
    )
