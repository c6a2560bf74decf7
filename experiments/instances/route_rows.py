"""The rows of a `gala_route.sh` work directory: per prediction variant (plain, `_tta_<mode>`) and
instance method, the parameters chosen on validation, the best validation VOI and the test scores
(`evaluate_<method><suffix>/metrics.json`).

    python experiments/instances/route_rows.py WORK_DIR [--suffixes "" _tta_dihedral] \
        [--out rows.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

METHODS = ("multicut", "agglomeration", "mws")


def rows(work: Path, suffixes) -> list[dict]:
    out = []
    for s in suffixes:
        for m in METHODS:
            ev = work / f"evaluate_{m}{s}" / "metrics.json"
            if not ev.exists():
                continue
            r = json.loads(ev.read_text())["metrics"]["region"]
            rec = work / f"predict_test_{m}{s}" / "predict.json"
            if rec.exists():
                tuned = json.loads(rec.read_text())["instances"]["tuned"]
            else:
                tuned = json.loads((work / f"instances_{m}{s}" / "instances.json").read_text())[
                    "tuned"
                ]
            out.append(
                {
                    "predictions": s.removeprefix("_") or "plain",
                    "method": m,
                    "chosen": tuned["chosen"],
                    "validation_voi": min(t["voi"] for t in tuned["trials"]),
                    "test_adapted_rand_error": r["adapted_rand_error"],
                    "test_voi_split": r["voi_split"],
                    "test_voi_merge": r["voi_merge"],
                    "test_voi": r["voi"],
                    "segments": r["num_pred_segments"],
                }
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work_dir")
    ap.add_argument("--suffixes", nargs="+", default=["", "_tta_dihedral"])
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    rs = rows(Path(a.work_dir), a.suffixes)
    print("| predictions | method (chosen) | validation VOI | ARE | VOI split | VOI merge | VOI |")
    print("|---|---|---|---|---|---|---|")
    for r in rs:
        print(
            f"| {r['predictions']} | {r['method']} {r['chosen']} | {r['validation_voi']:.3f} | "
            f"{r['test_adapted_rand_error']:.4f} | {r['test_voi_split']:.3f} | "
            f"{r['test_voi_merge']:.3f} | {r['test_voi']:.3f} |"
        )
    if a.out:
        Path(a.out).write_text(json.dumps(rs, indent=1))


if __name__ == "__main__":
    main()
