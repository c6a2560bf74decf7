"""Fine-tuning from a pretrained checkpoint vs random init, with a linear probe on each frozen
encoder given the same labels, on ISBI 2012 membranes and CDeep3M mitochondria.

    python experiments/foundation/finetune.py --shared ../shared/data/em --out
    runs/foundation/finetune \
        --checkpoint zoo:NAME [--datasets isbi,cdeep3m] [--inits zoo,random] [--fractions 0.1,1.0] \
        [--seeds 0,1,2] [--steps 400] [--probe]
    python experiments/foundation/finetune.py --table --out runs/foundation/finetune > table.md

Per run: `emfm finetune` (library call; U-Net with its own decoder as the head, full fine-tuning, CE
+ Dice; `regime.init=pretrained checkpoint=...` or scratch), then blended probabilities of the
validation and test sections; every choice that turns probabilities into instances (for ISBI
cells the main job's derivation: smoothing, rank seed level and seed size over CELL_GRID, the main
job's probe grid when the protocol was frozen; threshold and minimum size for mitochondria) is
made on the validation sections with the task's own metric, then the test sections are scored
once. With
`--probe`, a per-pixel linear probe (emfm.eval.probes, subpixel, the same labelled sections) on the
frozen encoder of the same initialisation is scored the same way. Label fraction f: the first
ceil(f x n) training sections are labelled (emfm finetune's data.label_fraction).

Splits (the corpus of configs/data/corpus.yaml leaves out both test ranges):
- ISBI 2012 train volume: train 0-15, validation 16-19, test 20-29 (membrane = label 0).
- CDeep3M: train 0-11, validation 12-13, test 14-19; 2x downsampled in plane (11.8 nm pixels, as the
  probing benchmark task), 512 x 512 per section.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import numpy as np

DATASETS = {
    "isbi": dict(
        image="isbi2012/train_volume.tif",
        labels="isbi2012/train_labels.tif",
        downsample=1,
        train=(0, 16),
        val=(16, 20),
        test=(20, 30),
        over=["task=semantic", "task.class_values=[255,0]"],
    ),
    "cdeep3m": dict(
        image="cdeep3m_sbem_mito/train_images.tif",
        labels="cdeep3m_sbem_mito/train_labels.tif",
        downsample=2,
        train=(0, 12),
        val=(12, 14),
        test=(14, 20),
        over=["task=semantic", "task.class_values=[0,1]", "loss.balance=true"],
    ),
}


TAG = ""  # run-name suffix of a recipe variant (--tag)
REGIME = "finetune"  # the regime of a pretrained start (--regime)
RANDOM_REGIME = "scratch"  # the regime of random init (--random-regime)
LR = None  # optim.lr override (--lr); None = configs/finetune.yaml's
EXTRA: list[str] = []  # further overrides of a pretrained start's fine-tuning (--set KEY=VALUE ...)
CONTROL = False  # --set applies to random init too (--control)


def load(name: str, shared: Path, tmp: Path) -> dict:
    """The data set as zarr volumes (`raw`, `labels`) plus in-memory arrays for scoring."""
    import tifffile

    from emfm.data.importer import downsample2
    from emfm.data.volume import write_array

    d = DATASETS[name]
    x, y = tifffile.imread(shared / d["image"]), tifffile.imread(shared / d["labels"])
    for _ in range(int(math.log2(d["downsample"]))):
        x, y = downsample2(x), downsample2(y, labels=True)
    out = dict(d, x=x, y=y)
    for k, arr in (("raw", x), ("labels_zarr", y)):
        p = tmp / f"{name}_{k}.zarr"
        if not (p / "zarr.json").exists():
            write_array(p, arr, chunks=(1, min(256, arr.shape[1]), min(256, arr.shape[2])))
        out[k] = str(p)
    return out


def fg(name: str, y: np.ndarray) -> np.ndarray:
    return y == 0 if name == "isbi" else y > 0


def finetune_config(
    ds: dict,
    init: str,
    checkpoint: str,
    frac: float,
    steps: int,
    seed: int,
    run_dir: Path,
    batch: int,
    width: int,
):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from emfm.config import schema

    ny, nx = ds["x"].shape[1:]
    over = [
        f"data.path={ds['raw']}",
        f"data.labels={ds['labels_zarr']}",
        f"data.label_fraction={frac}",
        "data.patch_shape=[1,128,128]",
        "data.test_roi=null",
        f"data.train_roi=[[{ds['train'][0]},{ds['train'][1]}],[0,{ny}],[0,{nx}]]",
        f"trainer.steps={steps}",
        f"data.batch_size={batch}",
        "optim.warmup_steps=20",
        "trainer.log_every=50",
        "trainer.progress=false",
        "trainer.tensorboard=false",
        "model=unet2d",
        "head=unet",
        f"model.width={width}",
        f"run_dir={run_dir}",
        f"trainer.seed={seed}",
        *ds["over"],
    ]
    over += (
        [f"regime={REGIME}", f"checkpoint={checkpoint}"]
        if init != "random"
        else [f"regime={RANDOM_REGIME}"]
    )
    over += [f"optim.lr={LR}"] if LR else []
    over += EXTRA if init != "random" or CONTROL else []
    repo = Path(__file__).resolve().parents[2]
    with initialize_config_dir(config_dir=str(repo / "configs"), version_base=None):
        c = compose("finetune", overrides=over)
    return schema.validate_finetune(OmegaConf.to_object(c))


# The ISBI cell-derivation grid of every recorded fine-tuning run: the main job's probe grid
# (configs/main.yaml probe.cell_*) when this protocol was frozen, kept here so that the records
# stay reproducible (--rescore) when the main job's grid changes.
CELL_GRID = dict(thresholds=[0.5, 0.6, 0.7], min_seeds=[16, 64, 256], sigmas=[0.0, 1.0], rank=True)


# Merge levels added to CELL_GRID by --cell-merges (emfm.eval.cells: adjacent cells joined while
# their border's mean membrane probability is below the level); [0.0] = no merging, the protocol of
# every record made before the option existed.
CELL_MERGES = [0.0]


def merge_levels(ap: argparse.ArgumentParser, flag: str, text: str) -> list[float]:
    """Comma-separated merge levels of a command-line flag, each in [0, 1); `ap.error` otherwise."""
    try:
        levels = [float(m) for m in text.split(",")]
    except ValueError:
        ap.error(f"{flag} {text!r}: expected comma-separated numbers, e.g. 0,0.5,0.6")
    if any(not 0 <= m < 1 for m in levels):
        ap.error(f"{flag} {text!r}: each level must be in [0, 1)")
    return levels


def _cell_grid() -> dict:
    """The cell-derivation grid of the fine-tuning protocol (CELL_GRID, with --cell-merges)."""
    g = {k: (list(v) if isinstance(v, list) else v) for k, v in CELL_GRID.items()}
    if CELL_MERGES != [0.0]:
        g["merges"] = list(CELL_MERGES)
    return g


def score(name: str, ds: dict, p_val: np.ndarray, p_test: np.ndarray) -> dict:
    """Test scores with post-processing chosen on the validation sections."""
    from scipy import ndimage

    from emfm.eval import metrics
    from emfm.eval.cells import cell_scores, tune_cells
    from emfm.eval.tasks import choose_threshold
    from emfm.instances.tune import foreground_instances, score_instances, tune_foreground

    yv, yt = fg(name, ds["y"][slice(*ds["val"])]), fg(name, ds["y"][slice(*ds["test"])])
    thr = choose_threshold(p_val, yv)
    px = metrics.binary_scores(p_test >= thr, yt)
    # for choosing fine-tuning recipes: validation only
    pv = metrics.binary_scores(p_val >= thr, yv)
    out = {
        "f1": px["f1"],
        "iou": px["iou"],
        "threshold": thr,
        "val_f1": pv["f1"],
        "val_iou": pv["iou"],
    }
    if name == "isbi":
        # cells as the main job's probe derives them (emfm.eval.cells, over CELL_GRID):
        # smoothing and per-section rank levels, so that the seeds
        # do not depend on how confident a fine-tuned map is. (The 2D watershed at absolute levels
        # 0.1-0.7 chose its lowest level on the validation sections of all 18 fine-tuned runs
        # of zoo:em_unet16_hc15k's study: the maps were more confident than its grid.)
        cg = _cell_grid()
        best = tune_cells(p_val, yv, **cg)
        out["val_adapted_rand_error"] = cell_scores(p_val, yv, **best)["adapted_rand_error"]
        out.update(cell_scores(p_test, yt, **best))
        out["tuned"] = best
    else:
        vgt = np.stack([ndimage.label(m)[0] for m in yv])
        tgt = np.stack([ndimage.label(m)[0] for m in yt])
        best, trials = tune_foreground(p_val, vgt, metric="instance_f1")
        out["val_instance_f1"] = max(t["instance_f1"] for t in trials)
        out["instance_f1"] = score_instances(
            foreground_instances(p_test, **best), tgt, "instance_f1", per_section=True
        )
        out["tuned"] = best
    return out


def predict(model, meta, task_cfg, ds: dict, z: tuple[int, int], tmp: Path, tag: str) -> np.ndarray:
    from emfm.data.volume import open_volume
    from emfm.finetune import targets
    from emfm.finetune.predict import model_fn, predict_volume

    lay = targets.layout(task_cfg, 2)
    ny, nx = ds["x"].shape[1:]
    out = tmp / "pred" / f"{tag}_{z[0]}_{z[1]}.zarr"
    predict_volume(
        model_fn(model, lay, ndim=2, batch_size=4),
        lay.channels,
        open_volume(ds["raw"]),
        out,
        grey_range=meta["grey_range"],
        window=[1, 128, 128],
        overlap=[0, 32, 32],
        chunk=[1, 512, 512],
        roi=[list(z), [0, ny], [0, nx]],
        dtype="float32",
        resume=False,
        show_progress=False,
    )
    return open_volume(out).read()[..., 1].astype(np.float32)


def run_finetune(name, ds, init, checkpoint, frac, steps, seed, out: Path, batch, width) -> dict:
    from emfm.finetune import train
    from emfm.finetune.model import load_seg_model

    tag = f"{name}_{init}_{int(round(100 * frac))}_seed{seed}{TAG}"
    run_dir = out / "runs" / tag
    cfg = finetune_config(ds, init, checkpoint, frac, steps, seed, run_dir, batch, width)
    t0 = time.time()
    summary = train.finetune(cfg)
    model, meta = load_seg_model(str(run_dir))
    p_val = predict(model, meta, cfg.task, ds, ds["val"], out, tag)
    p_test = predict(model, meta, cfg.task, ds, ds["test"], out, tag)
    return {
        "kind": "finetune",
        "run": tag,
        "recipe": TAG.lstrip("_") or "default",
        "regime": cfg.regime.name,
        "dataset": name,
        "init": init,
        "fraction": frac,
        "seed": seed,
        "steps": steps,
        "labelled_roi": summary["labelled_roi"],
        "final_loss": summary["final_loss"],
        "train_s": summary["train_s"],
        "seconds": time.time() - t0,
        "host": summary.get("host"),
        **score(name, ds, p_val, p_test),
    }


def run_probe(name, ds, init, checkpoint, frac, seed, width) -> dict:
    """Linear probe (subpixel, emfm.eval.probes) on the frozen encoder of this initialisation,
    trained on the same labelled sections as the fine-tuned model."""
    from emfm.config.schema import BenchmarkConfig, ModelConfig, resolve_zoo
    from emfm.eval import probes
    from emfm.eval.benchmark import encode
    from emfm.export.encode import normalise
    from emfm.train.state import build_encoder, load_encoder

    t0 = time.time()
    if init == "random":
        enc = build_encoder(
            ModelConfig(name="unet", patch_size=[1, 1], width=width, depth=4), seed=seed
        )
    else:
        enc, _ = load_encoder(resolve_zoo(checkpoint, "checkpoint"))
    tr = ds["train"]
    n_lab = max(1, math.ceil(frac * (tr[1] - tr[0])))
    lo, hi = np.percentile(ds["x"][tr[0] : tr[1]], [0.5, 99.5])
    bench = BenchmarkConfig(tile=128, margin=32, batch_size=8)
    f = {
        k: encode(enc, normalise(ds["x"][slice(*ds[k])], (lo, hi)), bench)
        for k in ("train", "val", "test")
    }
    ytr = fg(name, ds["y"][tr[0] : tr[1]])
    mask = np.zeros(ytr.shape, bool)
    mask[:n_lab] = True
    s = probes.ProbeSettings(steps=300, batch_tokens=4096, lr=0.01)
    p_test, p_val = probes.fit_predict(
        "linear", s, f["train"], ytr, mask, [f["test"], f["val"]], seed
    )
    return {
        "kind": "linear_probe",
        "run": f"{name}_{init}_{int(round(100 * frac))}_seed{seed}_probe",
        "dataset": name,
        "init": init,
        "fraction": frac,
        "seed": seed,
        "seconds": time.time() - t0,
        **score(name, ds, p_val, p_test),
    }


def rescore(out: Path, shared: Path) -> None:
    """Scores of the finished fine-tuning runs in `out/results.jsonl` again from their saved
    probabilities (`out/pred`), e.g. after a validation score was added to `score`; writes
    `out/results_rescored.jsonl` (`results_rescored_merge.jsonl` with --cell-merges). Pixel test
    scores must come out as recorded (checked); scores of an earlier post-processing (instances,
    cells) that differ are kept as `previous_*`."""
    from emfm.data.volume import open_volume

    recs = [json.loads(line) for line in open(out / "results.jsonl")]
    data: dict[str, dict] = {}
    name_out = "results_rescored.jsonl" if CELL_MERGES == [0.0] else "results_rescored_merge.jsonl"
    with open(out / name_out, "w") as f:
        for rec in recs:
            name = rec["dataset"]
            if name not in data:
                data[name] = load(name, shared, out)
            ds = data[name]
            pv, pt = (
                out / "pred" / f"{rec['run']}_{a}_{b}.zarr" for a, b in (ds["val"], ds["test"])
            )
            if rec["kind"] == "finetune" and pv.exists() and pt.exists():
                new = score(
                    name,
                    ds,
                    open_volume(pv).read()[..., 1].astype(np.float32),
                    open_volume(pt).read()[..., 1].astype(np.float32),
                )
                for k in ("f1", "iou"):
                    if k in rec and abs(rec[k] - new[k]) > 1e-9:
                        raise SystemExit(f"{rec['run']}: rescored test {k} {new[k]} != {rec[k]}")
                # scores of an earlier post-processing that came out differently: kept
                changed = {
                    f"previous_{k}": rec[k]
                    for k in new
                    if k in rec and rec[k] != new[k] and not k.startswith("previous_")
                }
                rec = {**rec, **changed}
                rec = {**rec, **new}
            f.write(json.dumps(rec) + "\n")
            print(rec["run"], {k: round(v, 4) for k, v in rec.items() if k.startswith("val_")})


METRICS = {"isbi": ["f1", "adapted_rand_error", "voi"], "cdeep3m": ["iou", "instance_f1", "f1"]}


def table(out: Path, recipes: set[str] | None = None) -> str:
    """Markdown tables of the records in `out` (a results.jsonl or the directory holding it); with
    `recipes`, only those fine-tuning recipes (and every probe row)."""
    path = out if out.suffix == ".jsonl" else out / "results.jsonl"
    recs = [json.loads(ln) for ln in path.read_text().splitlines()]
    if recipes is not None:
        recs = [r for r in recs if r["kind"] != "finetune" or r.get("recipe", "default") in recipes]
    lines = []
    for name, ms in METRICS.items():
        rows = [r for r in recs if r["dataset"] == name]
        if not rows:
            continue
        lines += [
            f"**{name}** (test sections; mean ± std over seeds, ddof 1)",
            "",
            "| model | init | labels | seeds | " + " | ".join(ms) + " |",
            "|---" * (4 + len(ms)) + "|",
        ]
        groups = {}
        for r in rows:
            recipe = r.get("recipe", "default")
            init = (
                r["init"]
                if recipe == "default" or r["kind"] != "finetune"
                else f"{r['init']} ({recipe})"
            )
            groups.setdefault((r["kind"], init, r["fraction"]), []).append(r)
        for (kind, init, frac), rs in sorted(
            groups.items(), key=lambda kv: (kv[0][0], -kv[0][2], kv[0][1])
        ):
            vals = []
            for m in ms:
                v = np.array([r[m] for r in rs], float)
                vals.append(
                    f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v.mean():.3f}"
                )
            lines.append(
                f"| {kind} | {init} | {100 * frac:g} % | {len(rs)} | " + " | ".join(vals) + " |"
            )
        lines.append("")
    return "\n".join(lines)


# the validation scores a fine-tuning recipe is chosen by (one recipe for both tasks): every target
# metric of the fine-tuning targets plus the pixel scores, each as "larger is better"
CHOICE = {
    "isbi": {"val_f1": 1.0, "val_adapted_rand_error": -1.0},
    "cdeep3m": {"val_iou": 1.0, "val_instance_f1": 1.0},
}


def choose(path: Path, recipes: list[str], init: str = "zoo", fraction: float = 0.1) -> str:
    """The recipe among `recipes` with the best mean validation score (CHOICE: ISBI F1 and
    1 - adapted Rand error, CDeep3M IoU and instance F1; each the mean over the seeds that every
    recipe has), runs of `init` at label `fraction` only. Prints the table; the first recipe
    listed wins ties. Test scores are not read."""
    recs = [json.loads(ln) for ln in path.read_text().splitlines()]
    recs = [
        r
        for r in recs
        if r["kind"] == "finetune" and r["init"] == init and r["fraction"] == fraction
    ]
    seeds = None
    for name in CHOICE:
        for rc in recipes:
            s = {r["seed"] for r in recs if r["dataset"] == name and r.get("recipe") == rc}
            seeds = s if seeds is None else seeds & s
    if not seeds:
        raise SystemExit(f"no seed has runs of every recipe {recipes} on {', '.join(CHOICE)}")
    cols = [(n, k) for n, ks in CHOICE.items() for k in ks]
    print(f"validation means over seeds {sorted(seeds)}; the choice score is their mean")
    print("| recipe | " + " | ".join(f"{n} {k}" for n, k in cols) + " | choice score |")
    print("|---" * (len(cols) + 2) + "|")
    best, best_s = None, -np.inf
    for rc in recipes:
        vals, terms = [], []
        for n, k in cols:
            v = [
                r.get(k)
                for r in recs
                if r["dataset"] == n and r.get("recipe") == rc and r["seed"] in seeds
            ]
            if any(x is None for x in v) or len(v) != len(seeds):
                raise SystemExit(f"recipe {rc}: {n} {k} missing on some seed (run --rescore)")
            m = float(np.mean(v))
            vals.append(m)
            sign = CHOICE[n][k]
            terms.append(m if sign > 0 else 1.0 - m)
        score_ = float(np.mean(terms))
        print(f"| {rc} | " + " | ".join(f"{v:.4f}" for v in vals) + f" | {score_:.4f} |")
        if score_ > best_s:
            best, best_s = rc, score_
    print(f"chosen: {best}")
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default="../shared/data/em")
    ap.add_argument("--out", default="runs/foundation/finetune")
    ap.add_argument("--checkpoint", default="")
    ap.add_argument("--datasets", default="isbi,cdeep3m")
    ap.add_argument("--inits", default="zoo,random")
    ap.add_argument("--fractions", default="0.1")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument(
        "--width",
        type=int,
        default=16,
        help="U-Net width of random init (the checkpoint's otherwise)",
    )
    ap.add_argument(
        "--probe", action="store_true", help="also a linear probe on each frozen encoder"
    )
    ap.add_argument("--no-finetune", action="store_true")
    ap.add_argument("--table", action="store_true")
    ap.add_argument(
        "--choose",
        default="",
        metavar="RECIPES",
        help="comma-separated recipes: print their validation table and the chosen one",
    )
    ap.add_argument(
        "--choose-init", default="zoo", help="the start whose recipe --choose picks (zoo, random)"
    )
    ap.add_argument(
        "--rescore",
        action="store_true",
        help="score the finished runs in --out again from their saved probabilities",
    )
    ap.add_argument(
        "--regime", default="finetune", help="regime of a pretrained start (finetune, finetune_lld)"
    )
    ap.add_argument(
        "--random-regime",
        default="scratch",
        help="regime of random init (scratch; a semi-supervised one: mean_teacher, fixmatch)",
    )
    ap.add_argument(
        "--lr", type=float, default=None, help="optim.lr of the fine-tuning (default: the config's)"
    )
    ap.add_argument(
        "--tag", default="", help="suffix of the run names and the recipe column (a variant)"
    )
    ap.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="further overrides of a pretrained start's fine-tuning, e.g. regime.shrink=0.5",
    )
    ap.add_argument(
        "--control",
        action="store_true",
        help="apply --set to random init too (e.g. the shrink-and-perturb control)",
    )
    ap.add_argument(
        "--cell-merges",
        default="0",
        help="ISBI cells: comma-separated merge levels in [0, 1) chosen on validation with the "
        "rest of CELL_GRID (0 = no merging, the default protocol); with --rescore, the records "
        "are scored again with them (the earlier scores kept as previous_*)",
    )
    a = ap.parse_args()
    global REGIME, RANDOM_REGIME, LR, TAG, EXTRA, CONTROL, CELL_MERGES
    CELL_MERGES = merge_levels(ap, "--cell-merges", a.cell_merges)
    REGIME, RANDOM_REGIME, LR = a.regime, a.random_regime, a.lr
    TAG, EXTRA, CONTROL = a.tag, list(a.set), a.control
    out = Path(a.out)
    if a.table:
        print(table(out))
        return
    if a.choose or a.rescore:
        path = out if (a.choose and out.suffix == ".jsonl") else out / "results.jsonl"
        if not path.is_file():
            raise SystemExit(f"--out {a.out}: no fine-tuning records at {path}")
    if a.choose:
        choose(path, a.choose.split(","), init=a.choose_init)
        return
    logging.basicConfig(level=logging.WARNING)
    if a.rescore:
        rescore(out, Path(a.shared))
        return
    from emfm.config import schema

    schema.register()
    out.mkdir(parents=True, exist_ok=True)
    for name in a.datasets.split(","):
        ds = load(name, Path(a.shared), out)
        for frac in [float(f) for f in a.fractions.split(",")]:
            for seed in [int(s) for s in a.seeds.split(",")]:
                for init in a.inits.split(","):
                    recs = []
                    if not a.no_finetune:
                        recs.append(
                            run_finetune(
                                name,
                                ds,
                                init,
                                a.checkpoint,
                                frac,
                                a.steps,
                                seed,
                                out,
                                a.batch,
                                a.width,
                            )
                        )
                    if a.probe:
                        recs.append(run_probe(name, ds, init, a.checkpoint, frac, seed, a.width))
                    for rec in recs:
                        if init != "random":  # which checkpoint a pretrained start came from
                            rec = {**rec, "checkpoint": a.checkpoint}
                        print(json.dumps(rec), flush=True)
                        with open(out / "results.jsonl", "a") as f:
                            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
