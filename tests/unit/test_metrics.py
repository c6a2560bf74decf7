"""Metric values from their definitions on tiny hand-made cases, invariances, blockwise = whole.

Every expected number below is derived in the comment beside it, from the formula in the
docstring of the function under test.
"""

import json
import math

import numpy as np
import pytest
from scipy import ndimage

from emfm.errors import UserError
from emfm.eval.evaluate import evaluate_paths
from emfm.eval.metrics import (
    ContingencyTable,
    aggregated_jaccard_index,
    binary_scores,
    coco_average_precision,
    evaluate_volumes,
    instance_scores,
    match_instances,
    panoptic_quality,
    region_scores,
    semantic_scores,
    simple_points,
    thin_boundaries,
    warping_error,
)
from emfm.eval.metrics_topology import _RING2, _simple_3d, _yokoi_simple


def h(*p):
    """Entropy in bits of a distribution."""
    return -sum(x * math.log2(x) for x in p if x > 0)


# ============================================================================ region


def test_region_hand_case():
    gt = np.array([[1, 1, 2, 2]])
    pred = np.array([[1, 1, 1, 2]])
    # n_ij: (1,1)=2, (2,1)=1, (2,2)=1; gt sizes a=(2,2); pred sizes b=(3,1); N=4.
    s = region_scores(pred, gt, ignore_gt=())
    # P = sum n^2 - N = 2, A = sum a^2 - N = 4, B = sum b^2 - N = 6.
    assert s["adapted_rand_error"] == pytest.approx(1 - 2 / (0.5 * 4 + 0.5 * 6))
    assert s["rand_recall"] == pytest.approx(2 / 4)
    assert s["rand_precision"] == pytest.approx(2 / 6)
    # Of the 6 voxel pairs, (0,1), (0,3), (1,3) agree.
    assert s["rand_index"] == pytest.approx(3 / 6)
    # H(pred|gt): gt 2 (prob 1/2) is split half/half -> 1/2 bit. H(gt|pred): pred 1 (prob 3/4)
    # holds gt (2/3, 1/3).
    assert s["voi_split"] == pytest.approx(0.5)
    assert s["voi_merge"] == pytest.approx(0.75 * h(2 / 3, 1 / 3))
    # V^Rand with p = n/N: sum p^2 = 6/16, sum t^2 = 8/16 (gt), sum s^2 = 10/16 (pred).
    assert s["vrand_split"] == pytest.approx(6 / 8)
    assert s["vrand_merge"] == pytest.approx(6 / 10)
    assert s["vrand"] == pytest.approx(2 * 6 / (8 + 10))
    i = h(0.5, 0.5) + h(0.75, 0.25) - h(0.5, 0.25, 0.25)
    assert s["vinfo_split"] == pytest.approx(i / h(0.75, 0.25))
    assert s["vinfo_merge"] == pytest.approx(i / 1.0)
    assert s["vinfo"] == pytest.approx(2 * i / (1 + h(0.75, 0.25)))
    assert s["cremi_score"] == pytest.approx(math.sqrt((0.5 + 0.75 * h(2 / 3, 1 / 3)) * 0.6))


def test_region_ignore_labels():
    gt = np.array([[0, 0, 1, 1, 2, 2]])
    pred = np.array([[5, 7, 1, 1, 1, 2]])
    # Dropping gt == 0 voxels leaves the hand case above.
    s = region_scores(pred, gt, ignore_gt=(0,))
    assert s["num_voxels"] == 4
    assert s["adapted_rand_error"] == pytest.approx(0.6)
    # Also ignoring pred id 2 leaves 3 voxels: gt (1,1,2), pred all 1: no split, one merge.
    s2 = region_scores(pred, gt, ignore_gt=(0,), ignore_pred=(2,))
    assert s2["num_voxels"] == 3
    assert s2["voi_split"] == pytest.approx(0.0)
    assert s2["voi_merge"] == pytest.approx(h(2 / 3, 1 / 3))


def test_thin_boundaries_isbi_protocol():
    # Predicted cells 1 | 2 separated by a 2-px boundary of zeros; gt has no boundary there.
    pred = np.array([[1, 1, 0, 0, 2, 2]] * 3)
    gt = np.array([[1, 1, 1, 2, 2, 2]] * 3)
    thinned = thin_boundaries(pred)
    assert (thinned != 0).all() and set(np.unique(thinned)) == {1, 2}
    # Boundary absorbed into the segments: both gt cells are intact apart from one column.
    assert region_scores(thinned, gt)["vrand"] > region_scores(pred, gt)["vrand"]
    np.testing.assert_array_equal(thin_boundaries(pred, mask=np.zeros_like(pred, bool)), pred)


