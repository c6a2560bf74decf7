"""Feature export throughput vs the encoder's forward-only throughput, and peak memory vs volume
size, in one run.

    nice -n 10 .venv/bin/python benchmarks/bench_export.py --out experiments/benchmarks/export.json

1. Writes two zarr v3 uint8 volumes (zstd, 1 x 512 x 512 chunks, EM-like texture plus noise)
   under --path: a small one (--small-gb) and a large one (--large-gb, several GB).
2. Forward-only: the export's own compiled encoder program on batches of in-memory windows (tile + 2
   margin, already normalised): voxels/s of block interiors. Measured before and after the exports
   and averaged, since the machine may be shared.
3. Export: `export_features` (the code behind `emfm export`: tensorstore reads in a prefetch thread,
   encoder, asynchronous zarr v3 writes) in a fresh subprocess per run, reporting voxels/s (after
   compilation, as the forward-only figure) and peak RSS (of the process, and of the export alone
   after a warm-up compile, through Linux's resettable high-water mark): an ROI of the small volume,
   the same ROI of the large volume, and an ROI --roi-factor times larger of the large volume. On a
   2-core CPU exporting a whole several-GB volume takes hours, so the runs export ROIs (context is
   still read from the surrounding volume); the volume is never loaded whole.
4. Records ratio = export / forward-only (target >= 0.8) and the RSS of the three runs, then
   deletes the volumes (--keep keeps them).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def model_config(width: int, depth: int, heads: int, patch: int):
    from emfm.config.schema import ModelConfig

    return ModelConfig(width=width, depth=depth, heads=heads, patch_size=[patch, patch])


def make_volume(path: Path, gb: float, side: int) -> tuple[int, int, int]:
    """`gb` GB of uint8 sections of side x side: a smooth membrane-like texture, shifted per
    section, plus noise."""
    from emfm.data.volume import create_volume, open_volume

    nz = max(1, int(round(gb * 1e9 / side**2)))
    shape = (nz, side, side)
    if (path / "zarr.json").exists() and open_volume(path).shape == shape:
        return shape
    vol = create_volume(
        path, shape, np.uint8, chunks=(1, 512, 512), voxel_size=(50, 4, 4), compression_level=1
    )
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:side, :side].astype(np.float32)
    base = 128 + 70 * np.sin(yy / 9.0 + 2 * np.sin(xx / 37.0)) * np.cos(
        xx / 11.0 + 2 * np.cos(yy / 41.0)
    )
    noise = rng.normal(0, 18, (4, side, side)).astype(np.float32)
    pending = []
    for z in range(nz):
        sec = np.roll(base, (3 * z, 5 * z), (0, 1)) + np.roll(noise[z % 4], 7 * z, 1)
        pending.append(vol.array[z : z + 1].write(np.clip(sec, 0, 255).astype(np.uint8)[None]))
        if len(pending) > 4:
            pending.pop(0).result()
    for p in pending:
        p.result()
    return shape


def forward_only(args) -> dict:
    """Voxels/s of the compiled export forward on in-memory normalised windows."""
    from emfm.export.encode import BlockEncoder
    from emfm.models import build_encoder

    enc = BlockEncoder(
        build_encoder(model_config(args.width, args.depth, args.heads, args.patch)),
        block=(1, args.tile, args.tile),
        margin=(0, args.margin, args.margin),
        batch_size=args.batch,
        out_dtype=np.float16,
    )
    rng = np.random.default_rng(1)
    wins = [rng.random((args.batch,) + enc.window, dtype=np.float32) for _ in range(4)]
    enc(wins[0])  # compile
    t0 = time.perf_counter()
    for i in range(args.forward_batches):
        enc(wins[i % 4])
    dt = time.perf_counter() - t0
    vox = args.forward_batches * args.batch * args.tile**2
    return {"voxels_per_s": vox / dt, "batches": args.forward_batches, "seconds": dt}


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child_export(args) -> None:
    """One export in this (fresh) process; prints a JSON line with its summary and peak RSS: of the
    whole process (compilation included) and of the export alone (a warm-up export of one block
    compiles the program into JAX's persistent cache, then the peak-RSS counter is reset: Linux
    clear_refs 5)."""
    import tempfile

    cache = tempfile.mkdtemp(prefix="emfm_bench_jax_cache_")
    import jax

    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    from emfm.data.volume import open_volume
    from emfm.export.features import export_features
    from emfm.models import build_encoder

    enc = build_encoder(model_config(args.width, args.depth, args.heads, args.patch))
    vol = open_volume(args.volume)
    kw = dict(
        grey_range=(0.0, 255.0),
        tile=args.tile,
        margin=args.margin,
        batch_size=args.batch,
        prefetch=args.prefetch,
        dtype="float16",
        resume=False,
        show_progress=False,
    )
    roi = json.loads(args.roi)
    # warm-up
    export_features(enc, vol, args.child_out, roi=[roi[0], [0, args.tile], [0, args.tile]], **kw)
    whole = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_mb("VmHWM")
    res = export_features(enc, vol, args.child_out, roi=roi, **kw)
    res["peak_rss_mb"] = max(whole, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    res["peak_rss_export_mb"] = _status_mb("VmHWM")
    res["rss_at_export_start_mb"] = before
    shutil.rmtree(cache, ignore_errors=True)
    print("RESULT " + json.dumps(res))


def run_child(args, volume: Path, roi, out: Path) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--volume",
        str(volume),
        "--child-out",
        str(out),
        "--roi",
        json.dumps(roi),
    ]
    for k in ("width", "depth", "heads", "patch", "tile", "margin", "batch", "prefetch"):
        cmd += [f"--{k}", str(getattr(args, k))]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if p.returncode:
        raise SystemExit(p.stderr[-3000:])
    res = json.loads(next(line[7:] for line in p.stdout.splitlines() if line.startswith("RESULT ")))
    shutil.rmtree(out, ignore_errors=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--path", default=str(Path(tempfile.gettempdir()) / "emfm_bench_export"))
    ap.add_argument("--small-gb", type=float, default=0.5)
    ap.add_argument("--large-gb", type=float, default=4.0)
    ap.add_argument("--side", type=int, default=4096)
    ap.add_argument("--roi-side", type=int, default=1536, help="in-plane side of the exported ROI")
    ap.add_argument(
        "--roi-factor", type=int, default=4, help="sections of the larger ROI (the smaller has 1)"
    )
    # the main job's ViT: width 128, 4 blocks, 8x8 patches
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--margin", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--forward-batches", type=int, default=40)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--out")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--volume")
    ap.add_argument("--child-out")
    ap.add_argument("--roi")
    args = ap.parse_args()
    if args.child:
        child_export(args)
        return
    root = Path(args.path)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    small, large = root / "small.zarr", root / "large.zarr"
    shapes = {
        "small": make_volume(small, args.small_gb, args.side),
        "large": make_volume(large, args.large_gb, args.side),
    }
    gen_s = time.perf_counter() - t0
    sizes = {k: float(np.prod(v)) / 1e9 for k, v in shapes.items()}
    print(f"volumes: {shapes} ({sizes} GB uint8) written in {gen_s:.0f} s", flush=True)
    fwd1 = forward_only(args)
    print(f"forward-only: {fwd1['voxels_per_s']:.4g} voxels/s", flush=True)
    r, n = args.roi_side, args.roi_factor
    runs = {
        "small_volume_roi_1": run_child(args, small, [[0, 1], [0, r], [0, r]], root / "f1.zarr"),
        "large_volume_roi_1": run_child(args, large, [[0, 1], [0, r], [0, r]], root / "f2.zarr"),
        f"large_volume_roi_{n}": run_child(args, large, [[0, n], [0, r], [0, r]], root / "f3.zarr"),
    }
    for k, v in runs.items():
        print(
            f"export {k}: {v['voxels_per_s']:.4g} voxels/s over {v['voxels']} voxels, peak RSS "
            f"{v['peak_rss_mb']:.0f} MB "
            f"(process), {v['peak_rss_export_mb']:.0f} MB (during the export)",
            flush=True,
        )
    fwd2 = forward_only(args)
    fwd = (fwd1["voxels_per_s"] + fwd2["voxels_per_s"]) / 2
    main_run = runs[f"large_volume_roi_{n}"]
    rss = [v["peak_rss_export_mb"] for v in runs.values()]
    rec = {
        "benchmark": "export",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": __import__("os").cpu_count(),
        "model": {
            "name": "vit",
            "width": args.width,
            "depth": args.depth,
            "heads": args.heads,
            "patch": args.patch,
        },
        "tile": args.tile,
        "margin": args.margin,
        "batch": args.batch,
        "prefetch": args.prefetch,
        "dtype": "float16",
        "volumes": {k: {"shape": list(shapes[k]), "gb_uint8": round(sizes[k], 3)} for k in shapes},
        "volume_generation_s": gen_s,
        "forward_only_voxels_per_s": [fwd1["voxels_per_s"], fwd2["voxels_per_s"]],
        "export_runs": {
            k: {
                "roi": v["roi"],
                "voxels": v["voxels"],
                "voxels_per_s": v["voxels_per_s"],
                "seconds": v["seconds"],
                "peak_rss_mb": v["peak_rss_mb"],
                "peak_rss_export_mb": v["peak_rss_export_mb"],
                "rss_at_export_start_mb": v["rss_at_export_start_mb"],
                "blocks": v["blocks"],
            }
            for k, v in runs.items()
        },
        "ratio_export_vs_forward": main_run["voxels_per_s"] / fwd,
        "target_ratio": 0.8,
        "peak_rss_export_mb_spread": max(rss) - min(rss),
        "note": "ROIs of the volumes are exported (a whole several-GB volume takes hours on this "
        "CPU); "
        "forward-only is the mean of a run before and after the exports",
    }
    print(json.dumps(rec, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        if Path(
            args.out
        ).exists():  # keep bench_export_large.py's record, which it merges into this file
            old = json.loads(Path(args.out).read_text())
            rec.update({k: old[k] for k in ("larger_than_memory",) if k in old})
        Path(args.out).write_text(json.dumps(rec, indent=1) + "\n")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
