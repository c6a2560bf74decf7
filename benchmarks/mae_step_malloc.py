"""Page faults and system time of emfm's MAE training step on CPU, under the C library's default
allocator settings and under settings that keep freed memory in the process.

XLA's CPU runtime allocates the step's buffers afresh at every execution. With glibc's defaults,
large blocks come from fresh mappings that the kernel must fault in page by page at every step.
This script times `--steps` steps of bench_mae_cpu.py's step (ViT-S/16 or ViT-B/16, batch 32) in a
child process per setting, alternating the settings `--rounds` times, and reports per step the
wall time, the minor page faults and the user and system CPU time (getrusage), and the loss (the
settings must not change it).

Command: .venv/bin/python benchmarks/mae_step_malloc.py [--model vit_small] [--rounds 2] [--steps 5]
    [--settings default,emfm,keep_memory]
Hardware: the 2-core CPU box. Runtime: about 3 minutes a round for ViT-S/16.
Output: one JSON record on stdout (`--out FILE` also writes it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

# glibc: no mmap for large blocks, never give the top of the heap back, one arena (the
# threads' own arenas are mmapped heaps that are trimmed and faulted in again); "emfm": what
# `emfm pretrain|finetune` set at start (emfm.cli.main.tune_malloc, through mallopt)
SETTINGS = {
    "default": {},
    "emfm": {"EMFM_BENCH_TUNE_MALLOC": "1"},
    "keep_memory": {
        "MALLOC_ARENA_MAX": "1",
        "MALLOC_MMAP_MAX_": "0",
        "MALLOC_TRIM_THRESHOLD_": "100000000000",
    },
}


def child(model: str, steps: int, warmup: int) -> dict:
    tuned = None
    if os.environ.get("EMFM_BENCH_TUNE_MALLOC"):
        from emfm.cli.main import tune_malloc

        tuned = tune_malloc("pretrain")
    import resource
    import time

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_mae_cpu import mae_step

    step, state, batch, _ = mae_step(model, 32)
    rows = []
    for i in range(warmup + steps):
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        state, m = step(state, batch)
        loss = float(m["loss"])
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        if i >= warmup:
            rows.append(
                {
                    "wall_s": round(wall, 3),
                    "minor_faults": r1.ru_minflt - r0.ru_minflt,
                    "user_s": round(r1.ru_utime - r0.ru_utime, 2),
                    "sys_s": round(r1.ru_stime - r0.ru_stime, 2),
                    "loss": loss,
                }
            )
    return {"model": model, "tune_malloc": tuned, "steps": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_small", choices=["vit_small", "vit_base"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--settings", default=",".join(SETTINGS), help="which of " + ",".join(SETTINGS))
    ap.add_argument("--out", default="")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.steps, args.warmup)))
        return
    names = args.settings.split(",")
    unknown = sorted(set(names) - set(SETTINGS))
    if unknown:
        ap.error(f"--settings: unknown {unknown}; choose from {list(SETTINGS)}")
    runs = []
    for r in range(args.rounds):
        for name in names:
            env = SETTINGS[name]
            cmd = [sys.executable, __file__, "--child", "--model", args.model]
            cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
            out = subprocess.run(
                cmd, env={**os.environ, **env}, capture_output=True, text=True, check=True
            ).stdout
            rec = json.loads(out[out.index("{") :])
            rec.update(round=r, setting=name, env=env)
            walls = [s["wall_s"] for s in rec["steps"]]
            rec["images_per_s"] = 32 / statistics.median(walls)
            print(
                f"round {r} {name}: {rec['images_per_s']:.3f} images/s, "
                f"faults/step {statistics.median(s['minor_faults'] for s in rec['steps']):.0f}, "
                f"sys s/step {statistics.median(s['sys_s'] for s in rec['steps']):.2f}",
                file=sys.stderr,
            )
            runs.append(rec)
    summary = {}
    for name in names:
        ips = [r["images_per_s"] for r in runs if r["setting"] == name]
        summary[name] = {
            "images_per_s": [round(x, 3) for x in ips],
            "median": statistics.median(ips),
        }
    losses = {json.dumps([s["loss"] for s in r["steps"]]) for r in runs}
    record = {
        "bench": "mae_step_malloc",
        "command": " ".join(["benchmarks/mae_step_malloc.py"] + sys.argv[1:]),
        "same_losses": len(losses) == 1,
        "summary": summary,
        "runs": runs,
    }
    text = json.dumps(record, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
