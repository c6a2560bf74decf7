"""Segmentation quality on real EM: random-init vs MAE-pretrained ViT at 10 % and 100 % of the labels.

Command (2-core CPU, about an hour for all 12 runs on a shared machine; results appended to results.jsonl):
  PYTHONPATH=. nice -n 10 python experiments/segmentation/run.py [--steps 60 --batch 4] [--only isbi,gala,cdeep3m]
  PYTHONPATH=. python experiments/segmentation/run.py --table      (the README tables from results.jsonl)
Per dataset and setting: `emfm finetune` (library call, full fine-tuning, progressive head), then blockwise
`predict_volume` of the held-out data to /work/seg_outputs/<dataset>_<init>_<fraction>/probabilities.zarr,
then scores read back from that zarr.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from scipy import ndimage

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from emfm.config import schema  # noqa: E402
from emfm.data.volume import open_volume, write_array  # noqa: E402
from emfm.eval import metrics  # noqa: E402
from emfm.eval.metrics_instance import match_instances  # noqa: E402
from emfm.eval.probe import cells_from_membranes, membrane_scores  # noqa: E402
from emfm.segment import targets, train  # noqa: E402
from emfm.segment.predict import model_fn, predict_volume  # noqa: E402

EM = REPO.parent / "shared" / "data" / "em"
MAE = "/work/main/runs/main/2026-11-25_14-45-37"
OUT = Path("/work/seg_outputs")
DATA = Path("/tmp/emfm_seg_data")
HERE = Path(__file__).resolve().parent
T0 = time.time()  # one fresh run directory per launch: never resume an older run


def to_zarr(name: str, arr: np.ndarray) -> str:
    p = DATA / name
    if not (p / "zarr.json").exists():
        write_array(p, arr, chunks=(1, min(256, arr.shape[1]), min(256, arr.shape[2])))
    return str(p)


def datasets() -> dict:
    isbi_x = tifffile.imread(EM / "isbi2012" / "train_volume.tif")
    isbi_y = tifffile.imread(EM / "isbi2012" / "train_labels.tif")
    mito_x = tifffile.imread(EM / "cdeep3m_sbem_mito" / "train_images.tif")
    mito_y = tifffile.imread(EM / "cdeep3m_sbem_mito" / "train_labels.tif")
    gala = {k: tifffile.imread(EM / "gala_fibsem" / f"{k}.tif") for k in
            ("train_image", "train_labels", "test_image", "test_labels")}
    return {
        # ISBI: class 0 = interior (255), class 1 = membrane (0); train 0-19, test 20-29
        "isbi": dict(raw=to_zarr("isbi_raw", isbi_x), labels=to_zarr("isbi_labels", isbi_y), test_raw=None,
                     train_roi=[[0, 20], [0, 512], [0, 512]], test_roi=[[20, 30], [0, 512], [0, 512]],
                     over=["task=semantic", "task.class_values=[255,0]"], patch=128),
        # CDeep3M: 1 = mitochondrion; train sections 0-14, test 15-19 (pixels 0-511 x 0-511)
        "cdeep3m": dict(raw=to_zarr("mito_raw", mito_x), labels=to_zarr("mito_labels", mito_y), test_raw=None,
                        train_roi=[[0, 15], [0, 1024], [0, 1024]], test_roi=[[15, 20], [0, 512], [0, 512]],
                        over=["task=semantic", "loss.balance=true"], patch=128),
        # gala: neuron instances (0 = boundary); boundary task per slice; train volume -> test volume
        "gala": dict(raw=to_zarr("gala_train_raw", gala["train_image"]),
                     labels=to_zarr("gala_train_labels", gala["train_labels"].astype(np.uint32)),
                     test_raw=to_zarr("gala_test_raw", gala["test_image"]), test_labels=gala["test_labels"],
                     train_roi=None, test_roi=None,
                     over=["task=boundary", "task.label_type=instances", "task.distance=false"], patch=64),
    }


def config(ds: dict, init: str, fraction: float, steps: int, run_dir: Path, batch: int):
    over = [f"data.path={ds['raw']}", f"data.labels={ds['labels']}", f"data.label_fraction={fraction}",
            f"data.patch_shape=[1,{ds['patch']},{ds['patch']}]", "data.test_roi=null",
            "data.train_roi=" + (json.dumps(ds["train_roi"]).replace(" ", "") if ds["train_roi"] else "null"),
            f"trainer.steps={steps}", f"data.batch_size={batch}", "optim.warmup_steps=5", "trainer.log_every=25", "trainer.progress=false", "trainer.tensorboard=false",
            "model.width=128", "model.depth=4", "model.heads=4", "head=progressive", f"run_dir={run_dir}",
            *ds["over"]]
    if init == "mae":
        over += ["regime.init=pretrained", f"checkpoint={MAE}"]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        c = compose("finetune", overrides=over)
    return schema.validate_finetune(OmegaConf.to_object(c))


def score(name: str, ds: dict, probs: np.ndarray) -> dict:
    if name == "isbi":
        gt = tifffile.imread(EM / "isbi2012" / "train_labels.tif")[20:30] == 0
        s = membrane_scores(probs[..., 1], gt)
        return {k: s[k] for k in ("f1", "iou", "adapted_rand_error", "voi", "voi_split", "voi_merge")}
    if name == "cdeep3m":
        gt = tifffile.imread(EM / "cdeep3m_sbem_mito" / "train_labels.tif")[15:20, :512, :512] > 0
        pred = probs[..., 1] >= 0.5
        px = metrics.binary_scores(pred, gt)
        tp = n_pred = n_gt = 0
        for k in range(len(gt)):  # instances = 2D connected components per section
            m = match_instances(ndimage.label(pred[k])[0], ndimage.label(gt[k])[0], threshold=0.5)
            tp, n_pred, n_gt = tp + len(m["iou"]), n_pred + m["n_pred"], n_gt + m["n_gt"]
        f1 = 2 * tp / max(n_pred + n_gt, 1)
        return {"iou": px["iou"], "f1_pixel": px["f1"], "instance_f1_50": f1, "n_pred": n_pred, "n_gt": n_gt}
    gt = ds["test_labels"]
    bnd = probs[..., 1]
    px = metrics.binary_scores(bnd >= 0.5, targets.boundaries(gt[None].astype(np.int64), 2)[0])
    ares, vois, sp, mg = [], [], [], []
    for k in range(len(gt)):  # 2D per slice: watershed cells from the predicted boundaries
        s = metrics.region_scores(cells_from_membranes(bnd[k]), gt[k], ignore_gt=(0,))
        ares.append(s["adapted_rand_error"]), vois.append(s["voi"]), sp.append(s["voi_split"]), mg.append(s["voi_merge"])
    return {"f1": px["f1"], "adapted_rand_error": float(np.mean(ares)), "voi": float(np.mean(vois)),
            "voi_split": float(np.mean(sp)), "voi_merge": float(np.mean(mg))}


COLUMNS = {"isbi": ["f1", "iou", "adapted_rand_error", "voi", "voi_split", "voi_merge"],
           "cdeep3m": ["iou", "f1_pixel", "instance_f1_50", "n_pred", "n_gt"],
           "gala": ["f1", "adapted_rand_error", "voi", "voi_split", "voi_merge"]}


def table() -> str:
    """Markdown tables of results.jsonl, one per dataset (the last record of each run)."""
    recs = {}
    for ln in (HERE / "results.jsonl").read_text().splitlines():
        r = json.loads(ln)
        recs[r["run"]] = r
    out = []
    for ds, cols in COLUMNS.items():
        rows = [r for r in recs.values() if r["dataset"] == ds]
        if not rows:
            continue
        out += [f"**{ds}**", "", "| encoder | labels | " + " | ".join(cols) + " | steps | final loss | train s |",
                "|---" * (len(cols) + 5) + "|"]
        for r in sorted(rows, key=lambda r: (-r["label_fraction"], r["init"])):
            vals = [f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols]
            out.append(f"| {'MAE-pretrained' if r['init'] == 'mae' else 'random init'} | "
                       f"{int(round(100 * r['label_fraction']))} % | " + " | ".join(vals)
                       + f" | {r['steps']} | {r['final_loss']:.3f} | {r['train_s']:.0f} |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    if sys.argv[1:] == ["--table"]:
        print(table())
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--only", default="isbi,gala,cdeep3m")
    ap.add_argument("--inits", default="random,mae")
    ap.add_argument("--fractions", default="0.1,1.0")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    schema.register()
    all_ds = datasets()
    for name in a.only.split(","):
        ds = all_ds[name]
        for frac in [float(f) for f in a.fractions.split(",")]:
            for init in a.inits.split(","):
                tag = f"{name}_{init}_{int(round(frac * 100))}"
                run_dir = Path("/tmp/emfm_seg_runs") / time.strftime("%Y%m%d_%H%M%S", time.localtime(T0)) / tag
                t0 = time.time()
                cfg = config(ds, init, frac, a.steps, run_dir, a.batch)
                summary = train.finetune(cfg)
                model, meta = train.load_seg_model(str(run_dir))
                lay = targets.layout(cfg.task, 2)
                vol = open_volume(ds["test_raw"] or ds["raw"])
                out = OUT / tag / "probabilities.zarr"
                p = ds["patch"]
                res = predict_volume(model_fn(model, lay, ndim=2, batch_size=4), lay.channels, vol, out,
                                     grey_range=meta["grey_range"], window=[1, p, p], overlap=[0, p // 4, p // 4],
                                     chunk=[1, 512, 512], roi=ds["test_roi"], dtype="float16", resume=False,
                                     show_progress=False,
                                     attributes={"content": "probabilities", "task": cfg.task.kind,
                                                 "channels": targets.channel_names(cfg.task, 2)})
                probs = open_volume(str(out)).read().astype(np.float32)
                rec = {"run": tag, "dataset": name, "init": init, "label_fraction": frac, "steps": a.steps,
                       "labelled_roi": summary["labelled_roi"], "first_loss": summary["first_loss"],
                       "final_loss": summary["final_loss"], "train_s": summary["train_s"],
                       "predict_s": res["seconds"], "total_s": time.time() - t0, "out": str(out),
                       **score(name, ds, probs)}
                print(json.dumps(rec), flush=True)
                with open(HERE / "results.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
