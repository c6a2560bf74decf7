"""The training step of dense self-distillation of a U-Net's hypercolumn (recipe
`unet_dino_dense_hc`), as emfm computes it (the levels read at the sampled cells only,
`emfm.objectives.dino_dense.hypercolumn_at`) against building the full-resolution hypercolumn
`[b, H, W, 256]`, turning it back and reading it (the earlier formulation, kept here as the
reference), side by side in one run on the CPU. Both give the same loss and gradients
(tests/unit/test_dino_dense.py::test_hypercolumn_read_at_samples_equals_the_full_map).

One step: the loss of a batch and its gradient with respect to the student's parameters (the
optimiser update, equal in both, is left out), batch 64 of 64 x 64 crops, width-16 U-Net, fp32.
The two are alternated for `--rounds` rounds; each round gives the median of `--steps` steps.

Command: .venv/bin/python benchmarks/bench_dino_dense_cpu.py [--rounds 3] [--steps 5]
    [--out experiments/benchmarks/dino_dense_cpu.json]
Hardware: the 2-core CPU box. Runtime: about 2 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from emfm.config.schema import compose
from emfm.objectives import dino_dense as dd
from emfm.train.state import build_pretraining_model


def full_map_loss(encoder, heads, x, rng, cfg, teacher):
    """dense_dino_loss as it was written before reading at the samples: the full-resolution
    hypercolumn of both views (the same random draws, so the same loss)."""
    kt, kz, kd, kp, km, ks = jax.random.split(rng, 6)
    b, h = x.shape[0], x.shape[1]
    xt = dd.photometric(kt, x, brightness=0.05, contrast=0.1, gamma=0.1, noise=0.01)
    zoomed, (y0, x0, side) = dd.zoom_crops(kz, x, tuple(cfg.local_crop_scale))
    code = dd.dihedral_codes(kd, b, square=True)
    xs = dd.mask_squares(km, dd.photometric(kp, zoomed), cfg.mask_ratio, cfg.mim_patch)
    xs = dd.dihedral(xs, code)
    t_enc, t_heads = teacher
    ft = jax.lax.stop_gradient(dd.dense_map(t_enc, xt, "hypercolumn"))
    fs = dd.dihedral(dd.dense_map(encoder, xs, "hypercolumn"), code, inverse=True)
    g, d = fs.shape[1], fs.shape[-1]
    n = g * g
    s = min(cfg.dense_samples, n)
    idx = jnp.argsort(jax.random.uniform(ks, (b, n)), axis=1)[:, :s]
    iy, ix = idx // g, idx % g
    q = jnp.take_along_axis(fs.reshape(b, n, d), idx[..., None], axis=1)
    f = (side / h)[:, None]
    ty = y0[:, None] + (iy + 0.5) * f - 0.5
    tx = x0[:, None] + (ix + 0.5) * f - 0.5
    k = dd.bilinear(ft, ty, tx)
    s_logits = heads.head(q.reshape(b * s, d))
    t_logits = jax.lax.stop_gradient(t_heads.head(k.reshape(b * s, d)))
    t_probs = jax.nn.softmax((t_logits - heads.center[...]) / cfg.teacher_temp, axis=-1)
    return jnp.mean(
        -jnp.sum(t_probs * jax.nn.log_softmax(s_logits / cfg.student_temp, axis=-1), axis=-1)
    ), {}


def make_step(loss_fn, cfg, batch: int, size: int):
    model = build_pretraining_model(cfg.model, cfg.objective)
    teacher = build_pretraining_model(cfg.model, cfg.objective)
    gd, params, rest = nnx.split(model, nnx.Param, ...)
    tgd, tstate = nnx.split(teacher)
    x = jax.random.uniform(jax.random.PRNGKey(0), (batch, size, size, 1))

    @jax.jit
    def step(params, rng):
        def f(p):
            m, t = nnx.merge(gd, p, rest), nnx.merge(tgd, tstate)
            return loss_fn(m.encoder, m.heads, x, rng, cfg.objective, (t.encoder, t.heads))[0]

        return jax.value_and_grad(f)(params)

    return lambda rng: step(params, rng)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    cfg = compose("pretrain", ["recipe=unet_dino_dense_hc"])
    steps = {
        "sampled": make_step(dd.dense_dino_loss, cfg, a.batch, 64),
        "full_map": make_step(full_map_loss, cfg, a.batch, 64),
    }
    rng = jax.random.PRNGKey(1)
    losses = {k: float(jax.block_until_ready(fn(rng))[0]) for k, fn in steps.items()}  # compile
    rounds: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(a.rounds):
        for k, fn in steps.items():
            ts = []
            for i in range(a.steps):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(jax.random.fold_in(rng, 100 * r + i)))
                ts.append(time.perf_counter() - t0)
            rounds[k].append(statistics.median(ts))
    ratios = [f / s for f, s in zip(rounds["full_map"], rounds["sampled"])]
    rec = {
        "batch": a.batch,
        "crop": 64,
        "loss_same_draws": losses,
        "round_median_s": rounds,
        "speedup_per_round": ratios,
        "speedup_median": statistics.median(ratios),
        "crops_per_s_sampled": a.batch / statistics.median(rounds["sampled"]),
        "jax": jax.__version__,
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
    }
    print(json.dumps(rec, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(rec, indent=1) + "\n")


if __name__ == "__main__":
    main()
