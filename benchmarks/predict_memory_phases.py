"""Where the peak memory of `emfm predict` + stitched instances grows with the volume: the same
command split into its phases, each a separate process with its peak RSS (wait4 ru_maxrss), on a
shallow and a deeper volume of real EM (benchmarks/predict_memory.py's tiled ISBI sections).

Per volume:
  1. `emfm predict ... predict.instances=none`: probabilities only;
  2. `emfm instances input=PROB out=LABELS method=watershed channel=1 block=B halo=H`: instances of
     those probabilities, block by block with stitching (the instance phase of 1+2 below);
  3. `emfm predict ... predict.instances=watershed`: both in one process (what
     predict_memory.py caps).
The instance blocks are the same for every volume (`--instance-block`, halo z 0 so that a block with
its halo never depends on the volume's depth), so only what scales with the volume differs.
The record goes into experiments/benchmarks/predict_memory_phases.json (`--out`) under a variant key
(`--variant`), by default named after the settings: cache{MB}[_arena{N}]{_cli | _emfmarena{M}}
(chunk cache MB; MALLOC_ARENA_MAX N; `_cli` = the CLI's own arena cap, `_emfmarena{M}` =
EMFM_MALLOC_ARENA_MAX=M); the other variants in the file are kept.

  PYTHONPATH=. python benchmarks/predict_memory_phases.py --checkpoint FINETUNE_RUN \
      [--sizes 4,1024,1024:16,1024,1024] [--cache-mb 64|0] [--malloc-arena-max N] \
      [--emfm-arena-max M] [--out JSON] [--variant NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from predict_memory import (  # noqa: E402
    EMFM,
    parse_peak,
    provenance,
    rss_wrapper,
    train_tiny,
    write_tiled_volume,
    write_variant,
)


def run(cmd: list[str], env: dict) -> dict:
    t0 = time.perf_counter()
    p = subprocess.run(
        rss_wrapper(cmd),
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    peak = parse_peak(p.stdout)
    if peak.get("status") != 0:
        raise SystemExit(f"predict_memory_phases: {' '.join(cmd[3:])} failed:\n{p.stdout[-3000:]}")
    return {"peak_rss_mb": round(peak["rss_mb"], 1), "wall_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="")
    ap.add_argument("--sizes", default="4,1024,1024:16,1024,1024")
    ap.add_argument(
        "--work", default=str(Path(tempfile.gettempdir()) / "emfm_predict_memory_phases")
    )
    ap.add_argument("--instance-block", default="4,256,256")
    ap.add_argument("--instance-halo", default="0,32,32")
    ap.add_argument("--cache-mb", type=int, default=64, help="EMFM_CHUNK_CACHE_MB of every process")
    ap.add_argument(
        "--malloc-arena-max",
        type=int,
        default=0,
        help="MALLOC_ARENA_MAX of every process (glibc's own; 0 = not set)",
    )
    ap.add_argument(
        "--emfm-arena-max",
        default="",
        help="EMFM_MALLOC_ARENA_MAX of every process (the CLI's cap, default 1; 0 = glibc's "
        "default)",
    )
    ap.add_argument(
        "--out",
        default="experiments/benchmarks/predict_memory_phases.json",
        help="the JSON file (relative to the repo root) that holds the record under --variant",
    )
    ap.add_argument(
        "--variant", default="", help="key of this run's record in --out (default: the settings)"
    )
    a = ap.parse_args()
    started = provenance()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "EMFM_CHUNK_CACHE_MB": str(a.cache_mb)}
    env.pop("MALLOC_ARENA_MAX", None)
    if a.malloc_arena_max:
        env["MALLOC_ARENA_MAX"] = str(a.malloc_arena_max)
    env.pop("EMFM_MALLOC_ARENA_MAX", None)
    if a.emfm_arena_max:
        env["EMFM_MALLOC_ARENA_MAX"] = a.emfm_arena_max
    ckpt = a.checkpoint
    if not ckpt:
        ckpt = str(work / "tiny_model")
        if not (Path(ckpt) / "finetune_summary.json").exists():
            train_tiny(Path(ckpt), env)
    records = []
    for size in a.sizes.split(":"):
        shape = tuple(int(v) for v in size.split(","))
        tag = "x".join(map(str, shape))
        vol, prob, lab = (
            work / f"vol_{tag}.zarr",
            work / f"prob_{tag}.zarr",
            work / f"lab_{tag}.zarr",
        )
        write_tiled_volume(vol, shape)
        predict = [
            *EMFM,
            "predict",
            f"checkpoint={ckpt}",
            f"predict.path={vol}",
            "predict.window=[1,256,256]",
            "predict.overlap=[0,32,32]",
            "predict.chunk=[1,512,512]",
            "predict.batch_size=4",
            "predict.dtype=float32",
            "predict.resume=false",
            "trainer.progress=false",
            f"hydra.run.dir={work / 'run'}",
        ]
        inst = [f"block=[{a.instance_block}]", f"halo=[{a.instance_halo}]"]
        rec = {"volume": list(shape), "voxels": shape[0] * shape[1] * shape[2]}
        for p in (prob, lab, work / "run"):
            shutil.rmtree(p, ignore_errors=True)
        rec["predict_only"] = run(
            [*predict, f"predict.out={prob}", "predict.instances=none", f"run_dir={work / 'run'}"],
            env,
        )
        rec["instances_only"] = run(
            [
                *EMFM,
                "instances",
                f"input={prob}",
                f"out={lab}",
                "method=watershed",
                "channel=1",
                *inst,
                f"run_dir={work / 'run_inst'}",
                f"hydra.run.dir={work / 'run_inst'}",
            ],
            env,
        )
        rec["segments"] = json.loads((lab / "zarr.json").read_text())["attributes"]["instances"][
            "segments"
        ]
        for p in (prob, lab, Path(str(prob)[:-5] + "_instances.zarr"), work / "run"):
            shutil.rmtree(p, ignore_errors=True)
        rec["predict_and_instances"] = run(
            [
                *predict,
                f"predict.out={prob}",
                "predict.instances=watershed",
                "instances.channel=1",
                *[f"instances.{x}" for x in inst],
                f"run_dir={work / 'run'}",
            ],
            env,
        )
        records.append(rec)
        print(json.dumps(rec), flush=True)
        for p in (vol, prob, lab, Path(str(prob)[:-5] + "_instances.zarr")):
            shutil.rmtree(p, ignore_errors=True)
    out = {
        "checkpoint": ckpt,
        "instance_block": a.instance_block,
        "instance_halo": a.instance_halo,
        "chunk_cache_mb": a.cache_mb,
        "malloc_arena_max": a.malloc_arena_max or None,
        "emfm_malloc_arena_max": a.emfm_arena_max or "1 (CLI default)",
        **started,
        "records": records,
    }
    variant = a.variant or (
        f"cache{a.cache_mb}"
        + (f"_arena{a.malloc_arena_max}" if a.malloc_arena_max else "")
        + (f"_emfmarena{a.emfm_arena_max}" if a.emfm_arena_max else "_cli")
    )
    write_variant(REPO / a.out, variant, out)


if __name__ == "__main__":
    main()
