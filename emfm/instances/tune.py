"""Choosing the parameters that turn soft predictions into instances on labelled validation data.

A network's boundary / foreground probabilities are not calibrated the same way from one model to
the next, so a fixed level (0.5) for seeds, fragments or foreground is arbitrary. `grid_search`
scores every combination of a small grid against validation labels with the task's metric and
returns the best; `tune_instances` does it for the methods of `emfm.instances.segment` (boundary
maps or affinities), `tune_foreground` for connected components of a foreground probability
(blob-like organelles). `emfm instances` / `emfm predict` call `tune_from_volumes` when
`instances.tune=true`.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields, replace

import numpy as np
from scipy import ndimage

from emfm.errors import UserError
from emfm.instances.link2d import METHODS_2D
from emfm.instances.segment import SegmentParams, segment

log = logging.getLogger("emfm")

# metric -> True when larger is better
METRICS = {
    "adapted_rand_error": False,
    "voi": False,
    "voi_split": False,
    "voi_merge": False,
    "cremi_score": False,
    "instance_f1": True,
}

DEFAULT_GRIDS: dict[str, dict[str, list]] = {
    "watershed": {"threshold": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7], "min_seed": [4, 16, 64, 256]},
    # link_mutual_best stays at its default (one-to-one): shallow validation regions do not show the
    # chaining of any-pair links, which builds up over many sections
    # (experiments/segmentation/README.md)
    "link2d": {
        "threshold": [0.1, 0.2, 0.3, 0.5],
        "link_2d": list(METHODS_2D),
        "agglomeration_threshold": [0.3, 0.5],
    },
    "agglomeration": {"threshold": [0.3, 0.5, 0.7], "agglomeration_threshold": [0.3, 0.5, 0.7]},
    "multicut": {"threshold": [0.1, 0.2, 0.3, 0.5], "beta": [0.3, 0.5, 0.7]},
    "mws": {"repulsive_stride": [1]},
    # up to 0.98: fine-tuned mitochondria maps chose 0.9, the end of a grid that stopped there, on
    # the validation sections of 10 of 18 runs (experiments/foundation/README.md); touching
    # objects part only at high levels
    "foreground": {
        "threshold": [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98],
        "min_size": [0, 64, 256, 1024],
    },
}


def score_instances(
    pred: np.ndarray,
    gt: np.ndarray,
    metric: str,
    *,
    per_section: bool = False,
    ignore_gt: Sequence[int] = (0,),
) -> float:
    """One number of `pred` against `gt` (same shape). Region metrics (adapted Rand error, VOI,
    CREMI) ignore gt ids in `ignore_gt`; `instance_f1` = 2 TP / (n_pred + n_gt) at IoU >= 0.5. With
    `per_section`, region metrics are averaged over sections and instance counts summed."""
    from emfm.eval.metrics_instance import match_instances
    from emfm.eval.metrics_region import region_scores

    if metric not in METRICS:
        raise UserError(f"tune metric {metric!r}: choose one of {', '.join(METRICS)}")
    if pred.shape != gt.shape:
        raise UserError(
            f"predicted labels {pred.shape} and validation labels {gt.shape} differ in shape"
        )
    pairs = list(zip(pred, gt)) if per_section else [(pred, gt)]
    if metric == "instance_f1":
        tp = n = 0
        for p, g in pairs:
            m = match_instances(p, g, threshold=0.5)
            tp, n = tp + len(m["iou"]), n + m["n_pred"] + m["n_gt"]
        return 2 * tp / n if n else 1.0
    return float(
        np.mean([region_scores(p, g, ignore_gt=tuple(ignore_gt))[metric] for p, g in pairs])
    )


def grid_search(
    make_labels: Callable[[dict], np.ndarray],
    gt: np.ndarray,
    grid: Mapping[str, Sequence],
    metric: str,
    *,
    per_section: bool = False,
    ignore_gt: Sequence[int] = (0,),
) -> tuple[dict, list[dict]]:
    """Every combination of `grid` (name -> values) labelled by `make_labels(combo)` and scored;
    returns the best combination (first one on ties) and all trials `{**combo, metric: score}`."""
    if metric not in METRICS:
        raise UserError(f"tune metric {metric!r}: choose one of {', '.join(METRICS)}")
    names = list(grid)
    if any(len(grid[k]) == 0 for k in names):
        raise UserError(f"tune grid {dict(grid)}: every parameter needs at least one value")
    sign = 1.0 if METRICS[metric] else -1.0
    trials, best, best_score = [], None, -np.inf
    for values in itertools.product(*(grid[k] for k in names)):
        combo = dict(zip(names, values))
        s = score_instances(
            make_labels(combo), gt, metric, per_section=per_section, ignore_gt=ignore_gt
        )
        trials.append({**combo, metric: s})
        if sign * s > best_score:
            best, best_score = combo, sign * s
    for k in names:
        edge = _edge_neighbour(best[k], grid[k])
        if edge is None:
            continue
        # warn only when the edge is strictly better than its neighbour (not a tie on k)
        nb = next(
            t[metric]
            for t in trials
            if t[k] == edge[1] and all(t[j] == best[j] for j in names if j != k)
        )
        if best_score > sign * nb:
            log.warning(
                "tuning chose %s=%s, the %s value of its grid %s: the best may lie beyond it; "
                "extend the grid",
                k,
                best[k],
                edge[0],
                list(grid[k]),
            )
    return best, trials


def _edge_neighbour(value, values: Sequence) -> tuple[str, float] | None:
    """('lowest' | 'highest', the next value inward) when numeric `value` is the extreme of
    `values` (3 or more distinct numbers), else None. A lowest value of 0 is no edge: it is the
    parameter's off position (no smoothing, no size filter, no core level), nothing lies below."""
    nums = sorted({v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)})
    if len(nums) < 3 or isinstance(value, bool) or value not in nums:
        return None
    if value == nums[0] and value != 0:
        return "lowest", nums[1]
    if value == nums[-1]:
        return "highest", nums[-2]
    return None


