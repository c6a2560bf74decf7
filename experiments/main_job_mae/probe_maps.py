"""Study (experiments/main_job_mae/README.md). Probe a checkpoint (or random seeds) and save
probability maps for offline post-processing study."""

import sys

import numpy as np

from emfm.config.schema import ModelConfig
from emfm.data import bundled
from emfm.data.sampling import Region, estimate_range
from emfm.data.volume import open_volume
from emfm.eval import metrics
from emfm.eval.linear_probe import train_linear_probe
from emfm.export.encode import encode, normalise
from emfm.pipeline import read_sections
from emfm.train.state import build_encoder, load_encoder

ckpt, which, out = sys.argv[1], sys.argv[2], sys.argv[3]  # which: pre | rnd0,rnd1,...
tile = int(sys.argv[4]) if len(sys.argv) > 4 else 32
img = open_volume(bundled.sample_raw())
lab = open_volume(bundled.sample_membranes())
x_tr, x_te = read_sections(img, (0, 20)), read_sections(img, (20, 30))
y_tr, y_te = read_sections(lab, (0, 20)) == 1, read_sections(lab, (20, 30)) == 1
grey = estimate_range(Region.of(img, [[0, 20], [0, img.shape[1]], [0, img.shape[2]]]))
enc, meta = load_encoder(ckpt)
rng = tuple(meta.get("grey_range") or grey)
res = {}
for name in which.split(","):
    e = (
        enc
        if name == "pre"
        else build_encoder(ModelConfig(**meta["model"]), seed=1000 + int(name[3:]))
    )
    kw = dict(tile=tile, margin=tile // 2, batch_size=8, embed=True)
    f_tr = encode(e, normalise(x_tr, rng), **kw)
    f_te = encode(e, normalise(x_te, rng), **kw)
    for ps in [0, 1]:
        lp = train_linear_probe(
            f_tr, y_tr.astype(np.int32), steps=300, lr=0.05, seed=ps, upsample="subpixel"
        )
        res[f"{name}_{ps}_te"] = lp.predict(f_te, y_te.shape[1:])[..., 1].astype(np.float16)
        res[f"{name}_{ps}_tr"] = lp.predict(f_tr, y_tr.shape[1:])[..., 1].astype(np.float16)
        px = metrics.binary_scores(res[f"{name}_{ps}_te"] >= 0.5, y_te)
        print(name, ps, round(px["f1"], 4), flush=True)
np.savez_compressed(out, **res)
