"""Does choosing the watershed parameters on held-out validation sections (not the probe's own
training sections) change the region-score comparison? Saves all maps for offline study."""
import sys, time, json
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
    la = probe.train_linear_probe(f[:15], y[:15].astype(np.int32), steps=300, lr=0.05, seed=0, upsample="subpixel")
    lb = probe.train_linear_probe(f[:20], y[:20].astype(np.int32), steps=300, lr=0.05, seed=0, upsample="subpixel")
    res[f"{name}_A_val"] = la.predict(f[15:20], y.shape[1:])[..., 1].astype(np.float16)
    res[f"{name}_A_te"] = la.predict(f[20:], y.shape[1:])[..., 1].astype(np.float16)
    res[f"{name}_B_tr"] = lb.predict(f[:20], y.shape[1:])[..., 1].astype(np.float16)
    res[f"{name}_B_te"] = lb.predict(f[20:], y.shape[1:])[..., 1].astype(np.float16)
    print(name, "F1 B", round(metrics.binary_scores(res[f"{name}_B_te"] >= 0.5, y[20:])["f1"], 4), f"{time.time()-t0:.0f}s", flush=True)
np.savez_compressed(out, y=y, **res)
