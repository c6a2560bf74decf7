"""Segmentation targets, losses, matching and blockwise blending, on exact ground truth (synthetic
EM)."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from emfm.data.synthetic import synthetic_em
from emfm.data.volume import VolumeError, open_volume, write_array
from emfm.export.windows import Blender, blend_weights, ramp
from emfm.finetune import losses, regimes, targets
from emfm.finetune.predict import predict_volume


def task(**kw):
    base = dict(
        kind="semantic",
        num_classes=2,
        label_type="instances",
        class_values=[],
        instance_class=1,
        ignore_label=-1,
        distance=False,
        offsets=[[0, -1, 0], [0, 0, -1]],
        sigma=2.0,
    )
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.fixture(scope="module")
def em2d():
    return synthetic_em((96, 96), seed=3, membrane_width=2)


def test_boundaries_equal_the_generators_membranes(em2d):
    b = targets.boundaries(em2d.cells[None, None].astype(np.int64), 2)[0, 0]
    np.testing.assert_array_equal(b, em2d.membranes)


def test_affinities_2d_and_3d_follow_the_ids_and_mask_the_border():
    em = synthetic_em((6, 40, 40), seed=1, spacing=(4, 1, 1))
    lab = em.cells[None].astype(np.int64)
    offs = [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [0, -5, 0], [0, 0, 7]]
    aff, mask = targets.affinities(lab, np.zeros(lab.shape, bool), offs, 3)
    c = em.cells
    np.testing.assert_array_equal(aff[0, 1:, :, :, 0], c[1:] == c[:-1])
    np.testing.assert_array_equal(aff[0, :, 5:, :, 3], c[:, 5:] == c[:, :-5])
    np.testing.assert_array_equal(aff[0, :, :, :-7, 4], c[:, :, :-7] == c[:, :, 7:])
    assert not mask[0, 0, :, :, 0].any() and mask[0, 1:, :, :, 0].all()  # v + o outside the patch
    assert not mask[0, :, :, -7:, 4].any()
    # a voxel with a cut in-plane nearest-neighbour affinity lies on a boundary
    a2, m2 = targets.affinities(
        lab, np.zeros(lab.shape, bool), [[0, -1, 0], [0, 0, -1], [0, 1, 0], [0, 0, 1]], 3
    )
    cut = ((a2 == 0) & (m2 > 0)).any(-1)[0]
    b = targets.boundaries(lab, 3)  # 3x3x3 box
    assert (cut <= b[0]).all()
    # background never has affinity; ignored voxels are masked on both ends
    lab0 = lab.copy()
    lab0[0, :, :10] = 0
    ign = np.zeros(lab.shape, bool)
    ign[0, :, 20] = True
    aff0, m0 = targets.affinities(lab0, ign, [[0, -1, 0]], 3)
    assert not aff0[0, :, :10, :, 0].any()
    assert not m0[0, :, 20, :, 0].any() and not m0[0, :, 21, :, 0].any()


def test_centre_targets_regroup_the_organelles_exactly():
    em = synthetic_em((128, 128), seed=5, n_organelles=12, organelle_radius=(4.0, 7.0))
    org = em.organelles.astype(np.int64)
    assert org.max() >= 3
    t = targets.make_targets(org[None, None], task(kind="center", sigma=2.0), 2)
    heat, off = t["regress"][0, 0, ..., 0], t["regress"][0, 0, ..., 1:]
    fg = org > 0
    # every foreground pixel points at its instance's centre of mass
    from scipy import ndimage

    ids = np.arange(1, org.max() + 1)
    com = np.asarray(ndimage.center_of_mass(np.ones(org.shape), org, ids))
    coords = np.stack(np.nonzero(fg), -1)
    np.testing.assert_allclose(coords + off[fg], com[org[fg] - 1], atol=1e-4)
    assert (
        heat.max() == pytest.approx(1.0) and (heat[tuple(np.rint(com).astype(int).T)] > 0.99).all()
    )
    np.testing.assert_array_equal(t["classes"][0, 0], fg.astype(np.int32))
    # Panoptic-DeepLab grouping of the exact targets gives back the instances
    inst = targets.group_centers(fg, heat, off, threshold=0.5, min_distance=2)
    from emfm.eval.metrics_instance import match_instances

    m = match_instances(inst, org, threshold=0.9)
    assert len(m["iou"]) == m["n_gt"] == m["n_pred"]


def test_boundary_distance_and_component_instances(em2d):
    raw = (~em2d.membranes).astype(np.uint8)[None, None]  # class 1 = interior, 0 = membrane
    t = targets.make_targets(
        raw, task(kind="boundary", label_type="classes", instance_class=1, distance=True), 2
    )
    d = t["regress"][0, 0, ..., 0]
    lab, _ = targets.instances(raw, task(label_type="classes", instance_class=1), 2)
    # connected interiors: each lies in exactly one cell (cells thinner than a membrane vanish)
    pairs = np.unique(np.stack([lab[0, 0][lab[0, 0] > 0], em2d.cells[lab[0, 0] > 0]]), axis=1)
    assert len(pairs[0]) == len(np.unique(pairs[0])) == lab.max() >= em2d.n_cells - 3
    inner = lab[0, 0] > 0
    from scipy import ndimage

    mx = ndimage.maximum(d, lab[0, 0], index=np.arange(1, lab.max() + 1))
    np.testing.assert_allclose(mx, 1.0)
    assert (d[t["classes"][0, 0] == 1] == 0).all() and (d[inner] >= 0).all()


def test_class_values_and_ignore_label():
    raw = np.array([[255, 0, 7, 9]], np.uint8)
    out = targets.to_classes(raw, task(label_type="classes", class_values=[255, 0], ignore_label=9))
    np.testing.assert_array_equal(out, [[0, 1, -1, -1]])


def test_losses_known_values_and_ignore_mask():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(-1, 3, (2, 8, 8)), jnp.int32)
    w = losses.class_weight_map(labels, 3)
    ce = losses.cross_entropy(logits, labels, w)
    valid = np.asarray(labels) >= 0
    ref = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))[
        valid
    ].mean()
    assert float(ce) == pytest.approx(float(ref), rel=1e-5)
    assert float(losses.focal(logits, labels, w, gamma=0.0)) == pytest.approx(float(ce), rel=1e-5)
    assert float(losses.focal(logits, labels, w, gamma=2.0)) < float(ce)
    # ignored voxels do not matter, whatever the logits there
    l2 = logits.at[~valid].set(100.0)
    assert float(losses.cross_entropy(l2, labels, w)) == pytest.approx(float(ce), rel=1e-5)
    # class weights: a weight-2 class counts twice
    cw = losses.class_weight_map(labels, 3, [1.0, 2.0, 1.0])
    assert np.asarray(cw)[np.asarray(labels) == 1].min() == 2.0
    # balanced weights average to 1 over valid voxels
    bw = np.asarray(losses.class_weight_map(labels, 3, balance=True))
    assert bw[valid].mean() == pytest.approx(1.0, rel=1e-5) and (bw[~valid] == 0).all()
    # Dice: perfect prediction -> 0, complementary -> 1
    onehot = jax.nn.one_hot(jnp.array([[0, 1], [1, 0]]), 2)
    assert float(losses.soft_dice(onehot, onehot, jnp.ones((2, 2)))) == pytest.approx(0.0, abs=1e-6)
    assert float(losses.soft_dice(1 - onehot, onehot, jnp.ones((2, 2)))) == pytest.approx(
        1.0, abs=1e-6
    )


def test_task_loss_for_every_kind_is_finite_and_lower_for_the_truth():
    lab = synthetic_em(
        (32, 32), seed=2, n_organelles=4, organelle_radius=(3.0, 5.0)
    ).organelles.astype(np.int64)
    cfg = SimpleNamespace(
        terms=["ce", "dice"],
        weights=[],
        class_weights=[],
        balance=False,
        focal_gamma=2.0,
        aux_weight=1.0,
    )
    for t in (task(kind="boundary", distance=True), task(kind="affinity"), task(kind="center")):
        tg = targets.make_targets(lab[None, None], t, 2)
        tg = {k: jnp.asarray(v[:, 0]) for k, v in tg.items()}
        lay = targets.layout(t, 2)
        parts = []
        if lay.classes:
            parts.append(20.0 * (jax.nn.one_hot(jnp.maximum(tg["classes"], 0), lay.classes) - 0.5))
        if lay.sigmoid:
            parts.append(20.0 * (tg["sigmoid"] - 0.5))
        if lay.regress:
            r = tg["regress"]
            parts.append(
                jnp.log(
                    jnp.clip(r[..., :1], 1e-4, 1 - 1e-4)
                    / (1 - jnp.clip(r[..., :1], 1e-4, 1 - 1e-4))
                )
            )
            parts.append(r[..., 1:])
        good = jnp.concatenate(parts, -1)
        assert good.shape[-1] == lay.channels
        # one program, not op by op
        f = jax.jit(lambda o, tg, lay=lay: losses.task_loss(o, tg, lay, cfg)[0])
        lg, lb = f(good, tg), f(jnp.zeros_like(good), tg)
        assert np.isfinite(float(lg)) and float(lg) < 0.1 < float(lb), t.kind


def test_hungarian_matching_recovers_a_permutation():
    labels = np.random.default_rng(0).integers(0, 3, (20, 20))
    clusters = np.array([2, 0, 1])[labels]
    mapping = regimes.hungarian_match(clusters, labels, 3)
    np.testing.assert_array_equal(mapping[clusters], labels)


def test_freeze_patterns_and_photometric_views():
    r = SimpleNamespace(encoder="partial", frozen_blocks=2)
    pats = regimes.freeze_patterns(r, unet=False)
    import re

    assert any(re.search(p, "encoder/blocks/1/attn/qkv/kernel") for p in pats)
    assert not any(re.search(p, "encoder/blocks/2/attn/qkv/kernel") for p in pats)
    assert not any(re.search(p, "head/out/kernel") for p in pats)
    x = jnp.full((2, 16, 16, 1), 0.5)
    v = jax.jit(lambda k, x: regimes.photometric(k, x, strength=1.0))(jax.random.PRNGKey(0), x)
    assert v.shape == x.shape and float(jnp.abs(v - x).mean()) > 0


# ----------------------------------------------------------------------------- blockwise prediction


def test_cosine_ramps_sum_to_one_where_windows_meet():
    w, o = 32, 8
    r = ramp(w, o, "cosine")
    np.testing.assert_allclose(r[w - o :] + r[:o], 1.0, atol=1e-6)
    assert blend_weights([1, w, w], [0, o, o], "gaussian").shape == (1, w, w)


def test_blending_is_exact_for_identity_and_removes_seams():
    img = np.random.default_rng(0).random((2, 100, 90)).astype(np.float32)
    ident = lambda x: x[..., None]  # noqa: E731
    bl = Blender(ident, 1, img.shape, window=[1, 32, 32], overlap=[0, 8, 8])
    out = bl.chunk(lambda b: img[b], tuple(slice(0, n) for n in img.shape))
    np.testing.assert_allclose(out[..., 0], img, atol=1e-6)
    # a predictor that is off by a different constant in every window: constant blending shows
    # jumps at window borders, cosine blending spreads them over the overlap
    flat = np.zeros((1, 96, 96), np.float32)
    state = {"i": 0}

    def biased(x):
        out = []
        for xi in x:
            state["i"] += 1
            out.append(xi[..., None] + (state["i"] * 7919 % 11) / 10.0)
        return np.stack(out)

    jumps = {}
    for kind in ("constant", "cosine"):
        state["i"] = 0
        b = Blender(
            biased, 1, flat.shape, window=[1, 32, 32], overlap=[0, 8, 8], blend=kind, batch_size=64
        )
        o = b.chunk(lambda s: flat[s], tuple(slice(0, n) for n in flat.shape))[0, ..., 0]
        jumps[kind] = max(np.abs(np.diff(o, axis=0)).max(), np.abs(np.diff(o, axis=1)).max())
    assert jumps["cosine"] < 0.5 * jumps["constant"]


def test_predict_volume_chunking_invariant_and_resumes(tmp_path):
    img = (np.random.default_rng(1).random((3, 70, 90)) * 255).astype(np.uint8)
    vol = write_array(tmp_path / "img.zarr", img, chunks=(1, 32, 32))

    def fn(x):  # a smooth non-linear "model" with two channels
        return np.stack([np.tanh(x), x**2], -1)

    kw = dict(
        grey_range=(0.0, 255.0),
        window=[1, 32, 32],
        overlap=[0, 8, 8],
        dtype="float32",
        show_progress=False,
    )
    big = predict_volume(fn, 2, vol, tmp_path / "a.zarr", chunk=[3, 70, 90], **kw)
    assert big["chunks_written"] == 1
    part = predict_volume(fn, 2, vol, tmp_path / "b.zarr", chunk=[1, 32, 32], stop_after=5, **kw)
    assert part["chunks_written"] == 5
    rest = predict_volume(fn, 2, vol, tmp_path / "b.zarr", chunk=[1, 32, 32], **kw)
    assert rest["chunks_skipped"] == 5 and rest["chunks_written"] == 3 * 3 * 3 - 5
    assert rest["chunks_all"] == part["chunks_all"] == 3 * 3 * 3
    again = predict_volume(fn, 2, vol, tmp_path / "b.zarr", chunk=[1, 32, 32], **kw)
    assert again["chunks_all"] == again["chunks_skipped"] == 27 and again["chunks_written"] == 0
    a = open_volume(tmp_path / "a.zarr").read()
    b = open_volume(tmp_path / "b.zarr").read()
    np.testing.assert_allclose(a, b, atol=1e-6)  # no seams at chunk borders
    np.testing.assert_allclose(a[..., 0], np.tanh(img / 255.0), atol=1e-5)  # pointwise model: exact


def test_predict_output_never_destroys_data_it_did_not_write(tmp_path):
    img = (np.random.default_rng(2).random((2, 32, 32)) * 255).astype(np.uint8)
    vol = write_array(tmp_path / "img.zarr", img, chunks=(1, 32, 32))
    other = write_array(tmp_path / "other.zarr", img[::-1].copy(), chunks=(1, 32, 32))
    kw = dict(grey_range=(0.0, 255.0), window=[1, 32, 32], overlap=[0, 0, 0], chunk=[1, 32, 32])
    kw.update(dtype="float32", show_progress=False)

    def fn(x):
        return x[..., None]

    for resume in (True, False):
        # the input itself, or a folder of the user's files, as the output: refused, all kept
        with pytest.raises(VolumeError, match="input volume"):
            predict_volume(fn, 1, vol, vol.path, resume=resume, **kw)
        np.testing.assert_array_equal(open_volume(vol.path).read(), img)
        mine = tmp_path / "mine"
        mine.mkdir(exist_ok=True)
        (mine / "notes.txt").write_text("keep")
        with pytest.raises(VolumeError, match="does not overwrite"):
            predict_volume(fn, 1, vol, mine, resume=resume, **kw)
        assert (mine / "notes.txt").read_text() == "keep"
    # resuming an output of another source stops; replacing it on purpose works
    out = tmp_path / "p.zarr"
    predict_volume(fn, 1, vol, out, **kw)
    with pytest.raises(VolumeError, match="differs in: source"):
        predict_volume(fn, 1, other, out, **kw)
    res = predict_volume(fn, 1, other, out, resume=False, **kw)
    assert res["chunks_written"] == 2
    np.testing.assert_allclose(open_volume(out).read()[..., 0], img[::-1] / 255.0, atol=1e-6)


def test_finetune_regions_and_label_values_of_a_users_volume(tmp_path):
    from conftest import compose

    from emfm.config.schema import ConfigError
    from emfm.data.sampling import Region
    from emfm.finetune.train import check_label_values

    # the bundled sample keeps its regions; a volume of the user's is trained on whole
    c = compose("finetune", [])
    assert c.data.train_roi == [[0, 20], [0, 384], [0, 384]] and c.data.test_roi[0] == [20, 30]
    user = ["data.path=mine.zarr", "data.labels=mine_labels.zarr"]
    c = compose("finetune", user)
    assert c.data.train_roi is None and c.data.test_roi is None
    with pytest.raises(ConfigError, match=r"data.train_roi is unset"):
        compose("finetune", [*user, "data.test_roi=[[8,10],[0,64],[0,64]]"])
    with pytest.raises(ConfigError, match=r"data.test_roi=.* overlaps data.train_roi"):
        compose("finetune", ["data.train_roi=[[0,25],[0,384],[0,384]]"])
    # labels stored as ISBI stores them (0 / 255): 255 is no class of 2 classes
    lab = np.zeros((3, 16, 16), np.uint8)
    lab[:, 4:6] = 255
    region = Region.of(write_array(tmp_path / "lab.zarr", lab))
    task = compose("finetune", []).task
    with pytest.raises(VolumeError, match=r"raw values 255 .* task.class_values="):
        check_label_values(region, task)
    task.class_values = [255, 0]
    check_label_values(region, task)
