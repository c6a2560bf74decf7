"""Blended windows vs margin-dropped tiles in `emfm export`: seam ratios and voxels/s on the bundled
real EM.

    nice -n 10 .venv/bin/python benchmarks/bench_export_blend.py --checkpoint runs/main/RUN \
        --model width=128,depth=4,heads=4 --out experiments/benchmarks/export_blend.json

Exports the same ROI of the bundled ISBI 2012 sample (default sections 0-3, 384 x 384) with
`blend=none` and `blend=cosine`, alternating (none, cosine, none, cosine, ...) so that load changes
on a shared machine hit both alike; one warm-up export of each first compiles the programs. Reports
each run's voxels/s (timed loop after compilation, as `emfm export` reports it), the median ratio
cosine / none, and the seam ratios of experiments/feature_export/seams.py (mean neighbour-cell
feature change across block boundaries over within blocks, and the worst phase modulo the block; 1.0
= no seam).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="", help="an emfm run dir; empty = random-init encoder")
    ap.add_argument(
        "--model",
        default="width=128,depth=4,heads=4",
        help="ModelConfig fields, k=v comma-separated",
    )
    ap.add_argument("--sections", type=int, default=4)
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--margin", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "experiments" / "feature_export"))
    from seams import seam_report

    from emfm.config.schema import ModelConfig
    from emfm.data import bundled
    from emfm.data.volume import open_volume
    from emfm.export.checkpoint import load_export_encoder
    from emfm.export.features import export_features

    fields = {k: int(v) for k, v in (kv.split("=") for kv in args.model.split(",") if kv)}
    enc, meta = load_export_encoder(ModelConfig(**fields), args.checkpoint)
    vol = open_volume(bundled.sample_raw())
    grey = tuple(meta.get("grey_range") or (0.0, 255.0))
    roi = [[0, args.sections], [0, vol.shape[1]], [0, vol.shape[2]]]
    tmp = Path(tempfile.mkdtemp(prefix="emfm_blend_"))
    runs: dict[str, list[float]] = {"none": [], "cosine": []}
    seams = {}
    try:
        for i in range(args.repeats + 1):
            for blend in ("none", "cosine"):
                res = export_features(
                    enc,
                    vol,
                    tmp / f"{blend}.zarr",
                    grey_range=grey,
                    tile=args.tile,
                    margin=args.margin,
                    roi=roi,
                    dtype="float32",
                    blend=blend,
                    resume=False,
                    show_progress=False,
                )
                if i == 0:  # warm-up: compilation
                    seams[blend] = seam_report(str(tmp / f"{blend}.zarr"))
                    continue
                runs[blend].append(res["voxels_per_s"])
                print(f"{blend}: {res['voxels_per_s']:.4g} voxels/s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratio = float(np.median(np.asarray(runs["cosine"]) / np.asarray(runs["none"])))
    rec = {
        "benchmark": "export_blend",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": platform.machine(),
        "checkpoint": args.checkpoint,
        "model": fields,
        "roi": roi,
        "tile": args.tile,
        "margin": args.margin,
        "voxels_per_s": runs,
        "cosine_over_none": ratio,
        "seams": {
            b: {k: v for k, v in r.items() if k.startswith(("seam", "worst"))}
            for b, r in seams.items()
        },
    }
    print(json.dumps(rec, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(rec, indent=1) + "\n")


if __name__ == "__main__":
    main()
