"""Boundary probabilities of the gala FIB-SEM test volume from a linear probe on frozen ViT
features.

The probe is trained on the gala *train* volume (boundary = label 0) and predicts the separate test
volume; encoders: random init and a pretrained ViT checkpoint (CHECKPOINT, an `emfm main` or
`emfm pretrain` run directory). Writes OUT_DIR/{pretrained,random_init}.npy and probe.json, read by
run_gala.py.

    PYTHONPATH=. nice -n 10 python experiments/instances/predict_gala_probe.py OUT_DIR CHECKPOINT \
        [--gala ../shared/data/em/gala_fibsem]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import tifffile

from emfm.config.schema import ModelConfig
from emfm.eval.cells import membrane_scores
from emfm.eval.linear_probe import train_linear_probe
from emfm.export.encode import encode, normalise
from emfm.train.state import build_encoder, load_encoder


def main(out_dir: str, checkpoint: str, gala: str = "../shared/data/em/gala_fibsem") -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src = Path(gala)
    x_tr = tifffile.imread(src / "train_image.tif")
    y_tr = tifffile.imread(src / "train_labels.tif") == 0
    x_te = tifffile.imread(src / "test_image.tif")
    y_te = tifffile.imread(src / "test_labels.tif") == 0
    # gala's own range, for both encoders
    grey = tuple(float(v) for v in np.percentile(x_tr, [0.5, 99.5]))
    enc_pre, meta = load_encoder(checkpoint)
    encoders = {
        "pretrained": enc_pre,
        "random_init": build_encoder(ModelConfig(**meta["model"]), seed=1000),
    }
    record = {}
    for name, enc in encoders.items():
        t0 = time.perf_counter()
        f_tr = encode(enc, normalise(x_tr, grey), tile=128, margin=32)
        f_te = encode(enc, normalise(x_te, grey), tile=128, margin=32)
        lp = train_linear_probe(
            f_tr, y_tr.astype(np.int32), steps=300, lr=0.05, upsample="subpixel"
        )
        p = lp.predict(f_te, y_te.shape[1:])[..., 1].astype(np.float32)
        np.save(out / f"{name}.npy", p)
        s = membrane_scores(p, y_te)
        record[name] = {"boundary_f1": s["f1"], "seconds": time.perf_counter() - t0}
        print(name, record[name], flush=True)
    (out / "probe.json").write_text(
        json.dumps({"checkpoint": checkpoint, "grey_range": grey, **record}, indent=1)
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", help="where the probability maps and probe.json go")
    ap.add_argument("checkpoint", help="the pretrained run directory (ViT)")
    ap.add_argument("--gala", default="../shared/data/em/gala_fibsem", help="gala FIB-SEM data")
    a = ap.parse_args()
    main(a.out_dir, a.checkpoint, a.gala)
