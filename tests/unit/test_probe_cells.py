"""Cells from predicted membranes, and the choice of their watershed parameters on training
sections."""

import numpy as np

from emfm.eval.cells import (
    cell_scores,
    cells_from_membranes,
    gt_cells,
    membrane_scores,
    tune_cells,
)


def _two_cells_with_weak_wall():
    """One section, two cells split by a vertical membrane whose middle third is weak (p = 0.45):
    a seed threshold of 0.5 lets the two interiors (p = 0.35) touch through the weak part, 0.4 does
    not."""
    p = np.full((48, 48), 0.35, np.float32)
    gt = np.zeros((48, 48), bool)
    gt[:, 23:25] = True
    p[:, 23:25] = 0.8
    p[16:32, 23:25] = 0.45
    return p[None], gt[None]


def test_fixed_threshold_merges_through_a_weak_membrane():
    p, gt = _two_cells_with_weak_wall()
    cells = cells_from_membranes(p[0], threshold=0.5)
    assert len(np.unique(cells)) == 1  # one merged cell
    assert (
        cell_scores(p, gt, threshold=0.5)["adapted_rand_error"] > 0.3
    )  # two equal cells merged: 1 - F(1/2, 1) = 1/3


def test_tuning_picks_the_threshold_that_separates_the_cells():
    p, gt = _two_cells_with_weak_wall()
    best = tune_cells(p, gt, thresholds=(0.5, 0.4), min_seeds=(16,), sigmas=(0.0,))
    assert best == {"threshold": 0.4, "min_seed": 16, "sigma": 0.0, "rank": False}
    s = membrane_scores(p, gt, **best)
    assert s["adapted_rand_error"] < 1e-9 and s["voi"] < 1e-9
    # pixel scores do not depend on the cell parameters (membrane = p >= 0.5 misses the weak third)
    assert s["f1"] == membrane_scores(p, gt)["f1"] == 0.8


def test_smoothing_and_min_seed_remove_spurious_seeds():
    rng = np.random.default_rng(0)
    p, gt = _two_cells_with_weak_wall()
    noisy = np.clip(p + rng.normal(0, 0.2, p.shape).astype(np.float32), 0, 1)
    raw = cell_scores(noisy, gt, threshold=0.4, min_seed=1)
    best = tune_cells(noisy, gt, thresholds=(0.4,), min_seeds=(1, 64), sigmas=(0.0, 2.0))
    tuned = cell_scores(noisy, gt, **best)
    assert tuned["adapted_rand_error"] < raw["adapted_rand_error"]
    assert best["min_seed"] == 64 or best["sigma"] == 2.0


def test_rank_seeds_ignore_the_maps_calibration():
    """A probe less confident on held-out sections (here: every value squeezed towards 0.5 and
    shifted) keeps its pixel order; absolute seed thresholds then merge the cells, quantile seeds
    give the very same cells as on the original map."""
    rng = np.random.default_rng(1)
    p, gt = _two_cells_with_weak_wall()
    p = np.clip(p + rng.normal(0, 0.02, p.shape).astype(np.float32), 0, 1)
    shifted = 0.5 + 0.3 * (p - 0.5) + 0.12  # monotone: interiors 0.575, the weak wall 0.605
    absolute = [cells_from_membranes(q[0], threshold=0.4, min_seed=16) for q in (p, shifted)]
    assert (
        len(np.unique(absolute[0])) == 2 and len(np.unique(absolute[1])) == 1
    )  # no seed below 0.4 any more
    ranked = [
        cells_from_membranes(q[0], threshold=0.9, min_seed=16, rank=True) for q in (p, shifted)
    ]
    np.testing.assert_array_equal(ranked[0], ranked[1])
    assert len(np.unique(ranked[0])) == 2
    best = tune_cells(shifted, gt, thresholds=(0.3, 0.9), min_seeds=(16,), sigmas=(0.0,), rank=True)
    assert best["rank"] is True and cell_scores(shifted, gt, **best)["adapted_rand_error"] < 0.05


