"""The configs/data/mixture.yaml example on the real volumes of ../shared/data/em imported to
OME-Zarr: a tiny pretraining run through the CLI (data-wait fraction in metrics and summary), and
class-balanced sampling of the mitochondria volume."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import CONFIGS, compose, run_cli, shared_data

from emfm.data.importer import import_volume
from emfm.data.sources import make_loader, open_sources

SHARED = shared_data()


@pytest.mark.skipif(not (SHARED / "cdeep3m_sbem_mito").exists(), reason="needs ../shared/data/em")
def test_mixture_config_on_real_em(tmp_path, monkeypatch):
    em = tmp_path / "em"
    mito = SHARED / "cdeep3m_sbem_mito"
    import_volume(
        mito / "train_images.tif",
        em / "cdeep3m_mito.zarr",
        voxel_size=(40, 5.9, 5.9),
        levels=2,
        progress=False,
    )
    import_volume(
        mito / "train_labels.tif",
        em / "cdeep3m_mito_labels.zarr",
        voxel_size=(40, 5.9, 5.9),
        levels=2,
        labels=True,
        progress=False,
    )
    import_volume(
        SHARED / "gala_fibsem" / "train_image.tif",
        em / "gala.zarr",
        voxel_size=(10, 10, 10),
        levels=2,
        progress=False,
    )
    monkeypatch.setenv("EMFM_DATA_DIR", str(em))
    run = tmp_path / "run"
    res = run_cli(
        "pretrain",
        "data=mixture",
        "debug=tiny",
        "trainer.progress=false",
        "trainer.tensorboard=false",
        "trainer.log_every=2",
        f"hydra.run.dir={run}",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    meta_sources = json.loads((run / "pretrain_summary.json").read_text())
    assert 0.0 <= meta_sources["data_wait_fraction"] < 1.0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["data_wait_fraction"] < 1.0 for r in rows) and len(rows) == 2
    cfg = compose("pretrain", ["data=mixture"])
    srcs = open_sources(cfg.data)
    assert [s.region.volume.shape for s in srcs] == [(30, 384, 384), (20, 512, 512), (50, 100, 200)]
    assert srcs[1].region.volume.voxel_size == (40.0, 11.8, 11.8) and srcs[1].labels.shape == (
        20,
        512,
        512,
    )
    # no benchmark task's test sections are pretrained on: cdeep3m_mito tests on sections 14..19
    from emfm.cli.probe import load_task

    test = load_task("cdeep3m_mito", str(CONFIGS)).test_slices
    assert srcs[1].region.box[0][1] <= test[0]
    ld = make_loader(cfg.data, srcs, batch_size=16, seed=5)
    ld.close()
    batch = ld.finished(0)["image"]
    assert batch.shape == (16, 1, 64, 64) and np.isfinite(batch).all()
    labels = srcs[1].labels.read()
    kept = [(i, o) for i, (v, o) in enumerate(ld.sample(0)[0]) if v == 1]
    assert kept
    for i, (z, y, x) in kept:  # mitochondria patches alternate: background, mitochondrion, ...
        assert (labels[z, y : y + 64, x : x + 64] == [0, 1][i % 2]).any()
