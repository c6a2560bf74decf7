"""`emfm data import` / `emfm data info`: TIFF (real ISBI + synthetic) to OME-Zarr, levels, labels,
errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile

from emfm.cli.main import main
from emfm.data.importer import downsample2, import_volume
from emfm.data.volume import VolumeError, open_volume

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("EMFM_SHARED_DATA", REPO.parent / "shared" / "data" / "em"))


def test_downsample_mean_and_mode():
    x = np.array([[[0, 2, 5], [4, 6, 5], [9, 9, 1]]], np.uint8)  # odd size: edge padded
    np.testing.assert_array_equal(downsample2(x), [[[3, 5], [9, 1]]])
    lab = np.array([[[1, 1, 7, 3], [1, 2, 7, 3], [0, 0, 4, 5], [6, 8, 6, 7]]], np.uint32)
    np.testing.assert_array_equal(downsample2(lab, labels=True), [[[1, 7], [0, 4]]])
    assert downsample2(lab, labels=True).dtype == np.uint32
    f = np.random.default_rng(0).random((2, 8, 6)).astype(np.float32)
    np.testing.assert_allclose(downsample2(f), f.reshape(2, 4, 2, 3, 2).mean((2, 4)), rtol=1e-6)


def test_import_synthetic_tif_levels_and_info(tmp_path, capsys):
    x = np.random.default_rng(1).integers(0, 4000, (5, 20, 18)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "s.tif", x)
    main(
        [
            "data",
            "import",
            str(tmp_path / "s.tif"),
            str(tmp_path / "s.zarr"),
            "--voxel-size",
            "30",
            "5",
            "5",
            "--chunks",
            "2",
            "8",
            "8",
            "--levels",
            "3",
            "--no-progress",
        ]
    )
    g = json.loads((tmp_path / "s.zarr" / "zarr.json").read_text())
    assert g["node_type"] == "group" and g["attributes"]["ome"]["version"] == "0.5"
    v0 = open_volume(tmp_path / "s.zarr")
    assert v0.shape == (5, 20, 18) and v0.dtype == np.uint16 and v0.chunks == (2, 8, 8)
    assert v0.voxel_size == (30.0, 5.0, 5.0)
    np.testing.assert_array_equal(v0.read(), x)
    v2 = open_volume(tmp_path / "s.zarr", voxel_size=(30, 20, 20))
    assert v2.shape == (5, 5, 5) and v2.voxel_size == (30.0, 20.0, 20.0)
    np.testing.assert_array_equal(v2.read(), downsample2(downsample2(x)))
    zarr_json = json.loads((tmp_path / "s.zarr" / "0" / "zarr.json").read_text())
    assert [c["name"] for c in zarr_json["codecs"]] == ["bytes", "zstd"]
    capsys.readouterr()
    main(["data", "info", str(tmp_path / "s.zarr"), "--json"])
    info = json.loads(capsys.readouterr().out)
    assert (
        info["shape"] == [5, 20, 18] and info["dtype"] == "uint16" and info["chunks"] == [2, 8, 8]
    )
    assert [s["shape"] for s in info["scales"]] == [[5, 20, 18], [5, 10, 9], [5, 5, 5]]
    assert (
        info["range"]["min"] == x.min()
        and info["range"]["max"] == x.max()
        and info["range"]["exact"]
    )
    main(["data", "info", str(tmp_path / "s.zarr"), "--level", "1"])
    table = capsys.readouterr().out
    assert "5 x 10 x 9 (zyx)" in table and "30 x 10 x 10 nm" in table and "level" in table


def test_import_labels_use_mode(tmp_path):
    lab = np.zeros((2, 8, 8), np.uint32)
    lab[:, :5, :5] = 70000
    lab[:, 0, 0] = 3
    tifffile.imwrite(tmp_path / "l.tif", lab)
    import_volume(tmp_path / "l.tif", tmp_path / "l.zarr", levels=2, labels=True, progress=False)
    v1 = open_volume(tmp_path / "l.zarr", level=1).read()
    assert set(np.unique(v1)) <= {
        0,
        70000,
    }  # mode never invents ids; the mean would give e.g. 52500
    assert v1[0, 0, 0] == 70000
    with pytest.raises(VolumeError, match="integer dtype"):
        tifffile.imwrite(tmp_path / "f.tif", lab.astype(np.float32))
        import_volume(tmp_path / "f.tif", tmp_path / "f.zarr", labels=True, progress=False)


def test_import_and_info_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["data", "import", str(tmp_path / "missing.tif"), str(tmp_path / "o.zarr")])
    assert e.value.code == 2 and "missing.tif" in capsys.readouterr().err
    (tmp_path / "x.png").write_bytes(b"x")
    with pytest.raises(SystemExit):
        main(["data", "import", str(tmp_path / "x.png"), str(tmp_path / "o.zarr")])
    assert "unknown format" in capsys.readouterr().err
    tifffile.imwrite(tmp_path / "s.tif", np.zeros((2, 4, 4), np.uint8))
    (tmp_path / "exists").mkdir()
    with pytest.raises(VolumeError, match="exists"):
        import_volume(tmp_path / "s.tif", tmp_path / "exists", progress=False)
    with pytest.raises(SystemExit):
        main(["data", "info", str(tmp_path / "nothere.zarr")])
    assert "nothere.zarr" in capsys.readouterr().err


def test_hdf5_import(tmp_path, monkeypatch):
    import h5py  # pinned in the test extra

    x = np.random.default_rng(2).integers(0, 60000, (5, 12, 10)).astype(np.uint16)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f.create_dataset("volumes/raw", data=x, chunks=(1, 12, 10), compression="gzip")
        f["other"] = x[0]
    with pytest.raises(VolumeError, match="--dataset"):
        import_volume(tmp_path / "a.h5", tmp_path / "a.zarr", progress=False)
    with pytest.raises(VolumeError, match="no dataset 'nope'"):
        import_volume(tmp_path / "a.h5", tmp_path / "a.zarr", dataset="nope", progress=False)
    # streamed: the source is read one slab of chunks[0] sections at a time, never whole
    reads = []
    getitem = h5py.Dataset.__getitem__
    monkeypatch.setattr(
        h5py.Dataset, "__getitem__", lambda self, k: reads.append(k) or getitem(self, k)
    )
    main(
        [
            "data",
            "import",
            str(tmp_path / "a.h5"),
            str(tmp_path / "b.zarr"),
            "--dataset",
            "volumes/raw",
            "--chunks",
            "2",
            "8",
            "8",
            "--levels",
            "2",
            "--voxel-size",
            "40",
            "4",
            "4",
            "--no-progress",
        ]
    )
    assert reads == [slice(0, 2), slice(2, 4), slice(4, 5)]
    v = open_volume(tmp_path / "b.zarr")
    assert v.dtype == np.uint16 and v.voxel_size == (40.0, 4.0, 4.0)
    np.testing.assert_array_equal(v.read(), x)
    np.testing.assert_array_equal(open_volume(tmp_path / "b.zarr", level=1).read(), downsample2(x))
    import_volume(tmp_path / "a.h5", tmp_path / "c.zarr", dataset="other", levels=1, progress=False)
    # 2D dataset: one section
    np.testing.assert_array_equal(open_volume(tmp_path / "c.zarr").read(), x[:1])


@pytest.mark.skipif(
    not (SHARED / "isbi2012" / "train_volume.tif").exists(), reason="needs ../shared/data/em"
)
def test_import_real_isbi(tmp_path):
    src = SHARED / "isbi2012" / "train_volume.tif"
    out = import_volume(
        src, tmp_path / "isbi.zarr", voxel_size=(50, 4, 4), levels=3, progress=False
    )
    assert [lv["shape"] for lv in out["levels"]] == [[30, 512, 512], [30, 256, 256], [30, 128, 128]]
    x = tifffile.imread(src)
    v = open_volume(tmp_path / "isbi.zarr")
    assert v.voxel_size == (50.0, 4.0, 4.0) and v.chunks == (30, 64, 64)
    np.testing.assert_array_equal(v.read(), x)
    v1 = open_volume(tmp_path / "isbi.zarr", level=1)
    assert v1.voxel_size == (50.0, 8.0, 8.0)
    np.testing.assert_array_equal(v1.read()[3], downsample2(x[3:4])[0])
