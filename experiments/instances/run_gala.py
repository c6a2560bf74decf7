"""Instance segmentation of the gala FIB-SEM neuron test volume from boundary probabilities:
VOI split/merge and adapted Rand error (emfm.eval.metrics) for each route of emfm.instances.

Sources: predicted test probabilities SEG_OUTPUTS/gala_*/probabilities.zarr (`--seg-outputs`,
default runs/seg_outputs) when they exist (fine-tuned models), the linear-probe predictions of
predict_gala_probe.py in PROBS_DIR (random-init and MAE encoders), and the upper bound with
boundaries derived from the ground truth (label 0 and in-plane faces). ONLY keeps the sources whose
name contains it (e.g. `fine-tuned`).

    PYTHONPATH=. nice -n 10 python experiments/instances/run_gala.py PROBS_DIR OUT_JSON [ONLY] \
        [--seg-outputs runs/seg_outputs] [--gala ../shared/data/em/gala_fibsem]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time
from pathlib import Path

import numpy as np
import tifffile

from emfm.eval.metrics import region_scores
from emfm.instances import SegmentParams, affinities_from_labels, boundaries_from_labels, segment

ROUTES = {  # name: SegmentParams; all at the library defaults except what the name says
    "link2d (2D watershed, overlap/min >= 0.5)": SegmentParams(method="link2d"),
    "link2d (2D agglomeration, IoU >= 0.3, all voxels)": SegmentParams(
        method="link2d",
        link_2d="agglomeration",
        link_criterion="iou",
        link_threshold=0.3,
        link_on_interior=False,
    ),
    "watershed 3D": SegmentParams(method="watershed"),
    "agglomeration 3D (mean p < 0.5)": SegmentParams(method="agglomeration"),
    "multicut 3D (GAEC, beta 0.5)": SegmentParams(method="multicut"),
    "multicut 3D (GAEC, beta 0.4)": SegmentParams(method="multicut", beta=0.4),
}


def sources(probs_dir: str, gt: np.ndarray, outputs: str) -> dict:
    out = {"gt-derived boundaries (upper bound)": boundaries_from_labels(gt, axes=(1, 2))}
    from emfm.data.volume import open_volume

    for f in sorted(glob.glob(os.path.join(outputs, "gala_*", "probabilities.zarr"))):
        vol = open_volume(f)  # z y x c, channel names in the attributes (emfm predict)
        n_chunks = sum(1 for c in Path(f, "c").rglob("*") if c.is_file())
        if n_chunks < vol.shape[0]:
            print(f"skipping {f}: {n_chunks} of {vol.shape[0]} sections written", flush=True)
            continue
        k = list(vol.attributes.get("channels", [])).index("boundary")
        out[f"fine-tuned: {Path(f).parent.name}"] = vol.read()[..., k].astype(np.float32)
    for name in ("random_init", "pretrained"):
        f = Path(probs_dir) / f"{name}.npy"
        if f.exists():
            out[f"linear probe, {name}"] = np.load(f)
    return out


def main(
    probs_dir: str,
    out_json: str,
    only: str = "",
    seg_outputs: str = "runs/seg_outputs",
    gala: str = "../shared/data/em/gala_fibsem",
) -> None:
    gt = tifffile.imread(Path(gala) / "test_labels.tif")
    rows = []
    for src, b in sources(probs_dir, gt, seg_outputs).items():
        if only and only not in src:
            continue
        assert b.shape == gt.shape, (src, b.shape)
        for route, params in ROUTES.items():
            t0 = time.perf_counter()
            lab = segment(b, params)
            s = region_scores(lab, gt, ignore_gt=(0,))
            rows.append(
                {
                    "source": src,
                    "route": route,
                    "adapted_rand_error": s["adapted_rand_error"],
                    "voi_split": s["voi_split"],
                    "voi_merge": s["voi_merge"],
                    "segments": int(lab.max()),
                    "seconds": time.perf_counter() - t0,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    Path(out_json).write_text(json.dumps(rows, indent=1))
    if only:
        return
    a = affinities_from_labels(gt)  # mutex watershed needs affinities: gt-derived only
    t0 = time.perf_counter()
    lab = segment(a, SegmentParams(method="mws"))
    s = region_scores(lab, gt, ignore_gt=(0,))
    rows.append(
        {
            "source": "gt-derived affinities (upper bound)",
            "route": "mutex watershed",
            "adapted_rand_error": s["adapted_rand_error"],
            "voi_split": s["voi_split"],
            "voi_merge": s["voi_merge"],
            "segments": int(lab.max()),
            "seconds": time.perf_counter() - t0,
        }
    )
    print(json.dumps(rows[-1]), flush=True)
    Path(out_json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("probs_dir", help="the output directory of predict_gala_probe.py")
    ap.add_argument("out_json", help="where the rows go")
    ap.add_argument("only", nargs="?", default="", help="keep sources whose name contains this")
    ap.add_argument("--seg-outputs", default="runs/seg_outputs", help="fine-tuned predictions")
    ap.add_argument("--gala", default="../shared/data/em/gala_fibsem", help="gala FIB-SEM data")
    a = ap.parse_args()
    main(a.probs_dir, a.out_json, a.only, a.seg_outputs, a.gala)
