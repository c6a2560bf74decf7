"""Whether seeded growth from confident cores (emfm.instances.tune.foreground_instances with
`seed_threshold`) gives better mitochondria instances than connected components, decided on the
validation sections of finished fine-tuning runs only.

    python experiments/foundation/mito_instances_val.py --shared ../shared/data/em \
        --runs runs/foundation/finetune_hc15k_steps runs/foundation/finetune_hc15k_confirm \
        [--recipe lr3e-3_s1200] [--out experiments/foundation/mito_instances_val.md]

For every CDeep3M fine-tuning run of the recipe in `--runs` (its saved probabilities of the
validation sections 12-13; the test sections' files are never opened): two-fold cross-validation
over the two validation sections (each grid tuned on one section by instance F1, scored on the
other, the two scores averaged), once with the connected-components grid and once with the grid
that adds core levels. A larger grid always tunes at least as well on the sections it is tuned
on, so only the held-out section's score can tell whether it generalises.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).parent))
import finetune as ft  # noqa: E402

from emfm.instances.tune import (  # noqa: E402
    DEFAULT_GRIDS,
    foreground_instances,
    score_instances,
    tune_foreground,
)

PLAIN = DEFAULT_GRIDS["foreground"]
SEEDED = {**PLAIN, "seed_threshold": [0.0, 0.9, 0.95, 0.98]}


def val_labels(shared: Path) -> np.ndarray:
    import tifffile

    from emfm.data.importer import downsample2

    d = ft.DATASETS["cdeep3m"]
    a, b = d["val"]
    y = tifffile.imread(shared / d["labels"])[a:b]
    for _ in range(int(math.log2(d["downsample"]))):
        y = downsample2(y, labels=True)
    return np.stack([ndimage.label(s > 0)[0] for s in y])


def cross_val(p: np.ndarray, gt: np.ndarray, grid: dict) -> tuple[float, list]:
    """Mean held-out instance F1 of the two folds, and each fold's choice."""
    scores, picks = [], []
    for k in range(2):
        best, _ = tune_foreground(p[k : k + 1], gt[k : k + 1], grid=grid)
        o = 1 - k
        scores.append(
            score_instances(
                foreground_instances(p[o : o + 1], **best), gt[o : o + 1], "instance_f1"
            )
        )
        picks.append(best)
    return float(np.mean(scores)), picks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", required=True, type=Path)
    ap.add_argument("--runs", nargs="+", required=True, type=Path)
    ap.add_argument("--recipe", default="lr3e-3_s1200")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    from emfm.data.volume import open_volume

    labels = a.shared / ft.DATASETS["cdeep3m"]["labels"]
    if not labels.is_file():
        raise SystemExit(f"--shared {a.shared}: the CDeep3M labels {labels} are not there")
    for d in a.runs:
        if not (d / "results.jsonl").is_file():
            raise SystemExit(f"--runs {d}: no fine-tuning records (results.jsonl) there")
    gt = val_labels(a.shared)
    va, vb = ft.DATASETS["cdeep3m"]["val"]
    rows = []
    for d in a.runs:
        for line in open(d / "results.jsonl"):
            r = json.loads(line)
            if r["dataset"] != "cdeep3m" or r["kind"] != "finetune" or r["recipe"] != a.recipe:
                continue
            pv = d / "pred" / f"{r['run']}_{va}_{vb}.zarr"
            if not pv.exists():
                continue
            p = open_volume(pv).read()[..., 1].astype(np.float32)
            plain, _ = cross_val(p, gt, PLAIN)
            seeded, picks = cross_val(p, gt, SEEDED)
            rows.append(
                dict(
                    run=r["run"],
                    init=r["init"],
                    fraction=r["fraction"],
                    plain=plain,
                    seeded=seeded,
                    picks=picks,
                )
            )
            print(f"{r['run']}: plain {plain:.4f} seeded {seeded:.4f} {picks}", flush=True)
    if len(rows) < 2:
        raise SystemExit(
            f"{len(rows)} CDeep3M run(s) of recipe {a.recipe} with saved validation probabilities "
            f"in {[str(d) for d in a.runs]}: need at least 2"
        )
    better = sum(r["seeded"] > r["plain"] for r in rows)
    worse = sum(r["seeded"] < r["plain"] for r in rows)
    diff = [r["seeded"] - r["plain"] for r in rows]
    lines = [
        f"CDeep3M mitochondria, fine-tuning recipe {a.recipe}: held-out instance F1 of two-fold "
        "cross-validation over the validation sections 12-13 (test sections not read).",
        "",
        "| run | connected components | + core levels (seeded growth) | chosen core levels |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['plain']:.4f} | {r['seeded']:.4f} | "
            f"{', '.join(str(p.get('seed_threshold', 0.0)) for p in r['picks'])} |"
        )
    lines += [
        "",
        f"Seeded growth ahead in {better} of {len(rows)} runs, behind in {worse}; mean difference "
        f"{np.mean(diff):+.4f} (std {np.std(diff, ddof=1):.4f}, ddof 1).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
