"""Loader throughput vs raw tensorstore reads vs in-memory numpy crops of the same patches, in one
run.

    nice -n 10 .venv/bin/python benchmarks/bench_loader.py --size-mb 2048 \
        --out experiments/benchmarks/loader.json
    nice -n 10 .venv/bin/python benchmarks/bench_loader.py --size-mb 8192 \
        --out experiments/benchmarks/loader.json

Each run stores its record under the key "<size>mb" of --out, keeping the other keys. The volumes
are kept between runs under --path (default: emfm_bench_loader in the system temp directory);
delete that directory afterwards.

Writes a zarr v3 uint8 volume (zstd, 64^3 chunks) of at least the given size under --path, then for
1x256x256 and 32x128x128 patches at batch 32 reports patches/s and MB/s (uint8 voxels delivered) and
CPU seconds per batch of PatchLoader.load (no augmentation: reading into one uint8 batch with its
normalisation constants; the float32 conversion runs in the jitted step, emfm.data.device.finish,
whose time per batch on the default device is reported beside it) and
of the same patch list read with raw tensorstore futures (each with its own chunk cache of the same
size; batches alternate which goes first), the ratios loader / raw in wall and CPU time, numpy crops
of an in-memory copy (volumes up to --memory-limit-mb, measured last), and peak RSS: of the
streaming part of this process, and of a fresh process that streams augmented batches through the
loader's prefetching iterator as training does.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from emfm.data.loader import PatchLoader
from emfm.data.sampling import PatchSampler, Region
from emfm.data.volume import create_volume, open_volume


def make_volume(path: Path, size_mb: int) -> tuple[int, int, int]:
    side = int(np.ceil((size_mb * 1e6) ** (1 / 3) / 64)) * 64  # at least size_mb
    shape = (max(64, side), max(256, side), max(256, side))
    if (path / "zarr.json").exists() and open_volume(path).shape == shape:
        return shape
    vol = create_volume(path, shape, np.uint8, chunks=(64, 64, 64), voxel_size=(8, 8, 8))
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[: shape[1], : shape[2]]
    # EM-like texture, compressible
    base = (96 + 60 * np.sin(yy / 11.0) * np.cos(xx / 13.0)).astype(np.float32)
    slab = np.empty(
        (64,) + shape[1:], np.uint8
    )  # one chunk-deep slab at a time: creation memory is bounded too
    for z0 in range(0, shape[0], 64):
        n = min(64, shape[0] - z0)
        for k in range(n):
            noisy = base + rng.standard_normal(shape[1:], dtype=np.float32) * 20
            np.clip(noisy, 0, 255, out=noisy)
            slab[k] = noisy
        vol.array[z0 : z0 + n].write(slab[:n]).result()
    return shape


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=2048)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--path", default=str(Path(tempfile.gettempdir()) / "emfm_bench_loader"))
    ap.add_argument(
        "--memory-limit-mb",
        type=int,
        default=4096,
        help="load into RAM for the numpy baseline up to this",
    )
    ap.add_argument("--out")
    ap.add_argument(
        "--rss-only",
        action="store_true",
        help="(internal) stream through the loader, print peak RSS",
    )
    args = ap.parse_args()
    if args.rss_only:
        return rss_only(Path(args.path) / f"vol_{args.size_mb}mb.zarr", args.batches, args.batch)

    path = Path(args.path) / f"vol_{args.size_mb}mb.zarr"
    t0 = time.perf_counter()
    shape = make_volume(path, args.size_mb)
    make_s = time.perf_counter() - t0
    rss_open = peak_rss_mb()
    # the loader and the raw reads each get their own handle (own chunk cache of the same size), so
    # neither is served from chunks the other decoded; batches alternate which of the two goes first
    cache_mb = int(os.environ.get("EMFM_CHUNK_CACHE_MB", "256"))
    vol_loader, vol_raw = open_volume(path, cache_mb=cache_mb), open_volume(path, cache_mb=cache_mb)
    results = {
        "volume": {
            "path": str(path),
            "shape": list(shape),
            "mb": float(np.prod(shape)) / 1e6,
            "disk_mb": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6,
            "chunks": list(vol_loader.chunks),
            "codec": "zstd",
            "create_s": make_s,
        },
        "batch": args.batch,
        "batches": args.batches,
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "chunk_cache_mb": cache_mb,
        "load_average_before": list(os.getloadavg()),
        "cases": {},
    }
    patches = [(1, 256, 256), (32, 128, 128)]
    samplers = {}
    for patch in patches:
        sampler = PatchSampler([Region.of(vol_loader)], patch, args.batch, seed=0)
        loader = PatchLoader(sampler, [(0.0, 255.0)], augment_batches=False, prefetch=1)
        loader.close()  # the background thread is not measured; load(step) is the same work
        samplers[patch] = sampler

        def raw(step, patch=patch, sampler=sampler):
            boxes = [
                tuple(slice(a, a + p) for a, p in zip(o, patch)) for _, o in sampler.origins(step)
            ]
            futures = [vol_raw.array[b].read() for b in boxes]
            return [f.result() for f in futures]

        times = {"loader": [], "tensorstore_raw": []}
        cpu = {"loader": [], "tensorstore_raw": []}
        fns = {"loader": loader.load, "tensorstore_raw": raw}
        for f in fns.values():
            f(10**6)  # warm-up (thread pools, metadata), on a batch outside the measured ones
        for step in range(1, args.batches + 1):
            for name in list(fns) if step % 2 else list(fns)[::-1]:
                t, c = time.perf_counter(), time.process_time()
                fns[name](step)
                times[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)  # all threads: tensorstore's decoders too
        patch_bytes = int(np.prod(patch))
        case = {
            k: {**summarise(v, args.batch, patch_bytes), "cpu_s_per_batch": float(np.mean(cpu[k]))}
            for k, v in times.items()
        }
        case["loader_over_raw"] = (
            case["loader"]["patches_per_s"] / case["tensorstore_raw"]["patches_per_s"]
        )
        # the same ratio in CPU time: what throughput on a machine busy with other work follows
        case["loader_over_raw_cpu"] = (
            case["tensorstore_raw"]["cpu_s_per_batch"] / case["loader"]["cpu_s_per_batch"]
        )
        case["device_finish_s_per_batch"] = time_finish(loader.load(1), args.batches)
        results["cases"]["x".join(map(str, patch))] = case
    # peak RSS: of this process so far (loader + raw reads, two caches), and of a fresh process that
    # only streams through the loader as training does; neither may grow with the volume's size
    results["peak_rss_mb_loader_and_raw"] = peak_rss_mb()
    results["peak_rss_mb_after_open"] = rss_open
    child = subprocess.run(
        [
            sys.executable,
            __file__,
            "--rss-only",
            "--size-mb",
            str(args.size_mb),
            "--path",
            args.path,
            "--batches",
            str(args.batches),
            "--batch",
            str(args.batch),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    results["loader_only"] = json.loads(child.stdout.strip().splitlines()[-1])
    if np.prod(shape) / 1e6 <= args.memory_limit_mb:
        in_memory = vol_raw.read()
        for patch in patches:
            sampler = samplers[patch]

            def crop(step, patch=patch, sampler=sampler):
                return np.stack(
                    [
                        in_memory[tuple(slice(a, a + p) for a, p in zip(o, patch))]
                        for _, o in sampler.origins(step)
                    ]
                )

            crop(10**6)
            times = []
            for step in range(1, args.batches + 1):
                t = time.perf_counter()
                crop(step)
                times.append(time.perf_counter() - t)
            results["cases"]["x".join(map(str, patch))]["numpy_in_memory"] = summarise(
                times, args.batch, int(np.prod(patch))
            )
        results["peak_rss_mb_with_in_memory_copy"] = peak_rss_mb()
    results["load_average_after"] = list(os.getloadavg())
    for name, case in results["cases"].items():
        print(
            name,
            {
                k: (round(v["patches_per_s"], 1), round(v["mb_per_s"], 1))
                if isinstance(v, dict)
                else round(v, 3)
                for k, v in case.items()
            },
        )
    print(json.dumps(results, indent=1))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        prev = json.loads(out.read_text()) if out.exists() else {}
        prev[f"{args.size_mb}mb"] = results
        out.write_text(json.dumps(prev, indent=1))


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM; unlike ru_maxrss it does not inherit the parent's
    peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_only(path: Path, batches: int, batch: int) -> None:
    """Stream `batches` augmented batches of each patch shape through the PatchLoader iterator
    (background thread, prefetch 4, the shared chunk cache) and print the peak RSS as JSON."""
    vol = open_volume(path)
    t0 = time.perf_counter()
    for patch in [(1, 256, 256), (32, 128, 128)]:
        loader = PatchLoader(
            PatchSampler([Region.of(vol)], patch, batch, seed=1), [(0.0, 255.0)], prefetch=4
        )
        try:
            for _ in range(batches):
                next(loader)
        finally:
            loader.close()
    print(
        json.dumps(
            {
                "batches_per_shape": batches,
                "augment": True,
                "prefetch": 4,
                "s": time.perf_counter() - t0,
                "peak_rss_mb": peak_rss_mb(),
            }
        )
    )


def time_finish(batch: dict, n: int) -> float:
    """Seconds per batch of the step's input conversion (emfm.data.device.finish, jitted, on the
    default device; the batch already there), excluded from the loader's figures above."""
    import jax

    from emfm.data import device

    f = jax.jit(device.finish)
    x = jax.device_put(batch)
    jax.block_until_ready(f(x))
    t = time.perf_counter()
    for _ in range(n):
        jax.block_until_ready(f(x))
    return (time.perf_counter() - t) / n


def summarise(times: list[float], batch: int, patch_bytes: int) -> dict:
    dt, n = sum(times), len(times) * batch
    return {
        "patches_per_s": n / dt,
        "mb_per_s": n * patch_bytes / dt / 1e6,
        "s": dt,
        "median_batch_s": float(np.median(times)),
    }


if __name__ == "__main__":
    main()
