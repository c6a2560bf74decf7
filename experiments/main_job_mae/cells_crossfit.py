"""Cross-fitted choice of the cells' parameters: out-of-fold probe maps of the 20 training sections
(4 folds of 5 sections), parameters chosen on them, scored on the held-out sections 20-29."""
import sys, time
import numpy as np
from emfm.data import bundled
from emfm.data.volume import open_volume
from emfm.data.loader import Region, estimate_range
from emfm.eval import probe, metrics
from emfm.export.features import encode_sections
from emfm.train.state import build_encoder, load_encoder
from emfm.config.schema import ModelConfig

ckpt, which, out = sys.argv[1], sys.argv[2], sys.argv[3]
img = open_volume(bundled.sample_raw()); lab = open_volume(bundled.sample_membranes())
x = probe.read_sections(img, (0, 30)); y = probe.read_sections(lab, (0, 30)) == 1
grey = estimate_range(Region.of(img, [[0, 20], [0, img.shape[1]], [0, img.shape[2]]]))
enc, meta = load_encoder(ckpt)
rng = tuple(meta.get("grey_range") or grey)
res = {}
for name in which.split(","):
    t0 = time.time()
    e = enc if name == "pre" else build_encoder(ModelConfig(**meta["model"]), seed=1000 + int(name[3:]))
    f = encode_sections(e, probe.normalise(x, rng), tile=32, margin=16, batch_size=8, embed=True)
    t1 = time.time()
    oof = np.zeros((20,) + y.shape[1:], np.float16)
    for k in range(4):
        tr = np.array([i for i in range(20) if i // 5 != k]); va = np.arange(5 * k, 5 * k + 5)
        lp = probe.train_linear_probe(f[tr], y[tr].astype(np.int32), steps=300, lr=0.05, seed=0, upsample="subpixel")
        oof[va] = lp.predict(f[va], y.shape[1:])[..., 1]
    t2 = time.time()
    res[f"{name}_oof"] = oof
    print(name, f"encode {t1-t0:.0f}s 4 folds {t2-t1:.0f}s", flush=True)
np.savez_compressed(out, **res)