def _typed(params: SegmentParams, combo: dict) -> dict:
    types = {f.name: type(getattr(params, f.name)) for f in fields(params)}
    bad = sorted(set(combo) - set(types))
    if bad:
        raise UserError(
            f"tune grid names unknown instance parameters {bad}; known: {', '.join(sorted(types))}"
        )
    out = {}
    for k, v in combo.items():
        if types[k] is bool and isinstance(v, str):
            if v.lower() not in ("true", "false"):
                raise UserError(f"tune grid {k}={v!r}: use true or false")
            out[k] = v.lower() == "true"
        else:
            try:
                out[k] = types[k](v)
            except (TypeError, ValueError):
                raise UserError(f"tune grid {k}={v!r}: expected a {types[k].__name__}") from None
    return out


def tune_instances(
    data: np.ndarray,
    gt: np.ndarray,
    params: SegmentParams,
    *,
    metric: str = "voi",
    grid: Mapping[str, Sequence] | None = None,
    per_section: bool = False,
    ignore_gt: Sequence[int] = (0,),
) -> tuple[SegmentParams, list[dict]]:
    """Best `params` (method fixed) for boundary map `[z,y,x]` / affinities `[c,z,y,x]` against `gt`
    `[z,y,x]`; `grid` defaults to DEFAULT_GRIDS[params.method]."""
    grid = dict(grid) if grid else DEFAULT_GRIDS[params.method]
    _typed(params, {k: v[0] for k, v in grid.items()})
    best, trials = grid_search(
        lambda c: segment(data, replace(params, **_typed(params, c))),
        gt,
        grid,
        metric,
        per_section=per_section,
        ignore_gt=ignore_gt,
    )
    return replace(params, **_typed(params, best)), trials


def foreground_instances(
    prob: np.ndarray,
    *,
    threshold: float = 0.5,
    min_size: int = 0,
    seed_threshold: float = 0.0,
    two_d: bool = True,
) -> np.ndarray:
    """Objects of the foreground `prob >= threshold` (per section with `two_d`), objects under
    `min_size` voxels removed.

    `seed_threshold <= threshold`: its connected components. `seed_threshold > threshold`: touching
    objects are parted where the map dips between them: the components of `prob >= seed_threshold`
    (confident cores) are grown over the falling map (watershed of -prob) through the foreground, so
    each object keeps the extent of the lower level; a foreground component without any core stays
    one object."""
    from skimage.segmentation import watershed

    def one(p):
        mask = p >= threshold
        if seed_threshold > threshold:
            cores, n = ndimage.label(p >= seed_threshold)
            lab = watershed(-p, cores, mask=mask).astype(np.int64)
            rest, _ = ndimage.label(mask & (lab == 0))
            lab[rest > 0] = rest[rest > 0] + n
        else:
            lab, _ = ndimage.label(mask)
        if min_size > 1:
            small = np.bincount(lab.ravel()) < min_size
            small[0] = False
            lab[small[lab]] = 0
        return lab

    return np.stack([one(p) for p in prob]) if two_d else one(prob)


