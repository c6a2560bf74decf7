"""The main job and the probe / export steps as library functions (the CLI only calls these).

`main_job(cfg)`: pretrain (MAE) -> linear probe of pretrained vs randomly initialised encoder ->
dense feature export; everything lands in `cfg.run_dir`.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emfm.config.pretrain import EmfmConfig
from emfm.data import bundled
from emfm.data.sampling import Region, estimate_range, grey_range_for
from emfm.data.volume import Volume, VolumeError, open_volume
from emfm.eval import figures
from emfm.eval.cells import cell_scores, membrane_scores, tune_cells
from emfm.eval.linear_probe import train_linear_probe
from emfm.eval.tasks import choose_threshold
from emfm.export.encode import encode, feature_groups, normalise
from emfm.export.features import check_volume, export_features
from emfm.export.pca import pca_rgb
from emfm.train.state import build_encoder, load_encoder

log = logging.getLogger("emfm")

PROBE_COLUMNS = [
    "encoder",
    "f1",
    "iou",
    "adapted_rand_error",
    "voi",
    "voi_split",
    "voi_merge",
    "precision",
    "recall",
    "pixel_error",
]


def _encoders(cfg: EmfmConfig, checkpoint: str | None, grey_range) -> dict:
    """{name: (encoder, grey range)}: the zoo checkpoint `probe.zoo` (if set), the checkpoint's
    encoder, and `probe.random_seeds` random ones of the checkpoint's architecture (all normalised
    alike), or only random ones when no checkpoint is given."""
    from emfm.config.common import ModelConfig, resolve_zoo

    pc = cfg.probe
    model, grey, encs = cfg.model, grey_range, {}
    if pc.zoo:
        enc, meta = load_encoder(resolve_zoo(pc.zoo, "probe.zoo"))
        encs[pc.zoo] = (enc, tuple(meta.get("grey_range") or grey_range))
    if checkpoint:
        enc, meta = load_encoder(checkpoint)
        grey = tuple(meta.get("grey_range") or grey_range)
        from emfm import zoo

        # a zoo checkpoint's row carries its name; the run's own checkpoint is "pretrained"
        label = f"zoo:{Path(checkpoint).name}" if zoo.is_packaged(checkpoint) else "pretrained"
        encs[label] = (enc, grey)
        model = ModelConfig(**meta["model"])  # the checkpoint's architecture, freshly initialised
        if not pc.compare_random:
            return encs
    seeds = (
        [pc.seed + 1000 + i for i in range(pc.random_seeds)]
        if checkpoint
        else [pc.seed + i for i in range(pc.random_seeds)]
    )
    for s in seeds:
        name = "random_init" if pc.random_seeds == 1 else f"random_init_seed{s}"
        encs[name] = (build_encoder(model, seed=s), grey)
    return encs


def read_sections(vol: Volume, z: tuple[int, int]) -> np.ndarray:
    """Sections `[z0, z1)` of a z, y, x volume."""
    if vol.ndim != 3:
        raise VolumeError(f"probe volume {vol.path} has {vol.ndim} dimensions; expected z, y, x")
    if not 0 <= z[0] < z[1] <= vol.shape[0]:
        raise VolumeError(
            f"sections {list(z)} are outside volume {vol.path} with {vol.shape[0]} sections"
        )
    return vol.read((slice(*z), slice(None), slice(None)))


@dataclass
class ProbeData:
    """Sections (grey values) and membrane labels of the probe's train / validation / test split."""

    tr: tuple[int, int]
    va: tuple[int, int]  # the training sections when there is no validation split
    te: tuple[int, int]
    x: dict  # {"tr" | "va" | "te": images [n, y, x]}
    y: dict  # {"tr" | "va" | "te": membranes [n, y, x] bool}
    grey: tuple[float, float]  # grey range of the training sections


def probe_data(pc) -> ProbeData:
    """Read the probe's sections (`probe.*`); labels of both classes in training and validation."""
    img_vol = open_volume(bundled.resolve(pc.path, bundled.sample_raw()))
    lab_vol = open_volume(bundled.resolve(pc.labels, bundled.sample_membranes()))
    if img_vol.shape != lab_vol.shape:
        raise VolumeError(
            f"probe labels {lab_vol.path} have shape {lab_vol.shape}, image {img_vol.path} has "
            f"{img_vol.shape}"
        )
    tr, te = tuple(pc.train_slices), tuple(pc.test_slices)
    va = tuple(pc.val_slices) if pc.val_slices else tr
    z = {"tr": tr, "va": va, "te": te}
    x = {k: read_sections(img_vol, s) for k, s in z.items()}
    y = {k: read_sections(lab_vol, s) == pc.positive_label for k, s in z.items()}
    for k in ("tr", "va"):
        if not y[k].any() or y[k].all():
            raise VolumeError(
                f"probe labels {lab_vol.path}: sections {list(z[k])} hold no pixel of both classes "
                f"(positive_label={pc.positive_label})"
            )
    grey = estimate_range(
        Region.of(img_vol, [list(tr), [0, img_vol.shape[1]], [0, img_vol.shape[2]]])
    )
    return ProbeData(tr, va, te, x, y, grey)


