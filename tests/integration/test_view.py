"""`emfm view`: volumes and run directories served in neuroglancer, streamed chunk by chunk from the
files.

Tiny synthetic volumes: a raw grey volume, an instance label volume, exported-style features and a
probability map made of part of the raw volume. The layers' kinds, names and voxel sizes are checked
from the viewer's state, data is fetched over HTTP from the local server and compared with the
files, and (where a Chromium / Chrome is installed) the page is rendered headless and saved as a
PNG.
"""

from __future__ import annotations

import io
import json
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from emfm import view, view_browser, view_plan
from emfm.data.volume import write_array
from emfm.errors import UserError

VS = (50.0, 4.0, 4.0)
SHAPE = (4, 48, 64)


def _raw() -> np.ndarray:
    z, y, x = np.indices(SHAPE)
    return (40 + 30 * np.sin(x / 4.0) * np.cos(y / 5.0) + 60 * ((x + y + 8 * z) % 24 < 12)).astype(
        np.uint8
    )


def _labels() -> np.ndarray:
    lab = np.zeros(SHAPE, np.uint32)
    lab[:, 4:24, 6:30] = 7
    lab[:, 26:44, 34:60] = 1_000_003
    return lab


@pytest.fixture(scope="module")
def vols(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("view")
    rng = np.random.default_rng(0)
    raw = write_array(d / "raw.zarr", _raw(), chunks=(1, 32, 32), voxel_size=VS)
    write_array(d / "cells.zarr", _labels(), chunks=(1, 32, 32), voxel_size=VS)
    feats = rng.normal(size=SHAPE + (8,)).astype(np.float16)
    feats[..., 0] += (_raw() / 16.0).astype(np.float16)
    write_array(
        d / "features.zarr",
        feats,
        chunks=(1, 32, 32, 8),
        voxel_size=VS,
        attributes={"content": "U-Net decoder output", "export": {"stride": [1, 1, 1]}},
    )
    # predictions of sections 1..3 of the raw volume, as `emfm predict` records them
    run = d / "run"
    run.mkdir()
    prob = rng.random((2,) + SHAPE[1:] + (2,)).astype(np.float16)
    write_array(
        run / "predictions.zarr",
        prob,
        voxel_size=VS,
        attributes={
            "content": "probabilities",
            "channels": ["background", "membrane"],
            "source": raw.path,
            "roi": [[1, 3], [0, SHAPE[1]], [0, SHAPE[2]]],
        },
    )
    write_array(
        run / "pred_instances.zarr",
        _labels()[1:3],
        voxel_size=VS,
        attributes={"instances": {"segments": 2}},
    )
    (run / "config.yaml").write_text("predict:\n  path: ''\n")
    return {
        "dir": d,
        "raw": d / "raw.zarr",
        "cells": d / "cells.zarr",
        "features": d / "features.zarr",
        "run": run,
    }


@pytest.fixture(scope="module")
def served(vols):
    viewer, url = view.serve([str(vols["raw"]), str(vols["cells"]), str(vols["features"])])
    return viewer, url


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=20) as r:
        assert r.status == 200, url
        return r.read()


def _chunk(url: str, layer: dict, start, stop) -> np.ndarray:
    """Fetch a region of a served layer at full resolution, as the neuroglancer client does."""
    key = layer["url"].removeprefix("python://volume/")
    base = url.split("/v/")[0]
    ones = ",".join("1" * len(start))
    box = f"{','.join(map(str, start))}/{','.join(map(str, stop))}"
    q = f"{base}/neuroglancer/npz/{key}/{ones}/{box}"
    return np.load(io.BytesIO(zlib.decompress(_get(q))))


def test_layers_kinds_names_and_voxel_sizes(served):
    viewer, url = served
    layers = {layer["name"]: layer for layer in view.layer_summary(viewer)}
    assert list(layers) == [
        "raw",
        "features (PCA RGB)",
        "cells",
    ]  # raw below, features, labels on top
    assert layers["raw"]["type"] == "image" and layers["features (PCA RGB)"]["type"] == "image"
    assert layers["cells"]["type"] == "segmentation"
    for layer in layers.values():
        assert layer["voxel_size"] == list(VS)
    assert layers["features (PCA RGB)"]["shape"] == list(SHAPE) + [3]
    state = viewer.state.to_json()
    assert state["dimensions"] == {"x": [4e-9, "m"], "y": [4e-9, "m"], "z": [5e-8, "m"]}
    assert state["layout"]["type"] == "row"  # features beside the raw volume and its labels


