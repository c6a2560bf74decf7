"""Study (experiments/main_job_mae/README.md): watershed parameters chosen on the training
sections (by adapted Rand error) for each probability map saved by probe_maps.py (probe seed 0),
scored on the held-out sections, against the fixed 0.5 / 16 post-processing."""

import itertools
import sys

import numpy as np
from scipy import ndimage

from emfm.data import bundled
from emfm.data.volume import open_volume
from emfm.eval import metrics
from emfm.eval.cells import cells_from_membranes, gt_cells
from emfm.pipeline import read_sections

lab = open_volume(bundled.sample_membranes())
y_tr, y_te = read_sections(lab, (0, 20)) == 1, read_sections(lab, (20, 30)) == 1
d = np.load(sys.argv[1])


def region(p, y, th, ms, sg):
    out = []
    for k in range(len(p)):
        pk = ndimage.gaussian_filter(p[k].astype(np.float32), sg) if sg else p[k].astype(np.float32)
        s = metrics.region_scores(
            cells_from_membranes(pk, threshold=th, min_seed=ms),
            gt_cells(y[k]),
            ignore_gt=(0,),
        )
        out.append((s["adapted_rand_error"], s["voi"]))
    return np.mean(out, axis=0)


grid = list(itertools.product([0.2, 0.3, 0.4, 0.5], [16, 64, 256], [0, 1.0, 2.0]))
names = [n for n in sorted({k.rsplit("_", 1)[0] for k in d.files}) if n.endswith("_0")]
for n in names:
    ptr, pte = d[n + "_tr"][::2], d[n + "_te"]
    sc = {g: region(ptr, y_tr[::2], *g) for g in grid}
    best = min(grid, key=lambda g: sc[g][0])
    bs0 = min([g for g in grid if g[2] == 0], key=lambda g: sc[g][0])
    t = region(pte, y_te, *best)
    t0 = region(pte, y_te, *bs0)
    f = region(pte, y_te, 0.5, 16, 0)
    print(
        n,
        "fixed",
        f.round(4),
        "tuned(no smooth)",
        bs0,
        t0.round(4),
        "tuned",
        best,
        t.round(4),
        flush=True,
    )
