"""Blockwise instance segmentation (`emfm.instances.instances`): peak memory and throughput as the
volume grows with the block fixed. Each size runs in its own process (peak RSS is per process) on a
boundary-probability zarr made by tiling the boundaries of one synthetic block (exact labels, so the
objects' count is known). Prints one JSON record and stores it in
experiments/benchmarks/instances.json (`--out`) under a variant key (`--variant`, default
cache{MB}: the chunk cache the run had), keeping the other variants in the file.

Usage: python benchmarks/bench_instances.py [--sizes 64x256x256 64x512x512 128x512x512]
         [--method watershed]                                   # variant cache256
       EMFM_CHUNK_CACHE_MB=0 python benchmarks/bench_instances.py  # variant cache0
(the input is read through tensorstore's decoded-chunk cache, EMFM_CHUNK_CACHE_MB, 256 MB by
default, which fills up to that limit as the volume grows)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
import numpy as np
from emfm.data.volume import create_volume
from emfm.data.synthetic import synthetic_em
from emfm.instances import SegmentParams, boundaries_from_labels, instances
a = json.loads(sys.argv[1])
shape, tile = a["shape"], (32, 128, 128)
cells = synthetic_em(tile, seed=0, cell_size=24.0).cells
b = (boundaries_from_labels(cells) * 255).astype(np.uint8)
vol = create_volume(a["input"], shape, np.uint8, chunks=[32, 128, 128])
# written slab by slab: tiles of one block, no whole-volume array
for z in range(0, shape[0], tile[0]):
    slab = np.tile(b, (1, shape[1] // tile[1], shape[2] // tile[2]))[: min(tile[0], shape[0] - z)]
    vol.array[z:z + len(slab)].write(slab).result()
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
res = instances(a["input"], a["out"], SegmentParams(method=a["method"]), block=a["block"],
                halo=a["halo"])
dt = time.perf_counter() - t
print(json.dumps({"shape": shape, "voxels": int(np.prod(shape)), "seconds": dt,
                  "mvoxels_per_s": np.prod(shape) / dt / 1e6, "segments": res["segments"],
                  "blocks": res["blocks"], "peak_rss_mb_before": rss0 / 1024,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", default=["64x256x256", "64x512x512", "128x512x512"])
    ap.add_argument("--method", default="watershed")
    ap.add_argument("--block", default="32x128x128")
    ap.add_argument("--halo", default="8x16x16")
    ap.add_argument(
        "--out",
        default="experiments/benchmarks/instances.json",
        help="the JSON file (relative to the repo root) that holds the record under --variant",
    )
    ap.add_argument("--variant", default="", help="key of the record in --out (default: cache{MB})")
    args = ap.parse_args()
    cache_mb = int(os.environ.get("EMFM_CHUNK_CACHE_MB", "256"))
    block = [int(v) for v in args.block.split("x")]
    halo = [int(v) for v in args.halo.split("x")]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for i, size in enumerate(args.sizes):
            spec = {
                "shape": [int(v) for v in size.split("x")],
                "input": f"{d}/in{i}.zarr",
                "out": f"{d}/out{i}.zarr",
                "method": args.method,
                "block": block,
                "halo": halo,
            }
            r = subprocess.run(
                [sys.executable, "-c", CHILD, json.dumps(spec)],
                capture_output=True,
                text=True,
                cwd=REPO,
                check=True,
            )
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    rec = {
        "benchmark": "instances_blockwise",
        "method": args.method,
        "chunk_cache_mb": cache_mb,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": git_commit(),
        "block": block,
        "halo": halo,
        "runs": rows,
        "voxel_ratio_last_first": rows[-1]["voxels"] / rows[0]["voxels"],
        "peak_rss_ratio_last_first": rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"],
    }
    variant = args.variant or f"cache{cache_mb}"
    out = REPO / args.out
    whole = json.loads(out.read_text()) if out.exists() else {}
    whole[variant] = rec
    out.write_text(json.dumps(whole, indent=1) + "\n")
    print(json.dumps({"variant": variant, **{k: v for k, v in rec.items() if k != "runs"}}))


def git_commit() -> str:
    """Short commit of this checkout, "+dirty" with uncommitted changes; "unknown" without git."""
    try:
        git = ["git", "-C", str(REPO)]
        commit = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    main()
