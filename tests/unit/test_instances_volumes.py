"""Instance methods on volumes with exact ground truth: synthetic EM (boundaries / affinities from
the labels plus noise), the 2D->3D linking on the real gala FIB-SEM labels, and blockwise
processing (stitching equals the whole-volume result; an interrupted job resumes)."""

import numpy as np
import pytest
import tifffile
from conftest import shared_data
from skimage.measure import label as cc_label

from emfm.data.synthetic import synthetic_em
from emfm.data.volume import open_volume
from emfm.eval.metrics import region_scores
from emfm.instances import (
    BlockwiseJob,
    SegmentParams,
    affinities_from_labels,
    boundaries_from_labels,
    link_sections,
    segment,
)


@pytest.fixture(scope="module")
def syn():
    s = synthetic_em((24, 64, 64), seed=2, cell_size=24.0)
    rng = np.random.default_rng(0)
    b = np.clip(boundaries_from_labels(s.cells) + rng.normal(0, 0.1, s.cells.shape), 0, 1).astype(
        np.float32
    )
    a = np.clip(
        affinities_from_labels(s.cells) + rng.normal(0, 0.1, (6, *s.cells.shape)), 0, 1
    ).astype(np.float32)
    return s.cells, b, a


# Cells cut by the volume's faces can be too small to hold a seed or a fragment: they merge into
# a neighbour, hence small but non-zero errors.
@pytest.mark.parametrize(
    "method,source,max_are",
    [
        ("watershed", "boundary", 0.02),
        ("agglomeration", "boundary", 0.04),
        ("multicut", "boundary", 0.04),
        ("agglomeration", "affinities", 0.04),
        ("multicut", "affinities", 0.04),
        ("mws", "affinities", 0.02),
    ],
)
def test_methods_recover_synthetic_cells(syn, method, source, max_are):
    cells, b, a = syn
    lab = segment(b if source == "boundary" else a, SegmentParams(method=method))
    s = region_scores(lab, cells)
    assert s["adapted_rand_error"] < max_are, s
    assert lab.max() > 0.7 * cells.max()


def test_link2d_relinks_real_gala_labels():
    path = shared_data() / "gala_fibsem" / "test_labels.tif"
    if not path.exists():
        pytest.skip(f"needs the real EM of ../shared/data/em ({path} not found)")
    gt = tifffile.imread(path)[:, :64]  # real dense neuron labels, 50 sections
    # the objects as 3D-connected pieces: cropping cut some neurons into pieces no linking can join
    gt3d = cc_label(gt, connectivity=1)
    # every section numbered on its own
    per_section = np.stack([cc_label(z, connectivity=1) for z in gt])
    assert region_scores(per_section, gt3d)["adapted_rand_error"] > 0.5  # unlinked: badly split
    # exact sections: linking every pair over the level also joins branches (a neuron in two pieces)
    linked = link_sections(per_section, threshold=0.5, criterion="fraction", mutual_best=False)
    s = region_scores(linked, gt3d)
    assert s["adapted_rand_error"] < 1e-3 and s["voi_split"] < 0.01 and s["voi_merge"] < 1e-9, s
    # one-to-one links (the default, safe on predicted sections) never merge, but split the branches
    s1 = region_scores(link_sections(per_section, threshold=0.5), gt3d)
    assert s1["voi_merge"] < 1e-9 and 0.01 < s1["adapted_rand_error"] < 0.15, s1


def test_link2d_by_hand():
    # section 0: ids 1 | 2; section 1: one id over both halves (a branch) ; section 2: 5 inside the
    # left half
    sec = np.zeros((3, 2, 4), np.uint32)
    sec[0, :, :2], sec[0, :, 2:] = 1, 2
    sec[1] = 7
    sec[2, :, :2] = 5
    out = link_sections(sec, threshold=0.5, mutual_best=False)
    assert len(np.unique(out)) == 2  # everything linked; the empty right half of section 2 stays 0
    assert out[0, 0, 0] == out[0, 0, 3] == out[1, 0, 0] == out[2, 0, 0]
    # IoU is stricter: 1 vs 7 overlap 4 of union 8 = 0.5 passes, at 0.6 nothing links
    assert (
        len(np.unique(link_sections(sec, threshold=0.6, criterion="iou", mutual_best=False))) == 5
    )
    # one-to-one (the default): 7 ties between 1 and 2 and takes the first, so 2 stays on its own
    out = link_sections(sec, threshold=0.5)
    assert out[0, 0, 0] == out[1, 0, 0] == out[2, 0, 0] != out[0, 0, 3] and len(np.unique(out)) == 3