def _random_labels(rng, shape, n):
    seeds = rng.integers(0, n, size=shape)
    return ndimage.median_filter(seeds, size=3).astype(np.int64)


def test_region_perfect_relabel_and_swap():
    rng = np.random.default_rng(0)
    gt = _random_labels(rng, (6, 40, 50), 30)
    pred = _random_labels(rng, (6, 40, 50), 20)
    s = region_scores(gt, gt, ignore_gt=())
    assert s["adapted_rand_error"] == pytest.approx(0.0, abs=1e-12)
    assert s["voi"] == pytest.approx(0.0, abs=1e-12)
    for k in ("rand_index", "vrand", "vinfo"):
        assert s[k] == pytest.approx(1.0)
    # Relabelling ids (to huge uint64 ids, or a shuffled permutation) changes nothing.
    base = region_scores(pred, gt)
    perm = rng.permutation(2**20)
    big = np.uint64(2**63) + rng.permutation(64).astype(np.uint64) * np.uint64(2**40)
    assert region_scores(perm[pred], gt) == pytest.approx(base)
    gt_big = np.where(gt == 0, 0, big[gt % 64]).astype(np.uint64)
    gt_perm = np.where(gt == 0, 0, (gt % 64) + 1)  # same partition as gt_big
    assert region_scores(pred, gt_big) == pytest.approx(region_scores(pred, gt_perm))
    # Swapping pred and gt swaps split and merge (no ignored labels).
    a, b = region_scores(pred, gt, ignore_gt=()), region_scores(gt, pred, ignore_gt=())
    for split, merge in (
        ("voi_split", "voi_merge"),
        ("vrand_split", "vrand_merge"),
        ("vinfo_split", "vinfo_merge"),
        ("rand_recall", "rand_precision"),
    ):
        assert a[split] == pytest.approx(b[merge])
        assert a[merge] == pytest.approx(b[split])


def test_region_dtypes_and_errors():
    gt = np.array([[1, 1, 2, 2]], np.int8)
    ref = region_scores(np.array([[1, 1, 1, 2]]), gt, ignore_gt=())
    for dt in (np.int8, np.uint16, np.int32, np.uint64, np.bool_):
        pred = (
            np.array([[1, 1, 1, 0]]).astype(dt) if dt == np.bool_ else np.array([[1, 1, 1, 2]], dt)
        )
        assert region_scores(pred, gt, ignore_gt=()) == pytest.approx(ref)
    neg = region_scores(np.array([[-1, -1, -1, 3]]), np.array([[-5, -5, 2, 2]]), ignore_gt=())
    assert neg == pytest.approx(ref)
    with pytest.raises(ValueError, match="pred must hold integer"):
        region_scores(np.zeros((2, 2), np.float32), np.zeros((2, 2), int))
    with pytest.raises(ValueError, match="shape"):
        region_scores(np.zeros((2, 2), int), np.zeros((2, 3), int))


@pytest.mark.parametrize("scale", [1, 2**28, 2**40, -(2**58)])
def test_region_id_ranges(scale):
    """Small, 32-bit, 40-bit and negative 63-bit id ranges take different packing paths."""
    rng = np.random.default_rng(6)
    gt = _random_labels(rng, (3, 30, 40), 25)
    pred = _random_labels(rng, (3, 30, 40), 15)
    ref = region_scores(pred, gt, ignore_gt=())
    assert region_scores(pred * scale + 7, gt * scale - 3, ignore_gt=()) == pytest.approx(ref)
    t = ContingencyTable.from_arrays(pred * scale, gt)
    np.testing.assert_array_equal(np.unique(t.pred_ids), np.unique(pred * scale))


