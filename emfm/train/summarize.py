"""`emfm runs summarize DIR`: one table and one loss-curve plot over every run below DIR (a sweep).

A run is a directory holding `config.yaml` (written by every emfm command). For each run: the
config values that differ between runs, steps done, final and best loss, throughput, and status
(finished, running, failed, preempted; a "running" run whose files have not changed for
`stale_after` seconds is reported as "stalled", e.g. a killed job).
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import yaml


def _flatten(d, prefix=""):
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def find_runs(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"runs directory not found: {root}")
    return sorted(p.parent for p in root.rglob("config.yaml") if p.parent.name != ".hydra")


def read_run(run: Path, stale_after: float = 600.0) -> dict:
    cfg = _flatten(yaml.safe_load((run / "config.yaml").read_text()))
    recs = []
    mfile = run / "metrics.jsonl"
    if mfile.exists():
        recs = [json.loads(ln) for ln in mfile.read_text().splitlines() if ln.strip()]
    status = "unknown"
    sfile = run / "status.json"
    if sfile.exists():
        status = json.loads(sfile.read_text()).get("status", "unknown")
    if status == "running":
        newest = max((p.stat().st_mtime for p in run.rglob("*") if p.is_file()), default=0)
        if time.time() - newest > stale_after:
            status = "stalled"
    losses = [r["loss"] for r in recs if "loss" in r]
    return {
        "run": str(run),
        "config": cfg,
        "status": status,
        "steps": recs[-1]["step"] if recs else 0,
        "target_steps": cfg.get("trainer.steps"),
        "final_loss": losses[-1] if losses else None,
        "best_loss": min(losses) if losses else None,
        "images_per_s": recs[-1].get("images_per_s") if recs else None,
        "curve": [(r["step"], r["loss"]) for r in recs if "loss" in r],
    }


def summarize(
    root: str | Path, out_dir: str | Path | None = None, stale_after: float = 600.0
) -> dict:
    runs = [read_run(r, stale_after) for r in find_runs(root)]
    if not runs:
        raise FileNotFoundError(f"no emfm runs (directories with config.yaml) below {root}")
    keys = sorted({k for r in runs for k in r["config"]})
    varying = [
        k
        for k in keys
        if k != "run_dir" and len({json.dumps(r["config"].get(k), default=str) for r in runs}) > 1
    ]
    out = Path(out_dir or root)
    out.mkdir(parents=True, exist_ok=True)
    cols = [
        "run",
        *varying,
        "status",
        "steps",
        "target_steps",
        "final_loss",
        "best_loss",
        "images_per_s",
    ]
    rows = []
    for r in runs:
        row = {
            "run": str(Path(r["run"]).relative_to(Path(root)))
            if Path(r["run"]) != Path(root)
            else "."
        }
        row.update({k: r["config"].get(k) for k in varying})
        row.update({k: r[k] for k in cols[len(varying) + 1 :]})
        rows.append(row)
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))

    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    _plot(runs, root, out / "loss_curves.png")
    return {
        "runs": rows,
        "varying": varying,
        "table": "\n".join(md),
        "plot": str(out / "loss_curves.png"),
    }


def _plot(runs, root, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        if r["curve"]:
            steps, losses = zip(*r["curve"])
            ax.plot(steps, losses, label=f"{Path(r['run']).name} ({r['status']})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    if any(r["curve"] for r in runs):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
