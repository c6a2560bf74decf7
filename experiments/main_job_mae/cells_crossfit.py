"""Cross-fitted choice of the cells' parameters: out-of-fold probe maps of the 20 training sections
(4 folds of 5 sections), parameters chosen on them, scored on the held-out sections 20-29."""

import sys
import time

import numpy as np
from study_features import load

from emfm.eval.linear_probe import train_linear_probe

ckpt, which, out = sys.argv[1], sys.argv[2], sys.argv[3]
x, y, features = load(ckpt)
res = {}
for name in which.split(","):
    t0 = time.time()
    f = features(name)
    t1 = time.time()
    oof = np.zeros((20,) + y.shape[1:], np.float16)
    for k in range(4):
        tr = np.array([i for i in range(20) if i // 5 != k])
        va = np.arange(5 * k, 5 * k + 5)
        lp = train_linear_probe(
            f[tr], y[tr].astype(np.int32), steps=300, lr=0.05, seed=0, upsample="subpixel"
        )
        oof[va] = lp.predict(f[va], y.shape[1:])[..., 1]
    t2 = time.time()
    res[f"{name}_oof"] = oof
    print(name, f"encode {t1 - t0:.0f}s 4 folds {t2 - t1:.0f}s", flush=True)
np.savez_compressed(out, **res)
