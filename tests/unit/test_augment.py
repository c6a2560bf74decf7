"""Augmentation invariants: seeded, labels move with images, identity at zero strength, artefact
semantics."""

from __future__ import annotations

import numpy as np
import pytest

from emfm.data import augment, augment_ops


def _batch(seed=0, shape=(4, 3, 16, 16)):
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def test_geometric_moves_labels_with_images_and_is_seeded():
    x = _batch()
    lab = (x * 1000).astype(np.int32)
    a, la = augment_ops.geometric(np.random.default_rng(5), x, lab)
    np.testing.assert_array_equal((a * 1000).astype(np.int32), la)
    b, _ = augment_ops.geometric(np.random.default_rng(5), x, lab)
    np.testing.assert_array_equal(a, b)
    for i in range(4):  # a flip / rotation per example: the same values, rearranged
        np.testing.assert_array_equal(np.sort(a[i].ravel()), np.sort(x[i].ravel()))
    assert not np.array_equal(a, x)
    r, _ = augment_ops.geometric(
        np.random.default_rng(0), _batch(shape=(8, 1, 8, 12)), _batch(shape=(8, 1, 8, 12))
    )
    assert r.shape == (8, 1, 8, 12)  # non-square patches keep their shape


def test_intensity_seeded_and_per_example():
    x = _batch()
    a = augment_ops.intensity(np.random.default_rng(1), x)
    np.testing.assert_array_equal(a, augment_ops.intensity(np.random.default_rng(1), x))
    assert a.dtype == np.float32 and a.shape == x.shape
    same = augment_ops.intensity(
        np.random.default_rng(1), x, brightness=0, contrast=0, gamma=0, noise=0
    )
    np.testing.assert_allclose(same, x, atol=1e-6)


def test_gaussian_blur():
    x = _batch()
    np.testing.assert_allclose(augment_ops.gaussian_blur(np.random.default_rng(0), x, p=0.0), x)
    y = augment_ops.gaussian_blur(np.random.default_rng(0), x, sigma=(1.0, 2.0), p=1.0)
    assert y.shape == x.shape and y.dtype == np.float32
    assert (y.std(axis=(1, 2, 3)) < 0.6 * x.std(axis=(1, 2, 3))).all()  # noise is smoothed
    np.testing.assert_allclose(y.mean(), x.mean(), atol=0.01)
    c = np.full((2, 1, 9, 9), 0.3, np.float32)
    np.testing.assert_allclose(
        augment_ops.gaussian_blur(np.random.default_rng(0), c, p=1.0), c, atol=1e-6
    )
    d = np.zeros((1, 1, 9, 9), np.float32)
    d[0, 0, 4, 4] = 1  # an impulse becomes a symmetric, normalised blob
    k = augment_ops.gaussian_blur(np.random.default_rng(0), d, sigma=(1.0, 1.0), p=1.0)[0, 0]
    np.testing.assert_allclose(k, k.T, atol=1e-6)
    np.testing.assert_allclose(k, k[::-1, ::-1], atol=1e-6)
    np.testing.assert_allclose(k.sum(), 1.0, atol=1e-5)


def test_elastic_same_field_for_images_and_labels():
    x = _batch()
    lab = np.random.default_rng(3).integers(0, 5, x.shape).astype(np.uint16)
    a, la = augment_ops.elastic(np.random.default_rng(0), x, lab, strength=0.0)
    np.testing.assert_allclose(a, x, atol=1e-6)
    np.testing.assert_array_equal(la, lab)
    # a smooth ramp, warped as float (linear) and as integer (nearest) with the same field,
    # agrees to within the ramp's slope; labels keep their ids and dtype
    ramp = np.broadcast_to(
        np.arange(32, dtype=np.float32)[None, None, None, :] * 10, (3, 2, 24, 32)
    ).copy()
    ids = np.random.default_rng(3).integers(0, 5, ramp.shape).astype(np.uint16)
    a, la, lb = augment_ops.elastic(
        np.random.default_rng(1), ramp, ramp.astype(np.int64), ids, strength=3.0, p=1.0
    )
    assert np.abs(a - la).max() <= 5.0 + 1e-4 and np.abs(a - ramp).max() > 5
    assert la.dtype == np.int64 and lb.dtype == np.uint16 and set(np.unique(lb)) <= set(range(5))
    b = augment_ops.elastic(np.random.default_rng(1), ramp, strength=3.0, p=1.0)[0]
    np.testing.assert_array_equal(a, b)  # seeded
    assert np.all(a[:, 0] == a[:, 1])  # one field for every section of an example


