"""Rank the checkpoints of a validation-split benchmark (`emfm probe checkpoints=[random,SWEEP]
benchmark.split=val ...`) by their margin over random init of the same architecture.

    python experiments/foundation/rank.py BENCHMARK_RUN_DIR [--out FILE.md] [--sweep SWEEP_DIR]

For every (task, probe, label fraction) the primary metric of each task (membranes / neuron
boundaries: pixel F1; mitochondria: IoU) is compared with the random-init encoder of the same
architecture; the score of a checkpoint is the mean of these margins over all cells, with the
number of cells it leads by more than 0.03. Only validation-section results are accepted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections import defaultdict
from pathlib import Path

PRIMARY = {"membranes": "f1", "neuron_boundaries": "f1", "mitochondria": "iou"}


def arch_of(run_dir: str) -> str:
    from emfm.config.schema import ModelConfig
    from emfm.train import checkpoint as ckpt

    return json.dumps(
        dataclasses.asdict(ModelConfig(**ckpt.read_meta(run_dir)["model"])), sort_keys=True
    )


def rank(bench_dir: Path) -> list[dict]:
    out = json.loads((bench_dir / "benchmark.json").read_text())
    if out.get("split") != "val":
        raise SystemExit(
            f"{bench_dir}: not a validation-split benchmark (benchmark.split=val); refusing to rank"
        )
    targets = {name: t["target"] for name, t in out["tasks"].items()}
    cps = out["checkpoints"]
    arch = {n: arch_of(c["run_dir"]) for n, c in cps.items() if c["run_dir"]}
    randoms = [n for n, c in cps.items() if not c["run_dir"]]
    # a random entry's architecture: "random:<checkpoint>" names a checkpoint of it; plain "random"
    # the only one
    rnd_arch = {}
    for r in randoms:
        ref = r.split(":", 1)[1] if ":" in r else next(iter(arch))
        rnd_arch[arch[ref]] = r
    val = {}
    for row in out["rows"]:
        m = PRIMARY[targets[row["task"]]]
        val[(row["task"], row["probe"], row["fraction"], row["checkpoint"])] = row[m + "_mean"]
    cells = sorted({k[:3] for k in val})
    res = []
    for n in arch:
        margins, scores = [], defaultdict(list)
        for c in cells:
            if (c + (n,)) in val and (c + (rnd_arch[arch[n]],)) in val:
                a, b = val[c + (n,)], val[c + (rnd_arch[arch[n]],)]
                margins.append(a - b)
                scores[c[0]].append(a)
        res.append(
            {
                "checkpoint": n,
                "random": rnd_arch[arch[n]],
                "cells": len(margins),
                "mean_margin": sum(margins) / max(len(margins), 1),
                "min_margin": min(margins, default=0.0),
                "lead_0.03": sum(m > 0.03 for m in margins),
                **{f"mean_{t}": sum(v) / len(v) for t, v in scores.items()},
            }
        )
    return sorted(res, key=lambda r: -r["mean_margin"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bench_dir")
    ap.add_argument("--out")
    ap.add_argument(
        "--sweep",
        help="the sweep directory: also print its runs (compute, loss) with their margins",
    )
    args = ap.parse_args()
    res = rank(Path(args.bench_dir))
    if args.sweep:
        text = sweep_table(Path(args.sweep), res)
        print(text + "\n")
        if args.out:
            Path(args.out).with_name(Path(args.out).stem + "_sweep.md").write_text(text + "\n")
    tasks = [k[5:] for k in res[0] if k.startswith("mean_") and k != "mean_margin"]
    lines = [
        "| checkpoint | random init | cells | mean margin | min margin | cells ahead by > 0.03 | "
        + " | ".join(f"mean {t}" for t in tasks)
        + " |",
        "|---" * (6 + len(tasks)) + "|",
    ]
    for r in res:
        lines.append(
            f"| {r['checkpoint']} | {r['random']} | {r['cells']} | {r['mean_margin']:+.4f} | "
            f"{r['min_margin']:+.4f} | {r['lead_0.03']} | "
            + " | ".join(f"{r.get('mean_' + t, float('nan')):.4f}" for t in tasks)
            + " |"
        )
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


def sweep_table(sweep: Path, ranking: list[dict]) -> str:
    """Markdown: one row per run of `sweep` (recipe, steps x batch, crops, train seconds, final
    loss) joined with its validation ranking."""
    import ast

    by_name = {r["checkpoint"].split("/")[-1]: r for r in ranking}
    lines = [
        "| recipe | steps x batch | crops | train s | final loss | mean margin | min margin | > "
        "0.03 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in sorted(p for p in sweep.iterdir() if (p / "pretrain.log").exists()):
        summ = [ln for ln in (run / "pretrain.log").read_text().splitlines() if "pretrain: {" in ln]
        if not summ:
            continue
        s = ast.literal_eval(summ[-1].split("pretrain: ", 1)[1])
        cfg = yaml_load(run / "config.yaml")
        b = cfg["data"]["batch_size"]
        r = by_name.get(run.name, {})
        lines.append(
            f"| {run.name} | {s['steps']} x {b} | {s['steps'] * b} | {s['train_s']:.0f} | "
            f"{s['final_loss']:.3f} | {r.get('mean_margin', float('nan')):+.4f} | "
            f"{r.get('min_margin', float('nan')):+.4f} | {r.get('lead_0.03', '')} |"
        )
    return "\n".join(lines)


def yaml_load(p: Path) -> dict:
    import yaml

    return yaml.safe_load(p.read_text())


if __name__ == "__main__":
    main()
