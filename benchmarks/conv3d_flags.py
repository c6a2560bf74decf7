"""One 3D convolution training step under the XLA flags of the environment, for comparing XLA's CPU
library options (XLA_FLAGS is read when JAX starts, so each setting needs its own process).

    XLA_FLAGS=... .venv/bin/python benchmarks/conv3d_flags.py [SHAPE C KERNEL IMPL]
    e.g. XLA_FLAGS=--xla_cpu_use_xnnpack=true .venv/bin/python benchmarks/conv3d_flags.py \
        16x64x64 16 3x3x3 fold

Step: forward and gradients (input, weights) of mean(conv(x, w) ** 2), batch 2, fp32, with the
formulation IMPL of emfm.models.conv3d (native, fold, fold_sum). Prints one JSON line: the median
step time of 5 steps after a warm-up, the loss and gradient sums (to see whether a flag changed the
arithmetic). Runtime: seconds. Results: experiments/benchmarks/README.md, conv3d_cpu.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from emfm.models.conv3d import FORMULATIONS


def main() -> None:
    args = sys.argv[1:] or ["16x64x64", "16", "3x3x3", "native"]
    shape = tuple(int(v) for v in args[0].split("x"))
    c, kernel, impl = int(args[1]), tuple(int(v) for v in args[2].split("x")), args[3]
    x = jax.random.normal(jax.random.PRNGKey(0), (2, *shape, c))
    w = jax.random.normal(jax.random.PRNGKey(1), (*kernel, c, c)) * 0.1

    def loss(x, w):
        return jnp.mean(FORMULATIONS[impl](x, w) ** 2)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    value, (gx, gw) = jax.block_until_ready(step(x, w))
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(step(x, w))
        times.append(time.perf_counter() - t0)
    print(
        json.dumps(
            {
                "impl": impl,
                "xla_flags": os.environ.get("XLA_FLAGS", ""),
                "ms": round(1000 * statistics.median(times), 1),
                "loss": float(value),
                "grad_x_abs_sum": float(jnp.abs(gx).sum()),
                "grad_w_abs_sum": float(jnp.abs(gw).sum()),
            }
        )
    )


if __name__ == "__main__":
    main()
