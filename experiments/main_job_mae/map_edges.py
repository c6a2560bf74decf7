# Study (experiments/main_job_mae/README.md): mean |step| of the probe maps across 32-px tile seams
# and 8-px token edges.
import sys

import numpy as np

d = np.load(sys.argv[1])
for n in ["pre", "rnd0", "rnd1", "rnd2"]:
    p = d[f"{n}_B_te"].astype(np.float32)
    dy = np.abs(np.diff(p, axis=1)).mean(axis=(0, 2))
    dx = np.abs(np.diff(p, axis=2)).mean(axis=(0, 1))
    # diff index i is between row i and i+1; tile boundary at rows 32k -> index 32k-1; token
    # boundary (8) elsewhere
    idx = np.arange(len(dy))
    tb = (idx % 32) == 31
    kb = ((idx % 8) == 7) & ~tb
    print(
        n,
        f"tile-seam/token-edge dy {dy[tb].mean() / dy[kb].mean():.3f} "
        f"dx {dx[tb].mean() / dx[kb].mean():.3f}",
        "token-edge/inner %.3f" % (dy[kb].mean() / dy[~tb & ~kb].mean()),
    )
