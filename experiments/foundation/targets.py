"""The targets of the foundation checkpoint, read from a test-section benchmark of `zoo:NAME`
against random init (`bash experiments/foundation/benchmark_test.sh`).

    python experiments/foundation/targets.py BENCH_DIR [--zoo zoo:em_unet16] [--out FILE.md]

For every task, probe and label fraction: the primary metric (membranes / neuron boundaries: pixel
F1; mitochondria: IoU) of the zoo checkpoint and of random init (mean ± std, ddof 1, over the seeds;
each random-init seed its own network), the margin, and whether it meets the target: a margin above
+0.03 and above 2 standard deviations (the larger of the two rows' std). The target covers the
linear and MLP probes at 1 % and 10 % of the labels; kNN and 100 % are reported beside it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PRIMARY = {"membranes": "f1", "neuron_boundaries": "f1", "mitochondria": "iou"}


def table(bench: Path, zoo: str) -> tuple[str, dict]:
    d = json.loads((bench / "benchmark.json").read_text())
    if d.get("split") != "test":
        raise SystemExit(
            f"{bench}: split={d.get('split')!r}; the targets are read from the test sections"
        )
    targets = {k: t["target"] for k, t in d["tasks"].items()}
    rows = {(r["task"], r["probe"], r["fraction"], r["checkpoint"]): r for r in d["rows"]}
    lines = [
        "| task (metric) | probe | labels | zoo | random | margin | 2 std | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    met = total = 0
    for (task, probe, frac, ck), z in sorted(rows.items()):
        if ck != zoo or (task, probe, frac, "random") not in rows:
            continue
        m = PRIMARY.get(targets.get(task, ""), "f1")
        r = rows[(task, probe, frac, "random")]
        margin = z[f"{m}_mean"] - r[f"{m}_mean"]
        two_std = 2 * max(z[f"{m}_std"], r[f"{m}_std"])
        in_target = probe in ("linear", "mlp") and frac in (0.01, 0.1)
        ok = margin > 0.03 and margin > two_std
        if in_target:
            total += 1
            met += ok
        verdict = (
            ("met" if ok else "not met") if in_target else ("(ahead)" if margin > 0 else "(behind)")
        )
        lines.append(
            f"| {task} ({m}) | {probe} | {frac:.0%} | {z[f'{m}_mean']:.4f} ± {z[f'{m}_std']:.4f} | "
            f"{r[f'{m}_mean']:.4f} ± {r[f'{m}_std']:.4f} | {margin:+.4f} | {two_std:.4f} | "
            f"{verdict} |"
        )
    seeds = sorted({r["seeds"] for r in d["rows"]})
    sel = d.get("feature_selection") or {}
    chosen = "; ".join(f"{k}: blocks {max(v, key=v.get)}" for k, v in sel.items())
    fixed = "; ".join(f"{k}: blocks {v}" for k, v in (d.get("features") or {}).items())
    features = (
        f"features chosen on the validation sections in this run ({chosen})"
        if chosen
        else f"features as given ({fixed}; chosen on the validation sections beforehand)"
        if fixed
        else "features: each encoder's final output"
    )
    head = (
        f"Test sections; {', '.join(map(str, seeds))} seeds per row (ddof 1); {features}.\n\n"
        "Target (linear and MLP probes, 1 % and 10 % of the labels, margin > +0.03 and > 2 std): "
        "met in "
        f"{met} of {total} cells.\n\n"
    )
    return head + "\n".join(lines) + "\n", {"met": met, "cells": total}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bench_dir")
    ap.add_argument("--zoo", default="zoo:em_unet16")
    ap.add_argument("--out")
    a = ap.parse_args()
    text, _ = table(Path(a.bench_dir), a.zoo)
    if a.out:
        Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
