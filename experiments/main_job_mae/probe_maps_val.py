"""Does choosing the watershed parameters on held-out validation sections (not the probe's own
training sections) change the region-score comparison? Saves all maps for offline study."""

import sys
import time

import numpy as np
from study_features import load

from emfm.eval import metrics
from emfm.eval.linear_probe import train_linear_probe

ckpt, which, out = sys.argv[1], sys.argv[2], sys.argv[3]
x, y, features = load(ckpt)
res = {}
for name in which.split(","):
    t0 = time.time()
    f = features(name)
    la = train_linear_probe(
        f[:15], y[:15].astype(np.int32), steps=300, lr=0.05, seed=0, upsample="subpixel"
    )
    lb = train_linear_probe(
        f[:20], y[:20].astype(np.int32), steps=300, lr=0.05, seed=0, upsample="subpixel"
    )
    res[f"{name}_A_val"] = la.predict(f[15:20], y.shape[1:])[..., 1].astype(np.float16)
    res[f"{name}_A_te"] = la.predict(f[20:], y.shape[1:])[..., 1].astype(np.float16)
    res[f"{name}_B_tr"] = lb.predict(f[:20], y.shape[1:])[..., 1].astype(np.float16)
    res[f"{name}_B_te"] = lb.predict(f[20:], y.shape[1:])[..., 1].astype(np.float16)
    print(
        name,
        "F1 B",
        round(metrics.binary_scores(res[f"{name}_B_te"] >= 0.5, y[20:])["f1"], 4),
        f"{time.time() - t0:.0f}s",
        flush=True,
    )
np.savez_compressed(out, y=y, **res)
