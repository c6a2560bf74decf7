"""Loader throughput vs raw tensorstore reads vs in-memory numpy crops of the same patches, in one run.

    .venv/bin/python benchmarks/bench_loader.py --size-mb 2048            # the default: a 2 GB volume
    .venv/bin/python benchmarks/bench_loader.py --size-mb 256 --out experiments/benchmarks/loader.json

Writes a zarr v3 uint8 volume (zstd, 64^3 chunks) of the given size under /tmp (kept between runs;
delete it afterwards), then for 1x256x256 and 32x128x128 patches at batch 32 reports patches/s and
MB/s (of uint8 voxels delivered) of PatchLoader.load (no augmentation, so it measures reading +
normalisation to float32), of the same patch list read with raw tensorstore futures, and of numpy
crops from an in-memory array (only when the volume fits in --memory-limit-mb, measured last); the
ratio loader / raw; and the peak RSS of the streaming part (before any in-memory copy).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

import numpy as np

from emfm.data.loader import PatchLoader, PatchSampler, Region
from emfm.data.volume import create_volume, open_volume


def make_volume(path: Path, size_mb: int) -> tuple[int, int, int]:
    side = int(np.ceil((size_mb * 1e6) ** (1 / 3) / 64)) * 64  # at least size_mb
    shape = (max(64, side), max(256, side), max(256, side))
    if (path / "zarr.json").exists() and open_volume(path).shape == shape:
        return shape
    vol = create_volume(path, shape, np.uint8, chunks=(64, 64, 64), voxel_size=(8, 8, 8))
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[: shape[1], : shape[2]]
    base = (96 + 60 * np.sin(yy / 11.0) * np.cos(xx / 13.0)).astype(np.float32)  # EM-like texture, compressible
    slab = np.empty((64,) + shape[1:], np.uint8)  # one chunk-deep slab at a time: creation memory is bounded too
    for z0 in range(0, shape[0], 64):
        n = min(64, shape[0] - z0)
        for k in range(n):
            noisy = base + rng.standard_normal(shape[1:], dtype=np.float32) * 20
            np.clip(noisy, 0, 255, out=noisy)
            slab[k] = noisy
        vol.array[z0:z0 + n].write(slab[:n]).result()
    return shape


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=2048)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--path", default="/tmp/emfm_bench_loader")
    ap.add_argument("--memory-limit-mb", type=int, default=4096, help="load into RAM for the numpy baseline up to this")
    ap.add_argument("--out")
    args = ap.parse_args()

    path = Path(args.path) / f"vol_{args.size_mb}mb.zarr"
    t0 = time.perf_counter()
    shape = make_volume(path, args.size_mb)
    make_s = time.perf_counter() - t0
    rss_open = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # the loader and the raw reads each get their own handle (own chunk cache of the same size), so
    # neither is served from chunks the other decoded; batches alternate which of the two goes first
    vol_loader, vol_raw = open_volume(path), open_volume(path)
    results = {"volume": {"path": str(path), "shape": list(shape), "mb": float(np.prod(shape)) / 1e6,
                          "disk_mb": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6,
                          "chunks": list(vol_loader.chunks), "codec": "zstd", "create_s": make_s},
               "batch": args.batch, "batches": args.batches, "host": platform.node(), "cpus": os.cpu_count(),
               "chunk_cache_mb": int(os.environ.get("EMFM_CHUNK_CACHE_MB", "256")),
               "load_average_before": list(os.getloadavg()), "cases": {}}
    patches = [(1, 256, 256), (32, 128, 128)]
    samplers = {}
    for patch in patches:
        sampler = PatchSampler([Region.of(vol_loader)], patch, args.batch, seed=0)
        loader = PatchLoader(sampler, [(0.0, 255.0)], augment_batches=False, prefetch=1)
        loader.close()  # the background thread is not measured; load(step) is the same work
        samplers[patch] = sampler

        def raw(step, patch=patch, sampler=sampler):
            boxes = [tuple(slice(a, a + p) for a, p in zip(o, patch)) for _, o in sampler.origins(step)]
            futures = [vol_raw.array[b].read() for b in boxes]
            return [f.result() for f in futures]

        times = {"loader": [], "tensorstore_raw": []}
        fns = {"loader": loader.load, "tensorstore_raw": raw}
        for f in fns.values():
            f(10**6)  # warm-up (thread pools, metadata), on a batch outside the measured ones
        for step in range(1, args.batches + 1):
            for name in (list(fns) if step % 2 else list(fns)[::-1]):
                t = time.perf_counter()
                fns[name](step)
                times[name].append(time.perf_counter() - t)
        patch_bytes = int(np.prod(patch))
        case = {k: summarise(v, args.batch, patch_bytes) for k, v in times.items()}
        case["loader_over_raw"] = case["loader"]["patches_per_s"] / case["tensorstore_raw"]["patches_per_s"]
        results["cases"]["x".join(map(str, patch))] = case
    # peak RSS of streaming (loader + raw reads): must not grow with the volume's size
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results["peak_rss_mb_after_open"] = rss_open
    if np.prod(shape) / 1e6 <= args.memory_limit_mb:
        in_memory = vol_raw.read()
        for patch in patches:
            sampler = samplers[patch]

            def crop(step, patch=patch, sampler=sampler):
                return np.stack([in_memory[tuple(slice(a, a + p) for a, p in zip(o, patch))]
                                 for _, o in sampler.origins(step)])

            crop(10**6)
            times = []
            for step in range(1, args.batches + 1):
                t = time.perf_counter()
                crop(step)
                times.append(time.perf_counter() - t)
            results["cases"]["x".join(map(str, patch))]["numpy_in_memory"] = summarise(times, args.batch, int(np.prod(patch)))
        results["peak_rss_mb_with_in_memory_copy"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results["load_average_after"] = list(os.getloadavg())
    for name, case in results["cases"].items():
        print(name, {k: (round(v["patches_per_s"], 1), round(v["mb_per_s"], 1)) if isinstance(v, dict) else round(v, 3)
                     for k, v in case.items()})
    print(json.dumps(results, indent=1))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        prev = json.loads(out.read_text()) if out.exists() else {}
        prev[f"{args.size_mb}mb"] = results
        out.write_text(json.dumps(prev, indent=1))


def summarise(times: list[float], batch: int, patch_bytes: int) -> dict:
    dt, n = sum(times), len(times) * batch
    return {"patches_per_s": n / dt, "mb_per_s": n * patch_bytes / dt / 1e6, "s": dt,
            "median_batch_s": float(np.median(times))}


if __name__ == "__main__":
    main()