def tune_foreground(
    prob: np.ndarray,
    gt: np.ndarray,
    *,
    metric: str = "instance_f1",
    grid: Mapping[str, Sequence] | None = None,
    two_d: bool = True,
) -> tuple[dict, list[dict]]:
    """Best `threshold` / `min_size` of `foreground_instances` against instance labels `gt`."""
    grid = dict(grid) if grid else DEFAULT_GRIDS["foreground"]
    bad = sorted(set(grid) - {"threshold", "min_size", "seed_threshold"})
    if bad:
        raise UserError(
            f"tune grid names {bad}; foreground instances take threshold, min_size and "
            "seed_threshold"
        )
    return grid_search(
        lambda c: foreground_instances(prob, two_d=two_d, **c),
        gt,
        grid,
        metric,
        per_section=two_d,
        ignore_gt=(),
    )


def tune_from_volumes(
    input_path: str,
    labels_path: str,
    roi: Sequence[Sequence[int]],
    params: SegmentParams,
    *,
    kind: str = "auto",
    channel: int | None = None,
    invert: bool = False,
    metric: str = "voi",
    grid: Mapping[str, Sequence] | None = None,
    per_section: bool = False,
    ignore_gt: Sequence[int] = (0,),
) -> tuple[SegmentParams, list[dict]]:
    """`instances.tune=true`: the probabilities of `input_path` in `roi` (its own coordinates)
    against the labels at `labels_path` in the same region of the source volume (shifted by the
    `roi` origin that `emfm predict` records in the probabilities' attributes)."""
    from emfm.data.volume import VolumeError, open_volume
    from emfm.instances.reader import from_attributes, volume_reader

    vol = open_volume(input_path)
    channel, invert, params = from_attributes(vol, kind, channel, invert, params)
    read, _ = volume_reader(
        vol, kind=kind, channel=channel, invert=invert, n_offsets=len(params.offsets)
    )
    shape = vol.spatial_shape
    if roi is None or len(roi) != 3 or any(not 0 <= a < b <= n for (a, b), n in zip(roi, shape)):
        raise VolumeError(
            f"instances.tune_roi={roi}: give 3 [start, stop] ranges inside {input_path} of shape "
            f"{list(shape)}"
        )
    origin = [r[0] for r in vol.attributes.get("roi") or [[0, 0]] * 3]
    lab = open_volume(labels_path)
    box = tuple(slice(a, b) for a, b in roi)
    lbox = tuple(slice(a + o, b + o) for (a, b), o in zip(roi, origin))
    if lab.ndim != 3 or any(s.stop > n for s, n in zip(lbox, lab.shape)):
        raise VolumeError(
            f"instances.tune_labels {labels_path} of shape {list(lab.shape)} does not cover the "
            f"validation region {[[s.start, s.stop] for s in lbox]}"
        )
    best, trials = tune_instances(
        read(box),
        lab.read(lbox),
        params,
        metric=metric,
        grid=grid,
        per_section=per_section,
        ignore_gt=ignore_gt,
    )
    log.info(
        "instances: tuned on %s: %s",
        [[s.start, s.stop] for s in lbox],
        {k: getattr(best, k) for k in (grid or DEFAULT_GRIDS[params.method])},
    )
    return best, trials


def tune_from_volumes_cfg(
    cfg, input_path: str, params: SegmentParams
) -> tuple[SegmentParams, dict]:
    """`tune_from_volumes` with the `instances.tune_*` settings of a validated InstancesConfig
    (emfm.config.instances.validate_instances) starting from its `params`
    (emfm.config.instances.segment_params); returns the chosen parameters and a record of the search
    (for the run's JSON)."""
    grid = {k: list(v) for k, v in (cfg.tune_grid or {}).items()} or None
    best, trials = tune_from_volumes(
        input_path,
        cfg.tune_labels,
        cfg.tune_roi,
        params,
        kind=cfg.kind,
        channel=cfg.channel,
        invert=cfg.invert,
        metric=cfg.tune_metric,
        grid=grid,
        per_section=cfg.tune_per_section,
        ignore_gt=tuple(cfg.tune_ignore),
    )
    names = list(grid or DEFAULT_GRIDS[best.method])
    return best, {
        "metric": cfg.tune_metric,
        "roi": cfg.tune_roi,
        "chosen": {k: getattr(best, k) for k in names},
        "trials": trials,
    }