def run_probe(cfg: EmfmConfig, checkpoint: str | None = None) -> dict:
    """Linear probe of membranes; returns {encoder name: scores}, writes CSV/JSON/Markdown and a
    figure.

    Each encoder's probe is trained on the training sections; its decision threshold and its cell
    segmentation parameters (probe.cell_* grid) are chosen on the validation sections (the training
    sections when there are none), then everything is scored once on the test sections. With several
    random-init encoders, "random_init" holds their mean and standard deviation (ddof 1)."""
    run_dir = Path(cfg.run_dir)
    d = probe_data(cfg.probe)
    results, probs = {}, {}
    for name, (enc, rng) in _encoders(cfg, checkpoint, d.grey).items():
        results[name], probs[name] = probe_encoder(cfg, enc, rng, d)
        r = results[name]
        log.info(
            "probe %-11s F1 %.4f IoU %.4f ARE %.4f VOI %.4f (threshold %.1f, cells %s)",
            name,
            r["f1"],
            r["iou"],
            r["adapted_rand_error"],
            r["voi"],
            r["threshold"],
            r["cells"],
        )
    rnd = [n for n in results if n.startswith("random_init_seed")]
    if rnd:  # the mean (and spread, ddof 1) of the random-init encoders
        results["random_init"] = {
            "seeds": len(rnd),
            **{c: float(np.mean([results[n][c] for n in rnd])) for c in PROBE_COLUMNS[1:]},
            **{
                c + "_std": float(np.std([results[n][c] for n in rnd], ddof=1))
                for c in PROBE_COLUMNS[1:]
            },
        }
    _write_probe_tables(run_dir, results, d.tr, d.te, d.va)
    k = np.linspace(0, len(d.x["te"]) - 1, min(3, len(d.x["te"]))).astype(int)
    cols = [("image", d.x["te"][k]), ("membrane label", d.y["te"][k].astype(float))]
    # one random-init map is enough
    shown = [n for n in probs if not n.startswith("random_init")] + rnd[:1]
    cols += [(f"{n} (F1 {results[n]['f1']:.3f})", probs[n][k]) for n in shown]
    figures.image_grid(run_dir / "figures" / "probe_membranes.png", cols)
    return results


def probe_encoder(cfg: EmfmConfig, enc, grey, d: ProbeData) -> tuple[dict, np.ndarray]:
    """(scores on the test sections, membrane probabilities of the test sections) of one encoder:
    its features encoded window by window, the linear probe trained on the training sections, the
    threshold and cell parameters chosen on the validation sections."""
    pc = cfg.probe
    t0 = time.perf_counter()
    kw = dict(
        tile=pc.tile,
        margin=pc.margin,
        batch_size=cfg.export.batch_size,
        layers=tuple(pc.blocks),
        embed=pc.embed,
    )

    def feats(k: str) -> np.ndarray:  # one split at a time: wide features take gigabytes
        return encode(enc, normalise(d.x[k], grey), **kw)

    lp = train_linear_probe(
        feats("tr"),
        d.y["tr"].astype(np.int32),
        steps=pc.steps,
        lr=pc.lr,
        weight_decay=pc.weight_decay,
        seed=pc.seed,
        upsample=pc.upsample,
        class_balance=pc.class_balance,
        crop=pc.crop,
        groups=feature_groups(enc, tuple(pc.blocks), pc.embed),
    )
    p_va = lp.predict(feats("va"), d.y["va"].shape[1:])[..., 1]
    threshold = choose_threshold(p_va, d.y["va"])  # chosen on the validation sections
    cells = {
        "threshold": pc.cell_thresholds[0],
        "min_seed": pc.cell_min_seeds[0],
        "sigma": pc.cell_sigmas[0],
        "rank": pc.cell_rank,
    }
    if pc.cell_merges[0] > 0:
        cells["merge"] = pc.cell_merges[0]
    n_cells = len(pc.cell_thresholds) * len(pc.cell_min_seeds) * len(pc.cell_sigmas)
    if n_cells * len(pc.cell_merges) > 1:
        # post-processing chosen on the validation sections, by this encoder's own predictions
        grid = dict(thresholds=pc.cell_thresholds, min_seeds=pc.cell_min_seeds)
        cells = tune_cells(
            p_va, d.y["va"], sigmas=pc.cell_sigmas, rank=pc.cell_rank, merges=pc.cell_merges, **grid
        )
    # the chosen cells' score on the validation sections (for choosing probe.cell_* grids)
    val_are = cell_scores(p_va, d.y["va"], **cells)["adapted_rand_error"]
    p_te = lp.predict(feats("te"), d.y["te"].shape[1:])[..., 1]
    scores = membrane_scores(p_te, d.y["te"], pixel_threshold=threshold, **cells)
    scores["cells"], scores["threshold"] = cells, threshold
    scores["val_adapted_rand_error"] = val_are
    scores["seconds"] = time.perf_counter() - t0
    return scores, p_te


