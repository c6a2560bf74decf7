"""Every segmentation regime and head trains on real EM (tiny models, a few steps, the loss falls):
the bundled ISBI 2012 sample, CDeep3M mitochondria and gala neurons from ../shared/data/em."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import tifffile
from conftest import CONFIGS, run_cli, shared_data
from flax import nnx
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from emfm.config import schema
from emfm.data.volume import open_volume, write_array
from emfm.errors import UserError
from emfm.finetune import model as seg_model
from emfm.finetune import predict, train
from emfm.train.state import load_encoder

pytestmark = pytest.mark.slow

STEPS = 6
TINY = [
    "debug=seg_tiny",
    f"trainer.steps={STEPS}",
    "trainer.log_every=1",
    "optim.warmup_steps=1",
    "optim.lr=3e-3",
    "data.patch_shape=[1,32,32]",
    "model.depth=1",
    "model.patch_size=[4,4]",
]


def finetune_cfg(run_dir, *over):
    schema.register()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        held_out = (
            [] if any(o.startswith("data.test_roi") for o in over) else ["data.test_roi=null"]
        )
        if any(
            o.startswith("data.path") for o in over
        ):  # not the bundled sample: train on all of it
            held_out.append("data.train_roi=null")
        c = compose(
            "finetune",
            overrides=[*TINY, *held_out, f"run_dir={run_dir}", "trainer.progress=false", *over],
        )
    return schema.validate_finetune(OmegaConf.to_object(c))


def losses(run_dir) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_falls(run_dir):
    ls = losses(run_dir)
    assert len(ls) == STEPS and np.isfinite(ls).all()
    assert np.mean(ls[-2:]) < np.mean(ls[:2]), ls


def _shared_crop(
    tmp_path_factory, dataset: str, image: str, labels: str, crop, label_dtype=None
) -> tuple[str, str]:
    """A crop of a real ../shared/data/em volume and its labels, written as zarr (skips without
    ../shared)."""
    src = shared_data() / dataset
    if not src.is_dir():
        pytest.skip(f"needs the real EM of ../shared/data/em ({src} not found)")
    d = tmp_path_factory.mktemp(dataset)
    img = tifffile.imread(src / image)[crop]
    lab = tifffile.imread(src / labels)[crop]
    lab = lab if label_dtype is None else lab.astype(label_dtype)
    return str(write_array(d / "raw", img).path), str(write_array(d / "labels", lab).path)


# dataset, image and label files, crop, label dtype (None: as stored)
GALA = ("gala_fibsem", "train_image.tif", "train_labels.tif", np.s_[:8, :64, :128], np.uint32)
MITO = ("cdeep3m_sbem_mito", "train_images.tif", "train_labels.tif", np.s_[:4, :256, :256], None)


@pytest.fixture(scope="module")
def gala(tmp_path_factory):
    return _shared_crop(tmp_path_factory, *GALA)


@pytest.fixture(scope="module")
def mito(tmp_path_factory):
    return _shared_crop(tmp_path_factory, *MITO)


def test_cli_finetune_then_blockwise_predict(tmp_path):
    run = tmp_path / "ft"
    res = run_cli(
        "finetune", *TINY, "data.test_roi=null", f"hydra.run.dir={run}", "trainer.progress=false"
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert_falls(run)
    pred = [
        f"checkpoint={run}",
        "predict.roi=[[20,22],[0,96],[0,96]]",
        "predict.window=[1,32,32]",
        "predict.overlap=[0,8,8]",
        "predict.chunk=[1,64,64]",
        f"predict.out={tmp_path / 'p.zarr'}",
        "trainer.progress=false",
    ]
    # probabilities, then instance labels from the membrane channel in stitched blocks, in one
    # command with the watershed level chosen on section 20's ground-truth cells (labels in source
    # coordinates)
    from emfm.data import bundled
    from emfm.eval.cells import gt_cells

    cells = np.stack([gt_cells(m) for m in open_volume(bundled.sample_membranes()).read() > 0])
    write_array(tmp_path / "cells.zarr", cells)
    inst = [
        "predict.instances=watershed",
        "instances.block=[1,64,64]",
        "instances.halo=[0,16,16]",
        "instances.min_seed=4",
        "instances.tune=true",
        f"instances.tune_labels={tmp_path / 'cells.zarr'}",
        "instances.tune_roi=[[0,1],[0,96],[0,96]]",
        "instances.tune_metric=adapted_rand_error",
        "+instances.tune_grid.threshold=[0.3,0.6]",
    ]
    res = run_cli("predict", *pred, *inst, f"hydra.run.dir={tmp_path / 'pr'}")
    assert res.returncode == 0, res.stderr[-3000:]
    out = open_volume(tmp_path / "p.zarr")
    p = out.read().astype(np.float32)
    assert p.shape == (2, 96, 96, 2) and out.attributes["channels"] == ["class_0", "class_1"]
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=2e-3)
    lab = open_volume(tmp_path / "p_instances.zarr").read()
    assert lab.shape == (2, 96, 96) and lab.dtype.kind == "u" and lab.max() >= 1
    rec = json.loads((tmp_path / "pr" / "predict.json").read_text())
    assert rec["instances"]["method"] == "watershed" and rec["instances"]["out"].endswith(
        "p_instances.zarr"
    )
    tuned = rec["instances"]["tuned"]
    assert (
        len(tuned["trials"]) == 2
        and tuned["chosen"]["threshold"]
        == min(tuned["trials"], key=lambda t: t["adapted_rand_error"])["threshold"]
    )
    # an unknown method is named as the config is composed, with the methods there are
    res = run_cli("predict", *pred, "predict.instances=magic", f"hydra.run.dir={tmp_path / 'pr3'}")
    assert res.returncode != 0 and "full_key: predict.instances" in res.stderr
    assert "Invalid value 'magic', expected one of [none, watershed, link2d," in res.stderr
    # a missing checkpoint is named (resume after interruption: tests/unit/test_finetune_targets.py)
    schema.register()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        c = compose(
            "predict",
            overrides=[*pred, f"checkpoint={tmp_path / 'nowhere'}", f"run_dir={tmp_path / 'pr2'}"],
        )
    with pytest.raises(FileNotFoundError, match="nowhere"):
        predict.run_predict(schema.validate_finetune(OmegaConf.to_object(c), command="predict"))
    # test-time augmentation: the mean of the 8 flipped and turned windows, recorded in the output
    tta = [*pred[:-2], f"predict.out={tmp_path / 'p_tta.zarr'}", *pred[-1:], "predict.tta=dihedral"]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        c = compose("predict", overrides=[*tta, f"run_dir={tmp_path / 'pr4'}"])
        bad = compose(
            "predict",
            overrides=[*tta, "predict.window=[1,32,24]", f"run_dir={tmp_path / 'pr5'}"],
        )
    predict.run_predict(schema.validate_finetune(OmegaConf.to_object(c), command="predict"))
    out = open_volume(tmp_path / "p_tta.zarr")
    q = out.read().astype(np.float32)
    assert q.shape == p.shape and out.attributes["tta"] == "dihedral"
    np.testing.assert_allclose(q.sum(-1), 1.0, atol=2e-3)
    assert 0 < np.abs(q - p).max() < 0.5  # the same model: close to, not equal to, the plain map
    with pytest.raises(UserError, match="predict.tta=dihedral swaps y and x"):
        predict.run_predict(schema.validate_finetune(OmegaConf.to_object(bad), command="predict"))
    # a window off the model's grid and mutex watershed on a semantic model: named before any output
    for over, msg in (
        (["predict.window=[1,30,30]"], r"predict.window=\[1, 30, 30\] is not divisible"),
        (["predict.instances=mws"], "predict.instances=mws needs a model of affinities"),
    ):
        out = tmp_path / "p_bad.zarr"
        with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
            c = compose("predict", overrides=[*pred, f"predict.out={out}", *over, "run_dir=x"])
        with pytest.raises(UserError, match=msg):
            predict.run_predict(schema.validate_finetune(OmegaConf.to_object(c), command="predict"))
        assert not out.exists()


def test_frozen_pretrained_encoder_boundary_progressive_on_gala(tmp_path, gala, tiny_main_run):
    cfg = finetune_cfg(
        tmp_path,
        "regime=frozen",
        f"checkpoint={tiny_main_run}",
        "head=progressive",
        "task=boundary",
        "task.label_type=instances",
        f"data.path={gala[0]}",
        f"data.labels={gala[1]}",
        "data.patch_shape=[1,32,64]",
    )
    train.finetune(cfg)
    assert_falls(tmp_path)
    model, meta = seg_model.load_seg_model(str(tmp_path))
    enc, _ = load_encoder(str(tiny_main_run))
    same = jax.tree.map(
        lambda a, b: bool(np.array_equal(a, b)),
        nnx.state(model.encoder, nnx.Param),
        nnx.state(enc, nnx.Param),
    )
    assert all(jax.tree.leaves(same)) and meta["channels"] == ["interior", "boundary", "distance"]


def test_partial_freeze_affinities_on_isbi(tmp_path, tiny_main_run):
    cfg = finetune_cfg(
        tmp_path,
        "regime=partial",
        "regime.frozen_blocks=1",
        f"checkpoint={tiny_main_run}",
        "task=affinity",
        "head=progressive",
    )
    train.finetune(cfg)
    assert_falls(tmp_path)
    model, _ = seg_model.load_seg_model(str(tmp_path))
    enc, _ = load_encoder(str(tiny_main_run))
    k = lambda m, i: np.asarray(m.blocks[i].attn.qkv.kernel[...])  # noqa: E731
    assert np.array_equal(k(model.encoder, 0), k(enc, 0)) and not np.array_equal(
        k(model.encoder, 1), k(enc, 1)
    )


def test_shrink_perturb_start_mixes_the_checkpoint_with_a_fresh_network(tmp_path, tiny_main_run):
    from emfm.train.state import build_encoder

    cfg = finetune_cfg(
        tmp_path,
        "regime=finetune",
        f"checkpoint={tiny_main_run}",
        "regime.shrink=0.25",
        "regime.perturb=0.5",
        "trainer.seed=3",
    )
    model, mcfg, _ = seg_model.init_model(cfg)
    pre, _ = load_encoder(str(tiny_main_run))
    fresh = build_encoder(mcfg, seed=3)
    want = jax.tree.map(
        lambda a, b: 0.25 * a + 0.5 * b, nnx.state(pre, nnx.Param), nnx.state(fresh, nnx.Param)
    )
    got = nnx.state(model.encoder, nnx.Param)
    assert all(
        jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.allclose(a, b, atol=1e-6)), got, want))
    )
    # the control: the same mix of two random networks, no checkpoint
    ccfg = finetune_cfg(
        tmp_path / "c", "regime.shrink=0.25", "regime.perturb=0.5", "trainer.seed=3"
    )
    ctl, _, _ = seg_model.init_model(ccfg)
    want = jax.tree.map(
        lambda a, b: 0.25 * a + 0.5 * b,
        nnx.state(build_encoder(ccfg.model, seed=3 + 10007), nnx.Param),
        nnx.state(build_encoder(ccfg.model, seed=3), nnx.Param),
    )
    got = nnx.state(ctl.encoder, nnx.Param)
    assert all(
        jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.allclose(a, b, atol=1e-6)), got, want))
    )
    with pytest.raises(schema.ConfigError, match="regime.shrink"):
        finetune_cfg(tmp_path / "bad", "regime.shrink=0")


def test_layer_decay_finetune_centre_head_on_mitochondria(tmp_path, mito, tiny_main_run):
    cfg = finetune_cfg(
        tmp_path,
        "regime=finetune_lld",
        f"checkpoint={tiny_main_run}",
        "task=center",
        "head=progressive",
        f"data.path={mito[0]}",
        f"data.labels={mito[1]}",
        "data.patch_shape=[1,64,64]",
    )
    train.finetune(cfg)
    assert_falls(tmp_path)


def test_mean_teacher_on_sparse_isbi_labels(tmp_path):
    cfg = finetune_cfg(
        tmp_path,
        "regime=mean_teacher",
        "data.label_fraction=0.1",
        "head=progressive",
        "data.train_roi=[[0,20],[0,384],[0,384]]",
    )
    s = train.finetune(cfg)
    assert_falls(tmp_path)
    assert s["labelled_roi"][0] == [0, 2]
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["loss_consistency"] > 0 and "ema_momentum" in rec
    # the summary names the host: the same seed can end elsewhere on another CPU
    host = json.loads((tmp_path / "finetune_summary.json").read_text())["host"]
    assert host == s["host"] and host["jax"] == jax.__version__ and host["cpu"]


def test_fixmatch_unet_decoder_affinities_on_gala(tmp_path, gala):
    cfg = finetune_cfg(
        tmp_path,
        "regime=fixmatch",
        "regime.threshold=0.6",
        "model=unet2d",
        "model.patch_size=[1,1]",
        "head=unet",
        "model.width=8",
        "model.depth=2",
        "task=affinity",
        "task.label_type=instances",
        f"data.path={gala[0]}",
        f"data.labels={gala[1]}",
    )
    train.finetune(cfg)
    assert_falls(tmp_path)
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 < rec["pseudo_fraction"] <= 1


def test_3d_unet_affinities_end_to_end_on_gala(tmp_path, gala):
    cfg = finetune_cfg(
        tmp_path,
        "model=unet3d",
        "model.patch_size=[1,1,1]",
        "head=unet",
        "model.width=8",
        "model.depth=2",
        "task=affinity",
        "task.label_type=instances",
        "task.offsets=[[-1,0,0],[0,-1,0],[0,0,-1],[0,-4,0]]",
        f"data.path={gala[0]}",
        f"data.labels={gala[1]}",
        "data.patch_shape=[4,32,32]",
    )
    train.finetune(cfg)
    assert_falls(tmp_path)


# sections of 128 pixels encoded in one tile (the default) or in four tiles with their margin
@pytest.mark.parametrize("method,tile", [("kmeans", 128), ("gmm", 64)])
def test_unsupervised_clustering_with_hungarian_matching(tmp_path, tiny_main_run, method, tile):
    cfg = finetune_cfg(
        tmp_path,
        f"regime={method}",
        f"checkpoint={tiny_main_run}",
        "regime.cluster_samples=4000",
        f"regime.tile={tile}",
        "data.train_roi=[[0,4],[0,128],[0,128]]",
        "data.test_roi=[[20,22],[0,128],[0,128]]",
    )
    s = train.finetune(cfg)
    assert sorted(s["mapping"]) == [0, 1] and 0.0 < s["f1"] <= 1.0 and s["accuracy"] > 0.5


@pytest.mark.parametrize(
    "override, key",
    [
        (["regime.semi=foo"], "regime.semi"),
        (["task.kind=blobs"], "task.kind"),
        (["head=unet"], "head.name"),
        (["regime=frozen"], "checkpoint"),
        (["regime=mean_teacher", "checkpoint=zoo:em_unet16"], "regime.init=pretrained"),
        (
            ["model=unet3d", "model.patch_size=[1,1,1]", "head=unet", "task=affinity"]
            + ["data.patch_shape=[4,32,32]"],
            "z component",
        ),
        (["loss.terms=[ce,lovasz]"], "loss.terms"),
        (["data.patch_shape=[1,30,32]"], "data.patch_shape"),
    ],
)
def test_bad_segmentation_config_names_the_key(tmp_path, override, key):
    from hydra.errors import ConfigCompositionException

    # options outside their set fail as the config is composed; other values in validate
    with pytest.raises((schema.ConfigError, ConfigCompositionException)) as e:
        finetune_cfg(tmp_path, *override)
    assert key in f"{e.value}\n{e.value.__cause__}"
