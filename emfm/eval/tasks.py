"""Tasks of the probing benchmark: a labelled volume, its split, its target and the target's
metrics.

A task (`TaskConfig`, one YAML file in configs/probe_task/) names an image and a label volume of the
same shape (TIFF stack, zarr v2/v3 or N5), the sections used for training, validation and testing
(or a separate test volume), an optional in-plane crop and downsampling, and a target:

- `membranes` (ISBI 2012): foreground = `labels == positive_label`; ground-truth cells are the
  connected non-membrane regions of each section. Metrics: pixel F1 / IoU of the foreground, and the
  adapted Rand error and VOI (split + merge) of the cells grown by watershed from the predicted
  membrane map, per section (emfm.eval.cells.cells_from_membranes), averaged over sections.
- `neuron_boundaries` (gala): foreground = `labels == positive_label` (0 = boundary); the label
  values are the ground-truth instances (0 ignored). Same metrics as membranes.
- `mitochondria` (CDeep3M): foreground = `labels == positive_label`. Metrics: foreground F1 /
  IoU and the instance F1 at IoU 0.5 of the 3D connected components of prediction and ground truth.

The decision threshold is 0.5, or, when the task has validation sections, the one of
0.3, 0.4, ..., 0.7 with the best pixel F1 on them. With `split="val"` (model selection) the
validation sections are the evaluated sections, the threshold is chosen on them, and the test
sections are not read at all.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from emfm.config.common import ConfigError
from emfm.config.probe import TaskConfig, check_apart
from emfm.data import bundled
from emfm.data.volume import VolumeError

TARGETS = {
    "membranes": {"kind": "boundary", "instances": "components", "primary": "f1"},
    "neuron_boundaries": {"kind": "boundary", "instances": "labels", "primary": "f1"},
    "mitochondria": {"kind": "foreground", "instances": "components", "primary": "iou"},
}
METRICS = {
    "boundary": ("f1", "iou", "adapted_rand_error", "voi", "voi_split", "voi_merge", "threshold"),
    "foreground": ("f1", "iou", "instance_f1", "n_pred", "n_gt", "threshold"),
}
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
SPLITS = ("test", "val")


@dataclass
class Split:
    images: np.ndarray  # [n, y, x] uint8/float grey values
    fg: np.ndarray  # [n, y, x] bool: the probed class
    labels: np.ndarray  # [n, y, x] the label values as stored (instance ids for neuron_boundaries)


@dataclass
class TaskData:
    name: str
    target: str
    train: Split
    val: Split | None
    test: Split
    config: TaskConfig


def validate(tc: TaskConfig) -> TaskConfig:
    if tc.target not in TARGETS:
        raise ConfigError(
            f"task {tc.name!r}: target={tc.target!r}; known targets are {', '.join(TARGETS)}"
        )
    for key in ("train_slices", "test_slices") + (("val_slices",) if tc.val_slices else ()):
        s = getattr(tc, key)
        if len(s) != 2 or not 0 <= s[0] < s[1]:
            raise ConfigError(
                f"task {tc.name!r}: {key}={s}; give [start, stop) with 0 <= start < stop"
            )
    if tc.downsample < 1 or tc.downsample & (tc.downsample - 1):
        raise ConfigError(f"task {tc.name!r}: downsample={tc.downsample}; use 1, 2, 4, ...")
    if tc.crop is not None and (
        len(tc.crop) != 2 or any(len(c) != 2 or not 0 <= c[0] < c[1] for c in tc.crop)
    ):
        raise ConfigError(f"task {tc.name!r}: crop={tc.crop}; give [[y0, y1], [x0, x1]]")
    if bool(tc.test_image) != bool(tc.test_labels):
        raise ConfigError(f"task {tc.name!r}: give both test_image and test_labels, or neither")
    # sections that are trained on, chosen on or scored must be apart (test sections of their own
    # volume, `test_image`, are apart by construction)
    splits = [("train_slices", tc.train_slices)]
    splits += [("val_slices", tc.val_slices)] if tc.val_slices else []
    splits += [] if tc.test_image else [("test_slices", tc.test_slices)]
    check_apart(splits, where=f"task {tc.name!r}: ")
    return tc


def _paths(tc: TaskConfig) -> list[str]:
    p = [
        bundled.resolve(tc.image, bundled.sample_raw()),
        bundled.resolve(tc.labels, bundled.sample_membranes()),
    ]
    return p + ([tc.test_image, tc.test_labels] if tc.test_image else [])


def identity(tc: TaskConfig) -> str:
    """Hash of the task's settings and its input files (path, size, modification time)."""
    h = hashlib.sha256(json.dumps(asdict(tc), sort_keys=True).encode())
    for p in _paths(tc):
        path = Path(p)
        files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())[:64]
        stats = [
            (
                str(f.relative_to(path)) if f != path else "",
                os.stat(f).st_size,
                os.stat(f).st_mtime_ns,
            )
            for f in files
        ]
        h.update(json.dumps([str(path.resolve()), stats]).encode())
    return h.hexdigest()[:16]


