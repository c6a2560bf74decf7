"""The probing benchmark's tables and figures: mean and standard deviation over seeds of every
(task, probe, label fraction, checkpoint), `benchmark.{csv,md}`, label-efficiency curves and
prediction overlays (`figures/`)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from emfm.config.probe import BenchmarkConfig
from emfm.eval import tasks as tasks_mod


def preview_index(task: tasks_mod.TaskData) -> int:
    """The test section shown in the overlays (and whose prediction is cached for them)."""
    fg = task.test.fg.reshape(len(task.test.fg), -1).mean(1)
    return int(np.argmax(fg > 0) if task.target == "mitochondria" else len(fg) // 2)


def aggregate(records: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds of every (task, probe, fraction, checkpoint)."""
    groups: dict = {}
    for r in records:
        groups.setdefault((r["task"], r["probe"], r["fraction"], r["checkpoint"]), []).append(r)
    rows = []
    for (task, kind, frac, name), rs in groups.items():
        row = {"task": task, "probe": kind, "fraction": frac, "checkpoint": name, "seeds": len(rs)}
        for m in sorted(
            {
                k
                for r in rs
                for k, v in r.items()
                if isinstance(v, (int, float))
                and k not in ("fraction", "seed", "seconds", "labelled_pixels")
            }
        ):
            v = np.array([r[m] for r in rs], float)
            row[f"{m}_mean"], row[f"{m}_std"] = (
                float(v.mean()),
                float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            )
        rows.append(row)
    return rows


def split_words(split: str) -> str:
    return (
        "test sections"
        if split == "test"
        else "validation sections (model selection; test sections unread)"
    )


def write_tables(
    run_dir: Path, rows: list[dict], loaded: list, split: str = "test", picks: dict | None = None
) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    cols = ["task", "probe", "fraction", "checkpoint", "seeds"]
    cols += sorted({k for r in rows for k in r} - set(cols))
    with open(run_dir / "benchmark.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    n_seeds = sorted({int(r["seeds"]) for r in rows if "seeds" in r})
    lines = [
        f"Probing benchmark: mean ± std (ddof 1) over {'/'.join(map(str, n_seeds)) or 'the'} "
        f"seeds, on the {split_words(split)} of each task (a single seed has no std: n/a).",
        "",
    ]
    if picks:
        lines += [
            "Features chosen per checkpoint on the validation sections (blocks; [] = final "
            "output): " + ", ".join(f"{n} {b}" for n, b in picks.items()),
            "",
        ]
    for t in loaded:
        ms = [
            m
            for m in tasks_mod.METRICS[tasks_mod.TARGETS[t.target]["kind"]]
            if m not in ("threshold", "n_gt")
        ]
        lines += [
            f"### {t.name} ({t.target})",
            "",
            "| probe | labels | checkpoint | " + " | ".join(ms) + " |",
            "|---" * (3 + len(ms)) + "|",
        ]
        for r in (r for r in rows if r["task"] == t.name):
            one = int(r.get("seeds", 2)) < 2
            vals = [
                f"{r[m + '_mean']:.3f} ± {'n/a' if one else format(r[m + '_std'], '.3f')}"
                if m + "_mean" in r
                else ""
                for m in ms
            ]
            lines.append(
                f"| {r['probe']} | {100 * r['fraction']:g} % | {r['checkpoint']} | "
                + " | ".join(vals)
                + " |"
            )
        lines.append("")
    (run_dir / "benchmark.md").write_text("\n".join(lines))
    print("\n".join(lines))


def figures(
    run_dir: Path, rows, loaded, checkpoints, bench: BenchmarkConfig, records, cache: Path
) -> None:
    """Per task: label-efficiency curves (primary metric against the label fraction, one panel per
    probe) and prediction overlays on one test section."""
    fig_dir = run_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    for t in loaded:
        _curves(fig_dir / f"label_efficiency_{t.name}.png", t, rows, checkpoints, bench.probes)
        _overlays(fig_dir / f"overlay_{t.name}.png", t, records, checkpoints, bench, cache)


def _curves(path: Path, t, rows, checkpoints, probes) -> None:
    from emfm.eval.figures import _plt

    plt = _plt()
    metric = tasks_mod.TARGETS[t.target]["primary"]
    fig, axes = plt.subplots(1, len(probes), figsize=(4 * len(probes), 3.4), squeeze=False)
    for ax, kind in zip(axes[0], probes):
        for c in checkpoints:
            rs = sorted(
                (
                    r
                    for r in rows
                    if (r["task"], r["probe"], r["checkpoint"]) == (t.name, kind, c.name)
                ),
                key=lambda r: r["fraction"],
            )
            ax.errorbar(
                [100 * r["fraction"] for r in rs],
                [r[metric + "_mean"] for r in rs],
                yerr=[r[metric + "_std"] for r in rs],
                marker="o",
                capsize=3,
                label=c.name,
            )
        ax.set_xscale("log")
        ax.set_xlabel("training labels (%)")
        ax.set_ylabel(f"test {metric}")
        ax.set_title(f"{t.name}: {kind}")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _overlays(path: Path, t, records, checkpoints, bench: BenchmarkConfig, cache: Path) -> None:
    """The largest label fraction, first seed, the central 256 x 256 pixels of one test section."""
    from emfm.eval.figures import _plt

    plt = _plt()
    frac, seed = max(bench.fractions), bench.seeds[0]
    k = preview_index(t)
    ny, nx = t.test.images.shape[1:]
    y0, x0 = max(0, ny // 2 - 128), max(0, nx // 2 - 128)
    win = (slice(y0, y0 + 256), slice(x0, x0 + 256))
    cols = len(checkpoints) + 1
    fig, axes = plt.subplots(
        len(bench.probes), cols, figsize=(2.6 * cols, 2.6 * len(bench.probes)), squeeze=False
    )
    for i, kind in enumerate(bench.probes):
        axes[i][0].imshow(t.test.images[k][win], cmap="gray")
        axes[i][0].contour(t.test.fg[k][win], levels=[0.5], colors="lime", linewidths=0.5)
        axes[i][0].set_title("image + label" if i == 0 else "", fontsize=9)
        axes[i][0].set_ylabel(kind)
        for j, c in enumerate(checkpoints, start=1):
            rec = next(
                r
                for r in records
                if (r["task"], r["probe"], r["checkpoint"], r["fraction"], r["seed"])
                == (t.name, kind, c.name, frac, seed)
            )
            p = cache / "results" / f"{rec['key']}.preview.npy"
            axes[i][j].imshow(t.test.images[k][win], cmap="gray")
            if p.exists():
                axes[i][j].imshow(
                    np.ma.masked_less(np.load(p)[win] / 255.0, rec["threshold"]),
                    cmap="autumn",
                    alpha=0.6,
                    vmin=0,
                    vmax=1,
                )
            axes[i][j].set_title(f"{c.name}\nF1 {rec['f1']:.3f}", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)
