"""Mixtures of volumes from the config: weights, masks, class balancing, augmentation options,
errors, and determinism across resume and 1 vs 2 processes."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import compose

from emfm.config.schema import AugmentConfig, ConfigError, DataConfig, SourceConfig, validate_data
from emfm.data.sources import make_loader, open_sources
from emfm.data.volume import VolumeError, write_array


@pytest.fixture(scope="module")
def vols(tmp_path_factory):
    """Two volumes told apart by their grey values (a: 0..99, b: 150..249), a mask of `a` at half
    resolution (only x >= 32 inside), and labels of `b` (class 2 in a small corner)."""
    d = tmp_path_factory.mktemp("mix")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 100, (6, 64, 64)).astype(np.uint8)
    a[0, 0, :2] = [0, 99]
    b = rng.integers(150, 250, (4, 48, 48)).astype(np.uint8)
    b[0, 0, :2] = [150, 249]
    write_array(d / "a", a, chunks=(2, 32, 32))
    write_array(d / "b", b, chunks=(2, 32, 32))
    mask = np.zeros((3, 32, 32), np.uint8)
    mask[:, :, 16:] = 1
    write_array(d / "mask", mask)
    lab = np.zeros(b.shape, np.uint8)
    lab[:, 36:, 36:] = 2
    write_array(d / "lab", lab)
    return d


def _data(d, **kw) -> DataConfig:
    sources = kw.pop(
        "sources",
        [SourceConfig(path=str(d / "a"), weight=3.0), SourceConfig(path=str(d / "b"), weight=1.0)],
    )
    cfg = DataConfig(
        patch_shape=[2, 16, 16],
        batch_size=8,
        intensity_samples=8,
        prefetch=1,
        sources=sources,
        **kw,
    )
    return validate_data(cfg)


def _loaders(cfg, srcs, *, batch=8, processes=1, start=0):
    return [
        make_loader(
            cfg,
            srcs,
            batch_size=batch // processes,
            seed=5,
            process_index=i,
            process_count=processes,
            start_step=start,
        )
        for i in range(processes)
    ]


def test_weights_pick_sources_and_each_has_its_grey_range(vols):
    cfg = _data(vols, augment=False)
    srcs = open_sources(cfg)
    assert [s.weight for s in srcs] == [3.0, 1.0]
    assert srcs[0].grey_range[1] <= 99 < 150 <= srcs[1].grey_range[0]
    (ld,) = _loaders(cfg, srcs, batch=64)
    ld.close()
    picked = np.array([v for s in range(4) for v, _ in ld.sampler.origins(s)])
    assert 0.65 < (picked == 0).mean() < 0.85  # 3 : 1
    img = ld.finished(0)["image"]
    assert img.min() >= 0 and img.max() <= 1 and img.std() > 0.2  # both normalised to [0, 1]


def test_mixture_deterministic_across_resume_and_processes(vols):
    aug = AugmentConfig(ops=["flip_rot", "elastic", "sections", "blur", "intensity", "noise"])
    cfg = _data(
        vols,
        aug=aug,
        balance_classes=[0, 2],
        min_foreground=0.01,
        max_redraws=20,
        sources=[
            SourceConfig(path=str(vols / "a"), weight=1.0, mask=str(vols / "mask")),
            SourceConfig(path=str(vols / "b"), weight=1.0, labels=str(vols / "lab")),
        ],
    )
    srcs = open_sources(cfg)
    (one,) = _loaders(cfg, srcs)
    try:
        first = [next(one)["image"] for _ in range(3)]
    finally:
        one.close()
    (resumed,) = _loaders(cfg, srcs, start=1)
    two = _loaders(cfg, srcs, processes=2, start=1)
    try:
        np.testing.assert_array_equal(next(resumed)["image"], first[1])
        np.testing.assert_array_equal(next(resumed)["image"], first[2])
        halves = [next(ld)["image"] for ld in two]
    finally:
        for ld in [resumed] + two:
            ld.close()
    np.testing.assert_array_equal(np.concatenate(halves), first[1])
    # labels steer sampling; pretraining batches carry images only (with their device-side entries)
    assert set(one.load(0)) == {"image", "image_norm", "image_grey", "image_seed"}


def test_mask_and_class_balance(vols):
    cfg = _data(
        vols,
        augment=False,
        min_mask=1.0,
        max_redraws=30,
        balance_classes=[0, 2],
        min_foreground=0.05,
        sources=[
            SourceConfig(path=str(vols / "a"), mask=str(vols / "mask")),
            SourceConfig(path=str(vols / "b"), labels=str(vols / "lab")),
        ],
    )
    srcs = open_sources(cfg)
    (ld,) = _loaders(cfg, srcs)
    ld.close()
    lab = srcs[1].labels.read()
    plain = make_loader(_data(vols, augment=False), srcs, batch_size=8, seed=5)
    plain.close()
    picked, outside, rare = [], 0, 0
    for step in range(4):
        picks, image, _ = ld.sample(step)
        np.testing.assert_array_equal(ld.load(step)["image"], image)
        for i, (v, (z, y, x)) in enumerate(picks):
            picked.append(v)
            if v == 0:  # the coarse mask covers x >= 32 of volume a: the whole patch lies there
                assert x >= 32
            else:  # the i-th patch of the global batch holds class balance_classes[i % 2]
                assert (lab[z : z + 2, y : y + 16, x : x + 16] == [0, 2][i % 2]).mean() >= 0.05
        for v, (z, y, x) in plain.sample(step)[
            0
        ]:  # without mask and balancing, both happen less often
            outside += v == 0 and x < 32
            rare += v == 1 and (lab[z : z + 2, y : y + 16, x : x + 16] == 2).mean() >= 0.05
    assert set(picked) == {0, 1} and outside > 0 and rare < picked.count(1) / 2


def test_config_errors_name_the_key(vols, tmp_path):
    a, b = str(vols / "a"), str(vols / "b")
    with pytest.raises(ConfigError, match="zero total weight"):
        _data(vols, sources=[SourceConfig(path=a, weight=0.0), SourceConfig(path=b, weight=0.0)])
    with pytest.raises(ConfigError, match=r"data.sources\[1\].weight=-1.0"):
        _data(vols, sources=[SourceConfig(path=a), SourceConfig(path=b, weight=-1.0)])
    with pytest.raises(ConfigError, match=r"data.sources\[1\].path='.*nothere.zarr': no such"):
        _data(
            vols, sources=[SourceConfig(path=a), SourceConfig(path=str(tmp_path / "nothere.zarr"))]
        )
    with pytest.raises(ConfigError, match=r"data.sources\[0\].mask="):
        _data(vols, sources=[SourceConfig(path=a, mask=str(tmp_path / "nomask"))])
    with pytest.raises(ConfigError, match="leave data.path and data.roi unset"):
        _data(vols, path=a)
    with pytest.raises(ConfigError, match=r"data.aug.ops: unknown augmentation\(s\) \['flip'\]"):
        _data(vols, aug=AugmentConfig(ops=["flip", "noise"]))
    with pytest.raises(
        ConfigError, match=r"data.aug.view_ops: unknown augmentation\(s\) \['cutout'\]"
    ):
        _data(vols, aug=AugmentConfig(view_ops=["cutout"]))
    with pytest.raises(ConfigError, match="data.aug.p_blur=1.5"):
        _data(vols, aug=AugmentConfig(p_blur=1.5))
    with pytest.raises(ConfigError, match="need label volumes"):
        _data(vols, balance_classes=[0, 1])
    # a source's volume error names its key
    with pytest.raises(VolumeError, match=r"data.sources\[0\]: volume .*level=2 picks"):
        open_sources(_data(vols, sources=[SourceConfig(path=a, level=2)]))
    # a volume with channels: a clear error, not a broadcast failure in the loader
    write_array(tmp_path / "c.zarr", np.zeros((2, 64, 64, 2), np.uint8))
    with pytest.raises(VolumeError, match=r"data.sources\[1\].*axes zyxc.*single-channel"):
        open_sources(
            _data(vols, sources=[SourceConfig(path=a), SourceConfig(path=str(tmp_path / "c.zarr"))])
        )
    # through Hydra, as the CLI composes: an unknown key inside a source is rejected by name
    with pytest.raises(Exception, match="nonsense"):
        compose("pretrain", ["data.roi=null", f"data.sources=[{{path: {a}, nonsense: 1}}]"])
    cfg = compose(
        "pretrain",
        [
            "data.roi=null",
            f"data.sources=[{{path: {a}, weight: 2}}, {{path: {b}}}]",
            "data.aug.ops=[flip_rot,sections]",
        ],
    )
    assert [s.weight for s in cfg.data.sources] == [2.0, 1.0] and cfg.data.aug.ops == [
        "flip_rot",
        "sections",
    ]
    # a mask of another shape, found when the volumes are opened
    write_array(tmp_path / "m3", np.ones((4, 20, 64), np.uint8))
    cfg = _data(vols, sources=[SourceConfig(path=a, mask=str(tmp_path / "m3"))])
    with pytest.raises(
        VolumeError, match="mask .*m3 of shape \\(4, 20, 64\\) does not match volume"
    ):
        _loaders(cfg, open_sources(cfg))


def test_augmentation_options_reach_the_batches(vols):
    off = _data(vols, aug=AugmentConfig(ops=[]))
    plain = _data(vols, augment=False)
    srcs = open_sources(plain)
    (a,), (b,) = _loaders(off, srcs), _loaders(plain, srcs)
    a.close(), b.close()
    # no ops = identity
    np.testing.assert_allclose(a.load(2)["image"], b.load(2)["image"], atol=1e-6)
    miss = _data(vols, aug=AugmentConfig(ops=["sections"], p_missing=1.0))
    (c,) = _loaders(miss, srcs)
    c.close()
    assert (c.load(2)["image"] == 0).all()  # every section missing


def test_bundled_roi_does_not_follow_a_users_path(vols):
    """The bundled sample's pretraining sections (0..19) are its own default: a volume of the user's
    is sampled whole unless data.roi says otherwise; sources need no `data.roi=null`."""
    from emfm.data.bundled import PRETRAIN_ROI

    assert compose("pretrain", []).data.roi == PRETRAIN_ROI
    assert compose("pretrain", [f"data.path={vols / 'a'}"]).data.roi is None
    assert compose(
        "pretrain", [f"data.path={vols / 'a'}", "data.roi=[[0,2],[0,64],[0,64]]"]
    ).data.roi == [[0, 2], [0, 64], [0, 64]]
    assert compose("pretrain", [f"data.sources=[{{path: {vols / 'a'}}}]"]).data.roi is None


def test_grey_range_of_a_volume_unlike_the_checkpoints_data(tmp_path):
    from emfm.data.sampling import Region, grey_range_for

    rng = np.random.default_rng(0)
    u8 = write_array(tmp_path / "u8.zarr", rng.integers(20, 220, (2, 128, 128)).astype(np.uint8))
    u16 = write_array(
        tmp_path / "u16.zarr", rng.integers(4000, 48000, (2, 128, 128)).astype(np.uint16)
    )
    # 8-bit EM like the checkpoint's: the checkpoint's range, as the model saw its data
    assert grey_range_for(Region.of(u8), (22.0, 211.0)) == (22.0, 211.0)
    # 16-bit EM: the checkpoint's range would clip every voxel to white; the volume's own range
    lo, hi = grey_range_for(Region.of(u16), (22.0, 211.0))
    assert 4000 <= lo < 5000 and 47000 < hi <= 48000
    assert grey_range_for(Region.of(u8), None) == grey_range_for(Region.of(u8), (0.0, 1.0))


def test_grey_range_inside_the_mask(tmp_path):
    from emfm.data.sampling import Region, estimate_range

    # tissue (grey 26800-40400) in a block of a volume padded with zeros; the mask marks the block
    rng = np.random.default_rng(1)
    img = np.zeros((2, 128, 128), np.uint16)
    img[:, :64, :64] = rng.integers(26800, 40400, (2, 64, 64))
    m = np.zeros((2, 32, 32), np.uint8)  # at a quarter of the in-plane resolution
    m[:, :16, :16] = 1
    vol, mask = write_array(tmp_path / "i.zarr", img), write_array(tmp_path / "m.zarr", m)
    lo, hi = estimate_range(Region.of(vol), mask=mask)
    assert 26800 <= lo < 27200 and 40000 < hi <= 40400
    assert estimate_range(Region.of(vol))[0] == 0.0  # without the mask the padding counts