def _fmt(r: dict, c: str) -> str:
    return f"{r[c]:.4f}" + (f" ± {r[c + '_std']:.4f}" if c + "_std" in r else "")


def _write_probe_tables(run_dir: Path, results: dict, tr, te, va=None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    std_cols = [c + "_std" for c in PROBE_COLUMNS[1:]]
    rows = [
        {
            "encoder": n,
            **{c: results[n].get(c, "") for c in PROBE_COLUMNS[1:] + std_cols + ["cells"]},
        }
        for n in results
    ]
    with open(run_dir / "probe.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=PROBE_COLUMNS + std_cols + ["cells"])
        w.writeheader()
        w.writerows(rows)
    (run_dir / "probe.json").write_text(
        json.dumps(
            {
                "train_sections": list(tr),
                "val_sections": list(va or tr),
                "test_sections": list(te),
                "results": results,
            },
            indent=1,
        )
    )
    va = va or tr
    lines = [
        f"Linear probe, membranes, test sections {te[0]}..{te[1] - 1} (trained on "
        f"{tr[0]}..{tr[1] - 1}; "
        f"threshold and cell parameters chosen on {va[0]}..{va[1] - 1})",
        "",
        "| encoder | F1 | IoU | adapted Rand error | VOI (split + merge) |",
        "|---|---|---|---|---|",
    ]
    for n, r in results.items():
        label = f"{n} (mean ± std of {r['seeds']} seeds, ddof 1)" if "seeds" in r else n
        lines.append(
            f"| {label} | {_fmt(r, 'f1')} | {_fmt(r, 'iou')} | {_fmt(r, 'adapted_rand_error')} | "
            f"{_fmt(r, 'voi')} ({r['voi_split']:.3f} + {r['voi_merge']:.3f}) |"
        )
    if "random_init" in results:
        b = results["random_init"]
        lines.append("")
        for n in (n for n in results if not n.startswith("random_init")):
            a = results[n]
            lines.append(
                f"{n} - random: F1 {a['f1'] - b['f1']:+.4f}, IoU {a['iou'] - b['iou']:+.4f}, "
                f"ARE {a['adapted_rand_error'] - b['adapted_rand_error']:+.4f}, "
                f"VOI {a['voi'] - b['voi']:+.4f} (lower ARE and VOI are better)"
            )
    (run_dir / "probe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def run_export(cfg: EmfmConfig, checkpoint: str | None = None) -> dict:
    """Dense features of a volume (or its ROI) to zarr, plus a PCA-RGB preview PNG of its middle
    section. Bad input (checkpoint of another model, output of another export, wrong dimensions)
    stops it before any compute; under several JAX processes each writes its share and process 0 the
    summary."""
    import jax

    run_dir = Path(cfg.run_dir)
    ec = cfg.export
    vol = open_volume(bundled.resolve(ec.path, bundled.sample_raw()))
    check_volume(vol)
    region = Region.of(vol, ec.roi)
    enc, meta = _export_encoder(cfg, checkpoint)
    out = ec.out or str(run_dir / "features.zarr")
    res = export_features(
        enc,
        vol,
        out,
        grey_range=grey_range_for(region, meta.get("grey_range")),
        tile=ec.tile,
        margin=ec.margin,
        block_z=ec.block_z,
        margin_z=ec.margin_z,
        layers=tuple(ec.layers),
        dtype=ec.dtype,
        pca_k=ec.pca_k,
        pca_sample_blocks=ec.pca_sample_blocks,
        roi=ec.roi,
        batch_size=ec.batch_size,
        prefetch=ec.prefetch,
        resume=ec.resume,
        checkpoint=checkpoint or "",
        seed=cfg.trainer.seed,
        blend=ec.blend,
        show_progress=cfg.trainer.progress,
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() != 0:  # its own share's record; process 0 writes the summary and preview
        (run_dir / f"export_process{jax.process_index()}.json").write_text(
            json.dumps(res, indent=1)
        )
        return res
    evr = _export_preview(run_dir / "figures" / "features_pca.png", vol, region, out, res["stride"])
    # the preview's own PCA (of the middle section's features); the export's, if it reduced the
    # features, stays under "pca_explained_variance"
    res["preview_pca_explained_variance"] = [float(v) for v in evr]
    (run_dir / "export.json").write_text(json.dumps(res, indent=1))
    log.info("export: %s", res)
    return res


def _export_encoder(cfg: EmfmConfig, checkpoint: str | None):
    """(encoder, checkpoint meta) of the export: a zoo checkpoint brings its own architecture, any
    other must match `cfg.model`."""
    from emfm import zoo
    from emfm.export.checkpoint import load_export_encoder

    model_cfg = cfg.model
    checkpoint = zoo.resolve(checkpoint) if checkpoint else checkpoint  # zoo:NAME from Python too
    if checkpoint and zoo.is_packaged(checkpoint):
        from emfm.config.common import checkpoint_model

        model_cfg = checkpoint_model(checkpoint)
    return load_export_encoder(model_cfg, checkpoint or "", seed=cfg.trainer.seed)


def _export_preview(path: Path, vol, region, features: str, stride) -> np.ndarray:
    """The middle section of the export (at most 512 x 512 feature cells) beside its features'
    first three principal components as RGB; returns their explained-variance ratios."""
    feats_vol = open_volume(features)
    z = feats_vol.shape[0] // 2
    cy, cx = (min(n, 512) for n in feats_vol.shape[1:3])  # a bounded preview of a huge section
    feats = feats_vol.read((slice(z, z + 1), slice(0, cy), slice(0, cx)))[0].astype(np.float32)
    rgb, evr = pca_rgb(feats)
    (z0, z1), (y0, y1), (x0, x1) = region.box
    st = stride
    # the grid's last cell may overhang the region (a ViT's patches round up): read inside it
    zi = min(z0 + z * st[0] + st[0] // 2, z1 - 1)
    ye, xe = min(y0 + cy * st[1], y1), min(x0 + cx * st[2], x1)
    img = vol.read((slice(zi, zi + 1), slice(y0, ye), slice(x0, xe)))[0]
    figures.image_grid(
        path, [(f"section {zi}", img[None]), ("features: PCA 1-3 as RGB", rgb[None])]
    )
    return evr


def main_job(cfg: EmfmConfig) -> dict:
    """Pretrain, probe (pretrained vs random init), export: the three things emfm is for."""
    from emfm.train.pretrain import pretrain

    t0 = time.perf_counter()
    run_dir = Path(cfg.run_dir)
    print(f"[emfm] main job -> {run_dir}")
    print(
        f"[emfm] 1/3 pretraining ({cfg.objective.name}, {cfg.model.name}) on",
        bundled.resolve(cfg.data.path, "the bundled ISBI 2012 sample"),
    )
    pre = pretrain(cfg)
    t1 = time.perf_counter()
    zoo = f"{cfg.probe.zoo}, " if cfg.probe.zoo else ""
    print(f"[emfm] 2/3 linear probe of membranes: {zoo}the pretrained and random-init encoders")
    prb = run_probe(cfg, checkpoint=str(run_dir))
    t2 = time.perf_counter()
    # the features a user would take: the zoo checkpoint's when one is probed, else the one just
    # pretrained
    from emfm.config.common import resolve_zoo

    source = resolve_zoo(cfg.probe.zoo, "probe.zoo") if cfg.probe.zoo else str(run_dir)
    print(f"[emfm] 3/3 exporting dense features ({cfg.probe.zoo or 'the pretrained encoder'})")
    exp = run_export(cfg, checkpoint=source)
    t3 = time.perf_counter()
    summary = {
        "pretrain": pre,
        "probe": prb,
        "export": exp,
        "seconds": {"pretrain": t1 - t0, "probe": t2 - t1, "export": t3 - t2, "total": t3 - t0},
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    print(f"[emfm] done in {t3 - t0:.0f} s; results, figures and checkpoint in {run_dir}")
    return summary