def test_served_over_http_matches_the_files(served):
    viewer, url = served
    page = _get(url).decode()
    assert "<html" in page.lower()
    layers = {layer["name"]: layer for layer in view.layer_summary(viewer)}
    base = url.split("/v/")[0]
    info = json.loads(
        _get(f"{base}/neuroglancer/info/{layers['cells']['url'].removeprefix('python://volume/')}")
    )
    assert info["volumeType"] == "segmentation" and info["dataType"] == "uint32"
    assert info["shape"] == list(SHAPE)
    # the client asks in the array's own (z, y, x) order; npz holds the region as written
    raw = _chunk(url, layers["raw"], (1, 0, 0), (2, 32, 32))
    np.testing.assert_array_equal(raw, _raw()[1:2, :32, :32])
    cells = _chunk(url, layers["cells"], (0, 16, 16), (4, 48, 64))
    np.testing.assert_array_equal(cells, _labels()[:, 16:, 16:])
    rgb = _chunk(url, layers["features (PCA RGB)"], (0, 0, 0, 0), (1, 32, 32, 3))
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 32, 32, 3) and rgb.std() > 10
    # the first component follows the raw grey values mixed into feature channel 0
    pc = rgb[..., 0].astype(float).ravel()
    assert abs(np.corrcoef(pc, _raw()[:1, :32, :32].astype(float).ravel())[0, 1]) > 0.5


def test_run_directory_shows_products_and_their_raw_input(vols):
    p = view_plan.plan([str(vols["run"])])
    kinds = {e.name: e.kind for e in p.entries}
    assert kinds == {"raw": "raw", "predictions": "probabilities", "pred_instances": "labels"}, (
        kinds
    )
    pred = next(e for e in p.entries if e.kind == "probabilities")
    inst = next(e for e in p.entries if e.kind == "labels")
    assert pred.offset_nm == (50.0, 0.0, 0.0)  # roi starts at section 1
    assert (
        inst.offset_nm == pred.offset_nm
    )  # instances share the grid of the prediction they came from
    viewer = view.build_viewer(p)
    layers = {layer["name"]: layer for layer in view.layer_summary(viewer)}
    assert set(layers) == {
        "raw",
        "predictions:background",
        "predictions:membrane",
        "pred_instances",
    }
    src = viewer.state.layers["predictions:membrane"].source[0]
    assert np.allclose(np.asarray(src.transform.matrix)[:, -1], [1.0, 0.0, 0.0])  # one section down
    assert "colormapJet" in viewer.state.layers["predictions:membrane"].shader
    # one channel of the probabilities shows (the last, the foreground class); the others can be
    # switched on
    assert viewer.state.layers["predictions:membrane"].visible is not False
    assert viewer.state.layers["predictions:background"].visible is False


def test_feature_grid_is_placed_on_the_raw_volume(vols, tmp_path):
    """A strided feature grid of part of the raw volume (OME-Zarr scale and translation, as `emfm
    export` writes them) lands on the raw voxels it was computed from."""
    from emfm.data.volume import create_ome_zarr, open_volume
    from emfm.export.features import feature_grid_transform

    raw = open_volume(vols["raw"])
    grid = feature_grid_transform(raw, (0, 8, 16), (1, 4, 4))  # cell 0 starts at voxel (0, 8, 16)
    out = create_ome_zarr(
        tmp_path / "strided.zarr",
        (4, 8, 8, 6),
        np.float16,
        chunks=(1, 8, 8, 6),
        attributes={"content": "final-norm patch tokens"},
        **grid,
    )
    out.array.write(np.random.default_rng(1).normal(size=(4, 8, 8, 6)).astype(np.float16)).result()
    viewer, _ = view.serve([str(vols["raw"]), str(tmp_path / "strided.zarr")])
    layers = {layer["name"]: layer for layer in view.layer_summary(viewer)}
    assert layers["strided (PCA RGB)"]["voxel_size"] == [50.0, 16.0, 16.0]
    m = np.asarray(viewer.state.layers["strided (PCA RGB)"].source[0].transform.matrix)
    assert np.allclose(
        m[:, -1], [0, 2, 4, 0]
    )  # in feature cells: 8 and 16 raw voxels of 4 nm = 2 and 4 cells of 16 nm


def test_not_a_volume_is_a_one_line_error(vols, tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="notes.txt"):
        view_plan.plan([str(tmp_path / "notes.txt")])
    with pytest.raises(UserError, match="empty_run"):
        (tmp_path / "empty_run").mkdir()
        view_plan.plan([str(tmp_path / "empty_run")])
    r = run_cli("view", str(tmp_path / "missing.zarr"))
    assert (
        r.returncode == 2
        and r.stderr.strip() == f"emfm: error: {tmp_path / 'missing.zarr'} does not exist"
    )


def test_screenshot_shows_raw_and_labels(vols, tmp_path):
    exe = view_browser.find_browser()
    if exe is None:
        pytest.skip("no browser installed")
    viewer, _ = view.serve([str(vols["raw"]), str(vols["cells"])])
    png = view_browser.screenshot(
        viewer, tmp_path / "view.png", browser=exe, size=(640, 480), timeout_s=45
    )
    from PIL import Image

    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert img.shape[:2] == (480, 640)
    grey = (np.ptp(img, axis=2) < 8) & (img.sum(axis=2) > 30)
    coloured = np.ptp(img, axis=2) > 60
    assert len(np.unique(img[grey][:, 0])) > 20, "raw grey values are drawn"
    assert coloured.sum() > 500, "label segments are drawn in colour"
    print(f"screenshot: {png}")
