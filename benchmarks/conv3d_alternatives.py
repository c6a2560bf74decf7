"""Two further formulations of the 3x3x3 convolution training step on the CPU, timed against
emfm's depth-folded one (emfm.models.conv3d, `fold`), to see whether either gets nearer PyTorch.

    .venv/bin/python benchmarks/conv3d_alternatives.py [--combos 16x64x64:16,16x64x64:32]
        [--rounds 3] [--steps 5] [--out FILE.json]

Both start, as `fold` does, from the kz = 3 depth-shifted copies stacked along channels
(xs [b z, h, w, 3 C], kernel [3, 3, 3 C, C]); they replace the 2D convolution that follows:
  "winograd": Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray 2016): the input cut into
      4 x 4 tiles at stride 2 and transformed (B^T d B), the kernel transformed (G g G^T), one
      batched matrix product over the 16 transform positions ([16, tiles, 3 C] x [16, 3 C, C]),
      the inverse transform (A^T m A); 2.25x fewer multiply-adds than the direct convolution;
  "shifted_dots": the padded sections flattened to [b z, (h + 3) (w + 2), 3 C], where an in-plane
      shift (dy, dx) is a contiguous slice at offset dy (w + 2) + dx; the three dx shifts stacked
      along channels, then three matrix products (one per dy) with K = 9 C, summed; the two
      padding columns per row cropped at the end.
Gradients come from autodiff of each formulation. A step is that of bench_conv3d_cpu.py: forward
and gradients (input, kernel) of mean(conv(x, w) ** 2), batch 2, fp32. Each formulation's output
and both gradients are checked against the native 3D convolution (relative max error, printed).
Per combination the three formulations alternate for `--rounds` rounds of `--steps` steps after a
warm-up; one JSON line per combination with every round's median (ms). Runtime: about a minute
per combination. Results: experiments/benchmarks/README.md, conv3d_cpu.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax

from emfm.models.conv3d import _pad_depth, conv3d_fold, conv3d_native


def _stack_depth(x: jax.Array, kz: int) -> jax.Array:
    """[b, z, h, w, c] -> [b z, h, w, kz c]: the kz depth-shifted copies of the padded input."""
    b, d, h, w, c = x.shape
    xp = _pad_depth(x, kz)
    xs = jnp.concatenate([xp[:, i : i + d] for i in range(kz)], axis=-1)
    return xs.reshape(b * d, h, w, kz * c)


def _kernel_2d(kernel: jax.Array) -> jax.Array:
    kz, ky, kx, c, o = kernel.shape
    return jnp.transpose(kernel, (1, 2, 0, 3, 4)).reshape(ky, kx, kz * c, o)


def _bt(r0, r1, r2, r3):
    """B^T of F(2, 3) applied along one axis to the four rows of a tile."""
    return (r0 - r2, r1 + r2, r2 - r1, r1 - r3)


def _g(g0, g1, g2):
    """G of F(2, 3) applied along one axis to the three taps of a kernel."""
    return (g0, 0.5 * (g0 + g1 + g2), 0.5 * (g0 - g1 + g2), g2)


def winograd_2d(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [n, h, w, c] * w [3, 3, c, o], 'SAME', stride 1, by Winograd F(2x2, 3x3)."""
    n, h, wd, c = x.shape
    o = w.shape[-1]
    th, tw = -(-h // 2), -(-wd // 2)
    xp = jnp.pad(x, ((0, 0), (1, 2 * th - h + 1), (1, 2 * tw - wd + 1), (0, 0)))
    v = []
    for u in _bt(*(xp[:, k : k + 2 * th : 2] for k in range(4))):
        v.extend(_bt(*(u[:, :, k : k + 2 * tw : 2] for k in range(4))))
    v = jnp.stack(v).reshape(16, n * th * tw, c)
    u = []
    for r in _g(w[0], w[1], w[2]):
        u.extend(_g(r[0], r[1], r[2]))
    m = jnp.einsum("tpc,tco->tpo", v, jnp.stack(u)).reshape(4, 4, n, th, tw, o)
    rows = (m[0] + m[1] + m[2], m[1] - m[2] - m[3])
    cols = [jnp.stack([r[0] + r[1] + r[2], r[1] - r[2] - r[3]], axis=3) for r in rows]
    y = jnp.stack(cols, axis=2)
    return y.reshape(n, 2 * th, 2 * tw, o)[:, :h, :wd]


def conv3d_winograd(x: jax.Array, kernel: jax.Array) -> jax.Array:
    b, d, h, w, _ = x.shape
    y = winograd_2d(_stack_depth(x, kernel.shape[0]), _kernel_2d(kernel))
    return y.reshape(b, d, h, w, -1)


def conv3d_shifted_dots(x: jax.Array, kernel: jax.Array) -> jax.Array:
    b, d, h, w, _ = x.shape
    kz, ky, kx, _, o = kernel.shape
    xs, wk = _stack_depth(x, kz), _kernel_2d(kernel)
    k3, w2 = xs.shape[-1], w + kx - 1
    py, px = (ky - 1) // 2, (kx - 1) // 2
    xq = jnp.pad(xs, ((0, 0), (py, ky - py), (px, kx - 1 - px), (0, 0)))  # one spare row at the end
    xf = xq.reshape(b * d, (h + ky) * w2, k3)
    rows = (h + ky - 1) * w2
    x3 = jnp.concatenate([xf[:, j : j + rows] for j in range(kx)], axis=-1)
    y = sum(
        jnp.einsum("bpk,ko->bpo", x3[:, i * w2 : i * w2 + h * w2], wk[i].reshape(kx * k3, o))
        for i in range(ky)
    )
    return y.reshape(b * d, h, w2, o)[:, :, :w].reshape(b, d, h, w, o)


FORMULATIONS = {
    "fold": conv3d_fold,
    "winograd": conv3d_winograd,
    "shifted_dots": conv3d_shifted_dots,
}


def _loss(conv):
    return lambda x, w: jnp.mean(conv(x, w) ** 2)


def _rel(a: jax.Array, b: jax.Array) -> float:
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def run(shape: tuple[int, ...], c: int, rounds: int, steps: int) -> dict:
    x = jax.random.normal(jax.random.PRNGKey(0), (2, *shape, c))
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, c, c)) * 0.1
    hi = lax.Precision.HIGHEST
    ref = conv3d_native(x, w, precision=hi)
    gref = jax.grad(_loss(lambda x, w: conv3d_native(x, w, precision=hi)), argnums=(0, 1))(x, w)
    record: dict = {"shape": list(shape), "channels": c, "kernel": [3, 3, 3]}
    record.update(rel_err={}, ms={})
    fns = {}
    for name, conv in FORMULATIONS.items():
        fns[name] = jax.jit(jax.value_and_grad(_loss(conv), argnums=(0, 1)))
        _, grads = jax.block_until_ready(fns[name](x, w))
        record["rel_err"][name] = {
            "output": _rel(conv(x, w), ref),
            "grad_x": _rel(grads[0], gref[0]),
            "grad_w": _rel(grads[1], gref[1]),
        }
        record["ms"][name] = []
    for _ in range(rounds):
        for name, fn in fns.items():
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(x, w))
                times.append(time.perf_counter() - t0)
            record["ms"][name].append(round(1000 * statistics.median(times), 1))
    record["median_ms"] = {k: statistics.median(v) for k, v in record["ms"].items()}
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--combos", default="16x64x64:16,16x64x64:32", help="SHAPE:C,...")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", default="", help="also write the records here (JSON list)")
    a = p.parse_args()
    combos = []
    for combo in a.combos.split(","):
        try:
            s, c = combo.split(":")
            combos.append((tuple(int(v) for v in s.split("x")), int(c)))
        except ValueError:
            p.error(f"--combos: {combo!r} is not SHAPE:C, e.g. 16x64x64:16")
        if len(combos[-1][0]) != 3 or min(*combos[-1][0], combos[-1][1]) < 1:
            p.error(f"--combos: {combo!r}: give a positive z x y x x shape and channel count")
    if a.rounds < 1 or a.steps < 1:
        p.error("--rounds and --steps must be >= 1")
    records = []
    for shape, c in combos:
        rec = run(shape, c, a.rounds, a.steps)
        print(json.dumps(rec), flush=True)
        records.append(rec)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"jax": jax.__version__, "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
