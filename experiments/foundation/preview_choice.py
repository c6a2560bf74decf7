"""Which features the PCA-as-RGB preview of an encoder should show, chosen on validation sections.

    python experiments/foundation/preview_choice.py --checkpoint zoo:em_unet16_hc15k \
        --out experiments/foundation/preview_choice [--tasks isbi_membranes,cdeep3m_mito]

The preview (`emfm export`, figures/features_pca.png) shows the first three principal components of
the exported features as RGB. A person reads it well when structures have distinct colours: this
script measures that. For each candidate feature set (U-Net levels and/or the decoder output) and
each task: one PCA basis fitted on a sample of the training sections' features, every section's
features projected on its first three components (the preview's colours), a small classifier on
those three numbers (logistic regression on their quadratic terms: "does the colour tell the
class") fitted on a sample of training pixels, and its average precision on the validation
sections. The test sections are never read (emfm.eval.tasks.load(split="val")). Random init with
the same features is the reference: what three colours show without pretraining.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import PolynomialFeatures, StandardScaler

from emfm.cli.probe import load_task
from emfm.eval import tasks as tasks_mod
from emfm.eval.benchmark import grey_range
from emfm.export.encode import encode, normalise

CANDIDATES = "[];[0];[0,1];[0,1,2];[0,1,2,3];[0,4];[0,1,4];[0,1,2,4];[0,1,2,3,4]"


def _layers(text: str) -> tuple[int, ...]:
    text = text.strip().strip("[]")
    return tuple(int(v) for v in text.split(",") if v.strip())


def _encoder(checkpoint: str, seed: int):
    from emfm.config.common import ModelConfig, resolve_zoo
    from emfm.train import checkpoint as ckpt
    from emfm.train.state import build_encoder, load_encoder

    path = resolve_zoo(checkpoint, "--checkpoint") if checkpoint.startswith("zoo:") else checkpoint
    if seed < 0:
        return load_encoder(path)[0]
    return build_encoder(ModelConfig(**ckpt.read_meta(path)["model"]), seed=seed)


def _sections(enc, images: np.ndarray, layers, tile: int, margin: int):
    for i in range(len(images)):
        yield i, encode(enc, images[i : i + 1], tile=tile, margin=margin, layers=layers)[0]


def score(enc, task, layers, *, tile: int, margin: int, n: int, seed: int) -> dict:
    """Validation average precision of the class from the preview's three colours."""
    rng = np.random.default_rng(seed)
    lo_hi = grey_range(task)
    imgs, fg = task.train.images, task.train.fg
    per = -(-n // len(imgs))
    vecs, ys = [], []
    for i, f in _sections(enc, normalise(imgs, lo_hi), layers, tile, margin):
        if f.shape[:2] != fg.shape[1:]:
            raise SystemExit(f"features {f.shape} are not dense; use U-Net levels")
        f, y = f.reshape(-1, f.shape[-1]), fg[i].reshape(-1)
        pick = rng.choice(len(f), size=min(per, len(f)), replace=False)
        vecs.append(f[pick])
        ys.append(y[pick])
    x, y = np.concatenate(vecs), np.concatenate(ys)
    mu = x.mean(0)
    _, sv, vt = np.linalg.svd(x - mu, full_matrices=False)
    basis = vt[:3]
    clf = make_pipeline(StandardScaler(), PolynomialFeatures(2), LogisticRegression(max_iter=2000))
    clf.fit((x - mu) @ basis.T, y)
    p = np.concatenate(
        [
            clf.predict_proba((f.reshape(-1, f.shape[-1]) - mu) @ basis.T)[:, 1]
            for _, f in _sections(enc, normalise(task.test.images, lo_hi), layers, tile, margin)
        ]
    )
    vfg = task.test.fg.reshape(-1)
    return {
        "val_ap": float(average_precision_score(vfg, p)),
        "base_rate": float(vfg.mean()),
        "explained_variance": [float(v) for v in (sv[:3] ** 2) / (sv**2).sum()],
        "channels": int(x.shape[-1]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="zoo:NAME or a run directory")
    ap.add_argument("--tasks", default="isbi_membranes,cdeep3m_mito")
    ap.add_argument("--candidates", default=CANDIDATES, help="';'-separated layer lists")
    ap.add_argument("--config-dir", default="configs")
    ap.add_argument("--random-seeds", default="1000", help="random-init references (seeds)")
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--margin", type=int, default=32)
    ap.add_argument("--pixels", type=int, default=100_000, help="training pixels sampled")
    ap.add_argument("--out", required=True, help="directory of results.json and results.md")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cands = [_layers(c) for c in a.candidates.split(";")]
    tasks = [tasks_mod.load(load_task(t, a.config_dir), "val") for t in a.tasks.split(",")]
    inits = [("pretrained", -1)] + [(f"random{s}", int(s)) for s in a.random_seeds.split(",") if s]
    rows = []
    for init, seed in inits:
        enc = _encoder(a.checkpoint, seed)
        for layers in cands:
            t0 = time.time()
            r = {"init": init, "layers": list(layers)}
            for task in tasks:
                s = score(enc, task, layers, tile=a.tile, margin=a.margin, n=a.pixels, seed=0)
                r[task.name] = s
            r["mean_val_ap"] = float(np.mean([r[t.name]["val_ap"] for t in tasks]))
            r["seconds"] = time.time() - t0
            rows.append(r)
            print(init, list(layers), f"{r['mean_val_ap']:.4f}", flush=True)
    pre = [r for r in rows if r["init"] == "pretrained"]
    best = max(pre, key=lambda r: r["mean_val_ap"])
    names = [t.name for t in tasks]
    rates = ", ".join(f"{n} {pre[0][n]['base_rate']:.3f}" for n in names)
    lines = [
        f"Preview features of {a.checkpoint}: average precision of each task's class from the "
        "first three principal components (the preview's RGB), validation sections; "
        f"base rates {rates}.",
        "",
        "| init | features (layers) | channels | " + " | ".join(names) + " | mean |",
        "|---|---|---|" + "---|" * len(names) + "---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['init']} | {r['layers'] or 'decoder output'} | {r[names[0]]['channels']} | "
            + " | ".join(f"{r[n]['val_ap']:.4f}" for n in names)
            + f" | {r['mean_val_ap']:.4f}{' (chosen)' if r is best else ''} |"
        )
    lines += ["", f"Chosen: export.layers={best['layers']} (highest mean validation AP)."]
    (out / "results.json").write_text(
        json.dumps({"checkpoint": a.checkpoint, "rows": rows, "chosen": best["layers"]}, indent=1)
    )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    from emfm.errors import UserError

    try:
        main()
    except UserError as e:  # a bad checkpoint, task or layer list: one line naming it
        raise SystemExit(f"preview_choice: {e}") from None
