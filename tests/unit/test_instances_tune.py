"""Instance parameters chosen on validation labels (emfm.instances.tune), on exact synthetic ground
truth."""

from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage

from emfm.data.synthetic import synthetic_em
from emfm.errors import UserError
from emfm.instances import SegmentParams, boundaries_from_labels, segment
from emfm.instances.tune import (
    foreground_instances,
    grid_search,
    score_instances,
    tune_foreground,
    tune_instances,
)


@pytest.fixture(scope="module")
def faint():
    """Cells whose boundaries a miscalibrated model scores only 0.4: at the default level 0.5 no
    boundary separates the seeds, every cell merges into one."""
    s = synthetic_em((4, 64, 64), seed=3, cell_size=20.0)
    rng = np.random.default_rng(0)
    b = 0.05 + 0.35 * boundaries_from_labels(s.cells) + rng.normal(0, 0.02, s.cells.shape)
    return np.clip(b, 0, 1).astype(np.float32), s.cells


def test_tune_instances_finds_the_level_the_default_misses(faint):
    b, cells = faint
    p = SegmentParams(method="watershed", two_d=False)
    default = score_instances(segment(b, p), cells, "voi")
    best, trials = tune_instances(
        b, cells, p, metric="voi", grid={"threshold": [0.2, 0.5], "min_seed": [4, 16]}
    )
    assert len(trials) == 4 and all("voi" in t for t in trials)
    assert best.threshold == 0.2 and isinstance(best.min_seed, int)
    tuned = score_instances(segment(b, best), cells, "voi")
    assert tuned < 0.5 < default  # merged into one segment at 0.5; close to exact at 0.2
    assert min(t["voi"] for t in trials) == pytest.approx(tuned)


def test_tune_rejects_unknown_names_and_metrics(faint):
    b, cells = faint
    with pytest.raises(ValueError, match="unknown instance parameters"):
        tune_instances(b, cells, SegmentParams(), grid={"thresh": [0.5]})
    with pytest.raises(ValueError, match="tune metric 'dice'"):
        grid_search(lambda c: cells, cells, {"a": [1]}, "dice")
    with pytest.raises(ValueError, match="differ in shape"):
        score_instances(cells[:1], cells, "voi")


def test_tune_foreground_instance_f1():
    """Blobs with a halo at 0.6 (too large at level 0.5: IoU < 0.5) and single-pixel specks at 0.8
    (false objects unless a size filter removes them): only level 0.7 with min_size 16 is exact."""
    yy, xx = np.mgrid[:64, :64]
    gt = np.zeros((2, 64, 64), np.int32)
    halo = np.zeros((64, 64), bool)
    for k, (cy, cx) in enumerate([(16, 16), (16, 48), (48, 16), (48, 48)]):
        d2 = (yy - cy) ** 2 + (xx - cx) ** 2
        gt[:, d2 < 64] = k + 1
        halo |= (d2 >= 64) & (d2 < 144)
    rng = np.random.default_rng(1)
    specks = (rng.random(gt.shape) > 0.99) & (gt == 0) & ~halo
    prob = np.where(gt > 0, 0.9, np.where(halo, 0.6, 0.1)) + 0.7 * specks
    best, trials = tune_foreground(prob, gt, grid={"threshold": [0.5, 0.7], "min_size": [0, 16]})
    assert best == {"threshold": 0.7, "min_size": 16}
    scores = {(t["threshold"], t["min_size"]): t["instance_f1"] for t in trials}
    assert scores[(0.7, 16)] == 1.0 and scores[(0.5, 16)] == 0.0 and scores[(0.7, 0)] < 0.5
    lab = foreground_instances(prob, threshold=0.7, min_size=16)
    assert lab.shape == gt.shape and ndimage.label(prob[0] >= 0.7)[1] > 4


