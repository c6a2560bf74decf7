"""Where a fine-tuned ISBI membrane map's adapted Rand error comes from: per section, split against
merge, and how much of a gap between two starts is the cell derivation chosen on the four
validation sections rather than the maps themselves.

    python experiments/foundation/isbi_are_diagnosis.py --shared ../shared/data/em \
        --run START=OUT_DIR:RUN_TAG [--run START=OUT_DIR:RUN_TAG ...] [--out FILE.json] \
        [--merges 0,0.3,0.4,...]

OUT_DIR is a finetune.py `--out` folder holding `pred/RUN_TAG_16_20.zarr` (validation sections)
and `pred/RUN_TAG_20_30.zarr` (test sections); give one `--run` per seed, the same START for the
runs of one start. For every run: the cell derivation that finetune.py chooses on the validation
sections (its CELL_GRID), and the test adapted Rand error (ARE) with it, with the Rand split and
merge errors (1 - Rand recall, 1 - Rand precision) and per section. Then, for every derivation of
the grid, each start's validation and test ARE (mean over its runs), so that the starts can be
compared under one derivation; and one derivation for all runs, chosen on the validation sections
of all runs together. Test sections choose nothing here: this is a diagnosis, not a result row.
With `--merges`, every derivation of the grid is tried with each merge level (adjacent cells joined
while their border's mean membrane probability is below it; 0 = no merging; emfm.eval.cells), and
the merge level is chosen on the validation sections with the rest.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def per_section(p: np.ndarray, y: np.ndarray, cells: dict) -> list[dict]:
    """Region scores of the cells derived from membrane map `p` `[n, y, x]` against membrane
    labels `y`, per section."""
    from emfm.eval import metrics
    from emfm.eval.cells import cells_from_membranes, gt_cells

    out = []
    for k in range(len(p)):
        s = metrics.region_scores(cells_from_membranes(p[k], **cells), gt_cells(y[k]), (0,))
        out.append(
            {
                "are": s["adapted_rand_error"],
                "split": 1 - s["rand_recall"],
                "merge": 1 - s["rand_precision"],
            }
        )
    return out


def _mean(rows: list[dict], key: str) -> float:
    return float(np.mean([r[key] for r in rows]))


def _std(x) -> float:
    return float(np.std(x, ddof=1)) if len(x) > 1 else float("nan")


def figure(path: Path, image: np.ndarray, membrane: np.ndarray, first: dict, k: int) -> None:
    """The section, its ground-truth cells, and per start the membrane map and the derived cells
    (each run's own chosen derivation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.segmentation import find_boundaries

    from emfm.eval.cells import cells_from_membranes, gt_cells

    fig, ax = plt.subplots(2, 1 + len(first), figsize=(4 * (1 + len(first)), 8))
    ax[0, 0].imshow(image, cmap="gray")
    ax[0, 0].set_title(f"test section index {k}")
    ax[1, 0].imshow(find_boundaries(gt_cells(membrane)), cmap="gray_r")
    ax[1, 0].set_title("ground-truth cells")
    for j, (start, r) in enumerate(first.items(), start=1):
        p, c = r["maps"]
        ax[0, j].imshow(p[k], cmap="magma", vmin=0, vmax=1)
        ax[0, j].set_title(f"{start}: membrane map")
        ax[1, j].imshow(image, cmap="gray")
        ax[1, j].contour(
            find_boundaries(cells_from_membranes(p[k], **c)),
            levels=[0.5],
            colors="r",
            linewidths=0.5,
        )
        ax[1, j].set_title(
            f"{start}: cells ({c['threshold']}, {c['min_seed']}, {c['sigma']}, "
            f"{c.get('merge', 0.0)}), "
            f"ARE {r['test_sections'][k]['are']:.3f}"
        )
    for a in ax.flat:
        a.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=50)


