"""How well a fine-tuning run's validation score predicts its test score, over recorded runs.

    python experiments/foundation/val_test_agreement.py \
        experiments/foundation/finetune_results_hc15k*.jsonl [--dataset isbi] \
        [--score adapted_rand_error] [--fraction 0.1]

Reads finetune.py's records (one JSON object per line; a run recorded in several files counts
once, its first record), keeps the fine-tuned runs of one data set and label fraction that carry
both `val_SCORE` and `SCORE`, and prints every run's pair, then Spearman's and Pearson's
correlation (scipy.stats) over the runs. The runs of one seed under different recipes are not
independent, so the p-values are indications only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy import stats


def pairs(files: list[Path], dataset: str, score: str, fraction: float) -> list[tuple]:
    """(run, validation score, test score) of each fine-tuned run, first record of a run only."""
    seen, out = set(), []
    for f in files:
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{f}:{n}: not a JSON record ({e.msg})") from None
            if not isinstance(d, dict) or (d.get("kind") == "finetune" and "run" not in d):
                raise SystemExit(f"{f}:{n}: not a finetune.py record (no 'run' key)")
            if (
                d.get("kind") != "finetune"
                or d.get("dataset") != dataset
                or d.get("fraction") != fraction
                or d.get(f"val_{score}") is None
                or d.get(score) is None
                or d["run"] in seen
            ):
                continue
            seen.add(d["run"])
            out.append((d["run"], float(d[f"val_{score}"]), float(d[score])))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("records", nargs="+", type=Path, help="finetune.py record files (.jsonl)")
    ap.add_argument("--dataset", default="isbi")
    ap.add_argument("--score", default="adapted_rand_error")
    ap.add_argument("--fraction", type=float, default=0.1)
    a = ap.parse_args(argv)
    missing = [str(f) for f in a.records if not f.is_file()]
    if missing:
        ap.error(f"no such record file: {', '.join(missing)}")
    rows = pairs(a.records, a.dataset, a.score, a.fraction)
    if len(rows) < 3:
        print(f"{len(rows)} runs with val_{a.score} and {a.score}: too few", file=sys.stderr)
        return 1
    for run, v, t in sorted(rows):
        print(f"{run:48s} validation {v:.4f}  test {t:.4f}")
    v = np.array([r[1] for r in rows])
    t = np.array([r[2] for r in rows])
    s, p = stats.spearmanr(v, t)
    r, q = stats.pearsonr(v, t)
    print(f"{len(rows)} runs: Spearman {s:.3f} (p {p:.3f}), Pearson {r:.3f} (p {q:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
