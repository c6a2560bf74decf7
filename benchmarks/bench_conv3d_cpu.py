"""3D convolution training steps on CPU: XLA's native 3D convolution, emfm's depth-folded ones
(emfm.models.conv3d) and PyTorch, side by side in one run; then a 3D U-Net fine-tuning step with
the native and the folded convolution.

Per (shape, channels, kernel) combination, in rounds that alternate the contenders (native,
fold, fold_sum, torch), each round times `--repeats` steps after a warm-up and records their
median; the table reports the median over rounds and the JSON every step of every round. A step is
what ../shared/bench/conv3d_torch.py times: forward and backward w.r.t. input and weights of a
C -> C 'SAME' convolution without bias, loss mean(y ** 2), batch `--batch`, fp32. FLOPs: 2 per
multiply-add, training = 3 x forward. The peer runs in its own environment (`.venv-peer`,
torch==2.13.0; see ../shared/bench/README.md) with `--threads`; this process is pinned to
`--threads` cores when the machine has more (XLA sizes its thread pool to the cores it may use).

The end-to-end step is the U-Net of configs/model/unet3d.yaml (widths 16-128, z pooled from
level 2) with the 1x1 `unet` head onto 6 affinity channels, sigmoid cross-entropy on random
targets and AdamW (emfm.train.state.make_train_step), batch 2 x 16 x 64 x 64, traced once with
the native and once with the folded convolution.

Command: .venv/bin/python benchmarks/bench_conv3d_cpu.py --variant NAME
    [--bench-dir ../shared/bench] [--rounds 3] [--repeats 5] [--threads 2]
    [--combos 16x64x64:16:3x3x3,...] [--md FILE]
Hardware: the 2-core CPU box. Runtime: about 10 minutes.
Output: the record under key NAME (e.g. `quiet`, `loaded`: the machine's load) of
experiments/benchmarks/conv3d_cpu.json, the other keys kept; with `--md FILE` also its Markdown
table (experiments/benchmarks/conv3d_cpu.md is that table for `quiet` plus a reading of both runs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BENCH = os.environ.get("EMFM_SHARED_BENCH", str(REPO.parent / "shared" / "bench"))
PEER_PY = REPO / ".venv-peer" / "bin" / "python"
# the shapes of a 3D U-Net on EM patches: full-resolution levels with few channels, deep levels
# with many; 3x3x3 and in-plane 1x3x3 kernels
COMBOS = (
    "16x64x64:16:3x3x3",  # level 0 of unet3d.yaml on a 16 x 64 x 64 patch
    "16x64x64:16:1x3x3",
    "8x64x64:8:3x3x3",
    "32x128x128:8:3x3x3",
    "32x128x128:8:1x3x3",
    "16x128x128:16:1x3x3",
    "16x32x32:32:3x3x3",  # level 1
    "16x64x64:32:3x3x3",  # level 1 of a 16 x 128 x 128 patch
    "8x32x32:64:3x3x3",
    "8x16x16:64:3x3x3",  # level 2
    "4x8x8:128:3x3x3",  # level 3
)
IMPLS = ("native", "fold", "fold_sum")


def parse_combo(s: str) -> dict:
    shape, ch, kernel = s.split(":")
    return {
        "shape": [int(v) for v in shape.split("x")],
        "channels": int(ch),
        "kernel": [int(v) for v in kernel.split("x")],
    }


def run_json(cmd: list[str]) -> dict:
    """Run a peer script and parse the one JSON record it prints."""
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out[out.index("{") :])


def time_steps(fn, repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return ts


def conv_step(impl: str, batch: int, combo: dict):
    """A compiled conv training step (grads w.r.t. input and weights) and its arguments."""
    import jax

    from emfm.models import conv3d

    fn = conv3d.FORMULATIONS[impl]
    c = combo["channels"]
    key_x, key_w = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(key_x, (batch, *combo["shape"], c))
    fan_in = c * combo["kernel"][0] * combo["kernel"][1] * combo["kernel"][2]
    w = jax.random.normal(key_w, (*combo["kernel"], c, c)) / fan_in**0.5

    def loss(x, w):
        return (fn(x, w) ** 2).mean()

    step = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile()
    return lambda: jax.block_until_ready(step(x, w))


def unet_step(impl: str, batch: int, shape: list[int]):
    """A compiled fine-tuning step of the unet3d.yaml U-Net + `unet` head, traced with `impl`."""
    import jax
    import jax.numpy as jnp
    import optax
    import yaml

    from emfm.config.schema import ModelConfig
    from emfm.models import build_encoder, conv3d
    from emfm.models.seg_heads import SegModel, build_head
    from emfm.train.state import init_state, make_train_step

    mcfg = ModelConfig(**yaml.safe_load((REPO / "configs" / "model" / "unet3d.yaml").read_text()))
    enc = build_encoder(mcfg, seed=0)
    model = SegModel(enc, build_head("unet", enc, out=6))
    tx = optax.adamw(1e-3, weight_decay=1e-4)
    graphdef, state = init_state(model, tx, 0)

    def loss_fn(m, b, rng, teacher):
        logits = m(b["image"])
        loss = optax.sigmoid_binary_cross_entropy(logits, b["target"]).mean()
        return loss, {"loss": loss}

    key_x, key_t = jax.random.split(jax.random.PRNGKey(1))
    b = {
        "image": jax.random.normal(key_x, (batch, *shape, 1)),
        "target": (jax.random.uniform(key_t, (batch, *shape, 6)) > 0.5).astype(jnp.float32),
    }
    t0 = time.perf_counter()
    with conv3d.use_impl(impl):
        step = jax.jit(make_train_step(graphdef, loss_fn, tx)).lower(state, b).compile()
    compile_s = time.perf_counter() - t0
    box = {"state": state}

    def run():
        box["state"], metrics = step(box["state"], b)
        return float(metrics["loss"])  # blocks until the step is done

    return run, compile_s


def summary(runs: list[list[float]]) -> dict:
    meds = [statistics.median(r) for r in runs]
    return {
        "ms": 1e3 * statistics.median(meds),
        "round_ms": [round(1e3 * m, 2) for m in meds],
        "all_ms": [[round(1e3 * t, 2) for t in r] for r in runs],
    }


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _name(r: dict) -> str:
    return f"{'x'.join(map(str, r['shape']))} C{r['channels']} {'x'.join(map(str, r['kernel']))}"


def write_md(record: dict, path: Path, json_path: Path, variant: str) -> None:
    env, nan = record["env"], float("nan")
    lines = [
        "# 3D convolution on CPU: XLA native vs depth-folded (emfm.models.conv3d) vs PyTorch",
        "",
        (
            f"Measured {record['date']} at commit {record['commit']} on {env['cpu_count']} cores "
            f"({env.get('cpu', 'CPU')}), {record['threads']} threads for each library; "
            f"jax {env['jax']}, torch {record.get('torch_version', '?')}. Command: "
            f"`{record['command']}`."
        ),
        "",
    ]
    if record.get("note"):
        lines += [record["note"], ""]
    lines += [
        (
            "One step: forward + backward (input and weights) of a C -> C 'SAME' convolution, "
            f"batch {record['batch']}, fp32. Median over {record['rounds']} alternating rounds "
            f"of the per-round median of {record['repeats']} steps. `emfm` is the formulation "
            "emfm uses on CPU (`auto`: fold below 32 input channels, fold_sum from 32 on); "
            "`torch / emfm` > 1: emfm is faster than PyTorch."
        ),
        "",
        (
            "| shape | C | kernel | native ms | fold ms | fold_sum ms | torch ms | emfm "
            "| emfm GFLOP/s | torch GFLOP/s | torch / emfm | native / emfm |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in record["convs"]:
        ms = {k: r[k]["ms"] if k in r else nan for k in (*IMPLS, "torch")}
        gf = r["gflops"]
        auto = r.get("auto")
        lines.append(
            f"| {'x'.join(map(str, r['shape']))} | {r['channels']} | "
            f"{'x'.join(map(str, r['kernel']))} | {ms['native']:.0f} | {ms['fold']:.0f} | "
            f"{ms['fold_sum']:.0f} | {ms['torch']:.0f} | {auto} | {gf.get(auto, nan):.1f} | "
            f"{gf.get('torch', nan):.1f} | {r.get('torch_over_emfm', nan):.2f} | "
            f"{r.get('native_over_emfm', nan):.2f} |"
        )
    e = record.get("unet")
    if e:
        lines += [
            "",
            (
                "3D U-Net fine-tuning step (configs/model/unet3d.yaml + `unet` head onto 6 "
                f"affinities, AdamW), batch {e['batch']} x {'x'.join(map(str, e['shape']))}: "
                f"native {e['native']['ms']:.0f} ms, emfm (auto) {e['auto']['ms']:.0f} ms "
                f"(x{e['native_over_auto']:.2f}); compile {e['native']['compile_s']:.1f} s / "
                f"{e['auto']['compile_s']:.1f} s. No PyTorch peer for this step."
            ),
        ]
    lines += ["", "Each round's median (ms):", ""]
    for r in record["convs"]:
        parts = [f"{k} {r[k]['round_ms']}" for k in (*IMPLS, "torch") if k in r]
        lines.append(f"- {_name(r)}: " + "; ".join(parts))
    if e:
        parts = [f"{k} {e[k]['round_ms']}" for k in ("native", "auto")]
        lines.append("- U-Net step: " + "; ".join(parts))
    lines += ["", f"Every step's time: `{json_path.name}`, key `{variant}`."]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench-dir", default=DEFAULT_BENCH, help="the shared peer harness")
    ap.add_argument("--peer-python", default=str(PEER_PY))
    ap.add_argument("--combos", default=",".join(COMBOS), help="DxHxW:C:KZxKYxKX,...")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--unet-shape", default="16x64x64", help="'' skips the U-Net step")
    ap.add_argument("--note", default="", help="a sentence for the report (e.g. machine load)")
    ap.add_argument("--out", default=str(REPO / "experiments" / "benchmarks" / "conv3d_cpu.json"))
    ap.add_argument(
        "--variant", required=True, help="key of this run's record in --out (e.g. quiet, loaded)"
    )
    ap.add_argument("--md", default="", help="also write this run's Markdown table to this file")
    args = ap.parse_args()
    if args.threads < (os.cpu_count() or 1):
        os.sched_setaffinity(0, range(args.threads))  # before jax starts its thread pool
    import jax

    from emfm.models import conv3d

    # the command as recorded: without the note (it has a line of its own) and local paths
    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a in ("--note", "--bench-dir", "--peer-python", "--out", "--md"):
            skip = True
        elif not a.startswith(("--note=", "--bench-dir=", "--peer-python=", "--out=", "--md=")):
            argv.append(a)
    bench = Path(args.bench_dir)
    sys.path.insert(0, str(bench))
    from common import env_info

    impls = [i for i in args.impls.split(",") if i]
    combos = [parse_combo(c) for c in args.combos.split(",") if c]
    env = dict(
        env_info(),
        jax=jax.__version__,
        backend=jax.default_backend(),
        affinity=sorted(os.sched_getaffinity(0)),
        machine=platform.machine(),
    )
    record = {
        "bench": "conv3d_cpu",
        "command": " ".join([Path(sys.argv[0]).name] + argv),
        "note": args.note,
        "date": datetime.date.today().isoformat(),
        "commit": git_commit(),
        "env": env,
        "threads": args.threads,
        "batch": args.batch,
        "rounds": args.rounds,
        "repeats": args.repeats,
        "convs": [],
    }
    for combo in combos:
        d, h, w = combo["shape"]
        kz, ky, kx = combo["kernel"]
        c = combo["channels"]
        flops = 3 * 2 * args.batch * d * h * w * kz * ky * kx * c * c
        steps = {i: conv_step(i, args.batch, combo) for i in impls}  # compiled once
        runs: dict[str, list] = {k: [] for k in (*impls, "torch")}
        for _ in range(args.rounds):
            for impl in impls:
                runs[impl].append(time_steps(steps[impl], args.repeats))
            peer = run_json(
                [
                    args.peer_python,
                    str(bench / "conv3d_torch.py"),
                    "--batch",
                    str(args.batch),
                    "--shape",
                    *map(str, combo["shape"]),
                    "--channels",
                    str(c),
                    "--kernel",
                    *map(str, combo["kernel"]),
                    "--threads",
                    str(args.threads),
                    "--repeats",
                    str(args.repeats),
                ]
            )
            record["torch_version"] = peer["torch"]
            runs["torch"].append(peer["timing"]["all_s"])
        res = dict(combo, gflop_per_step=flops / 1e9)
        for k, r in runs.items():
            res[k] = summary(r)
        res["gflops"] = {k: flops / res[k]["ms"] / 1e6 for k in runs}
        with conv3d.use_impl("auto"):
            res["auto"] = conv3d.current_impl(c)  # what emfm runs for this convolution
        if res["auto"] in res:
            res["torch_over_emfm"] = res["torch"]["ms"] / res[res["auto"]]["ms"]
            if "native" in res:
                res["native_over_emfm"] = res["native"]["ms"] / res[res["auto"]]["ms"]
        if "native" in res:
            res["torch_over_native"] = res["torch"]["ms"] / res["native"]["ms"]
        del steps
        record["convs"].append(res)
        print(
            json.dumps(
                {
                    k: (v["round_ms"] if isinstance(v, dict) and "round_ms" in v else v)
                    for k, v in res.items()
                }
            ),
            flush=True,
        )
    if args.unet_shape:
        shape = [int(v) for v in args.unet_shape.split("x")]
        steps = {i: unet_step(i, args.batch, shape) for i in ("native", "auto")}
        runs = {i: [] for i in steps}
        for _ in range(args.rounds):
            for impl, (fn, _) in steps.items():
                runs[impl].append(time_steps(fn, args.repeats))
        e = {
            "batch": args.batch,
            "shape": shape,
            "model": "configs/model/unet3d.yaml",
            "head": "unet",
            "out_channels": 6,
        }
        for impl, r in runs.items():
            e[impl] = dict(summary(r), compile_s=steps[impl][1])
        e["native_over_auto"] = e["native"]["ms"] / e["auto"]["ms"]
        record["unet"] = e
        print(json.dumps({k: e[k]["round_ms"] for k in ("native", "auto")}), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    whole = json.loads(out.read_text()) if out.exists() else {}
    whole[args.variant] = record
    out.write_text(json.dumps(whole, indent=1, default=float) + "\n")
    if args.md:
        write_md(record, Path(args.md), out, args.variant)
    print(f"wrote {out}" + (f" and {args.md}" if args.md else ""))


if __name__ == "__main__":
    main()
