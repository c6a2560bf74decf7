"""Training-engine benchmark, one run: (1) step time with and without asynchronous checkpointing
every 50 steps; (2) on 8 simulated CPU devices, the same model under data parallelism and under FSDP
(parameter + optimizer bytes per device, step time). Prints one JSON record and writes it to
--out (default experiments/benchmarks/engine.json).

Usage: python benchmarks/bench_engine.py [--steps 150] [--width 192 --depth 6] [--out JSON]
Each configuration runs `emfm pretrain` in its own process (the device count is fixed per process).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
from emfm.config.schema import compose
from emfm.train import distributed
args = json.loads(sys.argv[1])
cfg = compose("pretrain", args["overrides"], run_dir=args["run_dir"])
distributed.initialize(cfg.distributed)
import jax
from emfm.train import pretrain as pt
from emfm.train import mesh as meshlib
s = pt.pretrain(cfg)
# parameter + optimizer bytes per device of the state, placed as the engine places it
from flax import nnx
from emfm.train.state import build_pretraining_model, init_state
from emfm.train import optim
from emfm import objectives
m = meshlib.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
tx, _ = optim.build(cfg.optim, steps=cfg.trainer.steps, batch_size=cfg.data.batch_size)
create = lambda: init_state(build_pretraining_model(cfg.model, cfg.objective), tx, 0)[1]
sh = meshlib.state_shardings(jax.eval_shape(create), m, cfg.mesh.min_shard_size)
state = jax.jit(create, out_shardings=sh)()
per_dev = meshlib.bytes_per_device((state.params, state.opt_state))
print("RESULT", json.dumps({"train_s": s["train_s"], "steps": cfg.trainer.steps,
                            "images_per_s": s["images_per_s"],
                            "state_bytes_per_device_max": max(per_dev.values()),
                            "devices": len(per_dev)}))
"""


def run(overrides, run_dir):
    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps({"overrides": overrides, "run_dir": run_dir})],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(out.stderr[-3000:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--width", type=int, default=192)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument(
        "--out",
        default="experiments/benchmarks/engine.json",
        help="where the record goes (relative to the repo root)",
    )
    args = ap.parse_args()
    base = [
        f"trainer.steps={args.steps}",
        "trainer.progress=false",
        "trainer.log_every=50",
        "trainer.tensorboard=false",
        f"model.width={args.width}",
        f"model.depth={args.depth}",
        "model.heads=3",
        f"data.batch_size={args.batch}",
        "data.patch_shape=[1,64,64]",
    ]
    res = {
        "config": {
            "steps": args.steps,
            "width": args.width,
            "depth": args.depth,
            "batch": args.batch,
        }
    }
    with tempfile.TemporaryDirectory() as tmp:
        no_ck = run(base, f"{tmp}/a")
        ck = run(base + ["trainer.checkpoint_every=50", "trainer.keep_checkpoints=2"], f"{tmp}/b")
        res["checkpointing"] = {
            "step_s_without": no_ck["train_s"] / args.steps,
            "step_s_with_every_50": ck["train_s"] / args.steps,
            "overhead_fraction": ck["train_s"] / no_ck["train_s"] - 1.0,
        }
        dp = run(base + ["distributed.cpu_devices=8", "mesh.fsdp=1"], f"{tmp}/c")
        fs = run(
            base + ["distributed.cpu_devices=8", "mesh.fsdp=8", "mesh.min_shard_size=1024"],
            f"{tmp}/d",
        )
        res["dp_vs_fsdp_8_cpu_devices"] = {
            "dp": {
                "step_s": dp["train_s"] / args.steps,
                "state_MB_per_device": dp["state_bytes_per_device_max"] / 2**20,
            },
            "fsdp": {
                "step_s": fs["train_s"] / args.steps,
                "state_MB_per_device": fs["state_bytes_per_device_max"] / 2**20,
            },
        }
        d = res["dp_vs_fsdp_8_cpu_devices"]
        d["memory_ratio_fsdp_over_dp"] = (
            d["fsdp"]["state_MB_per_device"] / d["dp"]["state_MB_per_device"]
        )
        d["step_time_ratio_fsdp_over_dp"] = d["fsdp"]["step_s"] / d["dp"]["step_s"]
    text = json.dumps(res, indent=1)
    print(text)
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
