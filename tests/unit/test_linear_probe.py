"""The main job's linear probe trained on random windows (`crop`) of its sections: the windows'
labels must line up with their features, at one pixel per token and at several."""

import numpy as np
import pytest

from emfm.errors import UserError
from emfm.eval.linear_probe import train_linear_probe


def _tokens(labels: np.ndarray, s: int) -> np.ndarray:
    """Features that carry each token's own `s x s` labels exactly (one channel per pixel of the
    token, +-1): a subpixel probe reads them back only where features and labels are aligned."""
    n, y, x = labels.shape
    t = (
        labels.reshape(n, y // s, s, x // s, s)
        .transpose(0, 1, 3, 2, 4)
        .reshape(n, y // s, x // s, -1)
    )
    return (2.0 * t - 1.0).astype(np.float32)


@pytest.mark.parametrize("stride", [1, 4])
def test_crop_windows_keep_features_and_labels_aligned(stride):
    rng = np.random.default_rng(0)
    # blobs of 8 x 8 pixels, so a shift of one token would scramble most labels
    labels = np.kron(rng.random((6, 8, 12)) > 0.6, np.ones((8, 8), bool)).astype(np.int32)
    feats = _tokens(labels, stride)
    for crop in (0, 32):
        lp = train_linear_probe(
            feats, labels, steps=150, lr=0.1, seed=0, upsample="subpixel", crop=crop
        )
        prob = lp.predict(feats, labels.shape[1:])
        assert (prob.argmax(-1) == labels).mean() > 0.99, (stride, crop)
        # confident too: labels shifted against their features would still give the right sign
        # (neighbouring pixels agree more often than not) but no confidence
        p_true = np.take_along_axis(prob, labels[..., None], -1)
        assert p_true.mean() > 0.9, (stride, crop, p_true.mean())


def test_crop_longer_than_a_section_takes_it_whole_and_bad_crops_are_named():
    labels = (np.arange(2 * 16 * 16).reshape(2, 16, 16) % 3 == 0).astype(np.int32)
    feats = _tokens(labels, 4)
    lp = train_linear_probe(feats, labels, steps=50, lr=0.1, upsample="subpixel", crop=64)
    assert (lp.predict(feats, (16, 16)).argmax(-1) == labels).mean() > 0.99
    with pytest.raises(UserError, match="crop=6: must be a multiple of the pixels per token"):
        train_linear_probe(feats, labels, steps=2, upsample="subpixel", crop=6)
    with pytest.raises(UserError, match="crop=-1"):
        train_linear_probe(feats, labels, steps=2, upsample="subpixel", crop=-1)


def test_crop_with_bilinear_logits_matches_whole_sections():
    """Bilinear logits on a window are the window of the whole section's logits up to its border
    pixels: both trainings learn the same blob map."""
    rng = np.random.default_rng(1)
    labels = np.kron(rng.random((6, 8, 12)) > 0.6, np.ones((8, 8), bool)).astype(np.int32)
    n, y, x = labels.shape
    feats = labels.reshape(n, y // 4, 4, x // 4, 4).mean((2, 4))[..., None].astype(np.float32)
    acc = []
    for crop in (0, 32):
        lp = train_linear_probe(feats, labels, steps=150, lr=0.1, upsample="bilinear", crop=crop)
        acc.append((lp.predict(feats, (y, x)).argmax(-1) == labels).mean())
    assert min(acc) > 0.9 and abs(acc[0] - acc[1]) < 0.02, acc


def _hypercolumn(rng, n, y, x, groups):
    """Features of `groups` [(channels, (ry, rx))]: each group random on its own coarse grid,
    nearest-upsampled to pixels (as a U-Net's level hypercolumn)."""
    parts = []
    for c, (ry, rx) in groups:
        g = rng.standard_normal((n, -(-y // ry), -(-x // rx), c)).astype(np.float32)
        parts.append(np.repeat(np.repeat(g, ry, 1), rx, 2)[:, :y, :x])
    return np.concatenate(parts, -1)


@pytest.mark.parametrize("crop", [0, 24])
def test_groups_read_on_their_own_grids_train_the_same_probe(crop):
    """The probe that reads each nearest-upsampled group on its own grid is the dense probe: same
    windows, same weights, same predictions (up to rounding), also where a window starts inside a
    coarse cell and where the sections are not a whole number of coarse cells (36 x 44, 8 x 8)."""
    rng = np.random.default_rng(2)
    groups = [(3, (1, 1)), (4, (2, 2)), (5, (8, 8)), (2, (1, 1))]
    feats = _hypercolumn(rng, 5, 36, 44, groups)
    w = rng.standard_normal(feats.shape[-1])
    labels = (feats @ w > 0.3).astype(np.int32)
    kw = dict(steps=40, lr=0.05, seed=3, upsample="subpixel", crop=crop)
    dense = train_linear_probe(feats, labels, **kw)
    pyr = train_linear_probe(feats, labels, groups=groups, **kw)
    assert np.abs(dense.w - pyr.w).max() < 2e-3 * np.abs(dense.w).max()
    p_d, p_p = (lp.predict(feats, labels.shape[1:])[..., 1] for lp in (dense, pyr))
    assert np.abs(p_d - p_p).max() < 2e-3
    assert ((p_p > 0.5) == labels).mean() > 0.9  # and it learnt the map
    with pytest.raises(UserError, match="groups .* hold 13 channels; the features have 14"):
        train_linear_probe(feats, labels, groups=groups[:-1] + [(1, (1, 1))], **kw)