def test_link2d_straddling_fragment_does_not_chain():
    # two objects A (x 0-2) and B (x 3-5) through 3 sections; in section 1 the 2D step cut them into
    # A' (x 0-1), a fragment F (x 2-3) that straddles both, and B' (x 4-5)
    sec = np.zeros((3, 2, 6), np.uint32)
    sec[[0, 2], :, :3], sec[[0, 2], :, 3:] = 1, 2
    sec[1, :, :2], sec[1, :, 2:4], sec[1, :, 4:] = 1, 2, 3
    # F overlaps A and B by 2 of its 4 voxels (fraction 0.5 of the smaller): any-pair linking joins
    # all
    assert len(np.unique(link_sections(sec, threshold=0.5, mutual_best=False))) == 1
    # F is neither A's nor B's best overlap: it links nothing
    out = link_sections(sec, threshold=0.5)
    a, f, b = out[0, 0, 0], out[1, 0, 2], out[0, 0, 5]
    assert len({a, f, b}) == 3 and 0 not in (a, f, b)
    assert (
        (out[:, :, :2] == a).all()
        and (out[[0, 2], :, 2] == a).all()
        and (out[1, :, 2:4] == f).all()
    )
    assert (out[:, :, 4:] == b).all() and (out[[0, 2], :, 3] == b).all()


def _job(b, out, params, *, read=None, halo=(4, 12, 12), **kw) -> BlockwiseJob:
    """A blockwise job over the array `b` (or `read`) in blocks of 12 x 32 x 32."""
    read = read or (lambda box: b[box])
    return BlockwiseJob(read, b.shape, out, params, block=[12, 32, 32], halo=list(halo), **kw)


@pytest.mark.parametrize("method", ["watershed", "multicut"])
def test_blockwise_equals_whole_volume(syn, tmp_path, method):
    cells, b, _ = syn
    params = SegmentParams(method=method)
    whole = segment(b, params)
    # halo = block: each block sees the whole volume, so only the stitching can differ
    job = _job(b, tmp_path / "full.zarr", params, halo=[12, 32, 32])
    assert job.run()["blocks"] == 8
    out = open_volume(tmp_path / "full.zarr").read()
    s = region_scores(out, whole, ignore_gt=())
    assert s["voi_split"] < 1e-9 and s["voi_merge"] < 1e-9
    assert out.max() == len(np.unique(out)) - (0 in out)  # consecutive ids
    # a realistic halo: the same objects up to a few voxels
    job = _job(b, tmp_path / "halo.zarr", params)
    job.run()
    s = region_scores(open_volume(tmp_path / "halo.zarr").read(), whole, ignore_gt=())
    assert s["adapted_rand_error"] < 0.02, s


def test_blockwise_resumes_after_interruption(syn, tmp_path):
    _, b, _ = syn
    params = SegmentParams(method="watershed")
    calls = []

    def flaky(box):
        calls.append(box)
        if len(calls) == 4:
            raise KeyboardInterrupt  # killed while segmenting the 4th block
        return b[box]

    work = tmp_path / "work"
    with pytest.raises(KeyboardInterrupt):
        _job(b, tmp_path / "out.zarr", params, read=flaky, work_dir=work).run()
    assert len(list(work.glob("block_*.npz"))) == 3  # finished blocks are kept
    res = _job(b, tmp_path / "out.zarr", params, work_dir=work).run()
    assert res["segmented_now"] == 5
    ref = _job(b, tmp_path / "ref.zarr", params).run()
    assert ref["segments"] == res["segments"]
    np.testing.assert_array_equal(
        open_volume(tmp_path / "out.zarr").read(), open_volume(tmp_path / "ref.zarr").read()
    )
    # a different job must not reuse another job's blocks
    work.mkdir()
    _job(b, tmp_path / "x.zarr", params, work_dir=work)._prepare()
    with pytest.raises(ValueError, match="another job"):
        _job(b, tmp_path / "x.zarr", SegmentParams(method="multicut"), work_dir=work)._prepare()