def test_foreground_instances_part_touching_objects_at_their_cores():
    """Two discs that touch through a neck of p 0.7 (one component at any level up to 0.7), each
    with a core of p 0.95, and a faint blob of p 0.6 with no core: seeded growth from the cores
    parts the two discs at the neck and keeps their full extent; the faint blob stays one object;
    a high level alone parts them only by shrinking them to their cores."""
    yy, xx = np.mgrid[:48, :80]
    gt = np.zeros((48, 80), np.int32)
    prob = np.full((48, 80), 0.05)
    for k, cx in enumerate((20, 44)):
        d2 = (yy - 24) ** 2 + (xx - cx) ** 2
        gt[d2 < 144] = k + 1
        prob[d2 < 144] = 0.8
        prob[d2 < 36] = 0.95
    prob[20:29, 30:35] = np.maximum(prob[20:29, 30:35], 0.7)  # the neck (inside both discs' reach)
    blob = (yy - 24) ** 2 + (xx - 70) ** 2 < 25
    gt[blob], prob[blob] = 3, 0.6
    prob, gt = prob[None], gt[None]

    plain = foreground_instances(prob, threshold=0.5)
    assert len(np.unique(plain[0])) - 1 == 2  # the discs merged, the blob apart
    seeded = foreground_instances(prob, threshold=0.5, seed_threshold=0.9)
    assert len(np.unique(seeded[0])) - 1 == 3
    assert (seeded > 0).sum() == (plain > 0).sum()  # the extent of the lower level
    assert score_instances(seeded, gt, "instance_f1", per_section=True) == 1.0
    cores = foreground_instances(prob, threshold=0.9)  # parted, but shrunk and the blob lost
    assert score_instances(cores, gt, "instance_f1", per_section=True) < 1.0
    # seed_threshold at or below the level: plain components
    np.testing.assert_array_equal(
        foreground_instances(prob, threshold=0.5, seed_threshold=0.5), plain
    )
    best, _ = tune_foreground(
        prob, gt, grid={"threshold": [0.5, 0.9], "seed_threshold": [0.0, 0.9], "min_size": [0]}
    )
    assert best == {"threshold": 0.5, "seed_threshold": 0.9, "min_size": 0}
    with pytest.raises(UserError, match="seed_threshold"):
        tune_foreground(prob, gt, grid={"threshold": [0.5], "sigma": [1.0]})


def test_tune_link2d_grid_of_switches_and_names():
    # objects A (x 0-3) and B (x 5-8) through 3 sections, a wall at x 4; in section 1 walls at x 2
    # and 6 cut them into A' (x 0-1), a fragment F (x 3-5) on both, and B' (x 7-8). Interior
    # overlaps: F meets A and B by 2 of its 6 voxels (1/3), A' and B' cover A and B's
    bnd = np.zeros((3, 2, 9), np.float32)
    bnd[[0, 2], :, 4] = 1.0
    bnd[1, :, 2], bnd[1, :, 6] = 1.0, 1.0
    gt = np.zeros((3, 2, 9), np.int64)  # walls and F unlabelled (not scored)
    gt[[0, 2], :, :4], gt[[0, 2], :, 5:] = 1, 2
    gt[1, :, :2], gt[1, :, 7:] = 1, 2
    p = SegmentParams(method="link2d", threshold=0.5, min_seed=1, link_threshold=0.3)
    assert segment(bnd, replace(p, link_mutual_best=False)).max() == 1  # F chains A and B
    # values as they come from the CLI (instances.tune_grid is a list of any): strings and booleans
    best, trials = tune_instances(
        bnd,
        gt,
        p,
        metric="voi",
        grid={"link_mutual_best": [True, "false"], "link_criterion": ["fraction", "iou"]},
    )
    assert len(trials) == 4 and best.link_mutual_best is True and best.link_criterion == "fraction"
    # IoU >= 0.3: F links neither
    voi = {(t["link_mutual_best"], t["link_criterion"]): t["voi"] for t in trials}
    assert (
        voi["false", "fraction"] == pytest.approx(1.0)
        and max(voi[True, "fraction"], voi["false", "iou"]) < 1e-9
    )
    with pytest.raises(ValueError, match="link_mutual_best='maybe'"):
        tune_instances(bnd, gt, p, grid={"link_mutual_best": ["maybe"]})
    with pytest.raises(ValueError, match="min_seed=.abc.: expected a int"):
        tune_instances(bnd, gt, p, grid={"min_seed": ["abc"]})


def test_grid_search_warns_when_the_best_value_is_at_the_grid_edge(caplog):
    """A best value at the end of a numeric grid is reported: the optimum may lie beyond it."""
    gt = np.ones((1, 8, 8), np.int64)
    gt[0, :, 4:] = 2

    def labels(c):  # the lower `level`, the fewer rows of object 1 merged into 2; `size` is inert
        lab = gt.copy()
        lab[0, : int(8 * c["level"]), :4] = 2
        return lab

    with caplog.at_level("WARNING", logger="emfm"):
        best, _ = grid_search(
            labels,
            gt,
            {"level": [0.1, 0.3, 0.5], "size": [1, 2, 3]},
            "adapted_rand_error",
            ignore_gt=(),
        )
    assert best["level"] == 0.1
    msgs = [r.getMessage() for r in caplog.records]
    assert any("level=0.1, the lowest value" in m for m in msgs), msgs
    assert not any("size=" in m for m in msgs)  # a tie on size: its edge value is no signal
    caplog.clear()
    with caplog.at_level("WARNING", logger="emfm"):  # 0 is the off position, not a grid edge
        best, _ = grid_search(
            labels, gt, {"level": [0.0, 0.3, 0.5]}, "adapted_rand_error", ignore_gt=()
        )
    assert best["level"] == 0.0 and not caplog.records