def test_blockwise_equals_whole():
    rng = np.random.default_rng(1)
    gt = _random_labels(rng, (9, 30, 40), 25)
    pred = _random_labels(rng, (9, 30, 40), 15)
    whole = ContingencyTable.from_arrays(pred, gt)
    blocks = ContingencyTable()
    for z in (4, 0, 7, 2):  # any order, uneven blocks
        zs = slice(z, {4: 7, 0: 2, 7: 9, 2: 4}[z])
        blocks.add(pred[zs], gt[zs])
    for name in ("gt_ids", "pred_ids", "counts"):
        np.testing.assert_array_equal(getattr(blocks, name), getattr(whole, name))
    halves = ContingencyTable().add(pred[:5], gt[:5])
    halves.merge(ContingencyTable().add(pred[5:], gt[5:]))
    assert halves.scores() == pytest.approx(whole.scores())
    # Non-contiguous views count the same.
    t = ContingencyTable.from_arrays(pred[:, :, ::-1], gt[:, :, ::-1])
    assert t.scores() == pytest.approx(whole.scores())
    lazy = evaluate_volumes(pred, gt, ("region", "instance"), block_z=2)
    full = evaluate_volumes(pred, gt, ("region", "instance"))
    assert lazy["region"] == pytest.approx(full["region"])
    assert lazy["instance"]["ap_dsb"] == pytest.approx(full["instance"]["ap_dsb"])


# ============================================================================ semantic


