"""Resident memory of `emfm instances` (the library job, in this process) block after block, next to
numpy's own memory (tracemalloc): shows whether a growing peak is live array data or memory the
allocator holds. Probabilities come from `emfm predict` of benchmarks/predict_memory.py's tiled ISBI
volume (kept under --work and reused).

  PYTHONPATH=. [MALLOC_ARENA_MAX=1] [EMFM_CHUNK_CACHE_MB=0] python
  benchmarks/instances_memory_trace.py \\
      --checkpoint CKPT --depth 16 [--block 4,256,256 --halo 0,32,32]

Prints one line per traced point (after blocks 1, 2, 4, ..., after stitching, after relabelling):
VmRSS and VmHWM (MB) and tracemalloc's current / peak (MB). Numbers in
experiments/segmentation/README.md.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))
from predict_memory import EMFM, write_tiled_volume  # noqa: E402


def rss() -> str:
    d = dict(ln.split(":", 1) for ln in open("/proc/self/status"))
    cur, peak = (v / 2**20 for v in tracemalloc.get_traced_memory())
    return (
        f"rss {int(d['VmRSS'].split()[0]) / 1024:.0f} hwm {int(d['VmHWM'].split()[0]) / 1024:.0f} "
        "MB; "
        f"numpy/python traced {cur:.1f} peak {peak:.1f} MB"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--block", default="4,256,256")
    ap.add_argument("--halo", default="0,32,32")
    ap.add_argument(
        "--work", default=str(Path(tempfile.gettempdir()) / "emfm_instances_memory_trace")
    )
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    shape = (a.depth, a.size, a.size)
    tag = "x".join(map(str, shape))
    vol, prob, lab = work / f"vol_{tag}.zarr", work / f"prob_{tag}.zarr", work / f"lab_{tag}.zarr"
    if not prob.exists():
        write_tiled_volume(vol, shape)
        subprocess.run(
            [
                *EMFM,
                "predict",
                f"checkpoint={a.checkpoint}",
                f"predict.path={vol}",
                f"predict.out={prob}",
                "predict.window=[1,256,256]",
                "predict.overlap=[0,32,32]",
                "predict.chunk=[1,512,512]",
                "predict.dtype=float32",
                "predict.resume=false",
                "predict.instances=none",
                "trainer.progress=false",
                f"run_dir={work / 'run'}",
                f"hydra.run.dir={work / 'run'}",
            ],
            check=True,
            cwd=REPO,
        )
    from emfm.instances import SegmentParams, blockwise

    shutil.rmtree(lab, ignore_errors=True)
    shutil.rmtree(str(lab) + ".work", ignore_errors=True)
    tracemalloc.start()
    print("start:", rss(), flush=True)
    stitch, relabel = blockwise.BlockwiseJob.stitch, blockwise.BlockwiseJob.relabel

    def traced_stitch(self, prov):
        out = stitch(self, prov)
        print("after stitch:", rss(), flush=True)
        return out

    def traced_relabel(self, prov, mapping):
        out = relabel(self, prov, mapping)
        print("after relabel:", rss(), flush=True)
        return out

    blockwise.BlockwiseJob.stitch, blockwise.BlockwiseJob.relabel = traced_stitch, traced_relabel

    def progress(i, n):
        if i & (i - 1) == 0 or i == n:
            print(f"block {i}/{n}:", rss(), flush=True)

    res = blockwise.instances(
        str(prob),
        str(lab),
        SegmentParams(method="watershed"),
        channel=1,
        progress=progress,
        block=[int(v) for v in a.block.split(",")],
        halo=[int(v) for v in a.halo.split(",")],
    )
    print("segments", res["segments"])


if __name__ == "__main__":
    main()
