"""Where the time of emfm's depth-folded 3D convolution step goes on the CPU: the three 2D
convolutions of one training step of `fold` (emfm.models.conv3d), timed apart.

    .venv/bin/python benchmarks/conv3d_parts.py [SHAPE C] [--rounds 3] [--steps 5]
    e.g. .venv/bin/python benchmarks/conv3d_parts.py 16x64x64 16

`fold` turns a 3x3x3 convolution of x [2, D, H, W, C] into one 2D convolution of the kz = 3
depth-shifted copies stacked along channels, xs [2 D, H, W, 3 C], with kernel [3, 3, 3 C, C].
A training step needs that convolution (forward), its gradient with respect to xs (a transposed
convolution) and its gradient with respect to the kernel (XLA lowers it to a convolution whose
window is the whole H x W section). This script times each of the three alone (jitted, median of
`--steps` steps per round, `--rounds` rounds alternated), the whole `fold` step (forward and both
gradients of mean(conv ** 2) through emfm.models.conv3d.conv3d_fold, including the stacking and
its gradient), and the kernel gradient written as one matrix product of xs with the 9 spatially
shifted copies of the output gradient (a formulation tried as a replacement; both gradients are
checked equal to 1e-4 relative), and prints one JSON object with the times and GFLOP/s (2 x
multiply-adds of the convolution per part). Runtime: about a minute. Results:
experiments/benchmarks/README.md, conv3d_cpu.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from emfm.models.conv3d import conv3d_fold

DN = ("NHWC", "HWIO", "NHWC")


def conv(x, k):
    return lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=DN)


def kernel_grad_dot(x, g):
    """d(sum(conv(x, k) * g)) / dk for a 3x3 'SAME' kernel as one matrix product:
    xs^T [cin, n h w] @ [n h w, 9 cout] (the 9 shifted copies of g)."""
    n, h, w, cin = x.shape
    cout = g.shape[-1]
    gp = jnp.pad(g, ((0, 0), (1, 1), (1, 1), (0, 0)))
    g9 = jnp.concatenate(
        [gp[:, 2 - i : 2 - i + h, 2 - j : 2 - j + w] for i in range(3) for j in range(3)], axis=-1
    )
    out = jnp.dot(x.reshape(-1, cin).T, g9.reshape(-1, 9 * cout))
    return out.reshape(cin, 3, 3, cout).transpose(1, 2, 0, 3)


def timed(fn, args, steps: int) -> float:
    ts = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("shape", nargs="?", default="16x64x64")
    ap.add_argument("channels", nargs="?", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args()
    try:
        d, h, w = (int(v) for v in a.shape.split("x"))
    except ValueError:
        ap.error(f"SHAPE {a.shape!r}: give depth x height x width, e.g. 16x64x64")
    c = a.channels
    if min(d, h, w, c) < 1 or a.rounds < 1 or a.steps < 1:
        ap.error("SHAPE, C, --rounds and --steps must be positive")
    rng = np.random.default_rng(0)
    x5 = jnp.asarray(rng.standard_normal((2, d, h, w, c)), jnp.float32)
    k5 = jnp.asarray(rng.standard_normal((3, 3, 3, c, c)) / (27 * c) ** 0.5, jnp.float32)
    xs = jnp.asarray(rng.standard_normal((2 * d, h, w, 3 * c)), jnp.float32)
    k2 = jnp.asarray(rng.standard_normal((3, 3, 3 * c, c)) / (27 * c) ** 0.5, jnp.float32)
    g = jnp.asarray(rng.standard_normal((2 * d, h, w, c)), jnp.float32)

    parts = {
        "forward": (jax.jit(conv), (xs, k2)),
        "input_grad": (jax.jit(lambda x, k, g: jax.vjp(conv, x, k)[1](g)[0]), (xs, k2, g)),
        "kernel_grad": (jax.jit(lambda x, k, g: jax.vjp(conv, x, k)[1](g)[1]), (xs, k2, g)),
        "kernel_grad_dot": (jax.jit(lambda x, k, g: kernel_grad_dot(x, g)), (xs, k2, g)),
        "fold_step": (
            jax.jit(jax.grad(lambda x, k: jnp.mean(conv3d_fold(x, k) ** 2), argnums=(0, 1))),
            (x5, k5),
        ),
    }
    ref = parts["kernel_grad"][0](xs, k2, g)
    alt = parts["kernel_grad_dot"][0](xs, k2, g)
    rel = float(jnp.max(jnp.abs(alt - ref)) / jnp.max(jnp.abs(ref)))
    if rel > 1e-4:
        raise SystemExit(f"kernel_grad_dot differs from the convolution's gradient: {rel:.2e}")
    for fn, args in parts.values():
        jax.block_until_ready(fn(*args))  # compile and warm up
    runs: dict[str, list[float]] = {k: [] for k in parts}
    for _ in range(a.rounds):
        for name, (fn, args) in parts.items():
            runs[name].append(round(timed(fn, args, a.steps), 2))
    gflop = 2 * 2 * d * h * w * 27 * c * c / 1e9  # one convolution's multiply-adds x 2
    med = {k: statistics.median(v) for k, v in runs.items()}
    out = {
        "shape": a.shape,
        "channels": c,
        "batch": 2,
        "gflop_per_conv": round(gflop, 3),
        "median_ms": {k: round(v, 2) for k, v in med.items()},
        "gflop_per_s": {
            k: round((3 if k == "fold_step" else 1) * gflop / (v / 1e3), 1) for k, v in med.items()
        },
        "rounds_ms": runs,
        "kernel_grad_dot_rel_err": rel,
        "jax": jax.__version__,
        "cpus": os.cpu_count(),
        "load_avg": os.getloadavg(),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
