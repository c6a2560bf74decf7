"""Speed and memory of emfm.eval.metrics, measured in one run.

    .venv/bin/python benchmarks/bench_metrics.py [--shape 100,1024,1024] [--seeds 100000]

Hardware the recorded figures came from: 2-core x86 CPU, 24 GB RAM (no GPU needed).
Runtime: ~5-8 min at the default size (volume generation is cached under the system temp directory
after the first run).

Parts (each in its own subprocess, so peak-memory figures do not mix):
1. region: emfm's adapted Rand error + VOI (one contingency table) vs skimage's
   ``adapted_rand_error`` + ``variation_of_information`` on a uint32 pair of Voronoi segmentations
   of random seeds (~1e5 objects at the default size; the prediction's seeds are jittered, 10 %
   dropped and 10 % added, giving real splits and merges). Values must agree to 1e-9.
2. instance: AP (DSB and COCO), PQ, AJI on a crop holding ~1e4 instances.
3. warping: warping error of a 1024x1024 probability map against a binary membrane map.
4. blockwise: evaluate_paths on the volumes stored as zarr v3, read 8 slices at a time.

Blockwise figures: peak memory should be one block of each input plus the sparse table
(O(distinct (gt, pred) pairs)), far below the in-memory size of the inputs.

Peak memory = peak RSS increase over the process's RSS after its inputs are loaded (the kernel's
peak counter is reset via /proc/self/clear_refs), read from /proc/self/status.
Prints one JSON record and writes it to --out (default experiments/benchmarks/metrics.json).
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

import numpy as np

CACHE = Path(tempfile.gettempdir()) / "emfm_bench_metrics"
REPO = Path(__file__).resolve().parents[1]


# ============================================================================ memory helpers


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> int:
    """Reset the peak-RSS counter to the current RSS; returns the current RSS in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS") * 1024


def _peak_increase(baseline: int) -> int:
    return _status_kb("VmHWM") * 1024 - baseline


# ============================================================================ data


def _voronoi(shape, seeds) -> np.ndarray:
    from scipy import ndimage

    mask = np.ones(shape, bool)
    mask[tuple(seeds.T)] = False
    ids = np.zeros(shape, np.uint32)
    ids[tuple(seeds.T)] = np.arange(1, len(seeds) + 1, dtype=np.uint32)
    idx = ndimage.distance_transform_edt(mask, return_distances=False, return_indices=True)
    return ids[tuple(idx)]


