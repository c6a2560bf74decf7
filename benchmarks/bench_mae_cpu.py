"""emfm's MAE training step against the PyTorch reference, side by side in one run, on CPU.

Same model and step as ../shared/bench/mae_torch.py: ViT-S/16 and ViT-B/16 encoders on 224x224
one-channel images, 75 % random masking, decoder 8 blocks x 512 (16 heads), norm-pixel MSE on masked
patches, AdamW (lr 1.5e-4, betas 0.9 / 0.95, weight decay 0.05 on every parameter, no clipping),
batch 32, fp32. Reports images/s of each and their ratio, and achieved FLOP/s (analytic count,
../shared/bench/mae_flops.py) over the fp32 matmul ceiling measured in the same run
(../shared/bench/cpu_ceiling.py). The peer runs in its own environment (`.venv-peer`, torch==2.13.0;
see ../shared/bench/README.md).

With `--rounds N` the whole comparison (every model: PyTorch, then emfm) is repeated N times,
alternating the two, and `summary` gives per model the median ratio over the rounds with each
round's figure.

The emfm side sets glibc's malloc up as `emfm pretrain` does (emfm.cli.main.tune_malloc: freed
memory stays in the process) unless `--glibc-default`; the records before that setting existed ran
with glibc's defaults.

Command: .venv/bin/python benchmarks/bench_mae_cpu.py --variant NAME [--models vit_small,vit_base]
    [--steps 3] [--rounds 3] [--glibc-default]
Hardware: the 2-core CPU box. Runtime: about 7 minutes a round. Output: the record under key NAME
of experiments/benchmarks/mae_cpu.json (e.g. the machine), the other keys kept.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(os.environ.get("EMFM_SHARED_BENCH", REPO.parent / "shared" / "bench"))
PEER_PY = REPO / ".venv-peer" / "bin" / "python"
SIZES = {"vit_small": "S", "vit_base": "B"}


def run_json(cmd: list[str]) -> dict:
    """Run a peer script and parse the one JSON record it prints."""
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out[out.index("{") :])


def mae_step(model: str, batch: int):
    """emfm's jitted MAE training step for `model` (a key of SIZES), its initial state, a batch of
    `batch` random images and the parameter count."""
    import jax
    import jax.numpy as jnp
    import optax

    from emfm.config.objective import MAEConfig
    from emfm.config.schema import ModelConfig
    from emfm.models.vit import count_params
    from emfm.objectives import mae
    from emfm.train.state import build_pretraining_model, init_state, make_train_step

    mcfg = ModelConfig(name="vit", size=SIZES[model], patch_size=[16, 16])
    ocfg = MAEConfig(
        mask_ratio=0.75,
        decoder_width=512,
        decoder_depth=8,
        decoder_heads=16,
        norm_pix_loss=True,
    )
    net = build_pretraining_model(mcfg, ocfg)
    nparams = count_params(net)
    tx = optax.adamw(1.5e-4, b1=0.9, b2=0.95, weight_decay=0.05)
    graphdef, state = init_state(net, tx, 0)
    del net
    step = jax.jit(
        make_train_step(graphdef, lambda m, b, r, t: mae.loss(m, b, r, mask_ratio=0.75), tx),
        donate_argnums=0,
    )
    images = jax.random.normal(jax.random.PRNGKey(0), (batch, 224, 224, 1), jnp.float32)
    return step, state, {"image": images}, nparams


def bench_emfm(model: str, batch: int, steps: int, warmup: int) -> dict:
    import jax

    step, state, batch_arr, nparams = mae_step(model, batch)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch_arr).compile()
    compile_s = time.perf_counter() - t0
    losses, ts = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        state, m = compiled(state, batch_arr)
        losses.append(float(m["loss"]))  # blocks until the step is done
        if i >= warmup:
            ts.append(time.perf_counter() - t0)
    med = statistics.median(ts)
    return {
        "model": model,
        "batch": batch,
        "params_M": nparams / 1e6,
        "jax": jax.__version__,
        "compile_s": compile_s,
        "median_s": med,
        "min_s": min(ts),
        "all_s": [round(t, 4) for t in ts],
        "images_per_s": batch / med,
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


def compare(model: str, args, peak: float, configs, flops_of) -> dict:
    """One round for `model`: the PyTorch reference, then emfm's step; ratio and FLOP rates."""
    torch_res = run_json(
        [
            str(PEER_PY),
            str(BENCH / "mae_torch.py"),
            "--model",
            model,
            "--batch",
            str(args.batch),
            "--threads",
            str(args.threads),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
        ]
    )
    emfm_res = bench_emfm(model, args.batch, args.steps, args.warmup)
    flop_img = flops_of(configs[model])["train_step_approx"]
    emfm_res["achieved_GFLOPs"] = flop_img * args.batch / emfm_res["median_s"] / 1e9
    return {
        "model": model,
        "analytic_train_GFLOP_per_img": flop_img / 1e9,
        "emfm_images_per_s": emfm_res["images_per_s"],
        "torch_images_per_s": torch_res["images_per_s"],
        "speed_ratio_emfm_over_torch": emfm_res["images_per_s"] / torch_res["images_per_s"],
        "emfm_fraction_of_ceiling": emfm_res["achieved_GFLOPs"] / peak if peak else None,
        "torch_fraction_of_ceiling": torch_res["achieved_GFLOPs"] / peak if peak else None,
        "emfm": emfm_res,
        "torch": torch_res,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="vit_small,vit_base")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / "experiments" / "benchmarks" / "mae_cpu.json"))
    ap.add_argument("--variant", required=True, help="the key of --out this run's record goes to")
    ap.add_argument("--glibc-default", action="store_true", help="leave glibc's malloc as it is")
    args = ap.parse_args()
    tuned = None
    if not args.glibc_default:  # before jax starts any thread, as `emfm pretrain` does
        from emfm.cli.main import tune_malloc

        tuned = tune_malloc("pretrain")
    sys.path.insert(0, str(BENCH))
    from mae_flops import CONFIGS, mae_forward_flops

    def ceiling_of(python: str, skip: str) -> dict:
        cmd = [python, str(BENCH / "cpu_ceiling.py"), "--n", "2048", "--repeats", "5"]
        return run_json([*cmd, "--skip", skip])

    ceiling = ceiling_of(sys.executable, "torch,torch_bf16,membw")  # numpy and jax, here
    ceiling.update(ceiling_of(str(PEER_PY), "numpy,jax,torch_bf16,membw"))  # torch, the peer's
    # the ceiling is the best fp32 matmul rate any of the three libraries reached on this machine
    peak = max(ceiling[k]["gflops"] for k in ("numpy_f32", "jax_f32", "torch_f32") if k in ceiling)
    record = {
        "bench": "mae_cpu",
        "command": " ".join(sys.argv),
        "tune_malloc": tuned,
        "ceiling_gflops": peak,
        "ceiling": ceiling,
        "runs": [],
    }
    for rnd in range(args.rounds):
        for model in args.models.split(","):
            run = compare(model, args, peak, CONFIGS, mae_forward_flops)
            run["round"] = rnd
            record["runs"].append(run)
            print(
                json.dumps({k: v for k, v in run.items() if k not in ("emfm", "torch")}, indent=1),
                flush=True,
            )
    record["summary"] = {
        model: {
            "median_ratio_emfm_over_torch": statistics.median(rs),
            "ratios": [round(r, 4) for r in rs],
            "rounds": len(rs),
        }
        for model in args.models.split(",")
        if (rs := [r["speed_ratio_emfm_over_torch"] for r in record["runs"] if r["model"] == model])
    }
    print(json.dumps(record["summary"], indent=1))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    records = json.loads(out.read_text()) if out.exists() else {}
    records[args.variant] = record
    out.write_text(json.dumps(records, indent=1, default=float))
    print(f"wrote key {args.variant!r} of {out}")


if __name__ == "__main__":
    main()