def main() -> None:
    from finetune import DATASETS, _cell_grid, fg, load, merge_levels

    from emfm.data.volume import open_volume
    from emfm.eval.cells import tune_cells

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", type=Path, required=True, help="../shared/data/em")
    ap.add_argument("--run", action="append", required=True, help="START=OUT_DIR:RUN_TAG")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    ap.add_argument(
        "--figure",
        type=Path,
        default=None,
        help="PNG: one test section (--section), its cells, and the first run of each start",
    )
    ap.add_argument("--section", type=int, default=0, help="index into the test sections")
    ap.add_argument(
        "--merges",
        default="0",
        help="comma-separated merge levels in [0, 1) added to the cell grid (0 = no merging)",
    )
    a = ap.parse_args()
    merges = merge_levels(ap, "--merges", a.merges)

    for f in (DATASETS["isbi"]["image"], DATASETS["isbi"]["labels"]):
        if not (a.shared / f).is_file():
            ap.error(f"--shared {a.shared}: {f} not found (the labelled EM of ../shared/data/em)")
    ds = load("isbi", a.shared, Path(tempfile.mkdtemp(prefix="isbi_are_")))
    spec = DATASETS["isbi"]
    yv = fg("isbi", ds["y"][slice(*spec["val"])])
    yt = fg("isbi", ds["y"][slice(*spec["test"])])
    g = _cell_grid()
    if merges != [0.0]:
        g["merges"] = merges
    grid = [
        dict(threshold=t, min_seed=m, sigma=s, rank=g["rank"])
        | ({"merge": j} if "merges" in g else {})
        for t, m, s, j in itertools.product(g["thresholds"], g["min_seeds"], g["sigmas"], merges)
    ]
    runs: list[dict] = []
    for item in a.run:
        start, _, rest = item.partition("=")
        out_dir, _, tag = rest.rpartition(":")
        if not (start and out_dir and tag):
            ap.error(f"--run {item!r}: expected START=OUT_DIR:RUN_TAG")
        pred = Path(out_dir) / "pred"
        paths = [pred / f"{tag}_{lo}_{hi}.zarr" for lo, hi in (spec["val"], spec["test"])]
        missing = [str(q) for q in paths if not q.exists()]
        if missing:
            ap.error(f"--run {item!r}: no saved probabilities at {', '.join(missing)}")
        pv, pt = (open_volume(q).read()[..., 1] for q in paths)
        chosen = tune_cells(pv, yv, **g)
        sections = per_section(pt, yt, chosen)
        val_cells = [per_section(pv, yv, c) for c in grid]
        test_cells = [per_section(pt, yt, c) for c in grid]
        r = {
            "start": start,
            "run": tag,
            "chosen": chosen,
            "test_are": _mean(sections, "are"),
            "test_split": _mean(sections, "split"),
            "test_merge": _mean(sections, "merge"),
            "test_sections": sections,
            "val_are_per_cell": [_mean(v, "are") for v in val_cells],
            "test_are_per_cell": [_mean(t, "are") for t in test_cells],
            "val_sections_per_cell": val_cells,
            "test_sections_per_cell": test_cells,
        }
        r["maps"] = (pt, chosen)  # for --figure; dropped before writing
        runs.append(r)
        c = chosen
        print(
            f"{start} {tag}: chosen (threshold {c['threshold']}, min_seed {c['min_seed']}, "
            f"sigma {c['sigma']}, merge {c.get('merge', 0.0)}): test ARE {r['test_are']:.4f} "
            f"(split {r['test_split']:.4f}, merge {r['test_merge']:.4f}); per section "
            + " ".join(f"{s['are']:.3f}" for s in sections)
        )
    starts = list(dict.fromkeys(r["start"] for r in runs))
    by = {s: [r for r in runs if r["start"] == s] for s in starts}

    print(
        "\nper derivation (threshold, min_seed, sigma, merge): validation / test ARE, "
        "mean over runs"
    )
    print("  " + " | ".join(f"{s} ({len(by[s])} runs)" for s in starts))
    for i, c in enumerate(grid):
        cols = [
            f"{np.mean([r['val_are_per_cell'][i] for r in by[s]]):.4f} / "
            f"{np.mean([r['test_are_per_cell'][i] for r in by[s]]):.4f}"
            for s in starts
        ]
        print(
            f"  ({c['threshold']}, {c['min_seed']:>3}, {c['sigma']}, {c.get('merge', 0.0)}): "
            + " | ".join(cols)
        )

    # one derivation for every run: the lowest validation ARE averaged over all runs
    pooled = [float(np.mean([r["val_are_per_cell"][i] for r in runs])) for i in range(len(grid))]
    i_common = int(np.argmin(pooled))
    summary = {}
    print(f"\none derivation for all runs, chosen on their validation sections: {grid[i_common]}")
    for s in starts:
        own = [r["test_are"] for r in by[s]]
        common = [r["test_are_per_cell"][i_common] for r in by[s]]
        summary[s] = {
            "runs": len(own),
            "test_are_own_choice": [float(np.mean(own)), _std(own)],
            "test_are_common": [float(np.mean(common)), _std(common)],
            "test_split_own_choice": float(np.mean([r["test_split"] for r in by[s]])),
            "test_merge_own_choice": float(np.mean([r["test_merge"] for r in by[s]])),
        }
        print(
            f"  {s}: test ARE {np.mean(own):.4f} ± {_std(own):.4f} with each run's own choice, "
            f"{np.mean(common):.4f} ± {_std(common):.4f} with the common one (ddof 1, "
            f"{len(own)} runs)"
        )
    if a.figure:
        first = {s: by[s][0] for s in starts}
        figure(a.figure, ds["x"][spec["test"][0] + a.section], yt[a.section], first, a.section)
    for r in runs:
        r.pop("maps")
    if a.out:
        a.out.write_text(
            json.dumps(
                {
                    "test_sections": list(spec["test"]),
                    "val_sections": list(spec["val"]),
                    "grid": grid,
                    "merges": merges,
                    "common": grid[i_common],
                    "summary": summary,
                    "runs": runs,
                },
                indent=1,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
