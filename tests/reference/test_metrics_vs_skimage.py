"""emfm's region metrics vs scikit-image on the real EM label volumes in shared/data/em.

skimage.metrics.adapted_rand_error(gt, pred) and variation_of_information(gt, pred) must agree
to 1e-9. The data live beside the repository (``<repo>/../shared/data/em``, also where CI puts
them) or where $EMFM_SHARED_DATA points; the module is skipped only when they are absent.
"""

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage
from skimage.metrics import adapted_rand_error as sk_are
from skimage.metrics import variation_of_information as sk_voi

from emfm.eval.metrics import ContingencyTable, region_scores


def _data_dir() -> Path:
    env = os.environ.get("EMFM_SHARED_DATA")
    if env:
        env = Path(env)
        return env / "em" if (env / "em").is_dir() else env
    return Path(__file__).resolve().parents[2].parent / "shared/data/em"


DATA = _data_dir()
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"EM data set not found at {DATA}")


def _isbi_instances(labels: np.ndarray) -> np.ndarray:
    """Cells = connected components of the 255 (non-membrane) region, per slice, unique ids."""
    out = np.zeros(labels.shape, np.uint32)
    offset = 0
    for z, sl in enumerate(labels):
        lab, n = ndimage.label(sl == 255)
        out[z] = np.where(lab > 0, lab + offset, 0)
        offset += n
    return out


@pytest.fixture(scope="module")
def pairs():
    """(name, pred, gt) pairs of real label volumes and realistic corruptions of them."""
    rng = np.random.default_rng(0)
    gala_train = tifffile.imread(DATA / "gala_fibsem/train_labels.tif")
    gala_test = tifffile.imread(DATA / "gala_fibsem/test_labels.tif")
    isbi = tifffile.imread(DATA / "isbi2012/train_labels.tif")[:12]
    isbi_gt = _isbi_instances(isbi)
    # A plausible prediction: membranes eroded (merges across thin gaps) and slightly shifted.
    thin = ndimage.binary_erosion(isbi == 0, np.ones((1, 2, 2), bool))
    isbi_pred = _isbi_instances(np.where(np.roll(thin, 1, axis=2), 0, 255))
    # Randomly relabelled gala ids, with some objects merged (id collisions) and one split.
    perm = rng.permutation(int(gala_train.max()) + 1) + 5
    merged = (perm[gala_train] % 60).astype(np.uint32)
    merged[:, :, 100:] += np.uint32(1000) * (merged[:, :, 100:] > 0).astype(np.uint32)
    return [
        ("gala test vs train", gala_test, gala_train),
        ("gala relabel/merge/split", merged, gala_train),
        ("gala swapped", gala_train, merged),
        ("isbi eroded+shifted", isbi_pred, isbi_gt),
    ]


def test_against_skimage(pairs):
    for name, pred, gt in pairs:
        ours = region_scores(pred, gt, ignore_gt=(0,))
        are, prec, rec = sk_are(gt, pred)
        assert ours["adapted_rand_error"] == pytest.approx(are, abs=1e-9), name
        assert ours["rand_recall"] == pytest.approx(prec, abs=1e-9), name
        assert ours["rand_precision"] == pytest.approx(rec, abs=1e-9), name
        split, merge = sk_voi(gt, pred, ignore_labels=(0,))
        assert (ours["voi_split"], ours["voi_merge"]) == pytest.approx((split, merge), abs=1e-9)
        everything = region_scores(pred, gt, ignore_gt=())
        split, merge = sk_voi(gt, pred)
        assert (everything["voi_split"], everything["voi_merge"]) == pytest.approx(
            (split, merge), abs=1e-9
        ), name


def test_random_relabelling_matches_skimage(pairs):
    rng = np.random.default_rng(1)
    _, pred, gt = pairs[3]
    # Shuffle every id (0 included: for the prediction it is just another segment).
    pred_r = rng.permutation(int(pred.max()) + 1)[pred]
    ours = region_scores(pred_r, gt)
    assert ours["adapted_rand_error"] == pytest.approx(sk_are(gt, pred_r)[0], abs=1e-9)
    assert ours["voi_split"] == pytest.approx(sk_voi(gt, pred_r, ignore_labels=(0,))[0], abs=1e-9)
    assert ours == pytest.approx(region_scores(pred, gt))


def test_blockwise_real_volume(pairs):
    _, pred, gt = pairs[0]
    table = ContingencyTable()
    for z in range(0, gt.shape[0], 7):
        table.add(pred[z : z + 7], gt[z : z + 7])
    assert table.scores() == pytest.approx(region_scores(pred, gt), abs=1e-12)
