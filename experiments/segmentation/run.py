"""Segmentation quality on real EM: random-init vs MAE-pretrained ViT at 10 % and 100 % of the
labels.

Command (from the repository root; 2-core CPU, about an hour for all 12 runs on a shared machine;
records appended to experiments/segmentation/runs.jsonl and results.jsonl):
  PYTHONPATH=. nice -n 10 python experiments/segmentation/run.py --checkpoint MAE_RUN \
      [--steps 300 --batch 4] [--only isbi,gala,cdeep3m] [--out runs/seg_outputs/v2]
  PYTHONPATH=. python experiments/segmentation/run.py --stage score   (scores -> results.jsonl)
  PYTHONPATH=. python experiments/segmentation/run.py --table         (the README tables)
Per dataset and setting (`--stage train`): `emfm finetune` (library call, full fine-tuning,
progressive head), then blockwise `predict_volume` of the validation and test regions to
OUT/<dataset>_<init>_<fraction>/{val,test}.zarr; `--stage score` reads them back. Paths are
arguments: --checkpoint (the pretrained run for `--inits mae`), --out (probability maps), --data
(the EM data sets, default ../shared/data/em), --scratch (converted data and run directories,
default the system temp directory).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
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
from emfm.finetune import targets, train  # noqa: E402
from emfm.finetune.model import load_seg_model  # noqa: E402
from emfm.finetune.predict import model_fn, predict_volume  # noqa: E402

# paths, set from the command line in main()
EM = Path("../shared/data/em")  # --data
MAE = ""  # --checkpoint: the pretrained run (the main job's 1500-step MAE in the records)
OUT = Path("runs/seg_outputs/v2")  # --out
SCRATCH = Path(tempfile.gettempdir())  # --scratch
DATA = SCRATCH / "emfm_seg_data"
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
    gala = {
        k: tifffile.imread(EM / "gala_fibsem" / f"{k}.tif")
        for k in ("train_image", "train_labels", "test_image", "test_labels")
    }
    return {
        # ISBI: class 0 = interior (255), class 1 = membrane (0); train 0-19, test 20-29
        "isbi": dict(
            raw=to_zarr("isbi_raw", isbi_x),
            labels=to_zarr("isbi_labels", isbi_y),
            test_raw=None,
            train_roi=[[0, 16], [0, 512], [0, 512]],
            val_roi=[[16, 20], [0, 512], [0, 512]],
            test_roi=[[20, 30], [0, 512], [0, 512]],
            over=["task=semantic", "task.class_values=[255,0]"],
            patch=128,
        ),
        # CDeep3M: 1 = mitochondrion; train sections 0-14, test 15-19 (pixels 0-511 x 0-511)
        "cdeep3m": dict(
            raw=to_zarr("mito_raw", mito_x),
            labels=to_zarr("mito_labels", mito_y),
            test_raw=None,
            train_roi=[[0, 12], [0, 1024], [0, 1024]],
            val_roi=[[12, 15], [0, 512], [0, 512]],
            test_roi=[[15, 20], [0, 512], [0, 512]],
            over=["task=semantic", "loss.balance=true"],
            patch=128,
        ),
        # gala: neuron instances (0 = boundary); boundary task per slice; train volume -> test
        # volume
        "gala": dict(
            raw=to_zarr("gala_train_raw", gala["train_image"]),
            labels=to_zarr("gala_train_labels", gala["train_labels"].astype(np.uint32)),
            test_raw=to_zarr("gala_test_raw", gala["test_image"]),
            test_labels=gala["test_labels"],
            train_roi=[[0, 40], [0, 100], [0, 200]],
            val_roi=[[40, 50], [0, 100], [0, 200]],
            test_roi=None,
            over=["task=boundary", "task.label_type=instances", "task.distance=false"],
            patch=64,
        ),
    }


def config(
    ds: dict,
    init: str,
    fraction: float,
    steps: int,
    run_dir: Path,
    batch: int,
    regime: str = "scratch",
    seed: int = 0,
):
    over = [
        f"data.path={ds['raw']}",
        f"data.labels={ds['labels']}",
        f"data.label_fraction={fraction}",
        f"data.patch_shape=[1,{ds['patch']},{ds['patch']}]",
        "data.test_roi=null",
        "data.train_roi="
        + (json.dumps(ds["train_roi"]).replace(" ", "") if ds["train_roi"] else "null"),
        f"trainer.steps={steps}",
        f"data.batch_size={batch}",
        "optim.warmup_steps=20",
        "trainer.log_every=50",
        "trainer.progress=false",
        "trainer.tensorboard=false",
        "model.width=128",
        "model.depth=4",
        "model.heads=4",
        "head=progressive",
        f"run_dir={run_dir}",
        f"regime={regime}",
        f"trainer.seed={seed}",
        *ds["over"],
    ]
    if init == "mae":
        if not MAE:
            raise SystemExit("run.py: --inits mae needs --checkpoint (a pretraining run directory)")
        over += ["regime.init=pretrained", f"checkpoint={MAE}"]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        c = compose("finetune", overrides=over)
    return schema.validate_finetune(OmegaConf.to_object(c))


COLUMNS = {  # (header, key); the tuned parameters follow
    "isbi": [
        ("F1", "f1"),
        ("IoU", "iou"),
        ("ARE @0.5", "adapted_rand_error_default"),
        ("VOI @0.5", "voi_default"),
        ("ARE tuned", "adapted_rand_error"),
        ("VOI tuned", "voi"),
        ("split", "voi_split"),
        ("merge", "voi_merge"),
    ],
    "cdeep3m": [
        ("IoU @0.5", "iou"),
        ("IoU tuned", "iou_tuned"),
        ("inst. F1 @0.5", "instance_f1_50_default"),
        ("inst. F1 tuned", "instance_f1_50"),
    ],
    "gala": [
        ("bnd F1", "f1"),
        ("2D-3D ARE", "link2d_adapted_rand_error"),
        ("2D-3D VOI", "link2d_voi"),
        ("split", "link2d_voi_split"),
        ("merge", "link2d_voi_merge"),
        ("2D-3D VOI @0.5", "link2d_voi_default"),
        ("MC ARE", "multicut_adapted_rand_error"),
        ("MC VOI", "multicut_voi"),
        ("split", "multicut_voi_split"),
        ("merge", "multicut_voi_merge"),
        ("MC VOI @0.5", "multicut_voi_default"),
    ],
}
TUNED = {"isbi": ["tuned"], "cdeep3m": ["tuned"], "gala": ["link2d_tuned", "multicut_tuned"]}


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
        out += [
            f"**{ds}**",
            "",
            "| regime | encoder | labels | "
            + " | ".join(h for h, _ in cols)
            + " | tuned on val | steps | final loss | train s |",
            "|---" * (len(cols) + 7) + "|",
        ]
        for r in sorted(
            rows,
            key=lambda r: (
                r.get("regime", "scratch") != "scratch",
                -r["label_fraction"],
                r.get("regime", ""),
                r["init"],
            ),
        ):
            vals = [f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for _, k in cols]
            tuned = "; ".join(
                ", ".join(
                    f"{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)
                    for v in r[t].values()
                )
                for t in TUNED[ds]
            )
            regime = r.get("regime", "scratch")
            regime = ("supervised" if regime == "scratch" else regime) + (
                f" (seed {r['seed']})" if r.get("seed") else ""
            )
            out.append(
                f"| {regime} | "
                f"{'MAE' if r['init'] == 'mae' else 'random'} | "
                f"{int(round(100 * r['label_fraction']))} % | "
                + " | ".join(vals)
                + f" | {tuned} | {r['steps']} | {r['final_loss']:.3f} | {r['train_s']:.0f} |"
            )
        out.append("")
    return "\n".join(out)


def _instances_scores(lab: np.ndarray, gt: np.ndarray, per_section: bool) -> dict:
    from emfm.eval.metrics_region import region_scores

    pairs = list(zip(lab, gt)) if per_section else [(lab, gt)]
    rs = [region_scores(p, g, ignore_gt=(0,)) for p, g in pairs]
    return {
        k: float(np.mean([r[k] for r in rs]))
        for k in ("adapted_rand_error", "voi", "voi_split", "voi_merge")
    }


def score_run(name: str, ds: dict, rec: dict, routes: tuple = ("link2d", "multicut")) -> dict:
    """Scores of one trained run on the test region, with the instance parameters chosen on its
    validation region (emfm.instances.tune, the task's metric), and at the fixed defaults."""
    from emfm.eval.cells import gt_cells
    from emfm.instances import SegmentParams, segment
    from emfm.instances.tune import (
        DEFAULT_GRIDS,
        foreground_instances,
        score_instances,
        tune_foreground,
        tune_instances,
    )

    val = open_volume(rec["val_probabilities"]).read()[..., 1].astype(np.float32)
    test = open_volume(rec["test_probabilities"]).read()[..., 1].astype(np.float32)
    out = {}
    if name == "isbi":
        lab = tifffile.imread(EM / "isbi2012" / "train_labels.tif") == 0  # membranes
        vgt = np.stack([gt_cells(m) for m in lab[16:20]])
        tgt = np.stack([gt_cells(m) for m in lab[20:30]])
        px = metrics.binary_scores(test >= 0.5, lab[20:30])
        out.update(f1=px["f1"], iou=px["iou"])
        p0 = SegmentParams(method="watershed", two_d=True)
        best, trials = tune_instances(val, vgt, p0, metric="adapted_rand_error", per_section=True)
        out.update(
            {
                f"{k}_default": v
                for k, v in _instances_scores(segment(test, p0), tgt, True).items()
                if k in ("adapted_rand_error", "voi")
            }
        )
        out.update(_instances_scores(segment(test, best), tgt, True))
        out["tuned"] = {"threshold": best.threshold, "min_seed": best.min_seed}
    elif name == "cdeep3m":
        lab = tifffile.imread(EM / "cdeep3m_sbem_mito" / "train_labels.tif") > 0
        vgt = np.stack([ndimage.label(m)[0] for m in lab[12:15, :512, :512]])
        tgt = np.stack([ndimage.label(m)[0] for m in lab[15:20, :512, :512]])
        best, trials = tune_foreground(val, vgt, metric="instance_f1")
        px = metrics.binary_scores(test >= 0.5, tgt > 0)
        pt = metrics.binary_scores(test >= best["threshold"], tgt > 0)
        out.update(
            iou=px["iou"],
            iou_tuned=pt["iou"],
            instance_f1_50_default=score_instances(
                foreground_instances(test), tgt, "instance_f1", per_section=True
            ),
            instance_f1_50=score_instances(
                foreground_instances(test, **best), tgt, "instance_f1", per_section=True
            ),
            tuned=best,
        )
    else:
        vgt = tifffile.imread(EM / "gala_fibsem" / "train_labels.tif")[40:50].astype(np.int64)
        tgt = ds["test_labels"].astype(np.int64)
        out["f1"] = metrics.binary_scores(test >= 0.5, targets.boundaries(tgt[None], 2)[0])["f1"]
        grids = {"link2d": DEFAULT_GRIDS["link2d"], "multicut": DEFAULT_GRIDS["multicut"]}
        for route, p0 in (
            ("link2d", SegmentParams(method="link2d")),
            ("multicut", SegmentParams(method="multicut", two_d=True)),
        ):
            if route not in routes:
                continue
            best, trials = tune_instances(val, vgt, p0, metric="voi", grid=grids[route])
            d = _instances_scores(segment(test, p0), tgt, False)
            t = _instances_scores(segment(test, best), tgt, False)
            out.update({f"{route}_{k}": v for k, v in t.items()})
            out[f"{route}_voi_default"] = d["voi"]
            out[f"{route}_are_default"] = d["adapted_rand_error"]
            names = DEFAULT_GRID_NAMES[route]
            out[f"{route}_tuned"] = {k: getattr(best, k) for k in names}
    return out


DEFAULT_GRID_NAMES = {
    "link2d": ("threshold", "link_2d", "agglomeration_threshold"),
    "multicut": ("threshold", "beta"),
}


def rescore_link2d(all_ds: dict) -> None:
    """The gala 2D-then-3D route again (one-to-one links, the default grid of link2d)
    on the stored probabilities of every gala run; the other scores of its last record are kept."""
    last = {}
    for ln in (HERE / "results.jsonl").read_text().splitlines():
        r = json.loads(ln)
        last[r["run"]] = r
    for rec in last.values():
        if rec["dataset"] != "gala":
            continue
        t0 = time.time()
        res = {
            **rec,
            **score_run("gala", all_ds["gala"], rec, routes=("link2d",)),
            "link2d_rescored": time.strftime("%Y-%m-%d"),
            "link2d_score_s": time.time() - t0,
        }
        print(json.dumps({k: v for k, v in res.items() if k.startswith("link2d")}), flush=True)
        with open(HERE / "results.jsonl", "a") as f:
            f.write(json.dumps(res) + "\n")


def rescore(all_ds: dict, only: list[str]) -> None:
    """Every run's stored probabilities (its last record in results.jsonl) scored again
    with score_run, no training; the new scores go to rescore.jsonl with the entries that differ
    from the recorded ones by more than 5e-4 (or whose chosen parameters differ)."""
    last = {}
    for ln in (HERE / "results.jsonl").read_text().splitlines():
        r = json.loads(ln)
        last[r["run"]] = r
    for tag, rec in last.items():
        if rec["dataset"] not in only:
            continue
        t0 = time.time()
        new = score_run(rec["dataset"], all_ds[rec["dataset"]], rec)
        differs = {
            k: [rec.get(k), v]
            for k, v in new.items()
            if (
                abs(v - rec[k]) > 5e-4
                if isinstance(v, float) and isinstance(rec.get(k), float)
                else v != rec.get(k)
            )
        }
        res = {
            "run": tag,
            "dataset": rec["dataset"],
            "rescored": time.strftime("%Y-%m-%d"),
            "rescore_s": time.time() - t0,
            "probabilities": [rec["val_probabilities"], rec["test_probabilities"]],
            **new,
            "differs_from_results": differs,
        }
        print(
            json.dumps({"run": tag, "rescore_s": res["rescore_s"], "differs": differs}), flush=True
        )
        with open(HERE / "rescore.jsonl", "a") as f:
            f.write(json.dumps(res) + "\n")


def score_all(all_ds: dict) -> None:
    """Scores of every trained run in runs.jsonl (the last record per run) to results.jsonl."""
    runs = {}
    for ln in (HERE / "runs.jsonl").read_text().splitlines():
        r = json.loads(ln)
        runs[r["run"]] = r
    done = set()
    if (HERE / "results.jsonl").exists():
        done = {
            (r["run"], r.get("train_s"))
            for r in map(json.loads, (HERE / "results.jsonl").read_text().splitlines())
        }
    for tag, rec in runs.items():
        if (tag, rec["train_s"]) in done:
            continue
        t0 = time.time()
        res = {
            **rec,
            **score_run(rec["dataset"], all_ds[rec["dataset"]], rec),
            "score_s": time.time() - t0,
        }
        print(json.dumps(res), flush=True)
        with open(HERE / "results.jsonl", "a") as f:
            f.write(json.dumps(res) + "\n")


def train_one(
    name: str, ds: dict, init: str, frac: float, regime: str, steps: int, batch: int, seed: int = 0
) -> dict:
    """`emfm finetune` (library call), then blended probabilities of the validation and test
    regions."""
    tag = (
        f"{name}_{init}_{int(round(frac * 100))}"
        + ("" if regime == "scratch" else f"_{regime}")
        + (f"_seed{seed}" if seed else "")
    )
    run_dir = SCRATCH / "emfm_seg_runs" / time.strftime("%Y%m%d_%H%M%S", time.localtime(T0)) / tag
    t0 = time.time()
    cfg = config(ds, init, frac, steps, run_dir, batch, regime, seed)
    summary = train.finetune(cfg)
    model, meta = load_seg_model(str(run_dir))
    lay = targets.layout(cfg.task, 2)
    p = ds["patch"]
    rec = {
        "run": tag,
        "dataset": name,
        "init": init,
        "regime": regime,
        "seed": seed,
        "label_fraction": frac,
        "steps": steps,
        "labelled_roi": summary["labelled_roi"],
        "first_loss": summary["first_loss"],
        "final_loss": summary["final_loss"],
        "train_s": summary["train_s"],
    }
    for split, src, roi in (
        ("val", ds["raw"], ds["val_roi"]),
        ("test", ds["test_raw"] or ds["raw"], ds["test_roi"]),
    ):
        out = OUT / tag / f"{split}.zarr"
        res = predict_volume(
            model_fn(model, lay, ndim=2, batch_size=4),
            lay.channels,
            open_volume(src),
            out,
            grey_range=meta["grey_range"],
            window=[1, p, p],
            overlap=[0, p // 4, p // 4],
            chunk=[1, 512, 512],
            roi=roi,
            dtype="float16",
            resume=False,
            show_progress=False,
            attributes={
                "content": "probabilities",
                "task": cfg.task.kind,
                "channels": targets.channel_names(cfg.task, 2),
            },
        )
        rec[f"{split}_probabilities"] = str(out)
        rec[f"{split}_predict_s"] = res["seconds"]
    rec["total_s"] = time.time() - t0
    return rec


def main() -> None:
    global EM, MAE, OUT, SCRATCH, DATA
    if sys.argv[1:] == ["--table"]:
        print(table())
        return
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--stage", default="train", choices=["train", "score", "rescore_link2d", "rescore"]
    )
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--only", default="isbi,cdeep3m,gala")
    ap.add_argument("--inits", default="random,mae")
    ap.add_argument("--fractions", default="0.1,1.0")
    ap.add_argument("--regimes", default="scratch")
    ap.add_argument(
        "--seed",
        type=int,
        default=0,
        help="trainer.seed: initialisation of the head (and random encoder) and patch sampling",
    )
    ap.add_argument("--checkpoint", default="", help="pretraining run for --inits mae")
    ap.add_argument("--out", default=str(OUT), help="probability maps, one directory per run")
    ap.add_argument("--data", default=str(EM), help="the EM data sets (isbi2012, ...)")
    ap.add_argument("--scratch", default=str(SCRATCH), help="converted data, run directories")
    a = ap.parse_args()
    EM, MAE, OUT, SCRATCH = Path(a.data), a.checkpoint, Path(a.out), Path(a.scratch)
    DATA = SCRATCH / "emfm_seg_data"
    logging.basicConfig(level=logging.WARNING)
    schema.register()
    all_ds = datasets()
    if a.stage == "score":
        score_all(all_ds)
        return
    if a.stage == "rescore_link2d":
        rescore_link2d(all_ds)
        return
    if a.stage == "rescore":
        rescore(all_ds, a.only.split(","))
        return
    for name in a.only.split(","):
        for frac in [float(f) for f in a.fractions.split(",")]:
            for regime in a.regimes.split(","):
                for init in a.inits.split(","):
                    rec = train_one(
                        name, all_ds[name], init, frac, regime, a.steps, a.batch, a.seed
                    )
                    print(json.dumps(rec), flush=True)
                    with open(HERE / "runs.jsonl", "a") as f:
                        f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