def test_volume_reader_kinds_and_errors(tmp_path):
    from emfm.data.volume import VolumeError, write_array
    from emfm.instances.reader import volume_reader

    probs = np.zeros((2, 4, 6, 2), np.float32)  # z y x c: [interior, boundary]
    probs[..., 1] = 0.25
    probs[..., 0] = 0.75
    vol = open_volume(write_array(tmp_path / "p.zarr", probs).path)
    read, kind = volume_reader(vol, channel=1)
    box = (slice(0, 2), slice(1, 3), slice(0, 6))
    assert kind == "boundary" and read(box).shape == (2, 2, 6) and np.allclose(read(box), 0.25)
    read, _ = volume_reader(vol, channel=0, invert=True)  # an interior probability read as boundary
    assert np.allclose(read(box), 0.25)
    read, kind = volume_reader(vol, n_offsets=2)
    assert kind == "affinities" and read(box).shape == (2, 2, 2, 6)
    with pytest.raises(VolumeError, match="3 offsets"):
        volume_reader(vol, n_offsets=3)
    with pytest.raises(VolumeError, match="channel=K"):
        volume_reader(vol, kind="boundary")
    u8 = open_volume(write_array(tmp_path / "u.zarr", np.full((2, 4, 6), 255, np.uint8)).path)
    assert np.allclose(volume_reader(u8)[0](box), 1.0)  # integer probabilities scaled to [0, 1]


def test_instances_reads_what_predict_records(syn, tmp_path):
    """`emfm predict` output: z y x c with channel names / offsets in the attributes."""
    from emfm.data.volume import VolumeError, write_array
    from emfm.instances import instances

    cells, b, a = syn

    def run(name, method, out=None, **kw):  # one block: the whole volume
        out = str(tmp_path / (out or name.replace(".zarr", "_out.zarr")))
        params = SegmentParams(method=method, **kw)
        return instances(str(tmp_path / name), out, params, block=[24, 64, 64], halo=[0, 0, 0])

    two = np.stack([1 - b, b], axis=-1)
    write_array(
        tmp_path / "b.zarr", two, attributes={"channels": ["interior", "boundary"], "offsets": []}
    )
    res = run("b.zarr", "watershed")
    assert res["kind"] == "boundary"
    np.testing.assert_array_equal(
        open_volume(tmp_path / "b_out.zarr").read(), segment(b, SegmentParams(method="watershed"))
    )
    offsets = [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [-2, 0, 0], [0, -4, 0], [0, 0, -4]]
    affs = affinities_from_labels(cells, offsets)
    write_array(
        tmp_path / "a.zarr", np.moveaxis(affs, 0, -1).copy(), attributes={"offsets": offsets}
    )
    res = run("a.zarr", "mws")  # the recorded offsets replace the default ones
    assert res["kind"] == "affinities"
    # as in test_methods_recover_synthetic_cells: thin cell pieces at the faces may lack a mutex
    assert (
        region_scores(open_volume(tmp_path / "a_out.zarr").read(), cells)["adapted_rand_error"]
        < 0.02
    )
    with pytest.raises(VolumeError, match="offsets"):
        run("a.zarr", "mws", "x.zarr", offsets=((-1, 0, 0), (0, -1, 0), (0, 0, -1)))


def test_objects_on_a_background_and_per_section_default(tmp_path):
    from emfm.data.volume import write_array
    from emfm.instances.reader import from_attributes
    from emfm.instances.segment import SegmentParams, segment

    # two blobs (p = 0.9) on a background (p = 0.05): boundary = 1 - p
    p = np.full((2, 32, 32), 0.05, np.float32)
    p[:, 4:12, 4:12] = 0.9
    p[:, 20:28, 18:30] = 0.9
    plain = segment(1 - p, SegmentParams(method="watershed", min_seed=4))
    assert (plain > 0).all()  # without a background every voxel joins some basin
    lab = segment(1 - p, SegmentParams(method="watershed", min_seed=4, background=0.5))
    assert (lab[p < 0.5] == 0).all() and len(np.unique(lab[p > 0.5])) == 2
    # what emfm predict records decides both when left to auto (None)
    probs = np.stack([1 - p, p], -1)
    attrs = {"channels": ["background", "mito"], "instance_class": 1, "model_ndim": 2}
    auto = SegmentParams(method="watershed", two_d=None, background=None)
    for on_bg, want in ((True, 0.5), (False, 1.0)):
        v = write_array(tmp_path / f"p{on_bg}.zarr", probs, voxel_size=(8, 8, 8))
        v.attributes.update(attrs, objects_on_background=on_bg)
        channel, invert, params = from_attributes(v, "auto", None, False, auto)
        assert (channel, invert) == (1, True) and params.background == want and params.two_d
    # no record of the model: per section when z is >= 3x the in-plane voxel size
    v = write_array(tmp_path / "aniso.zarr", 1 - p, voxel_size=(40, 4, 4))
    assert from_attributes(v, "auto", None, False, auto)[2].two_d
    v = write_array(tmp_path / "iso.zarr", 1 - p, voxel_size=(8, 8, 8))
    assert not from_attributes(v, "auto", None, False, auto)[2].two_d