def test_section_artefacts():
    x = _batch(shape=(6, 8, 16, 16))
    np.testing.assert_array_equal(
        augment_ops.sections(
            np.random.default_rng(0), x, p_missing=0, p_duplicate=0, p_shift=0, p_contrast=0
        ),
        x,
    )
    m = augment_ops.sections(
        np.random.default_rng(0), x, p_missing=1, p_duplicate=0, p_shift=0, p_contrast=0
    )
    assert (m == 0).all()
    d = augment_ops.sections(
        np.random.default_rng(0), x, p_missing=0, p_duplicate=1, p_shift=0, p_contrast=0
    )
    # every section but the first copies the one before
    np.testing.assert_array_equal(d[:, 1:], x[:, :-1])
    s = augment_ops.sections(
        np.random.default_rng(0),
        x,
        p_missing=0,
        p_duplicate=0,
        p_shift=1,
        max_shift=3,
        p_contrast=0,
    )
    # a shift keeps the interior of each section, displaced by at most 3 px
    for i in range(2):
        for k in range(8):
            assert any(
                np.array_equal(s[i, k, 3:-3, 3:-3], x[i, k, 3 - dy : 13 - dy, 3 - dx : 13 - dx])
                for dy in range(-3, 4)
                for dx in range(-3, 4)
            )
    c = augment_ops.sections(
        np.random.default_rng(0), x, p_missing=0, p_duplicate=0, p_shift=0, p_contrast=1
    )
    ratio = c.sum(axis=(2, 3)) / x.sum(axis=(2, 3))
    assert ratio.std() > 0.05 and (c >= 0).all() and (c <= 1).all()
    np.testing.assert_array_equal(
        augment_ops.sections(np.random.default_rng(4), x),
        augment_ops.sections(np.random.default_rng(4), x),
    )


def test_two_views():
    x = _batch()
    v1, v2 = augment.two_views(np.random.default_rng(0), x)
    assert v1.shape == v2.shape == x.shape and v1.dtype == np.float32
    assert not np.allclose(v1, v2)
    w1, w2 = augment.two_views(np.random.default_rng(0), x)
    np.testing.assert_array_equal(v1, w1)
    np.testing.assert_array_equal(v2, w2)


def test_per_example_ops_move_labels_and_reject_unknown_names():
    # a smooth ramp and its integer copy: after flips / rotations and one elastic field per example
    # (linear for the image, nearest for the labels) they still agree to within the ramp's slope
    ramp = (np.add.outer(np.arange(24), np.arange(24)) / 48.0).astype(np.float32)
    x = np.broadcast_to(ramp, (6, 2, 24, 24)).copy()
    lab = np.rint(x * 480).astype(np.int32)
    rngs = [np.random.default_rng([0, i]) for i in range(6)]
    img, la = augment.per_example(
        rngs, x, lab, ops=["elastic", "flip_rot"], p_elastic=1.0, elastic_strength=2.0
    )
    assert la.dtype == np.int32 and np.abs(img * 480 - la).max() <= 20 + 1e-3
    assert np.abs(img - x).max() > 0.05  # something moved
    again = augment.per_example(
        [np.random.default_rng([0, i]) for i in range(6)],
        x,
        lab,
        ops=["flip_rot", "elastic"],
        p_elastic=1.0,
        elastic_strength=2.0,
    )
    np.testing.assert_array_equal(again[0], img)  # order of the names does not matter; seeded
    np.testing.assert_allclose(augment.per_example(rngs, x, ops=[])[0], x, atol=1e-6)
    with pytest.raises(ValueError, match=r"unknown augmentation\(s\) \['rotate'\]"):
        augment.per_example(rngs, x, ops=["rotate"])