def _cell_with_faint_ridge():
    """One section: two cells split by a membrane (p = 0.8); the left cell is crossed by a faint
    horizontal ridge (p = 0.3, an organelle outline) on an interior of p = 0.1."""
    p = np.full((48, 48), 0.1, np.float32)
    gt = np.zeros((48, 48), bool)
    gt[:, 23:25] = True
    p[:, 23:25] = 0.8
    p[23:25, :23] = 0.3
    return p[None], gt[None]


def test_merge_joins_cells_split_by_a_faint_ridge_only():
    p, gt = _cell_with_faint_ridge()
    split = cells_from_membranes(p[0], threshold=0.2)
    assert len(np.unique(split)) == 3  # the ridge splits the left cell
    merged = cells_from_membranes(p[0], threshold=0.2, merge=0.5)
    assert len(np.unique(merged)) == 2  # the ridge's border joined, the membrane kept
    assert merged[10, 10] == merged[40, 10] != merged[10, 40]
    assert cell_scores(p, gt, threshold=0.2, merge=0.5)["adapted_rand_error"] < 1e-9
    # a merge level above the membrane's own probability joins everything
    assert len(np.unique(cells_from_membranes(p[0], threshold=0.2, merge=0.9))) == 1
    best = tune_cells(p, gt, thresholds=(0.2,), min_seeds=(16,), sigmas=(0.0,), merges=(0, 0.5))
    assert best["merge"] == 0.5
    # without merge levels to choose from, the chosen parameters read as before
    assert "merge" not in tune_cells(p, gt, thresholds=(0.2,), min_seeds=(16,), sigmas=(0.0,))


def test_merge_levels_are_checked():
    import pytest

    from emfm.errors import UserError

    p, gt = _cell_with_faint_ridge()
    for bad in ((), (1.0,), (-0.1,)):
        with pytest.raises(UserError, match="merge"):
            tune_cells(p, gt, merges=bad)
    for bad in (1.0, -0.1):
        with pytest.raises(UserError, match=f"cell merge level {bad}"):
            cells_from_membranes(p[0], merge=bad)


def test_probe_config_rejects_bad_merge_levels():
    import pytest

    from emfm.config.schema import ConfigError, ModelConfig, ProbeConfig, validate_probe

    m = ModelConfig(name="unet", width=16)
    validate_probe(ProbeConfig(cell_merges=[0.0, 0.6]), m)
    for bad in ([], [1.2]):
        with pytest.raises(ConfigError, match=r"probe.cell_merges=\[.*\] \(each in \[0, 1\)"):
            validate_probe(ProbeConfig(cell_merges=bad), m)


def test_tuning_with_merges_matches_each_derivation_on_its_own():
    """tune_cells reuses one watershed for all merge levels: its choice is the one that scoring
    every combination with cells_from_membranes picks."""
    import itertools

    rng = np.random.default_rng(2)
    p, gt = _cell_with_faint_ridge()
    p = np.clip(p + rng.normal(0, 0.08, p.shape).astype(np.float32), 0, 1)
    grid = dict(thresholds=(0.3, 0.5), min_seeds=(4, 64), sigmas=(0.0, 1.0), merges=(0.0, 0.4, 0.7))
    best = tune_cells(p, gt, **grid)
    scores = {
        (t, m, s, j): cell_scores(p, gt, threshold=t, min_seed=m, sigma=s, merge=j)[
            "adapted_rand_error"
        ]
        for t, m, s, j in itertools.product(*grid.values())
    }
    first_best = min(scores, key=scores.get)  # min keeps the first of equal scores
    assert (best["threshold"], best["min_seed"], best["sigma"], best["merge"]) == first_best


def test_gt_cells_any_membrane_dtype():
    # membranes as 0/1 integers give the same cells as booleans (a bitwise NOT of integers would
    # make every pixel interior: one cell)
    m = np.zeros((32, 32), bool)
    m[:, 15:17] = True
    m[15:17, :] = True
    ref = gt_cells(m)
    assert ref.max() == 4
    for dtype in (np.uint8, np.int64, np.float32):
        np.testing.assert_array_equal(gt_cells(m.astype(dtype)), ref)
