"""How good predicted affinities are on the validation sections of the gala train volume, per
offset: binary cross-entropy against the label affinities (what the network is trained on) and the
F1 of the cut edges (affinity < 0.5 against different neurons or a boundary voxel). Used to choose
`predict.tta` on validation (the segmentation scores of ten sections take few distinct values).

    python experiments/instances/affinity_quality.py WORK_DIR --sections 40 50 \
        --probs train_probs.zarr train_probs_tta_dihedral.zarr [--out quality.json]

WORK_DIR is a `gala_route.sh` work directory (train_labels.zarr and the probabilities inside it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from emfm.data.volume import open_volume
from emfm.finetune.targets import affinities


def quality(labels: np.ndarray, probs: np.ndarray, offsets) -> dict:
    """Per offset {bce, cut_f1} over the edges inside `labels` `[z, y, x]` (label 0 = boundary:
    never the same neuron)."""
    aff, _ = affinities(labels[None], np.zeros((1, *labels.shape), bool), offsets, 3)
    out = {}
    for c, o in enumerate(offsets):
        inside = tuple(slice(max(0, -q), n - max(0, q)) for q, n in zip(o, labels.shape))
        y = aff[0][inside][..., c]
        p = np.clip(probs[inside][..., c].astype(np.float64), 1e-4, 1 - 1e-4)
        bce = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
        cut, pcut = y < 0.5, p < 0.5
        f1 = 2 * np.sum(cut & pcut) / max(1, cut.sum() + pcut.sum())
        out[str(list(o))] = {"bce": float(bce), "cut_f1": float(f1)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work_dir")
    ap.add_argument("--sections", type=int, nargs=2, default=[40, 50])
    ap.add_argument("--probs", nargs="+", default=["train_probs.zarr"])
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    w = Path(a.work_dir)
    z0, z1 = a.sections
    labels = open_volume(w / "train_labels.zarr").read()[z0:z1].astype(np.int64)
    res = {"sections": [z0, z1]}
    for name in a.probs:
        v = open_volume(w / name)
        q = quality(labels, v.read()[z0:z1], v.attributes["offsets"])
        res[name] = {
            "mean_bce": float(np.mean([x["bce"] for x in q.values()])),
            "mean_cut_f1": float(np.mean([x["cut_f1"] for x in q.values()])),
            "per_offset": q,
        }
        r = res[name]
        print(f"{name}: mean BCE {r['mean_bce']:.4f}, cut F1 {r['mean_cut_f1']:.4f}")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
