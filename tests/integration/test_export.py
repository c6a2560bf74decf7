"""Feature export and discovery on the bundled real EM: blockwise features equal a whole-image
forward, layer choice / PCA-k / dtype, a SIGKILLed export resumed by two processes gives the same
bytes as one uninterrupted run, bad input stops before any compute, k-means discovery recovers
planted clusters, the discovery notebook runs in tiny form."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, compose

from emfm import pipeline
from emfm.config.schema import ModelConfig
from emfm.data import bundled
from emfm.data.volume import VolumeError, create_volume, open_volume, write_array
from emfm.errors import UserError
from emfm.export import encode as E
from emfm.export import features as F
from emfm.models import build_encoder
from emfm.train.checkpoint import CheckpointError

# 10 sections in 32-pixel tiles: 1440 small blocks, so a kill lands mid-way
KILL_ARGS = [
    "debug=tiny",
    "export.tile=32",
    "export.roi=[[0,10],[0,384],[0,384]]",
    "trainer.progress=false",
]


def store_files(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def sample(z=2, y=96, x=160) -> np.ndarray:
    return (
        open_volume(bundled.sample_raw())
        .read((slice(0, z), slice(0, y), slice(0, x)))
        .astype(np.float32)
        / 255
    )


@pytest.fixture(scope="module")
def sample_vol():
    return open_volume(bundled.sample_raw())


@pytest.fixture
def small_vit():
    """A 2-block ViT of width 32 with 8 x 8 patches, at random init (seed 0)."""
    return build_encoder(ModelConfig(width=32, depth=2, heads=2, patch_size=[8, 8]), seed=0)


def vit_export_args(sections: int, tile: int, margin: int, **kw) -> dict:
    """Keyword arguments of an export of the first sections of the sample (y, x 0-383)."""
    roi = [[0, sections], [0, 384], [0, 384]]
    return dict(grey_range=(0.0, 255.0), roi=roi, tile=tile, margin=margin, **kw)


def test_unet_blocks_equal_whole_image_forward_no_seams():
    """With a per-pixel norm and a margin beyond the receptive field, tile-by-tile features (decoder
    output, and encoder levels upsampled to a common grid) equal one forward pass over the mirrored
    whole image."""
    enc = build_encoder(
        ModelConfig(name="unet", patch_size=[1, 1], width=8, depth=2, norm="layer"), seed=3
    )
    img = sample()
    m = 16
    padded = jnp.asarray(np.pad(img, ((0, 0), (m, m), (m, m)), mode="reflect"))[..., None]
    _, aux = enc(padded, return_blocks=(0, 1))
    whole = np.asarray(aux["patch_map"])[:, m:-m, m:-m]
    tiled = E.encode(enc, img, tile=32, margin=m, batch_size=4)
    np.testing.assert_allclose(tiled, whole, rtol=0, atol=2e-5)
    lv1 = np.repeat(
        np.repeat(np.asarray(aux["blocks"][1])[:, m // 2 : -m // 2, m // 2 : -m // 2], 2, 1), 2, 2
    )
    both = np.concatenate([np.asarray(aux["blocks"][0])[:, m:-m, m:-m], lv1], -1)
    np.testing.assert_allclose(
        E.encode(enc, img, tile=32, margin=m, batch_size=4, layers=(0, 1)),
        both,
        rtol=0,
        atol=2e-5,
    )
    # index `depth` names the decoder output, so it can be concatenated with the levels
    depth = enc.spec.depth
    np.testing.assert_allclose(
        E.encode(enc, img, tile=32, margin=m, batch_size=4, layers=(0, 1, depth)),
        np.concatenate([both, whole], -1),
        rtol=0,
        atol=2e-5,
    )
    with pytest.raises(UserError, match="final output"):
        E.encode(enc, img, tile=32, margin=m, batch_size=4, layers=(depth + 1,))


def test_layers_pca_and_dtype(tmp_path, sample_vol, small_vit):
    vol, enc = sample_vol, small_vit
    kw = vit_export_args(1, 128, 16, show_progress=False, blend="none")
    a = F.export_features(enc, vol, tmp_path / "a.zarr", **kw)
    b = F.export_features(enc, vol, tmp_path / "b.zarr", layers=(-2, -1), dtype="float32", **kw)
    c = F.export_features(
        enc, vol, tmp_path / "c.zarr", layers=(0, 1), pca_k=5, dtype="bfloat16", **kw
    )
    assert (
        a["shape"] == [1, 48, 48, 32]
        and b["shape"] == [1, 48, 48, 64]
        and c["shape"] == [1, 48, 48, 5]
    )
    assert b["layers"] == c["layers"] == [0, 1]
    fa, fb, fc = (open_volume(tmp_path / n) for n in ("a.zarr", "b.zarr", "c.zarr"))
    # an OME-Zarr image group (NGFF 0.5): channel axis first on disk, features on the token grid
    # over the input
    ms = json.loads((tmp_path / "a.zarr" / "zarr.json").read_text())["attributes"]["ome"][
        "multiscales"
    ][0]
    assert [(a["name"], a["type"], a.get("unit")) for a in ms["axes"]] == [
        ("c", "channel", None),
        ("z", "space", "nanometer"),
        ("y", "space", "nanometer"),
        ("x", "space", "nanometer"),
    ]
    vz, vy, vx = vol.voxel_size
    assert ms["datasets"][0]["coordinateTransformations"] == [
        {"type": "scale", "scale": [1.0, vz, 8 * vy, 8 * vx]},
        {"type": "translation", "translation": [0.0, 0.0, 3.5 * vy, 3.5 * vx]},
    ]  # cell centres
    arr = json.loads((tmp_path / "a.zarr" / "0" / "zarr.json").read_text())
    assert arr["dimension_names"] == ["c", "z", "y", "x"] and arr["shape"] == [32, 1, 48, 48]
    assert fa.axes == ("z", "y", "x", "c") and fa.voxel_size == (vz, 8 * vy, 8 * vx)
    assert fa.attributes["export"]["checkpoint"] == "" and fc.attributes["layers"] == [0, 1]
    grid = F.feature_grid_transform(
        replace(vol, translation=(10.0, 20.0, 30.0)), (2, 16, 24), (1, 8, 8)
    )
    assert grid == {
        "voxel_size": (vz, 8 * vy, 8 * vx),
        "translation": (10 + 2 * vz, 20 + 19.5 * vy, 30 + 27.5 * vx),
    }
    assert (fa.dtype, fb.dtype, fc.dtype) == (np.float16, np.float32, np.dtype(jnp.bfloat16))
    img = vol.read((slice(0, 1),)).astype(np.float32) / 255
    ref_final = E.encode(enc, img, tile=128, margin=16)
    ref_blocks = E.encode(enc, img, tile=128, margin=16, layers=(0, 1))
    # float16 rounding
    np.testing.assert_allclose(fa.read().astype(np.float32), ref_final, rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(fb.read(), ref_blocks)
    assert (
        np.abs(ref_final - ref_blocks[..., 32:]).max() > 0.1
    )  # final norm != last block's raw tokens
    pca = fc.attributes["pca"]
    proj = (ref_blocks - np.asarray(pca["mean"], np.float32)) @ np.asarray(
        pca["components"], np.float32
    ).T
    np.testing.assert_allclose(
        fc.read().astype(np.float32), proj, rtol=2e-2, atol=2e-2 * np.abs(proj).max()
    )
    evr = pca["explained_variance_ratio"]
    assert len(evr) == 5 and all(x >= y for x, y in zip(evr, evr[1:])) and 0 < sum(evr) <= 1
    comp = np.asarray(pca["components"])
    np.testing.assert_allclose(comp @ comp.T, np.eye(5), atol=1e-5)


def test_blended_windows_remove_vit_seams(tmp_path, sample_vol, small_vit):
    """blend=cosine (the ViT default): features where one window covers a cell are that window's
    features, where two overlap a convex mix of both, and the block seams of margin-dropped tiles
    are gone."""
    sys.path.insert(0, str(REPO / "experiments" / "feature_export"))
    from seams import phase_profile, ratios

    vol, enc = sample_vol, small_vit
    kw = vit_export_args(2, 64, 32, dtype="float32", show_progress=False)
    res = F.export_features(enc, vol, tmp_path / "b.zarr", **kw)  # blend=auto
    assert res["blend"] == "cosine" and res["shape"] == [2, 48, 48, 32]
    F.export_features(enc, vol, tmp_path / "n.zarr", blend="none", **kw)
    fb, fn = (open_volume(tmp_path / n).read() for n in ("b.zarr", "n.zarr"))
    # windows of 128 pixels (16 cells) every 64 pixels (8 cells): cells 0-7 see only the first
    # window along y
    img = vol.read((slice(0, 1), slice(0, 128), slice(0, 384))).astype(np.float32)[None] / 255
    w00, w08 = (
        E.BlockEncoder(enc, block=(1, 128, 128), margin=(0, 0, 0))(img[..., x : x + 128])
        for x in (0, 64)
    )
    np.testing.assert_allclose(fb[0, :8, :8], w00[0, 0, :8, :8], rtol=1e-5, atol=1e-5)
    lo, hi = (
        np.minimum(w00[0, 0, :8, 8:16], w08[0, 0, :8, :8]),
        np.maximum(w00[0, 0, :8, 8:16], w08[0, 0, :8, :8]),
    )
    mix = fb[0, :8, 8:16]
    assert (mix >= lo - 1e-5).all() and (mix <= hi + 1e-5).all() and np.abs(mix - lo).max() > 1e-3
    r_none = [ratios(phase_profile(fn, 8, a))[0] for a in (1, 2)]
    # the worst phase, not just the boundary
    r_blend = [ratios(phase_profile(fb, 8, a))[1] for a in (1, 2)]
    assert min(r_none) > 1.35 and max(r_blend) < 1.2, (
        r_none,
        r_blend,
    )  # measured 1.41-1.49 and 1.07-1.14


def test_bad_inputs_stop_before_any_compute(tiny_main_run, tmp_path, monkeypatch):
    def no_compute(self, *a, **k):
        raise AssertionError("encoder ran before the input was checked")

    monkeypatch.setattr(E.BlockEncoder, "__call__", no_compute)
    # a checkpoint of another architecture
    cfg = compose("export", ["debug=tiny", "model.width=64"])
    cfg.run_dir = str(tmp_path / "r")
    with pytest.raises(
        CheckpointError, match=r"model\.width=64 in the config but 32 in the checkpoint"
    ):
        pipeline.run_export(cfg, checkpoint=str(tiny_main_run))
    # an output of another shape, and one of the same shape from another export (other layers)
    out = tmp_path / "f.zarr"
    attrs = {"job": "export"}
    create_volume(out, (30, 48, 48, 7), np.float16, chunks=(1, 16, 16, 7), attributes=attrs)
    before = store_files(out)
    cfg = compose("export", ["debug=tiny", f"export.out={out}"])
    cfg.run_dir = str(tmp_path / "r")
    # the input volume as the output, a folder of the user's files, a zarr emfm did not write:
    # refused whether resuming or not, nothing deleted
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    theirs = tmp_path / "theirs.zarr"
    write_array(theirs, np.ones((2, 8, 8), np.uint8))
    inp = tmp_path / "in.zarr"
    img = (np.random.default_rng(0).random((2, 64, 64)) * 255).astype(np.uint8)
    write_array(inp, img, chunks=(1, 64, 64))
    for resume in (True, False):
        for path, pattern in ((inp, "input volume"), (mine, "not an output"), (theirs, "not an")):
            c = compose("export", ["debug=tiny", f"export.path={inp}", f"export.out={path}"])
            c.run_dir, c.export.resume = str(tmp_path / "r"), resume
            with pytest.raises(VolumeError, match=pattern):
                pipeline.run_export(c)
    assert (mine / "notes.txt").read_text() == "keep"
    np.testing.assert_array_equal(open_volume(theirs).read(), 1)
    np.testing.assert_array_equal(open_volume(inp).read(), img)
    with pytest.raises(
        VolumeError, match=r"exists with shape \(30, 48, 48, 7\).*writes shape \(30, 48, 48, 32\)"
    ):
        pipeline.run_export(cfg)
    assert store_files(out) == before
    other = tmp_path / "g.zarr"
    create_volume(
        other,
        (30, 48, 48, 32),
        np.float16,
        chunks=(1, 16, 16, 32),
        attributes={"export": {"layers": [0]}},
    )
    cfg.export.out = str(other)
    with pytest.raises(VolumeError, match=r"holds another export \(differs in: .*layers"):
        pipeline.run_export(cfg)
    # a volume with channels, and a 2D one
    for shape in ((2, 64, 64, 3), (64, 64)):
        p = tmp_path / f"v{len(shape)}.zarr"
        write_array(p, np.zeros(shape, np.uint8))
        cfg.export.path, cfg.export.out = str(p), str(tmp_path / "h.zarr")
        with pytest.raises(VolumeError, match=rf"has {len(shape)} dimensions"):
            pipeline.run_export(cfg)
        assert not (tmp_path / "h.zarr").exists()


def _popen(*args):
    exe = Path(sys.executable).parent / "emfm"
    return subprocess.Popen(
        [str(exe), *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )


def test_killed_export_resumed_by_two_processes_gives_identical_bytes(tmp_path):
    from test_engine import _free_port

    ref, out = tmp_path / "ref.zarr", tmp_path / "out.zarr"
    cfg = compose("export", KILL_ARGS + [f"export.out={ref}"])
    cfg.run_dir = str(tmp_path / "ref_run")
    total = pipeline.run_export(cfg)["blocks"]
    assert total == 1440
    p = _popen("export", *KILL_ARGS, f"export.out={out}", f"hydra.run.dir={tmp_path / 'a'}")
    t0 = time.time()
    while p.poll() is None and time.time() - t0 < 300:
        if (out / "0" / "c").exists() and sum(
            len(f) for _, _, f in os.walk(out / "0" / "c")
        ) >= 200:
            break
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    n_done = sum(len(f) for _, _, f in os.walk(out / "0" / "c"))
    assert 200 <= n_done < total, f"kill missed the export ({n_done} of {total} blocks written)"
    port = _free_port()
    procs = [
        _popen(
            "export",
            *KILL_ARGS,
            f"export.out={out}",
            f"hydra.run.dir={tmp_path / 'b'}",
            "distributed.enabled=true",
            f"distributed.coordinator_address=127.0.0.1:{port}",
            "distributed.num_processes=2",
            f"distributed.process_id={i}",
        )
        for i in range(2)
    ]
    for q in procs:
        _, err = q.communicate(timeout=400)
        assert q.returncode == 0, err[-3000:]
    recs = [
        json.loads((tmp_path / "b" / n).read_text())
        for n in ("export.json", "export_process1.json")
    ]
    assert [r["process"] for r in recs] == [0, 1] and all(r["processes"] == 2 for r in recs)
    assert all(r["tiles_written"] + r["tiles_skipped"] == total // 2 for r in recs)
    assert (
        sum(r["tiles_skipped"] for r in recs) >= n_done - 16
    )  # blocks in flight at the kill may be redone
    assert all(r["tiles_written"] > 0 for r in recs)
    assert store_files(out) == store_files(ref)  # every chunk and the metadata, byte for byte
    cfg.export.out = str(out)
    again = pipeline.run_export(cfg)  # idempotent: nothing left to do
    assert again["tiles_written"] == 0 and again["tiles_skipped"] == total


def test_discover_recovers_planted_clusters(tmp_path):
    """Features with three planted, well-separated clusters: the streamed k-means labels them
    exactly (up to renaming), writes the label volume, one gallery per cluster and the overview."""
    from emfm.export.discover import discover

    rng = np.random.default_rng(0)
    truth = np.zeros((3, 40, 36), np.int64)
    truth[:, 10:25] = 1
    truth[:, :, 20:] = 2
    centres = rng.normal(size=(3, 12)) * 4
    feats = (centres[truth] + rng.normal(size=truth.shape + (12,)) * 0.3).astype(np.float16)
    write_array(
        tmp_path / "f.zarr",
        feats,
        chunks=(1, 8, 8, 12),
        attributes={"source": bundled.sample_raw(), "stride": [1, 8, 8], "roi_origin": [4, 40, 60]},
    )
    res = discover(
        str(tmp_path / "f.zarr"),
        tmp_path / "d",
        k=3,
        batch_size=256,
        examples=4,
        crop=32,
        show_progress=False,
    )
    lab = open_volume(res["labels"]).read()
    assert lab.shape == truth.shape and lab.dtype == np.uint8
    pairs = set(zip(truth.ravel().tolist(), lab.ravel().tolist()))
    assert len(pairs) == 3 and len({a for a, _ in pairs}) == len({b for _, b in pairs}) == 3
    assert sorted(res["counts"]) == sorted(np.bincount(truth.ravel()).tolist())
    assert len(res["galleries"]) == 3 and all(
        Path(g).stat().st_size > 1000 for g in res["galleries"]
    )
    assert Path(res["overview"]).exists() and (tmp_path / "d" / "centroids.npy").exists()


def test_interrupted_discover_resumes_to_identical_output(tmp_path, monkeypatch):
    """A discover stopped mid-fit, then again mid-labelling, and restarted with the same arguments
    continues from its saved k-means state, skips the labelled regions, and matches an uninterrupted
    run."""
    from sklearn.cluster import MiniBatchKMeans

    from emfm.export.discover import discover

    rng = np.random.default_rng(1)
    truth = rng.integers(0, 3, (8, 24, 24)).repeat(2, 1).repeat(2, 2)[:, :40, :36]
    feats = (rng.normal(size=(3, 6))[truth] * 3 + rng.normal(size=truth.shape + (6,))).astype(
        np.float16
    )
    write_array(
        tmp_path / "f.zarr",
        feats,
        chunks=(1, 8, 8, 6),
        attributes={"source": bundled.sample_raw(), "stride": [1, 8, 8], "roi_origin": [0, 0, 0]},
    )
    kw = dict(k=3, batch_size=256, examples=3, crop=16, show_progress=False, state_every_s=0.0)
    ref = discover(str(tmp_path / "f.zarr"), tmp_path / "ref", **kw)  # 8 regions (one per section)

    def fail_after(name, n):
        orig, calls = getattr(MiniBatchKMeans, name), []

        def f(self, *a, **k):
            calls.append(1)
            if len(calls) > n:
                raise RuntimeError("injected interruption")
            return orig(self, *a, **k)

        monkeypatch.setattr(MiniBatchKMeans, name, f)

    run = tmp_path / "run"
    fail_after("partial_fit", 14)  # 5-6 updates per region: stops in region 2
    with pytest.raises(RuntimeError, match="injected"):
        discover(str(tmp_path / "f.zarr"), run, **kw)
    monkeypatch.undo()
    with open(run / "discover_state" / "fit.pkl", "rb") as f:
        assert pickle.load(f)["next"] == 2
    fail_after("transform", 5)  # the fit resumes at region 2, labelling stops in region 5
    with pytest.raises(RuntimeError, match="injected"):
        discover(str(tmp_path / "f.zarr"), run, **kw)
    monkeypatch.undo()
    res = discover(str(tmp_path / "f.zarr"), run, **kw)
    assert res["fit_regions_skipped"] == 8 and res["label_regions_skipped"] == 5
    assert store_files(Path(res["labels"])) == store_files(
        Path(ref["labels"])
    )  # label chunks, byte for byte
    assert (run / "centroids.npy").read_bytes() == (tmp_path / "ref" / "centroids.npy").read_bytes()
    for key in ("counts", "fit_vectors", "inertia_per_vector", "examples"):
        assert res[key] == ref[key], key
    with pytest.raises(VolumeError, match=r"another job \(differs in: k\)"):
        discover(str(tmp_path / "f.zarr"), run, **{**kw, "k": 4})


def test_discovery_notebook_runs_tiny(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(REPO / "notebooks" / "discovery.ipynb", as_version=4)
    env = {"EMFM_NOTEBOOK_TINY": "1", "EMFM_NOTEBOOK_RUN_DIR": str(tmp_path / "nb")}
    os.environ.update(env)
    try:
        NotebookClient(
            nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        ).execute()
    finally:
        for k in env:
            os.environ.pop(k)
    assert open_volume(tmp_path / "nb" / "export" / "features.zarr").shape == (6, 48, 48, 8)
    res = json.loads((tmp_path / "nb" / "discover" / "discover.json").read_text())
    assert res["k"] == 4 and sum(res["counts"]) == 6 * 48 * 48 and len(res["galleries"]) == 4


def test_discover_config_and_cli_errors(tmp_path):
    from conftest import CONFIGS, run_cli
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from emfm.config import schema

    schema.register()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None, job_name="t"):
        raw = hydra_compose(
            config_name="discover", overrides=["features=f.zarr", "k=1", "run_dir=x"]
        )
    with pytest.raises(schema.ConfigError, match=r"k=1"):
        schema.validate_discover(OmegaConf.to_object(raw))
    res = run_cli(
        "discover", f"features={tmp_path / 'none.zarr'}", f"hydra.run.dir={tmp_path / 'd'}"
    )
    assert (
        res.returncode == 2
        and f"emfm: error: volume not found: {tmp_path / 'none.zarr'}" in res.stderr
    )
    assert "Traceback" not in res.stderr
    # an image of another voxel size than the features' source is refused
    from emfm.export.discover import _Sources

    enc = build_encoder(ModelConfig(name="unet", patch_size=[1, 1], width=8, depth=2), seed=0)
    img = (np.random.default_rng(0).random((2, 32, 32)) * 255).astype(np.uint8)
    src = write_array(tmp_path / "src.zarr", img, voxel_size=(50, 4, 4))
    F.export_features(enc, src, tmp_path / "f.zarr", grey_range=(0.0, 255.0), show_progress=False)
    other = write_array(tmp_path / "other.zarr", img, voxel_size=(1, 1, 1))
    assert _Sources.open(str(tmp_path / "f.zarr")).path == src.path
    with pytest.raises(VolumeError, match=r"voxel size \(1.0, 1.0, 1.0\).*exported from"):
        _Sources.open(str(tmp_path / "f.zarr"), str(other.path))


def test_3d_unet_blocks_equal_whole_volume_forward(tmp_path):
    """A 3D encoder on 3D blocks (z margin too): the exported decoder features equal one forward
    pass over the mirrored whole volume."""
    enc = build_encoder(
        ModelConfig(name="unet", patch_size=[1, 1, 1], width=8, depth=2, norm="layer"), seed=1
    )
    raw = open_volume(bundled.sample_raw()).read((slice(0, 12), slice(0, 32), slice(0, 32)))
    vol = write_array(tmp_path / "v.zarr", raw)
    res = F.export_features(
        enc,
        vol,
        tmp_path / "f.zarr",
        grey_range=(0.0, 255.0),
        tile=16,
        margin=12,
        block_z=4,
        margin_z=10,
        dtype="float32",
        batch_size=4,
        show_progress=False,
    )
    assert (
        res["shape"] == [12, 32, 32, 8]
        and res["block"] == [4, 16, 16]
        and res["tiles_written"] == 12
    )
    m = (10, 12, 12)  # the receptive field (radius 10) fits in the margins
    x = np.pad(raw.astype(np.float32) / 255, [(p, p) for p in m], mode="reflect")
    whole = np.asarray(enc(jnp.asarray(x)[None, ..., None])[1]["patch_map"])[
        0, 10:-10, 12:-12, 12:-12
    ]
    np.testing.assert_allclose(open_volume(tmp_path / "f.zarr").read(), whole, rtol=0, atol=2e-5)


def test_group_norm_unet_windows_are_blended_by_default():
    """A U-Net with group norm normalises with each window's statistics, so margin-dropped blocks
    differ from a whole-image forward at their seams; `auto` blends them (a per-pixel norm needs
    no blending)."""
    cfg = dict(name="unet", patch_size=[1, 1], width=8, depth=2)
    group = build_encoder(ModelConfig(**cfg), seed=3)
    layer = build_encoder(ModelConfig(**cfg, norm="layer"), seed=3)
    assert (
        E.block_encoders(group, block=(1, 64, 64), margin=(0, 16, 16), blend="auto")[2] == "cosine"
    )
    assert E.block_encoders(layer, block=(1, 64, 64), margin=(0, 16, 16), blend="auto")[2] == "none"
    img = sample()[:1, :128, :128]
    whole = E.encode(group, img, tile=None, margin=0)
    err = {
        b: np.abs(E.encode(group, img, tile=64, margin=16, blend=b) - whole).mean()
        for b in ("none", "cosine")
    }
    assert err["cosine"] < err["none"], err