def _open(path: str, what: str):
    from emfm.eval.evaluate import open_label_volume

    try:
        return open_label_volume(path, what)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"{e}. The tasks of configs/probe_task/ read ../shared/data/em relative to the working "
            "directory unless EMFM_SHARED_DATA names that folder (e.g. "
            "EMFM_SHARED_DATA=/data/em emfm probe ...); a task YAML of your own gives its paths."
        ) from None


def _pair(tc: TaskConfig, image: str, labels: str):
    img, lab = _open(image, f"task {tc.name!r} image"), _open(labels, f"task {tc.name!r} labels")
    if len(img.shape) != 3:
        raise VolumeError(
            f"task {tc.name!r}: image {image} has shape {img.shape}; expected z, y, x"
        )
    if tuple(img.shape) != tuple(lab.shape):
        raise VolumeError(
            f"task {tc.name!r}: labels {labels} have shape {tuple(lab.shape)}, "
            f"image {image} has {tuple(img.shape)}"
        )
    return img, lab


def _check_range(tc: TaskConfig, shape, z: list[int], key: str) -> None:
    if z[1] > shape[0]:
        raise VolumeError(
            f"task {tc.name!r}: {key}={list(z)} lies outside the volume's {shape[0]} sections"
        )
    if tc.crop and (tc.crop[0][1] > shape[1] or tc.crop[1][1] > shape[2]):
        raise VolumeError(
            f"task {tc.name!r}: crop={tc.crop} lies outside sections of {tuple(shape[1:])} pixels"
        )


def check_inputs(tc: TaskConfig) -> None:
    """The task's files, shapes and section ranges, from the volumes' metadata (no pixel is read,
    so checking the test split here reveals nothing of it): before any compute."""
    validate(tc)
    img, _ = _pair(tc, *_paths(tc)[:2])
    for key in ("train_slices", "val_slices") + (() if tc.test_image else ("test_slices",)):
        if getattr(tc, key):
            _check_range(tc, img.shape, getattr(tc, key), key)
    if tc.test_image:
        timg, _ = _pair(tc, tc.test_image, tc.test_labels)
        _check_range(tc, timg.shape, tc.test_slices, "test_slices")


def _read(tc: TaskConfig, img, lab, z: list[int], key: str) -> Split:
    _check_range(tc, img.shape, z, key)
    ys, xs = (slice(*tc.crop[0]), slice(*tc.crop[1])) if tc.crop else (slice(None), slice(None))
    x = np.asarray(img[slice(*z), ys, xs])
    y = np.asarray(lab[slice(*z), ys, xs])
    if tc.downsample > 1:
        from emfm.data.importer import downsample2

        for _ in range(int(np.log2(tc.downsample))):
            x, y = downsample2(x), downsample2(y, labels=True)
    return Split(images=x, fg=y == tc.positive_label, labels=y)


