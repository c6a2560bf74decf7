"""`emfm export` + `emfm discover` on generated volumes whose feature arrays exceed the memory cap
they run under (and, for the larger one, this machine's RAM): peak RSS and voxels/s for two volume
sizes.

    nice -n 10 .venv/bin/python benchmarks/bench_export_large.py --sections 4 15 --cap-gb 4 \
        --out experiments/benchmarks/export.json

The record is stored under the key `larger_than_memory` of `--out` (bench_export.py's record, whose
other keys are kept), after each size.

For each size: writes a zarr v3 uint8 volume of `sections` x side x side
(benchmarks/bench_export.py's EM-like texture), then runs, each as its own process under `prlimit
--as` (a hard address-space cap, which JAX on CPU runs under) and `/usr/bin/time` (peak RSS):

  emfm export model=unet2d objective=mim_unet model.width=8 model.depth=2 export.layers=[0,1]
  export.dtype=float32 ... emfm discover features=.../features.zarr k=8 sample_fraction=0.02

The encoder is a random-init 2D U-Net (levels of 8 and 16 channels, both kept and concatenated at
full resolution: 24 float32 channels = 96 bytes of features per voxel), cheap enough that several GB
of features take minutes on a 2-core CPU. Volumes and outputs are deleted after each size (--keep
keeps them).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EMFM = str(Path(sys.executable).parent / "emfm")
MODEL = ["model=unet2d", "objective=mim_unet", "model.width=8", "model.depth=2"]


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def capped(cmd: list[str], cap_gb: float) -> dict:
    """Run `cmd` under an address-space cap; its peak RSS (MB), wall time (s) and return code."""
    full = [
        "prlimit",
        f"--as={int(cap_gb * 2**30)}",
        "/usr/bin/time",
        "-f",
        "EMFM_TIME %M %e",
        *cmd,
    ]
    p = subprocess.run(full, cwd=REPO, capture_output=True, text=True)
    line = [ln for ln in p.stderr.splitlines() if ln.startswith("EMFM_TIME")]
    if p.returncode != 0 or not line:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    rss_kb, wall = line[-1].split()[1:]
    return {"peak_rss_mb": int(rss_kb) / 1024, "wall_s": float(wall)}


def main() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_export import make_volume

    ap = argparse.ArgumentParser()
    ap.add_argument("--path", default=str(Path(tempfile.gettempdir()) / "emfm_bench_large"))
    ap.add_argument("--sections", type=int, nargs="+", default=[4, 15])
    ap.add_argument("--side", type=int, default=4096)
    ap.add_argument(
        "--cap-gb", type=float, default=4.0, help="prlimit --as for each export / discover process"
    )
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--margin", type=int, default=32)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--sample-fraction", type=float, default=0.02)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument(
        "--out", help="store the record under 'larger_than_memory' in this JSON file (kept whole)"
    )
    args = ap.parse_args()
    root = Path(args.path)
    root.mkdir(parents=True, exist_ok=True)
    rec = {
        "benchmark": "export_large",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": platform.machine(),
        "ram_gb": round(_ram_gb(), 1),
        "cap_gb": args.cap_gb,
        "model": " ".join(MODEL),
        "layers": [0, 1],
        "channels": 24,
        "dtype": "float32",
        "tile": args.tile,
        "margin": args.margin,
        "k": args.k,
        "sample_fraction": args.sample_fraction,
        "runs": [],
    }
    for n in args.sections:
        vol = root / f"vol_{n}.zarr"
        t0 = time.perf_counter()
        shape = make_volume(vol, n * args.side**2 / 1e9, args.side)
        gen_s = time.perf_counter() - t0
        run = root / f"run_{n}"
        exp_cmd = [
            EMFM,
            "export",
            *MODEL,
            f"export.path={vol}",
            "export.layers=[0,1]",
            "export.dtype=float32",
            f"export.tile={args.tile}",
            f"export.margin={args.margin}",
            "trainer.progress=false",
            f"hydra.run.dir={run / 'export'}",
        ]
        exp = capped(exp_cmd, args.cap_gb)
        er = json.loads((run / "export" / "export.json").read_text())
        feats = run / "export" / "features.zarr"
        disc_cmd = [
            EMFM,
            "discover",
            f"features={feats}",
            f"k={args.k}",
            f"sample_fraction={args.sample_fraction}",
            "progress=false",
            f"hydra.run.dir={run / 'discover'}",
        ]
        disc = capped(disc_cmd, args.cap_gb)
        dr = json.loads((run / "discover" / "discover.json").read_text())
        fbytes = math.prod(er["shape"]) * 4
        r = {
            "volume_shape": list(shape),
            "volume_gb": math.prod(shape) / 1e9,
            "volume_generation_s": gen_s,
            "features_shape": er["shape"],
            "features_gb": fbytes / 1e9,
            "features_on_disk_gb": du(feats) / 1e9,
            "export": {
                **exp,
                "voxels": er["voxels"],
                "voxels_per_s": er["voxels_per_s"],
                "blend": er["blend"],
            },
            "discover": {
                **disc,
                "vectors": dr["vectors"],
                "fit_vectors": dr["fit_vectors"],
                "vectors_per_s": dr["vectors"] / disc["wall_s"],
                "fractions": dr["fractions"],
            },
            "commands": [
                " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd))
                for cmd in (exp_cmd, disc_cmd)
            ],
        }
        rec["runs"].append(r)
        print(json.dumps(r, indent=1), flush=True)
        if not args.keep:
            shutil.rmtree(vol)
            shutil.rmtree(run)
        if args.out:  # e.g. experiments/benchmarks/export.json
            out = Path(args.out)
            whole = json.loads(out.read_text()) if out.exists() else {}
            whole["larger_than_memory"] = rec
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(whole, indent=1) + "\n")


def _ram_gb() -> float:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) / 2**20


if __name__ == "__main__":
    main()