def volumes(shape, n_seeds):
    """Cached (pred, gt) uint32 label volumes; gt has voxels with id 0 on 2% of the volume."""
    tag = "x".join(map(str, shape)) + f"_{n_seeds}"
    gt_p, pred_p = CACHE / f"gt_{tag}.npy", CACHE / f"pred_{tag}.npy"
    if not gt_p.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        seeds = (rng.random((n_seeds, 3)) * shape).astype(np.int64)
        gt = _voronoi(shape, seeds)
        # Unlabelled gt voxels (id 0), as in real EM ground truth.
        gt[rng.random(shape, dtype=np.float32) < 0.02] = 0
        np.save(gt_p, gt)
        del gt
        keep = seeds[rng.random(n_seeds) > 0.1]
        jitter = rng.normal(0, 1.5, keep.shape).round().astype(np.int64)
        extra = (rng.random((n_seeds // 10, 3)) * shape).astype(np.int64)
        pseeds = np.clip(np.concatenate([keep + jitter, extra]), 0, np.array(shape) - 1)
        pseeds = np.unique(pseeds, axis=0)
        pred = _voronoi(shape, pseeds)
        # Shuffle ids so they are unrelated to gt's.
        perm = np.concatenate([[0], rng.permutation(len(pseeds)) + 1]).astype(np.uint32)
        np.save(pred_p, perm[pred])
    return pred_p, gt_p


# ============================================================================ parts (subprocesses)


def part_region_emfm(pred_p, gt_p):
    from emfm.eval.metrics import ContingencyTable

    pred, gt = np.load(pred_p), np.load(gt_p)
    base = _reset_peak()
    t = time.perf_counter()
    table = ContingencyTable.from_arrays(pred, gt)
    s_are = table.scores(ignore_gt=(0,))  # skimage ARE default: ignore gt 0
    s_voi = table.scores(ignore_gt=())  # skimage VOI default: ignore nothing
    secs = time.perf_counter() - t
    return {
        "seconds": secs,
        "peak_bytes": _peak_increase(base),
        "input_bytes": pred.nbytes + gt.nbytes,
        "are": s_are["adapted_rand_error"],
        "voi": [s_voi["voi_split"], s_voi["voi_merge"]],
        "table_entries": int(table.counts.size),
        "n_gt": s_voi["num_gt_segments"],
        "n_pred": s_voi["num_pred_segments"],
    }


def part_region_skimage(pred_p, gt_p):
    from skimage.metrics import adapted_rand_error, variation_of_information

    pred, gt = np.load(pred_p), np.load(gt_p)
    base = _reset_peak()
    t = time.perf_counter()
    are = adapted_rand_error(gt, pred)[0]
    voi = variation_of_information(gt, pred)
    secs = time.perf_counter() - t
    return {
        "seconds": secs,
        "peak_bytes": _peak_increase(base),
        "are": float(are),
        "voi": [float(v) for v in voi],
    }


def part_instance(pred_p, gt_p, n_slices):
    from emfm.eval.metrics import ContingencyTable, instance_scores

    pred = np.load(pred_p, mmap_mode="r")[:n_slices].copy()
    gt = np.load(gt_p, mmap_mode="r")[:n_slices].copy()
    t = time.perf_counter()
    table = ContingencyTable.from_arrays(pred, gt)
    t_table = time.perf_counter() - t
    t = time.perf_counter()
    s = instance_scores(None, None, table=table)
    t_scores = time.perf_counter() - t
    return {
        "shape": list(gt.shape),
        "n_gt": s["n_gt"],
        "n_pred": s["n_pred"],
        "seconds_table": t_table,
        "seconds_scores": t_scores,
        "ap_dsb": s["ap_dsb"],
        "ap_coco": s["ap_coco"],
        "pq": s["pq"],
        "aji": s["aji"],
        "f1@0.5": s["f1@0.5"],
    }


def part_warping(pred_p, gt_p):
    from scipy import ndimage

    from emfm.eval.metrics import warping_error

    def membranes(lab):
        return ndimage.grey_dilation(lab, size=3) != ndimage.grey_erosion(lab, size=3)

    gt = ~membranes(np.load(gt_p, mmap_mode="r")[0].astype(np.int64))  # True = cell interior
    rng = np.random.default_rng(0)
    pm = membranes(np.load(pred_p, mmap_mode="r")[0].astype(np.int64)).astype(np.float32)
    prob = np.clip(1 - ndimage.gaussian_filter(pm, 1.0) * 2 + rng.normal(0, 0.1, pm.shape), 0, 1)
    out = {"shape": list(gt.shape), "pixel_error": float(np.mean((prob > 0.5) != gt))}
    for warp in ("gt", "pred"):
        t = time.perf_counter()
        out[f"warping_error_{warp}"] = warping_error(prob, gt, warp=warp)
        out[f"seconds_{warp}"] = time.perf_counter() - t
    return out


def part_blockwise(pred_p, gt_p, block_z):
    import tensorstore as ts

    from emfm.eval.evaluate import evaluate_paths

    paths = {}
    for name, p in (("pred", pred_p), ("gt", gt_p)):
        z = CACHE / (p.stem + ".zarr")
        if not (z / "zarr.json").exists():
            arr = np.load(p, mmap_mode="r")
            spec = {
                "driver": "zarr3",
                "kvstore": {"driver": "file", "path": str(z)},
                "create": True,
                "delete_existing": True,
                "metadata": {
                    "shape": list(arr.shape),
                    "data_type": "uint32",
                    "chunk_grid": {
                        "name": "regular",
                        "configuration": {"chunk_shape": [8, 256, 256]},
                    },
                },
            }
            store = ts.open(spec).result()
            for zz in range(0, arr.shape[0], 8):
                stop = min(zz + 8, arr.shape[0])
                store[zz:stop].write(np.ascontiguousarray(arr[zz:stop])).result()
        paths[name] = z
    base = _reset_peak()
    t = time.perf_counter()
    res = evaluate_paths(
        paths["pred"], paths["gt"], CACHE / f"eval_bz{block_z}", kinds=("region",), block_z=block_z
    )
    return {
        "block_z": block_z,
        "seconds": time.perf_counter() - t,
        "peak_bytes": _peak_increase(base),
        "are": res["metrics"]["region"]["adapted_rand_error"],
    }


PARTS = {
    "region_emfm": part_region_emfm,
    "region_skimage": part_region_skimage,
    "instance": part_instance,
    "warping": part_warping,
    "blockwise": part_blockwise,
}


def _run_part(name, *args, env=None):
    """Run one part in a fresh interpreter; returns its JSON result."""
    cmd = [sys.executable, __file__, "--part", name, "--args", json.dumps([str(a) for a in args])]
    env = None if env is None else {**os.environ, **env}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    if out.returncode:
        raise RuntimeError(f"part {name} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="100,1024,1024")
    ap.add_argument("--seeds", type=int, default=100_000)
    ap.add_argument("--instance-slices", type=int, default=10)
    ap.add_argument("--part")
    ap.add_argument("--args")
    ap.add_argument(
        "--out",
        default="experiments/benchmarks/metrics.json",
        help="where the record goes (relative to the repo root)",
    )
    a = ap.parse_args()
    if a.part:
        args = json.loads(a.args)
        conv = [Path(x) if x.startswith("/") else int(x) for x in args]
        print(json.dumps(PARTS[a.part](*conv)))
        return

    shape = tuple(int(s) for s in a.shape.split(","))
    t = time.perf_counter()
    pred_p, gt_p = volumes(shape, a.seeds)
    gen = time.perf_counter() - t
    emfm = _run_part("region_emfm", pred_p, gt_p)
    sk = _run_part("region_skimage", pred_p, gt_p)
    inst = _run_part("instance", pred_p, gt_p, a.instance_slices)
    warp = _run_part("warping", pred_p, gt_p)
    blocks = [_run_part("blockwise", pred_p, gt_p, bz) for bz in (4, 16)]
    # tensorstore's reader threads leave freed buffers in per-thread glibc arenas, which inflates
    # RSS without being live data; with 2 arenas the figure is close to the live peak.
    arenas = _run_part("blockwise", pred_p, gt_p, 4, env={"MALLOC_ARENA_MAX": "2"})
    blocks.append({**arenas, "env": "MALLOC_ARENA_MAX=2"})
    rec = {
        "benchmark": "emfm.eval.metrics",
        "hardware": "2-core CPU, 24 GB RAM",
        "shape": list(shape),
        "dtype": "uint32",
        "generate_or_load_seconds": round(gen, 1),
        "region": {
            "emfm": emfm,
            "skimage": sk,
            "speedup": sk["seconds"] / emfm["seconds"],
            "max_abs_diff": max(
                abs(emfm["are"] - sk["are"]), *(abs(x - y) for x, y in zip(emfm["voi"], sk["voi"]))
            ),
            "emfm_peak_over_inputs": emfm["peak_bytes"] / emfm["input_bytes"],
            "skimage_peak_over_inputs": sk["peak_bytes"] / emfm["input_bytes"],
        },
        "instance": inst,
        "warping": warp,
        "blockwise_zarr": blocks,
    }
    out = REPO / a.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=2))
    print(json.dumps(rec))


if __name__ == "__main__":
    main()