def test_semantic_hand_case():
    gt = np.array([[0, 0, 1, 1, 2, 3]])
    pred = np.array([[0, 1, 1, 1, 2, 3]])
    s = semantic_scores(pred, gt, num_classes=3, ignore_index=3)
    # Class 0: TP 1, FN 1. Class 1: TP 2, FP 1. Class 2: TP 1. Five scored voxels, one wrong.
    assert s["pixel_error"] == pytest.approx(1 / 5)
    assert s["per_class_iou"] == pytest.approx([1 / 2, 2 / 3, 1.0])
    assert s["per_class_dice"] == pytest.approx([2 / 3, 4 / 5, 1.0])
    assert s["per_class_precision"] == pytest.approx([1.0, 2 / 3, 1.0])
    assert s["per_class_recall"] == pytest.approx([1 / 2, 1.0, 1.0])
    assert s["mean_iou"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    # A class absent from both is undefined and left out of the mean.
    s4 = semantic_scores(pred, gt, num_classes=5, ignore_index=3)
    assert s4["per_class_iou"][4] is None and s4["mean_iou"] == pytest.approx(s["mean_iou"])
    with pytest.raises(ValueError, match="outside"):
        semantic_scores(pred, gt, num_classes=3)


def test_binary_hand_case():
    gt = np.array([1, 1, 1, 0, 0, 0, 0, 0], bool)
    pred = np.array([1, 1, 0, 1, 0, 0, 0, 0], bool)
    s = binary_scores(pred, gt)  # TP 2, FP 1, FN 1, N 8
    assert (s["f1"], s["iou"]) == pytest.approx((4 / 6, 2 / 4))
    assert (s["precision"], s["recall"], s["pixel_error"]) == pytest.approx((2 / 3, 2 / 3, 2 / 8))
    assert binary_scores(np.zeros(4), np.zeros(4))["f1"] == 1.0


# ============================================================================ instance


def _row(*segments, n=40):
    """1 x n label image: segments are (id, start, stop)."""
    a = np.zeros((1, n), np.int32)
    for i, s, e in segments:
        a[0, s:e] = i
    return a


def test_instance_hungarian_beats_greedy():
    # gt A = [0,10), B = [10,20). pred X = A[0:5] + B[0:4] (9 px), Y = A[5:8] (3 px).
    gt = _row((1, 0, 10), (2, 10, 20))
    pred = _row((7, 0, 5), (7, 10, 14), (8, 5, 8))
    # IoU(X,A) = 5/14, IoU(X,B) = 4/15, IoU(Y,A) = 3/10. At t = 0.25 greedy-by-IoU takes X-A and
    # finds nothing else; the optimum matches X-B and Y-A.
    m = match_instances(pred, gt, threshold=0.25)
    assert sorted(zip(m["gt_ids"].tolist(), m["pred_ids"].tolist())) == [(1, 8), (2, 7)]
    assert sorted(m["iou"]) == pytest.approx([4 / 15, 3 / 10])
    # At t = 0.3 only A has candidates; the larger IoU wins the tie in cardinality.
    m = match_instances(pred, gt, threshold=0.3)
    assert m["gt_ids"].tolist() == [1] and m["pred_ids"].tolist() == [7]
    s = instance_scores(pred, gt, thresholds=(0.25, 0.3))
    assert s["per_threshold"][0.25]["tp"] == 2 and s["per_threshold"][0.3]["tp"] == 1
    assert s["ap_dsb"] == pytest.approx((1.0 + 1 / 3) / 2)  # TP/(TP+FP+FN) = 2/2, 1/3


def test_instance_pq_aji_ap_hand_case():
    # gt A = [0,10), B = [20,30); pred P = [0,8) + [10,12) (IoU with A 8/12), Q = [35,38).
    gt = _row((1, 0, 10), (2, 20, 30))
    pred = _row((5, 0, 8), (5, 10, 12), (6, 35, 38))
    pq = panoptic_quality(pred, gt)
    # TP 1 (IoU 2/3), FP 1 (Q), FN 1 (B): SQ 2/3, RQ 1/(1 + 1/2 + 1/2).
    assert (pq["sq"], pq["rq"], pq["pq"]) == pytest.approx((2 / 3, 1 / 2, 1 / 3))
    # AJI: A->P adds C 8, U 12; B has no overlap: U += 10; Q unused: U += 3.
    assert aggregated_jaccard_index(pred, gt) == pytest.approx(8 / 25)
    s = instance_scores(pred, gt)
    assert s["f1@0.5"] == pytest.approx(1 / 2) and s["ap_dsb@0.5"] == pytest.approx(1 / 3)
    # 2/3 >= t for t in 0.50..0.65 (4 thresholds): AP_dsb 1/3 there, 0 at the 6 others.
    assert s["ap_dsb"] == pytest.approx(4 / 3 / 10)
    # COCO at 0.5, preds in id order (P: TP, Q: FP): P(r) = 1 up to recall 1/2, so 51 of the
    # 101 recall points have precision 1.
    coco = coco_average_precision(pred, gt, thresholds=(0.5,))
    assert coco["ap_coco"] == pytest.approx(51 / 101)
    # Giving Q the higher confidence ranks the FP first: precision 1/2 up to recall 1/2.
    coco = coco_average_precision(pred, gt, thresholds=(0.5,), pred_scores={5: 0.1, 6: 0.9})
    assert coco["ap_coco"] == pytest.approx(51 / 101 / 2)


def test_instance_perfect_and_3d():
    rng = np.random.default_rng(2)
    gt = ndimage.label(rng.random((8, 24, 24)) > 0.6)[0]
    s = instance_scores(gt, gt)
    for k in ("ap_dsb", "ap_coco", "pq", "sq", "rq", "aji", "f1@0.5"):
        assert s[k] == pytest.approx(1.0), k
    relabel = np.where(gt > 0, gt * 7 + 1000, 0)
    assert instance_scores(relabel, gt)["ap_dsb"] == pytest.approx(1.0)
    empty = instance_scores(np.zeros_like(gt), gt)
    assert empty["ap_dsb"] == 0.0 and empty["n_pred"] == 0 and empty["aji"] == 0.0


# ============================================================================ topology


def _ref_T(nb, conn):
    """Topological number straight from its definition, with scipy.ndimage.label (2D or 3D)."""
    nb = nb.copy()
    c = (1,) * nb.ndim
    nb[c] = False
    dist = np.abs(np.indices(nb.shape) - 1).sum(0)
    if conn in (4, 6):
        if nb.ndim == 3:
            nb &= dist <= 2  # N18
        lab, _ = ndimage.label(nb, ndimage.generate_binary_structure(nb.ndim, 1))
        return len(set(lab[dist == 1].tolist()) - {0})
    return ndimage.label(nb, ndimage.generate_binary_structure(nb.ndim, nb.ndim))[1]


def _ref_simple(nb, fg, bg):
    return _ref_T(nb, fg) == 1 and _ref_T(~nb, bg) == 1


@pytest.mark.parametrize("conn", [(4, 8), (8, 4)])
def test_simple_points_2d_all_configurations(conn):
    for bits in range(256):
        ring = np.array([(bits >> k) & 1 for k in range(8)], bool)
        nb = np.zeros((3, 3), bool)
        for (dy, dx), v in zip(_RING2, ring):
            nb[1 + dy, 1 + dx] = v
        assert _yokoi_simple(ring[None], conn[0])[0] == _ref_simple(nb, *conn), bits


@pytest.mark.parametrize("conn", [(6, 26), (26, 6)])
def test_simple_points_3d_random_configurations(conn):
    rng = np.random.default_rng(3)
    cubes = rng.random((600, 27)) < rng.random((600, 1))
    got = _simple_3d(cubes, conn)
    ref = [_ref_simple(c.reshape(3, 3, 3), *conn) for c in cubes]
    np.testing.assert_array_equal(got, ref)


def test_simple_points_hand_cases():
    merge = np.zeros((3, 5), bool)
    merge[1, 1] = merge[1, 3] = True  # adding (1, 2) would join two objects
    hole = np.ones((5, 5), bool)
    hole[2, 2] = False  # filling (2, 2) removes a hole; a solid block's centre too
    end = np.zeros((3, 5), bool)
    end[1, 1:4] = True  # removing an end of a line changes nothing
    assert not simple_points(merge)[1, 2]
    assert not simple_points(hole)[2, 2]
    assert simple_points(end)[1, 3] and not simple_points(end)[1, 2]
    cube = np.zeros((3, 3, 3), bool)
    cube[0, 1, 1] = cube[2, 1, 1] = True  # joins two voxels along z
    assert not simple_points(cube)[1, 1, 1]
    assert not simple_points(np.ones((3, 3, 3), bool))[1, 1, 1]  # would open a cavity
    plate = np.zeros((3, 5, 5), bool)
    plate[0] = True  # a voxel added on top of a flat plate
    assert simple_points(plate)[1, 2, 2]


def test_warping_error_hand_cases():
    gt = np.zeros((32, 32), bool)
    gt[8:20, 8:20] = True
    shifted = np.roll(gt, (1, 2), axis=(0, 1))
    # A pure boundary displacement is a warp: no topological error, though pixels differ.
    assert warping_error(shifted, gt) == 0.0 and warping_error(shifted, gt, warp="pred") == 0.0
    # A 1-px cut splits the object: the warped gt keeps one connecting pixel.
    split = gt.copy()
    split[8:20, 13] = False
    assert warping_error(split, gt) * gt.size == 1
    # Warping the prediction instead: every cut pixel touches both halves, so adding any of them
    # merges two objects; none is simple and all 12 stay wrong.
    assert warping_error(split, gt, warp="pred") * gt.size == 12
    # A 1-px hole cannot be warped away.
    holed = gt.copy()
    holed[14, 14] = False
    assert warping_error(holed, gt) * gt.size == 1
    # Probability maps: thresholded at 0.5, flips ordered by confidence; same answer here.
    assert warping_error(holed * 0.9 + 0.05, gt) * gt.size == 1
    # 3D: shifted cube is fine, a cavity is one error voxel.
    gt3 = np.zeros((12, 12, 12), bool)
    gt3[3:9, 3:9, 3:9] = True
    assert warping_error(np.roll(gt3, 1, axis=0), gt3) == 0.0
    cav = gt3.copy()
    cav[5, 5, 5] = False
    assert warping_error(cav, gt3) * gt3.size == 1
    with pytest.raises(ValueError, match="connectivity"):
        warping_error(shifted, gt, connectivity=(6, 26))


def test_warping_error_preserves_topology_on_noise():
    rng = np.random.default_rng(4)
    gt = ndimage.gaussian_filter(rng.random((96, 96)), 3) > 0.5
    prob = ndimage.gaussian_filter(rng.random((96, 96)), 2)
    prob = (prob - prob.min()) / np.ptp(prob)
    err, warped = warping_error(prob, gt, return_warped=True)
    s4, s8 = ndimage.generate_binary_structure(2, 1), ndimage.generate_binary_structure(2, 2)
    # Warped gt has the gt's objects (4-conn) and background components (8-conn, outside = bg).
    assert ndimage.label(warped, s4)[1] == ndimage.label(gt, s4)[1]
    assert (
        ndimage.label(np.pad(~warped, 1, constant_values=True), s8)[1]
        == ndimage.label(np.pad(~gt, 1, constant_values=True), s8)[1]
    )
    assert 0 <= err <= np.mean((prob > 0.5) != gt)


# ============================================================================ files


def test_evaluate_paths_tiff_zarr_and_errors(tmp_path):
    import tensorstore as ts
    import tifffile

    rng = np.random.default_rng(5)
    gt = _random_labels(rng, (5, 20, 30), 12).astype(np.uint32)
    pred = _random_labels(rng, (5, 20, 30), 9).astype(np.uint16)
    tifffile.imwrite(tmp_path / "gt.tif", gt, compression="zlib")
    for driver, meta in (
        (
            "zarr3",
            {
                "shape": list(pred.shape),
                "data_type": "uint16",
                "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [2, 8, 8]}},
            },
        ),
        ("zarr", {"shape": list(pred.shape), "dtype": "<u2", "chunks": [2, 8, 8]}),
        (
            "n5",  # as N5 tools store it: dimensions x, y, z (emfm reads it as z, y, x)
            {
                "dimensions": list(pred.shape[::-1]),
                "dataType": "uint16",
                "blockSize": [8, 8, 2],
                "compression": {"type": "raw"},
            },
        ),
    ):
        path = tmp_path / f"pred_{driver}"
        spec = {
            "driver": driver,
            "kvstore": {"driver": "file", "path": str(path)},
            "metadata": meta,
            "create": True,
        }
        ts.open(spec).result().write(pred.T if driver == "n5" else pred).result()
        res = evaluate_paths(path, tmp_path / "gt.tif", tmp_path / driver, block_z=2)
        want = region_scores(pred, gt)
        assert res["metrics"]["region"] == pytest.approx(want)
        assert json.loads((tmp_path / driver / "metrics.json").read_text()) == res
        assert "| adapted_rand_error |" in (tmp_path / driver / "metrics.md").read_text()

    with pytest.raises(FileNotFoundError, match="pred path does not exist"):
        evaluate_paths(tmp_path / "nope.tif", tmp_path / "gt.tif", tmp_path / "o")
    tifffile.imwrite(tmp_path / "small.tif", gt[:4], photometric="minisblack")
    with pytest.raises(ValueError, match="shape mismatch.*small.tif"):
        evaluate_paths(tmp_path / "small.tif", tmp_path / "gt.tif", tmp_path / "o")
    tifffile.imwrite(tmp_path / "prob.tif", gt.astype(np.float32))
    with pytest.raises(ValueError, match="pred .*prob.tif has dtype float32"):
        evaluate_paths(tmp_path / "prob.tif", tmp_path / "gt.tif", tmp_path / "o")


def test_edge_cases_of_dtype_and_rounding():
    # a float probability map is thresholded (> 0.5) for "binary" as for "warping", not read
    # as non-zero: this map is perfect at 0.5 (inside 0.9, outside 0.3)
    gt = np.zeros((16, 16), np.uint8)
    gt[2:14, 2:14] = 1
    prob = np.where(gt > 0, 0.9, 0.3).astype(np.float32)
    out = evaluate_volumes(prob, gt, ("binary", "warping"))
    assert out["binary"]["f1"] == 1.0 and out["binary"]["pixel_error"] == 0.0
    assert out["warping"]["warping_error"] == 0.0
    # uint64 class maps: 2 of 8 pixels differ
    g = np.array([[0, 0, 1, 1], [0, 2, 2, 1]])
    p = np.array([[0, 1, 1, 1], [0, 2, 2, 2]])
    assert semantic_scores(p.astype(np.uint64), g.astype(np.uint64), 3)["pixel_error"] == 0.25
    # same size, different shape: misaligned pixels must not be scored
    with pytest.raises(UserError, match="shape"):
        semantic_scores(np.zeros((4, 4), int), np.zeros((16,), int), 2)
    # an ignored id the dtype cannot hold occurs nowhere: ignoring it changes nothing
    u, v = p.astype(np.uint64), g.astype(np.uint64)
    assert region_scores(u, v, ignore_gt=(-1,)) == region_scores(u, v, ignore_gt=())
    # one segment on both sides: every entropy is 0, so Vinfo and its parts are 0/0 = 1; the
    # difference form log2 N - sum c log2 c / N leaves about 1e-16 for some N (10, 48, 89, ...)
    for n in range(2, 100):
        one = np.ones((n,), int)
        s = region_scores(one, one, ignore_gt=())
        assert s["vinfo"] == s["vinfo_split"] == s["vinfo_merge"] == 1.0, n
    a = np.ones((2, 5), int)
    two = a.copy()
    two[0] = 2
    assert region_scores(a, two, ignore_gt=())["vinfo_split"] == 1.0  # one pred segment: no split