def load(tc: TaskConfig, split: str = "test") -> TaskData:
    """Read the task's sections into memory (small volumes; crop / downsample large ones).

    `split="test"`: training, validation and test sections. `split="val"` (choosing settings or
    checkpoints): the validation sections take the place of the test sections, which are never
    read, so no choice can see them; such a task has no separate validation split."""
    validate(tc)
    if split not in SPLITS:
        raise ConfigError(f"benchmark.split={split!r}: use one of {', '.join(SPLITS)}")
    if split == "val" and not tc.val_slices:
        raise ConfigError(
            f"task {tc.name!r}: benchmark.split=val needs val_slices in the task file"
        )
    img, lab = _pair(tc, *_paths(tc)[:2])
    train = _read(tc, img, lab, tc.train_slices, "train_slices")
    val = _read(tc, img, lab, tc.val_slices, "val_slices") if tc.val_slices else None
    if split == "val":
        return _checked(
            TaskData(name=tc.name, target=tc.target, train=train, val=None, test=val, config=tc),
            "val_slices",
        )
    if tc.test_image:
        img, lab = _pair(tc, tc.test_image, tc.test_labels)
    test = _read(tc, img, lab, tc.test_slices, "test_slices")
    return _checked(
        TaskData(name=tc.name, target=tc.target, train=train, val=val, test=test, config=tc),
        "test_slices",
    )


def _checked(task: TaskData, eval_key: str) -> TaskData:
    tc = task.config
    splits = [(task.train, "train_slices"), (task.test, eval_key)]
    splits += [(task.val, "val_slices")] if task.val is not None else []
    for split, key in splits:  # validation too: a threshold chosen on one class is no choice
        if not split.fg.any() or split.fg.all():
            raise VolumeError(
                f"task {tc.name!r}: {key} hold no pixel of both classes "
                f"(positive_label={tc.positive_label})"
            )
    return task


def choose_threshold(p_fg: np.ndarray, fg: np.ndarray) -> float:
    """The threshold of THRESHOLDS with the best pixel F1 (validation sections)."""
    from emfm.eval import metrics

    f1 = [metrics.binary_scores(p_fg >= t, fg)["f1"] for t in THRESHOLDS]
    return float(THRESHOLDS[int(np.argmax(f1))])


def gt_instances(task: TaskData, split: Split) -> np.ndarray:
    from scipy import ndimage

    mode = TARGETS[task.target]["instances"]
    if TARGETS[task.target]["kind"] == "boundary":
        if mode == "labels":
            return np.where(split.fg, 0, split.labels).astype(np.uint32)
        return np.stack([ndimage.label(np.asarray(m) == 0)[0] for m in split.fg]).astype(np.uint32)
    return ndimage.label(split.fg)[0].astype(np.uint32)


def scores(task: TaskData, p_fg: np.ndarray, split: Split, threshold: float = 0.5) -> dict:
    """The target's metrics of a foreground probability map `[n, y, x]` on `split`."""
    from scipy import ndimage

    from emfm.eval import metrics
    from emfm.eval.cells import cells_from_membranes
    from emfm.eval.metrics_instance import match_instances

    pred = p_fg >= threshold
    px = metrics.binary_scores(pred, split.fg)
    out = {"f1": px["f1"], "iou": px["iou"], "threshold": threshold}
    gt = gt_instances(task, split)
    if TARGETS[task.target]["kind"] == "boundary":
        per = [
            metrics.region_scores(
                cells_from_membranes(p_fg[k], threshold=threshold), gt[k], ignore_gt=(0,)
            )
            for k in range(len(p_fg))
        ]
        for key in ("adapted_rand_error", "voi", "voi_split", "voi_merge"):
            out[key] = float(np.mean([s[key] for s in per]))
        return out
    inst, n = ndimage.label(pred)
    if task.config.min_instance_size and n:
        small = np.bincount(inst.ravel()) < task.config.min_instance_size
        small[0] = False
        inst[small[inst]] = 0
    m = match_instances(inst, gt, threshold=0.5)
    tp = len(m["iou"])
    out.update(
        instance_f1=2 * tp / (m["n_pred"] + m["n_gt"]) if m["n_pred"] + m["n_gt"] else 1.0,
        n_pred=int(m["n_pred"]),
        n_gt=int(m["n_gt"]),
    )
    return out
