"""Cells from a predicted membrane map, and their scores: the region metrics of the membrane
probes (the main job's probe, the probing benchmark's membrane tasks, fine-tuning evaluation).

Cells are grown by seeded watershed per section from the predicted membranes, and adjacent cells
whose shared border is faint can then be joined (agglomeration by mean membrane probability along
the border, emfm.instances.graph); ground-truth cells are the connected cell-interior regions
(membrane pixels ignored). The watershed's seed threshold, minimum seed size, smoothing and the
merge level can be chosen per encoder on held-out sections (`tune_cells`), so that each encoder's
region scores come from its own best post-processing, not from one fixed threshold.
"""

from __future__ import annotations

import numpy as np

from emfm.errors import UserError


def cells_from_membranes(
    p_membrane: np.ndarray,
    *,
    threshold: float = 0.5,
    min_seed: int = 16,
    sigma: float = 0.0,
    rank: bool = False,
    merge: float = 0.0,
) -> np.ndarray:
    """Cell instances of one section from a membrane probability map: the map is optionally smoothed
    (Gaussian, `sigma` pixels), seeds are connected regions of confident interior (p < threshold, at
    least `min_seed` pixels), grown by watershed over the (smoothed) map.

    With `merge` > 0, adjacent cells are then joined while the lowest mean membrane probability
    along a shared border (of the map as given, not smoothed) is below `merge`, lowest first
    (emfm.instances.graph.agglomerate): a seed level low enough to separate cells behind weak
    membranes also splits cells along faint ridges inside them (organelle outlines, texture), and
    a border made of such ridges has a low mean. `merge` is an absolute probability; 0 joins
    nothing.

    With `rank`, `threshold` is a quantile of this section's own (smoothed) map: the seeds are then
    the `threshold` fraction of least membrane-like pixels. The watershed flooding depends only on
    the order of the values, so rank seeds make the whole derivation invariant to a monotone change
    of the map's calibration, e.g. a probe less confident on held-out sections than on the sections
    it was fitted to (experiments/main_job_mae/README.md)."""
    if not 0 <= merge < 1:
        raise UserError(f"cell merge level {merge}: must be in [0, 1) (0 = no merging)")
    cells = _seeded_cells(p_membrane, threshold, min_seed, sigma, rank)
    if merge > 0:
        from emfm.instances.graph import rag_from_boundaries

        cells = _merged(cells, rag_from_boundaries(cells, p_membrane), merge)
    return cells


def _seeded_cells(p_membrane, threshold, min_seed, sigma, rank) -> np.ndarray:
    from scipy import ndimage

    from emfm.instances.watershed import seeded_watershed, threshold_seeds

    p = ndimage.gaussian_filter(p_membrane.astype(np.float32), sigma) if sigma > 0 else p_membrane
    t = float(np.quantile(p, threshold)) if rank else threshold
    return seeded_watershed(p, threshold_seeds(p, t, min_seed)).astype(np.uint32)


def _merged(cells: np.ndarray, rag, merge: float) -> np.ndarray:
    from emfm.instances.graph import agglomerate, apply_to_fragments

    return apply_to_fragments(cells, agglomerate(rag, merge)).astype(np.uint32)


def gt_cells(membrane: np.ndarray) -> np.ndarray:
    """Ground-truth cells of one section: connected cell-interior regions; membranes = 0
    (ignored). `membrane`: non-zero (or True) = membrane, of any dtype."""
    from scipy import ndimage

    lab, _ = ndimage.label(np.asarray(membrane) == 0)
    return lab.astype(np.uint32)


def cell_scores(p_membrane: np.ndarray, membrane_gt: np.ndarray, **cells) -> dict:
    """Adapted Rand error and VOI (split, merge) of the cells derived from `p_membrane` `[n, y, x]`
    (`cells`: cells_from_membranes parameters) against the ground-truth cells, averaged over
    sections."""
    from emfm.eval import metrics

    per = [
        metrics.region_scores(
            cells_from_membranes(p_membrane[k], **cells), gt_cells(membrane_gt[k]), ignore_gt=(0,)
        )
        for k in range(len(p_membrane))
    ]
    return {
        k: float(np.mean([s[k] for s in per]))
        for k in ("adapted_rand_error", "voi", "voi_split", "voi_merge")
    }


def tune_cells(
    p_membrane: np.ndarray,
    membrane_gt: np.ndarray,
    *,
    thresholds=(0.5,),
    min_seeds=(16,),
    sigmas=(0.0,),
    rank: bool = False,
    merges=(0.0,),
) -> dict:
    """The cells_from_membranes parameters with the lowest adapted Rand error (averaged per section)
    on these (held-out) sections, searched over thresholds x min_seeds x sigmas x merges by
    emfm.instances.tune.grid_search (thresholds are quantiles with `rank`); ties keep the first.
    The result names `merge` only when `merges` offers more than "no merging" (0), so that the
    parameters of a grid without it read as before."""
    from emfm.instances.graph import rag_from_boundaries
    from emfm.instances.tune import grid_search

    gt = np.stack([gt_cells(m) for m in membrane_gt])
    grid = {
        "threshold": [float(t) for t in thresholds],
        "min_seed": [int(m) for m in min_seeds],
        "sigma": [float(s) for s in sigmas],
        "rank": [bool(rank)],
    }
    if any(m < 0 or m >= 1 for m in merges) or not merges:
        raise UserError(f"cell merge levels {list(merges)}: give at least one, each in [0, 1)")
    if list(merges) != [0.0]:
        grid["merge"] = [float(m) for m in merges]

    seeded: dict = {}  # the watershed of one seed setting, reused by every merge level

    def make_labels(c: dict) -> np.ndarray:
        key = (c["threshold"], c["min_seed"], c["sigma"], c["rank"])
        if key not in seeded:
            seeded.clear()  # the grid varies the merge level fastest
            cells = [_seeded_cells(p, *key) for p in p_membrane]
            rags = (
                [rag_from_boundaries(x, p) for x, p in zip(cells, p_membrane)]
                if "merge" in grid
                else None
            )
            seeded[key] = (cells, rags)
        cells, rags = seeded[key]
        m = c.get("merge", 0.0)
        if m <= 0:
            return np.stack(cells)
        return np.stack([_merged(x, r, m) for x, r in zip(cells, rags)])

    try:
        best, _ = grid_search(
            make_labels,
            gt,
            grid,
            "adapted_rand_error",
            per_section=True,
            ignore_gt=(0,),
        )
    except ValueError as e:  # an empty grid
        raise UserError(
            "probe cell tuning (probe.cell_thresholds / cell_min_seeds / cell_sigmas / "
            f"cell_merges): {e}"
        ) from None
    return best


def membrane_scores(
    p_membrane: np.ndarray, membrane_gt: np.ndarray, *, pixel_threshold: float = 0.5, **cells
) -> dict:
    """Pixel scores (membrane = p >= pixel_threshold) and region scores of the derived cells
    (`cells`: cells_from_membranes parameters) over sections `[n, y, x]`; region scores averaged per
    section."""
    from emfm.eval import metrics

    px = metrics.binary_scores(p_membrane >= pixel_threshold, membrane_gt)
    return {
        "f1": px["f1"],
        "iou": px["iou"],
        "precision": px["precision"],
        "recall": px["recall"],
        "pixel_error": px["pixel_error"],
        **cell_scores(p_membrane, membrane_gt, **cells),
    }
