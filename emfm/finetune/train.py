"""`emfm finetune`: segmentation training under every regime, on the pretraining engine (one step
loop, emfm.train.loop).

The same pieces as `emfm pretrain` (emfm.train): a `TrainState` (with an EMA teacher for the mean
teacher) on a `data` x `fsdp` mesh, one pure jitted step (`make_train_step`), orbax checkpoints
with the data position, resume from the run's own directory, SIGTERM -> checkpoint, metrics JSONL
and TensorBoard. Batches: labelled patches (PatchLoader with label volumes) turned into the task's
targets on the host (emfm.finetune.targets), plus `unlabelled_ratio` times as many unlabelled
patches for the semi-supervised regimes. `regime.cluster` (kmeans | gmm) trains nothing: it clusters
frozen features and scores them with Hungarian-matched classes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from emfm.config.common import ModelConfig
from emfm.config.finetune import FinetuneConfig
from emfm.data import bundled, device
from emfm.data.loader import PatchLoader
from emfm.data.sampling import PatchSampler, Region, estimate_range
from emfm.data.volume import VolumeError, open_volume
from emfm.finetune import losses, regimes, targets
from emfm.finetune.model import init_model
from emfm.finetune.predict import model_fn, predict_array
from emfm.models.seg_heads import SegModel
from emfm.models.vit import count_params
from emfm.train import loop, optim
from emfm.train import mesh as meshlib
from emfm.train.state import build_encoder, init_state, load_encoder, make_train_step

log = logging.getLogger("emfm")


# ----------------------------------------------------------------------------- data


def _volumes(cfg: FinetuneConfig):
    img = open_volume(bundled.resolve(cfg.data.path, bundled.sample_raw()))
    lab = open_volume(bundled.resolve(cfg.data.labels, bundled.sample_membranes()))
    if lab.spatial_shape != img.spatial_shape:
        raise VolumeError(
            f"labels {lab.path} of shape {lab.spatial_shape} do not match volume {img.path} "
            f"of shape {img.spatial_shape}"
        )
    unit = (1.0,) * len(img.voxel_size)
    if unit not in (tuple(img.voxel_size), tuple(lab.voxel_size)) and not np.allclose(
        img.voxel_size, lab.voxel_size, rtol=0.01
    ):
        log.warning(
            "labels %s record voxel size %s nm, volume %s %s nm: are they the same volume?",
            lab.path,
            tuple(lab.voxel_size),
            img.path,
            tuple(img.voxel_size),
        )
    return img, lab


def check_label_values(region: Region, task, sections: int = 4) -> None:
    """Class labels whose raw values are no class (not in `task.class_values`, or outside
    [0, num_classes) without them) and not `task.ignore_label` would be ignored in the loss and
    the scores without a word (e.g. ISBI's membranes stored as 255): an error naming the values,
    read from up to `sections` sections spread over the training region."""
    if task.label_type != "classes":
        return
    (z0, z1), *rest = region.box
    zs = sorted({int(z) for z in np.linspace(z0, z1 - 1, min(sections, z1 - z0))})
    vals, counts = np.unique(
        np.concatenate(
            [
                np.asarray(
                    region.volume.read((slice(z, z + 1),) + tuple(slice(*r) for r in rest))
                ).ravel()
                for z in zs
            ]
        ),
        return_counts=True,
    )
    known = set(task.class_values) if task.class_values else set(range(task.num_classes))
    bad = [(int(v), int(c)) for v, c in zip(vals, counts) if int(v) not in known]
    bad = [(v, c) for v, c in bad if v != task.ignore_label]
    if bad:
        share = sum(c for _, c in bad) / counts.sum()
        shown = ", ".join(f"{v} ({c} voxels)" for v, c in bad[:6])
        raise VolumeError(
            f"labels {region.volume.path}: raw values {shown} ({100 * share:.0f} % of the voxels "
            f"read) are no class of task.num_classes={task.num_classes}"
            + (f", task.class_values={task.class_values}" if task.class_values else "")
            + "; map them with task.class_values=[RAW_OF_CLASS_0,RAW_OF_CLASS_1,...], mark "
            "them task.ignore_label=VALUE, or, if the volume holds instance ids (neurons, "
            "organelles), set task.label_type=instances"
        )


def labelled_roi(region: Region, fraction: float, min_depth: int) -> list[list[int]]:
    """The first `fraction` of the region's sections (at least `min_depth`): the labelled part."""
    (z0, z1), *rest = region.box
    n = max(min_depth, int(math.ceil(fraction * (z1 - z0))))
    return [[z0, min(z1, z0 + n)]] + [list(r) for r in rest]


class Batches:
    """Host batches for the step: image, targets, and unlabelled images for semi-supervised
    regimes."""

    def __init__(
        self,
        cfg: FinetuneConfig,
        img,
        lab,
        grey,
        ndim: int,
        start: int,
        *,
        process_index: int = 0,
        process_count: int = 1,
    ):
        d, r = cfg.data, cfg.regime
        train = Region.of(img, d.train_roi)
        self.labelled = Region.of(img, labelled_roi(train, d.label_fraction, d.patch_shape[0]))
        self.task, self.ndim = cfg.task, ndim
        b = d.batch_size // process_count  # this process's share of the global batch
        procs = dict(process_index=process_index, process_count=process_count)
        s = PatchSampler([self.labelled], d.patch_shape, b, seed=cfg.trainer.seed, **procs)
        self.lab = PatchLoader(
            s,
            [grey],
            labels=[lab],
            augment_batches=d.augment,
            prefetch=d.prefetch,
            start_step=start,
            min_foreground=d.min_foreground,
        )
        self.unl = None
        if r.semi != "none":
            su = PatchSampler(
                [train], d.patch_shape, b * r.unlabelled_ratio, seed=cfg.trainer.seed + 1, **procs
            )
            self.unl = PatchLoader(
                su, [grey], augment_batches=d.augment, prefetch=d.prefetch, start_step=start
            )

    def _img(self, x):
        return x[:, 0, ..., None] if self.ndim == 2 else x[..., None]

    def make(self, lb: dict, ub: dict | None) -> dict:
        """Images stay in their native dtype with their normalisation / augmentation entries
        (emfm.data.device.finish runs in the step); targets are made here from the labels."""
        t = targets.make_targets(lb["label"], self.task, self.ndim)
        out = {k: self._img(v) if k == "image" else v for k, v in lb.items() if k != "label"}
        out.update({k: (v[:, 0] if self.ndim == 2 else v) for k, v in t.items()})
        if ub is not None:
            out.update({"u" + k: self._img(v) if k == "image" else v for k, v in ub.items()})
        return out

    def __next__(self) -> dict:
        return self.make(next(self.lab), next(self.unl) if self.unl is not None else None)

    def example(self) -> dict:
        return self.make(self.lab.load(0), self.unl.load(0) if self.unl is not None else None)

    def state(self) -> dict:
        return self.lab.state()

    def close(self):
        self.lab.close()
        if self.unl is not None:
            self.unl.close()


# ----------------------------------------------------------------------------- evaluation


def evaluate(
    model: SegModel, cfg: FinetuneConfig, img, lab, grey, roi, ndim: int, *, window=None
) -> tuple[dict, np.ndarray]:
    """Scores of the model on a held-out region, and its probabilities `[z, y, x, c]`."""
    from emfm.eval import metrics
    from emfm.eval.cells import membrane_scores

    region = Region.of(img, roi)
    box = tuple(slice(a, b) for a, b in region.box)
    x = np.clip((img.read(box).astype(np.float32) - grey[0]) / (grey[1] - grey[0]), 0, 1)
    raw = lab.read(box)
    lay = targets.layout(cfg.task, ndim)
    window = window or [1 if ndim == 2 else cfg.data.patch_shape[0]] + list(
        cfg.data.patch_shape[1:]
    )
    overlap = [0 if w == 1 else w // 4 for w in window]
    fn = model_fn(model, lay, ndim=ndim, batch_size=4)
    probs = predict_array(fn, lay.channels, x, window=window, overlap=overlap)
    t = cfg.task
    scores: dict = {}
    if t.kind == "semantic":
        cls = targets.to_classes(raw, t)
        pred = probs[..., : t.num_classes].argmax(-1)
        valid = cls >= 0
        pos = t.positive_class
        s = metrics.binary_scores(pred[valid] == pos, cls[valid] == pos)
        scores.update(f1=s["f1"], iou=s["iou"], accuracy=float((pred[valid] == cls[valid]).mean()))
        if ndim == 2 and t.num_classes == 2 and t.positive_class != t.instance_class:
            # the positive class separates instances (membranes): score the watershed cells it gives
            scores.update(
                {
                    k: v
                    for k, v in membrane_scores(probs[..., pos], cls == pos).items()
                    if k in ("adapted_rand_error", "voi", "voi_split", "voi_merge")
                }
            )
            # how those cells were made, so `emfm instances` + `emfm evaluate` can reproduce them
            scores["cells"] = (
                "per section: seeded watershed of the membrane probability (emfm.eval.cells."
                "cells_from_membranes defaults: threshold 0.5, min_seed 16, sigma 0), membrane "
                "pixels of the ground truth ignored; region scores averaged over sections"
            )
    else:
        tg = targets.make_targets(raw[None], t, ndim)
        if lay.classes:
            cls = tg["classes"][0]
            valid = cls >= 0
            s = metrics.binary_scores(probs[..., 1][valid] >= 0.5, cls[valid] == 1)
            scores.update(f1=s["f1"], iou=s["iou"])
        if lay.sigmoid:
            m = tg["sigmoid_mask"][0] > 0
            s = metrics.binary_scores(
                probs[..., lay.classes : lay.classes + lay.sigmoid][m] >= 0.5,
                tg["sigmoid"][0][m] > 0.5,
            )
            scores.update(affinity_f1=s["f1"])
    return scores, probs


def cluster_run(cfg: FinetuneConfig) -> dict:
    """Unsupervised regime: k-means / GMM on frozen dense features; Hungarian-matched classes,
    scored."""
    from emfm.eval import metrics

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    img, lab = _volumes(cfg)
    if cfg.regime.init == "pretrained":
        enc, meta = load_encoder(cfg.checkpoint)
        grey = tuple(meta.get("grey_range") or estimate_range(Region.of(img, cfg.data.train_roi)))
    else:
        enc = build_encoder(cfg.model, seed=cfg.trainer.seed)
        grey = estimate_range(Region.of(img, cfg.data.train_roi))
    if enc.spec.ndim != 2:
        raise VolumeError("regime.cluster works on 2D encoders (per-section features)")

    def norm(a):
        return np.clip((a.astype(np.float32) - grey[0]) / (grey[1] - grey[0]), 0, 1)

    train = Region.of(img, cfg.data.train_roi)
    tbox = tuple(slice(a, b) for a, b in train.box)
    test_roi = cfg.data.test_roi or [list(b) for b in train.box]
    ebox = tuple(slice(a, b) for a, b in Region.of(img, test_roi).box)
    t0 = time.perf_counter()
    predict = regimes.fit_clusters(
        enc,
        norm(img.read(tbox)),
        cfg.regime.cluster,
        cfg.regime.clusters,
        samples=cfg.regime.cluster_samples,
        seed=cfg.trainer.seed,
        tile=cfg.regime.tile,
        margin=cfg.regime.margin,
    )
    clusters = predict(norm(img.read(ebox)))
    cls = targets.to_classes(lab.read(ebox), cfg.task)
    mapping = regimes.hungarian_match(clusters, cls, cfg.task.num_classes)
    pred = mapping[clusters]
    valid = cls >= 0
    pos = cfg.task.positive_class
    s = metrics.binary_scores(pred[valid] == pos, cls[valid] == pos)
    summary = {
        "regime": cfg.regime.cluster,
        "clusters": cfg.regime.clusters,
        "mapping": mapping.tolist(),
        "f1": s["f1"],
        "iou": s["iou"],
        "accuracy": float((pred[valid] == cls[valid]).mean()),
        "seconds": time.perf_counter() - t0,
        "test_roi": test_roi,
    }
    (run_dir / "cluster_eval.json").write_text(json.dumps(summary, indent=1))
    log.info("cluster: %s", summary)
    return summary


# ----------------------------------------------------------------------------- training


def finetune(cfg: FinetuneConfig) -> dict:
    """Train a segmentation model under `cfg.regime`; resumes from `cfg.run_dir`'s checkpoint."""
    if cfg.regime.cluster != "none":
        return cluster_run(cfg)
    job = loop.start_job(cfg.run_dir, cfg.data.batch_size, cfg.mesh)
    img, lab = _volumes(cfg)
    check_label_values(Region.of(lab, cfg.data.train_roi), cfg.task)
    model, mcfg, ckpt_grey = init_model(cfg)  # data.patch_shape fits it (validate_finetune)
    ndim = model.encoder.spec.ndim
    grey = ckpt_grey or estimate_range(
        Region.of(img, cfg.data.train_roi),
        samples=cfg.data.intensity_samples,
        seed=cfg.trainer.seed,
    )
    tx, sched = _optimizer(cfg, model, mcfg, job.batch_size)
    teacher = cfg.regime.semi == "mean_teacher"
    graphdef, state0 = init_state(model, tx, cfg.trainer.seed, teacher=teacher)
    engine = loop.Engine(
        job,
        _train_step(cfg, graphdef, tx, targets.layout(cfg.task, ndim)),
        jax.eval_shape(lambda: state0),
        trainer=cfg.trainer,
        min_shard_size=cfg.mesh.min_shard_size,
    )
    state, start = engine.restore_or_init(lambda sh: meshlib.put_global(state0, sh))
    state0 = model = None  # the host copies are no longer needed
    procs = dict(process_index=job.process_index, process_count=job.process_count)
    batches = Batches(cfg, img, lab, grey, ndim, start, **procs)
    meta = {
        "model": dataclasses.asdict(mcfg),
        "head": dataclasses.asdict(cfg.head),
        "task": dataclasses.asdict(cfg.task),
        "regime": dataclasses.asdict(cfg.regime),
        "grey_range": list(grey),
        "data_path": img.path,
        "voxel_size": [float(v) for v in img.voxel_size],
        "channels": targets.channel_names(cfg.task, ndim),
    }
    result = engine.run(
        state,
        start,
        batches,
        meta=meta,
        sched=sched,
        accumulate_steps=cfg.optim.accumulate_steps,
        desc="finetune",
        log_first=True,
        throughput=False,
    )
    scores = _test_scores(cfg, job, graphdef, result.state, img, lab, grey, ndim)
    return _summary(cfg, job, result, batches.labelled, scores)


def _summary(cfg: FinetuneConfig, job: loop.Job, result: loop.LoopResult, labelled, scores):
    """The run's summary, written to finetune_summary.json (process 0) and logged."""
    kept = loop.kept_summary(job.dir / "finetune_summary.json", cfg.trainer.steps - result.start)
    if kept is not None:
        return kept
    summary = {
        "regime": dataclasses.asdict(cfg.regime),
        "steps": cfg.trainer.steps,
        "resumed_from": result.start,
        "first_loss": result.losses[0] if result.losses else None,
        "final_loss": result.losses[-1] if result.losses else None,
        "compile_s": result.compile_s,
        "train_s": result.loop_s,
        "labelled_roi": [list(b) for b in labelled.box],
        "checkpoint": str(job.dir / "checkpoints"),
        "host": loop.host_record(),
    }
    if scores is not None:
        summary["test"] = scores
    summary["total_s"] = time.perf_counter() - job.started
    if job.main_proc:
        (job.dir / "finetune_summary.json").write_text(json.dumps(summary, indent=1, default=float))
    log.info("finetune: %s", summary)
    return summary


def _optimizer(cfg: FinetuneConfig, model: SegModel, mcfg: ModelConfig, batch_size: int):
    """The optimiser and its schedule, with the regime's frozen parameters and layer decay."""
    r = cfg.regime
    unet = type(model.encoder).__name__ == "UNet"
    ocfg = dataclasses.replace(
        cfg.optim,
        freeze=list(cfg.optim.freeze) + regimes.freeze_patterns(r, unet=unet),
        layer_decay=r.layer_decay if r.layer_decay != 1.0 else cfg.optim.layer_decay,
    )
    log.info(
        "model: %s encoder + %s head, %.2f M parameters (encoder %.2f M, %s); regime %s",
        mcfg.name,
        cfg.head.name,
        count_params(model) / 1e6,
        count_params(model.encoder) / 1e6,
        r.encoder,
        r.name,
    )
    if r.frozen_steps:
        log.info("encoder held for the first %d of %d updates", r.frozen_steps, cfg.trainer.steps)
    return optim.build(
        ocfg,
        steps=cfg.trainer.steps,
        batch_size=batch_size,
        params=nnx.state(model, nnx.Param),
        hold=(["^encoder/"], r.frozen_steps),
    )


def _train_step(cfg: FinetuneConfig, graphdef, tx, lay: targets.Layout):
    """The pure step: the task's loss on the labelled batch, plus the regime's consistency loss on
    the unlabelled one (semi-supervised regimes), with an EMA teacher for the mean teacher."""
    r = cfg.regime
    frozen = r.encoder == "frozen"

    def loss_fn(m, batch, rng, teach):
        batch = device.finish(batch)
        out = m(batch["image"], frozen_encoder=frozen)
        loss, metrics = losses.task_loss(out, batch, lay, cfg.loss)
        if r.semi != "none":
            lu, mu = regimes.unlabelled_loss(
                m, teach, batch["uimage"], rng, lay, r, frozen_encoder=frozen
            )
            loss = loss + r.consistency_weight * lu
            metrics.update(mu)
        metrics["loss"] = loss
        return loss, metrics

    return make_train_step(
        graphdef, loss_fn, tx, ema_base=r.ema_momentum, total_steps=cfg.trainer.steps
    )


def _test_scores(cfg: FinetuneConfig, job: loop.Job, graphdef, state, img, lab, grey, ndim):
    """Scores of the trained model on `data.test_roi`, on process 0 (None elsewhere or without a
    test region); with several processes every one gathers the (possibly sharded) state."""
    if job.process_count > 1:
        from jax.experimental import multihost_utils

        host = multihost_utils.process_allgather(state, tiled=True)
    elif cfg.data.test_roi:
        host = jax.device_get(state)
    if not (cfg.data.test_roi and job.main_proc):
        return None
    model = nnx.merge(graphdef, host.params, host.rest)
    return evaluate(model, cfg, img, lab, grey, cfg.data.test_roi, ndim)[0]
