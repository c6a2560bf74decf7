"""Instance-segmentation metrics (2D or 3D): IoU matching, F1/AP at IoU thresholds, PQ, AJI.

All of them read the sparse overlap of :class:`~emfm.eval.metrics_region.ContingencyTable`, so a
volume with 1e4 instances never needs a dense n_gt x n_pred matrix. Id ``background`` (0) is not an
instance in either volume; its voxels still count in the instance sizes' complements (an instance's
size is all its voxels, whatever the other volume says there).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import sparse
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import connected_components

from emfm.eval.metrics_region import ContingencyTable, _unique_sum

__all__ = [
    "IOU_THRESHOLDS",
    "instance_overlaps",
    "match_instances",
    "instance_scores",
    "panoptic_quality",
    "aggregated_jaccard_index",
    "coco_average_precision",
]

# COCO / DSB2018 thresholds 0.50:0.05:0.95 (rounded so 0.55 etc. print cleanly).
IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * k, 2) for k in range(10))


class Overlaps:
    """Instance ids, sizes and the non-zero intersections between gt and pred instances."""

    def __init__(self, table: ContingencyTable, background: int = 0):
        g, p, n = table.gt_ids, table.pred_ids, table.counts
        self.gt_ids, self.gt_sizes = _unique_sum(g, n)
        self.pred_ids, self.pred_sizes = _unique_sum(p, n)
        keep_g, keep_p = self.gt_ids != background, self.pred_ids != background
        self.gt_ids, self.gt_sizes = self.gt_ids[keep_g], self.gt_sizes[keep_g]
        self.pred_ids, self.pred_sizes = self.pred_ids[keep_p], self.pred_sizes[keep_p]
        both = (g != background) & (p != background)
        # Indices into gt_ids / pred_ids (both sorted) of every overlapping pair.
        self.gi = np.searchsorted(self.gt_ids, g[both])
        self.pj = np.searchsorted(self.pred_ids, p[both])
        self.inter = n[both]
        union = self.gt_sizes[self.gi] + self.pred_sizes[self.pj] - self.inter
        self.iou = self.inter / union

    @property
    def n_gt(self) -> int:
        return int(self.gt_ids.size)

    @property
    def n_pred(self) -> int:
        return int(self.pred_ids.size)


def instance_overlaps(pred, gt, background: int = 0, table=None) -> Overlaps:
    """Overlap structure of two instance label volumes (or of a prebuilt table)."""
    table = ContingencyTable.from_arrays(pred, gt) if table is None else table
    return Overlaps(table, background)


def _match(ov: Overlaps, threshold: float):
    """Maximum-cardinality one-to-one matching among pairs with IoU >= threshold.

    Ties in cardinality are broken by the largest IoU sum (the stardist cost
    -1[iou >= t] - iou / (2 n)); solved exactly by scipy.optimize.linear_sum_assignment on each
    connected component of the candidate graph. Above IoU 0.5 every instance has at most one
    candidate, so all components are single pairs and no assignment problem is solved.
    Returns (gi, pj, iou) of the matched pairs.
    """
    cand = np.flatnonzero((ov.iou >= threshold) & (ov.iou > 0))
    gi, pj, iou = ov.gi[cand], ov.pj[cand], ov.iou[cand]
    if cand.size == 0:
        return gi, pj, iou
    deg_g = np.bincount(gi, minlength=ov.n_gt)
    deg_p = np.bincount(pj, minlength=ov.n_pred)
    simple = (deg_g[gi] == 1) & (deg_p[pj] == 1)
    out = [np.flatnonzero(simple)]
    rest = np.flatnonzero(~simple)
    if rest.size:
        # Components of the bipartite graph spanned by the ambiguous candidate pairs.
        ug, rg = np.unique(gi[rest], return_inverse=True)
        up, rp = np.unique(pj[rest], return_inverse=True)
        nodes = ug.size + up.size
        adj = sparse.coo_matrix((np.ones(rest.size), (rg, ug.size + rp)), shape=(nodes, nodes))
        _, comp = connected_components(adj, directed=False)
        edge_comp = comp[rg]
        order = np.argsort(edge_comp, kind="stable")
        bounds = np.flatnonzero(np.diff(edge_comp[order])) + 1
        for edges in np.split(order, bounds):
            e = rest[edges]
            lg, ig = np.unique(gi[e], return_inverse=True)
            lp, ip = np.unique(pj[e], return_inverse=True)
            cost = np.zeros((lg.size, lp.size))
            cost[ig, ip] = -1.0 - iou[e] / (2.0 * min(lg.size, lp.size) + 1.0)
            r, c = linear_sum_assignment(cost)
            chosen = cost[r, c] < 0
            lookup = {(a, b): k for k, a, b in zip(e, ig, ip)}
            out.append(np.array([lookup[(a, b)] for a, b in zip(r[chosen], c[chosen])], int))
    sel = np.concatenate(out)
    return gi[sel], pj[sel], iou[sel]


def match_instances(pred, gt, threshold: float = 0.5, background: int = 0, table=None) -> dict:
    """Optimal one-to-one matching of instances with IoU >= ``threshold``.

    IoU(g, p) = |g ∩ p| / |g ∪ p| over all voxels (2D or 3D). The matching maximises the number
    of matched pairs, then their IoU sum (Hungarian algorithm, scipy.optimize.linear_sum_assignment,
    on the sparse overlap graph; cf. Schmidt et al. 2018, stardist ``matching``).
    Returns ids and IoUs of the matched pairs plus the instance counts.
    """
    ov = instance_overlaps(pred, gt, background, table)
    gi, pj, iou = _match(ov, threshold)
    return {
        "gt_ids": ov.gt_ids[gi],
        "pred_ids": ov.pred_ids[pj],
        "iou": iou,
        "n_gt": ov.n_gt,
        "n_pred": ov.n_pred,
    }


def _counts_scores(tp: int, n_pred: int, n_gt: int, iou_sum: float) -> dict:
    fp, fn = n_pred - tp, n_gt - tp

    def div(a, b):
        # 0/0 = 1: with nothing predicted nothing was invented (precision 1; stardist's
        # matching reports 0 there), with nothing to find nothing was missed (recall 1)
        return a / b if b else 1.0

    return {
        "tp": int(tp),
        "fp": int(fp),
        "fn": int(fn),
        "precision": div(tp, tp + fp),
        "recall": div(tp, tp + fn),
        "f1": div(2 * tp, 2 * tp + fp + fn),
        # DSB2018 / stardist "accuracy", the per-threshold term of their AP.
        "ap_dsb": div(tp, tp + fp + fn),
        "mean_matched_iou": iou_sum / tp if tp else 0.0,
    }


def panoptic_quality(pred, gt, background: int = 0, table=None, overlaps=None) -> dict:
    """Panoptic quality of one class (Kirillov et al. 2019, CVPR, eq. 1).

    Pairs with IoU > 0.5 are matched (unique by construction). SQ = sum IoU(TP) / |TP|,
    RQ = |TP| / (|TP| + |FP|/2 + |FN|/2), PQ = SQ * RQ.
    """
    ov = overlaps or instance_overlaps(pred, gt, background, table)
    m = ov.iou > 0.5
    tp = int(m.sum())
    fp, fn = ov.n_pred - tp, ov.n_gt - tp
    sq = float(ov.iou[m].sum() / tp) if tp else 0.0
    denom = tp + 0.5 * fp + 0.5 * fn
    rq = tp / denom if denom else 1.0
    if denom == 0:
        sq = 1.0
    return {"pq": sq * rq, "sq": sq, "rq": rq, "tp": tp, "fp": fp, "fn": fn}


def aggregated_jaccard_index(pred, gt, background: int = 0, table=None, overlaps=None) -> float:
    """Aggregated Jaccard Index (Kumar et al. 2017, IEEE TMI 36:1550, Algorithm 1).

    For each gt instance G_i take the pred S_j with the largest IoU; C += |G_i ∩ S_j|,
    U += |G_i ∪ S_j| (U += |G_i| when nothing overlaps). Finally U += |S_k| for every pred never
    chosen. AJI = C / U. (A pred may be chosen by several gt instances, as in the original.)
    """
    ov = overlaps or instance_overlaps(pred, gt, background, table)
    if ov.n_gt == 0:
        return 1.0 if ov.n_pred == 0 else 0.0
    order = np.lexsort((-ov.iou, ov.gi))
    first = order[np.r_[True, np.diff(ov.gi[order]) != 0]] if order.size else order
    inter = ov.inter[first].astype(np.float64)
    union = ov.gt_sizes[ov.gi[first]] + ov.pred_sizes[ov.pj[first]] - inter
    lonely_gt = np.setdiff1d(np.arange(ov.n_gt), ov.gi[first])
    used = np.zeros(ov.n_pred, bool)
    used[ov.pj[first]] = True
    c = inter.sum()
    u = union.sum() + ov.gt_sizes[lonely_gt].sum() + ov.pred_sizes[~used].sum()
    return float(c / u) if u else 1.0


def coco_average_precision(
    pred,
    gt,
    thresholds: Sequence[float] = IOU_THRESHOLDS,
    pred_scores: Mapping[int, float] | None = None,
    background: int = 0,
    table=None,
    overlaps=None,
) -> dict:
    """COCO-style AP: greedy matching by confidence, 101-point interpolated precision.

    Predictions are visited in decreasing ``pred_scores`` (default: all equal, visited in id
    order); each takes the still-unmatched gt of largest IoU >= t. AP_t is the mean over recall
    r in {0, 0.01, ..., 1} of the interpolated precision max_{r' >= r} P(r') (Lin et al. 2014,
    pycocotools ``COCOeval.accumulate``; no crowd or area ranges). Without confidences the
    precision-recall curve is a single order, so this is mostly a reference for detectors that do
    provide scores.
    """
    ov = overlaps or instance_overlaps(pred, gt, background, table)
    scores = np.zeros(ov.n_pred)
    if pred_scores is not None:
        scores = np.array([float(pred_scores.get(int(i), 0.0)) for i in ov.pred_ids])
    rank = np.empty(ov.n_pred, int)
    rank[np.argsort(-scores, kind="stable")] = np.arange(ov.n_pred)
    rec_pts = np.linspace(0.0, 1.0, 101)
    result = {}
    for t in thresholds:
        cand = np.flatnonzero(ov.iou >= t)
        cand = cand[np.lexsort((-ov.iou[cand], rank[ov.pj[cand]]))]
        gt_taken = np.zeros(ov.n_gt, bool)
        pred_tp = np.zeros(ov.n_pred, bool)
        for g, p in zip(ov.gi[cand].tolist(), ov.pj[cand].tolist()):
            if not pred_tp[p] and not gt_taken[g]:
                pred_tp[p] = gt_taken[g] = True
        if ov.n_gt == 0:
            result[t] = 1.0 if ov.n_pred == 0 else 0.0
            continue
        tp_sorted = pred_tp[np.argsort(rank)]
        ctp = np.cumsum(tp_sorted)
        precision = ctp / np.arange(1, ov.n_pred + 1)
        recall = ctp / ov.n_gt
        precision = np.maximum.accumulate(precision[::-1])[::-1]
        idx = np.searchsorted(recall, rec_pts, side="left")
        valid = idx < recall.size
        q = np.zeros(rec_pts.size)
        q[valid] = precision[idx[valid]]
        result[t] = float(q.mean())
    return {"ap_coco": float(np.mean(list(result.values()))), "ap_coco_per_threshold": result}


def instance_scores(
    pred,
    gt,
    thresholds: Sequence[float] = IOU_THRESHOLDS,
    background: int = 0,
    table=None,
    pred_scores: Mapping[int, float] | None = None,
    coco: bool = True,
) -> dict:
    """All instance scores of two instance label volumes (2D or 3D), from one overlap table.

    * per threshold t (``per_threshold[t]``): TP/FP/FN of :func:`match_instances` at t, precision
      TP/(TP+FP), recall TP/(TP+FN), F1 2TP/(2TP+FP+FN), ``ap_dsb`` TP/(TP+FP+FN);
    * ``ap_dsb``: mean of ``ap_dsb`` over ``thresholds`` (default 0.50:0.05:0.95) — the Kaggle
      Data Science Bowl 2018 / stardist definition of "average precision" (Caicedo et al. 2019,
      Nat. Methods 16:1247), which needs no confidence scores;
    * ``f1@0.5`` etc. shortcuts, ``pq``/``sq``/``rq`` (:func:`panoptic_quality`), ``aji``
      (:func:`aggregated_jaccard_index`), and, if ``coco``, ``ap_coco``
      (:func:`coco_average_precision`).
    """
    table = ContingencyTable.from_arrays(pred, gt) if table is None else table
    ov = Overlaps(table, background)
    per = {}
    for t in thresholds:
        gi, pj, iou = _match(ov, t)
        per[float(t)] = _counts_scores(gi.size, ov.n_pred, ov.n_gt, float(iou.sum()))
    out = {
        "n_gt": ov.n_gt,
        "n_pred": ov.n_pred,
        "ap_dsb": float(np.mean([v["ap_dsb"] for v in per.values()])),
    }
    for t in (0.5, 0.75):
        if t in per:
            for k in ("precision", "recall", "f1", "ap_dsb"):
                out[f"{k}@{t}"] = per[t][k]
    out.update(
        {
            k: v
            for k, v in panoptic_quality(None, None, overlaps=ov).items()
            if k in ("pq", "sq", "rq")
        }
    )
    out["aji"] = aggregated_jaccard_index(None, None, overlaps=ov)
    if coco:
        out["ap_coco"] = coco_average_precision(None, None, thresholds, pred_scores, overlaps=ov)[
            "ap_coco"
        ]
    out["per_threshold"] = per
    return out
