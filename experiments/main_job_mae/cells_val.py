# Study (experiments/main_job_mae/README.md): pretrained vs random cells, chosen on training-fit
# maps, on validation sections, or on the test sections (oracle).
import sys

import numpy as np

from emfm.eval.cells import cell_scores, tune_cells

d = np.load(sys.argv[1])
y = d["y"]
grid = dict(thresholds=[0.3, 0.4, 0.5], min_seeds=[16, 64, 256], sigmas=[0.0, 1.0])
if len(sys.argv) > 2:
    grid = dict(
        thresholds=[0.2, 0.3, 0.4, 0.5, 0.6], min_seeds=[16, 64, 256], sigmas=[0.0, 1.0, 2.0]
    )
names = sorted({k.split("_")[0] for k in d.files if k != "y"})
for n in names:
    te = d[f"{n}_B_te"].astype(np.float32)
    row = [n]
    for how, maps, gt in [
        ("trainfit", d[f"{n}_B_tr"], y[:20]),
        ("val", d[f"{n}_A_val"], y[15:20]),
        ("oracle", te, y[20:]),
    ]:
        c = tune_cells(maps.astype(np.float32), gt, **grid)
        s = cell_scores(te, y[20:], **c)
        row.append(
            f"{how}: ARE {s['adapted_rand_error']:.3f} VOI {s['voi']:.3f} "
            f"({s['voi_split']:.2f}+{s['voi_merge']:.2f}) "
            f"{c['threshold']},{c['min_seed']},{c['sigma']}"
        )
    print(" | ".join(row), flush=True)
