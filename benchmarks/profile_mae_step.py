"""Where the time of emfm's MAE training step goes on the CPU: a `jax.profiler` trace of one step,
summed per kind of XLA thunk, and the rate of every plain matrix product by shape.

The step is bench_mae_cpu.mae_step (ViT-S/16 or ViT-B/16, batch 32, 224 x 224, AdamW), with the
malloc settings of `emfm pretrain` (tune_malloc). Products are grouped by output shape, contracted
length K and the operands' contracting axes (`lc` / `rc`; rc=1 contracts the right operand on
its minor axis, i.e. a product with a transposed operand). Thunks of the two XLA threads may
overlap, so the per-kind sums can exceed the step.

Command: .venv/bin/python benchmarks/profile_mae_step.py TRACE_DIR [--model vit_small]
Hardware: the 2-core CPU box; about a minute. Output: the tables on stdout; the trace in TRACE_DIR.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def fused_bodies(hlo: str) -> tuple[dict[str, str], dict[str, str]]:
    """{fusion instruction: called computation} and {computation: body} of compiled HLO text."""
    calls = dict(re.findall(r"\n\s*%([\w.\-]+) = .*?calls=%([\w.\-]+)", hlo))
    bodies = {
        m.group(1): m.group(2)
        for m in re.finditer(r"\n%([\w.\-]+) \([^\n]*\) -> [^\n]* \{\n(.*?)\n\}", hlo, re.S)
    }
    return calls, bodies


def product_key(body: str) -> tuple[str, float] | None:
    """(shape / K / contracting axes, FLOPs) when a computation is a single 2D matrix product."""
    if body.count("\n") != 2:
        return None
    m = re.search(
        r"= f32\[([\d,]+)\]\S* dot\(%([\w.\-]+), %[\w.\-]+\), lhs_contracting_dims=\{(\d)\}, "
        r"rhs_contracting_dims=\{(\d)\}",
        body,
    )
    if not m:
        return None
    lhs = re.search(r"%" + re.escape(m.group(2)) + r" = f32\[([\d,]+)\]", body)
    out = [int(x) for x in m.group(1).split(",")]
    k = [int(x) for x in lhs.group(1).split(",")][int(m.group(3))]
    flops = 2.0 * k
    for n in out:
        flops *= n
    return f"[{m.group(1)}] K={k} lc={m.group(3)} rc={m.group(4)}", flops


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("trace_dir")
    ap.add_argument("--model", default="vit_small", choices=["vit_small", "vit_base"])
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()

    from emfm.cli.main import tune_malloc

    tune_malloc("pretrain")
    import jax
    from bench_mae_cpu import mae_step

    step, state, batch, _ = mae_step(args.model, args.batch)
    compiled = step.lower(state, batch).compile()
    calls, bodies = fused_bodies(compiled.as_text())
    for _ in range(2):
        state, m = compiled(state, batch)
        float(m["loss"])
    jax.profiler.start_trace(args.trace_dir)
    t0 = time.perf_counter()
    state, m = compiled(state, batch)
    float(m["loss"])
    step_s = time.perf_counter() - t0
    jax.profiler.stop_trace()
    trace = sorted(Path(args.trace_dir).rglob("*.trace.json.gz"))[-1]
    events = [e for e in json.load(gzip.open(trace))["traceEvents"] if e.get("ph") == "X"]

    kinds, counts = collections.Counter(), collections.Counter()
    products = collections.defaultdict(lambda: [0.0, 0.0, 0])
    skip = ("ThunkExecutor", "$", "np.asarray", "SlinkyThreadPool", "end:", "Pjit", "Common")
    for e in events:
        name, us = e["name"], e["dur"]
        if name.startswith(skip):
            continue
        kind = re.sub(r"\.\d+$", "", name)
        kinds[kind] += us
        counts[kind] += 1
        key = product_key(bodies.get(calls.get(name, ""), ""))
        if key:
            p = products[key[0]]
            p[0], p[1], p[2] = p[0] + us, p[1] + key[1], p[2] + 1
    print(f"{args.model}, batch {args.batch}: traced step {step_s:.2f} s, loss {float(m['loss'])}")
    print("| thunk kind | ms | count |\n|---|---|---|")
    for kind, us in kinds.most_common(15):
        print(f"| {kind} | {us / 1e3:.1f} | {counts[kind]} |")
    print("\n| matrix product | ms | count | GFLOP/s |\n|---|---|---|---|")
    for key, (us, flops, n) in sorted(products.items(), key=lambda kv: -kv[1][0])[:20]:
        print(f"| {key} | {us / 1e3:.1f} | {n} | {flops / us / 1e3:.0f} |")


if __name__ == "__main__":
    main()
