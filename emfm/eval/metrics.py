"""Evaluation metrics for EM segmentation: the public entry point.

* semantic (class maps): :func:`semantic_scores`, :func:`binary_scores`, :func:`confusion_matrix`
* region agreement (label volumes): :func:`region_scores` on a blockwise
  :class:`ContingencyTable` — Rand, adapted Rand error, ISBI V^Rand / V^Info, VOI split/merge,
  CREMI score (:mod:`emfm.eval.metrics_region`)
* instances: :func:`instance_scores`, :func:`match_instances`, :func:`panoptic_quality`,
  :func:`aggregated_jaccard_index`, :func:`coco_average_precision`
  (:mod:`emfm.eval.metrics_instance`)
* topology: :func:`warping_error`, :func:`simple_points` (:mod:`emfm.eval.metrics_topology`)
* :func:`evaluate_volumes`: any of the above on a pair of (possibly lazily read) volumes, block by
  block along z.

Arguments are always ``(pred, gt)``. Axis order is (z, y, x).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from emfm.errors import UserError
from emfm.eval.metrics_instance import (  # noqa: F401
    IOU_THRESHOLDS,
    Overlaps,
    aggregated_jaccard_index,
    coco_average_precision,
    instance_scores,
    match_instances,
    panoptic_quality,
)
from emfm.eval.metrics_region import (  # noqa: F401
    ContingencyTable,
    adapted_rand_error,
    check_label_array,
    rand_index,
    region_scores,
    thin_boundaries,
    variation_of_information,
)
from emfm.eval.metrics_topology import simple_points, warp_binary, warping_error  # noqa: F401

KINDS = ("semantic", "binary", "region", "instance", "warping")


# ============================================================================ semantic


def confusion_matrix(pred, gt, num_classes: int, ignore_index: int | None = None) -> np.ndarray:
    """(num_classes, num_classes) int64 counts C[g, p] of gt class g predicted as p.

    Voxels with ``gt == ignore_index`` are skipped; any other class id outside
    [0, num_classes) is a ValueError.
    """
    pred, gt = check_label_array(pred, "pred"), check_label_array(gt, "gt")
    if pred.shape != gt.shape:
        raise UserError(f"pred shape {pred.shape} != gt shape {gt.shape}")
    pred, gt = pred.ravel(), gt.ravel()
    if ignore_index is not None:
        keep = gt != ignore_index
        pred, gt = pred[keep], gt[keep]
    for name, a in (("pred", pred), ("gt", gt)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise UserError(
                f"{name} holds class ids outside [0, {num_classes}): min {a.min()}, max {a.max()}"
            )
    # both as int64 (in range by the check above): int64 with uint64 would promote to float64
    idx = gt.astype(np.int64) * num_classes + pred.astype(np.int64)
    return np.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


def _safe_div(num, den):
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def scores_from_confusion(cm: np.ndarray) -> dict:
    """Per-class and mean semantic scores of a confusion matrix C[gt, pred].

    For class c: TP = C[c,c], FP = sum_g C[g,c] - TP, FN = sum_p C[c,p] - TP;
    IoU (Jaccard) = TP / (TP+FP+FN), Dice = F1 = 2TP / (2TP+FP+FN), precision = TP / (TP+FP),
    recall = TP / (TP+FN); undefined (NaN) when the denominator is 0, i.e. the class is absent
    from both. ``mean_*`` average over classes where defined. ``pixel_error`` = 1 - trace / total
    (the ISBI 2012 pixel error when applied to the binary membrane map).
    """
    cm = np.asarray(cm, np.int64)
    tp = np.diag(cm).astype(np.float64)
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    per = {
        "iou": _safe_div(tp, tp + fp + fn),
        "dice": _safe_div(2 * tp, 2 * tp + fp + fn),
        "precision": _safe_div(tp, tp + fp),
        "recall": _safe_div(tp, tp + fn),
    }
    total = cm.sum()
    out = {"pixel_error": float(1.0 - tp.sum() / total) if total else 0.0, "num_voxels": int(total)}
    for k, v in per.items():
        out[f"mean_{k}"] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
        out[f"per_class_{k}"] = [None if np.isnan(x) else float(x) for x in v]
    return out


def semantic_scores(pred, gt, num_classes: int, ignore_index: int | None = None) -> dict:
    """Pixel error, per-class IoU/Dice(F1)/precision/recall and their class means.

    ``pred``, ``gt``: integer class maps of the same shape (2D or 3D). Formulas in
    :func:`scores_from_confusion`; reference: Everingham et al. 2010 (PASCAL VOC IoU),
    Dice 1945, Arganda-Carreras et al. 2015 (pixel error).
    """
    return scores_from_confusion(confusion_matrix(pred, gt, num_classes, ignore_index))


def binary_scores(pred, gt, threshold: float = 0.5) -> dict:
    """Foreground scores of two masks: non-zero = foreground, except that a floating-point
    `pred` (a probability map) is foreground where it is > `threshold` (as in `warping_error`).

    TP, FP, FN, TN voxel counts; f1 = 2TP/(2TP+FP+FN), iou = TP/(TP+FP+FN),
    precision = TP/(TP+FP), recall = TP/(TP+FN), pixel_error = (FP+FN)/N. A ratio whose
    denominator is 0 (no foreground anywhere) is 1.0: nothing was missed or invented.
    """
    p, g = np.asarray(pred), np.asarray(gt) != 0
    p = p > threshold if np.issubdtype(p.dtype, np.floating) else p != 0
    if p.shape != g.shape:
        raise UserError(f"pred shape {p.shape} != gt shape {g.shape}")
    tp = int(np.count_nonzero(p & g))
    fp = int(np.count_nonzero(p)) - tp
    fn = int(np.count_nonzero(g)) - tp
    return _binary_from_counts(tp, fp, fn, p.size)


def _binary_from_counts(tp: int, fp: int, fn: int, n: int) -> dict:
    def div(a, b):
        return a / b if b else 1.0

    return {
        "f1": div(2 * tp, 2 * tp + fp + fn),
        "iou": div(tp, tp + fp + fn),
        "precision": div(tp, tp + fp),
        "recall": div(tp, tp + fn),
        "pixel_error": (fp + fn) / n if n else 0.0,
        "tp": tp,
        "fp": fp,
        "fn": fn,
    }


# ============================================================================ all at once


def _blocks(shape: tuple, block_z: int | None):
    if len(shape) < 3 or block_z is None or block_z >= shape[0]:
        yield (slice(None),)
        return
    for z in range(0, shape[0], block_z):
        yield (slice(z, min(z + block_z, shape[0])),)


def check_kinds(kinds: Sequence[str]) -> None:
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise UserError(f"unknown metric kinds {sorted(unknown)}; choose from {KINDS}")


def evaluate_volumes(
    pred,
    gt,
    kinds: Sequence[str] = ("region", "instance"),
    *,
    ignore_gt: Iterable[int] = (0,),
    ignore_pred: Iterable[int] = (),
    background: int = 0,
    iou_thresholds: Sequence[float] = IOU_THRESHOLDS,
    num_classes: int | None = None,
    ignore_index: int | None = None,
    threshold: float = 0.5,
    warping_per_slice: bool = True,
    block_z: int | None = None,
) -> dict:
    """Evaluate ``pred`` against ``gt`` with the metric families named in ``kinds``.

    ``pred``/``gt``: numpy arrays or anything sliceable along axis 0 that ``np.asarray`` turns
    into numpy (tifffile pages, tensorstore arrays opened by :mod:`emfm.eval.evaluate`). With
    ``block_z`` set, 3D inputs are read ``block_z`` slices at a time and accumulated: one
    :class:`ContingencyTable` serves "region" and "instance", one confusion matrix serves
    "semantic"/"binary" — results equal the whole-volume ones. "warping" runs per slice (ISBI
    protocol) when ``warping_per_slice``, else on the whole (in-memory) 3D volume.

    Kinds: "semantic" (needs ``num_classes``; :func:`semantic_scores`), "binary"
    (:func:`binary_scores` of pred != 0, or a float pred > ``threshold``, vs gt != 0), "region"
    (:func:`region_scores` with
    ``ignore_gt``/``ignore_pred``), "instance" (:func:`instance_scores`), "warping"
    (:func:`warping_error`, a float pred thresholded at ``threshold``). Returns {kind: scores}.
    """
    check_kinds(kinds)
    if tuple(pred.shape) != tuple(gt.shape):
        raise UserError(f"pred shape {tuple(pred.shape)} != gt shape {tuple(gt.shape)}")
    if "semantic" in kinds and num_classes is None:
        raise UserError("kind 'semantic' needs num_classes")
    acc = _Accumulators(kinds, num_classes)
    for sl in _blocks(tuple(pred.shape), block_z):
        p_blk, g_blk = np.asarray(pred[sl]), np.asarray(gt[sl])
        if "warping" in kinds and p_blk.ndim == 3 and not warping_per_slice and block_z is not None:
            raise UserError("3D warping error needs the whole volume: set block_z=None")
        acc.add(p_blk, g_blk, ignore_index, threshold, warping_per_slice)
    out: dict = {}
    if "semantic" in kinds:
        out["semantic"] = scores_from_confusion(acc.cm)
    if "binary" in kinds:
        out["binary"] = _binary_from_counts(*(int(x) for x in acc.bin_counts))
    if "region" in kinds:
        out["region"] = acc.table.scores(ignore_gt, ignore_pred)
    if "instance" in kinds:
        out["instance"] = instance_scores(
            None, None, iou_thresholds, background=background, table=acc.table
        )
    if "warping" in kinds:
        out["warping"] = {"warping_error": acc.warp_err / acc.warp_n}
    return out


class _Accumulators:
    """What the metric families of `kinds` accumulate block by block."""

    def __init__(self, kinds: Sequence[str], num_classes: int | None):
        self.kinds = kinds
        self.table = ContingencyTable() if {"region", "instance"} & set(kinds) else None
        self.cm = np.zeros((num_classes, num_classes), np.int64) if "semantic" in kinds else None
        self.num_classes = num_classes
        self.bin_counts = np.zeros(4, np.int64)  # tp, fp, fn, n
        self.warp_err, self.warp_n = 0.0, 0

    def add(self, p_blk, g_blk, ignore_index, threshold, warping_per_slice) -> None:
        if self.table is not None:
            self.table.add(check_label_array(p_blk, "pred"), check_label_array(g_blk, "gt"))
        if self.cm is not None:
            self.cm += confusion_matrix(p_blk, g_blk, self.num_classes, ignore_index)
        if "binary" in self.kinds:
            s = binary_scores(p_blk, g_blk, threshold)
            self.bin_counts += (s["tp"], s["fp"], s["fn"], p_blk.size)
        if "warping" in self.kinds:
            err = warping_error(p_blk, g_blk, threshold, per_slice=warping_per_slice)
            self.warp_err += err * p_blk.size
            self.warp_n += p_blk.size
