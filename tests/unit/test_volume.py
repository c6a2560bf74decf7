"""Volumes: formats and metadata, OME-Zarr level choice, errors that name the path, read retries."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import tensorstore as ts

from emfm.data import volume as volmod
from emfm.data.volume import VolumeError, create_volume, open_volume, write_array


def _ts_create(path: Path, driver: str, data: np.ndarray, chunks, **meta):
    kv = {"driver": "file", "path": str(path)}
    if driver == "zarr":
        md = {"shape": list(data.shape), "dtype": data.dtype.str, "chunks": list(chunks), **meta}
    elif driver == "n5":
        md = {
            "dimensions": list(data.shape),
            "dataType": data.dtype.name,
            "blockSize": list(chunks),
            "compression": {"type": "gzip"},
            **meta,
        }
    else:
        md = {
            "shape": list(data.shape),
            "data_type": data.dtype.name,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
            **meta,
        }
    arr = ts.open({"driver": driver, "kvstore": kv, "metadata": md, "create": True}).result()
    arr.write(data).result()
    return arr


@pytest.fixture
def data():
    return np.random.default_rng(0).integers(0, 60000, (5, 12, 10)).astype(np.uint16)


def test_zarr3_roundtrip_axes_dtype_voxel_size(tmp_path, data):
    write_array(tmp_path / "v", data, chunks=(2, 8, 8), voxel_size=(40, 4, 5))
    v = open_volume(tmp_path / "v")
    assert v.shape == (5, 12, 10) and v.spatial_shape == (5, 12, 10) and v.ndim == 3
    assert v.dtype == np.uint16 and v.axes == ("z", "y", "x") and v.chunks == (2, 8, 8)
    assert v.voxel_size == (40.0, 4.0, 5.0)
    np.testing.assert_array_equal(v.read(), data)
    np.testing.assert_array_equal(
        v.read((slice(1, 3), slice(2, 9), slice(0, 4))), data[1:3, 2:9, 0:4]
    )


def test_zarr2_voxel_size_from_zattrs(tmp_path, data):
    _ts_create(tmp_path / "v2", "zarr", data, (2, 4, 4))
    (tmp_path / "v2" / ".zattrs").write_text(json.dumps({"resolution": [30, 6, 6]}))
    v = open_volume(tmp_path / "v2")
    assert v.dtype == np.uint16 and v.chunks == (2, 4, 4) and v.voxel_size == (30.0, 6.0, 6.0)
    np.testing.assert_array_equal(v.read(), data)


def test_n5_axes_and_voxel_size_as_n5_tools_write_them(tmp_path, data):
    # N5 lists dimensions x, y, z (n5-java, z5py, BigDataViewer): the stored array is data.T
    xyz = np.ascontiguousarray(data.T)
    _ts_create(tmp_path / "n5", "n5", xyz, (4, 4, 2), resolution=[3, 4, 50], units=["nm"] * 3)
    v = open_volume(tmp_path / "n5")
    assert v.shape == data.shape and v.voxel_size == (50.0, 4.0, 3.0)
    np.testing.assert_array_equal(v.read(), data)
    # n5-viewer's pixelResolution, in micrometres
    _ts_create(tmp_path / "n5b", "n5", xyz, (4, 4, 2))
    attrs = json.loads((tmp_path / "n5b" / "attributes.json").read_text())
    attrs["pixelResolution"] = {"dimensions": [0.003, 0.004, 0.05], "unit": "um"}
    (tmp_path / "n5b" / "attributes.json").write_text(json.dumps(attrs))
    v = open_volume(tmp_path / "n5b")
    assert v.shape == data.shape and np.allclose(v.voxel_size, (50.0, 4.0, 3.0))
    # an "axes" attribute that puts z first keeps the stored order
    _ts_create(tmp_path / "n5c", "n5", data, (2, 4, 4), axes=["z", "y", "x"])
    np.testing.assert_array_equal(open_volume(tmp_path / "n5c").read(), data)


def test_neuroglancer_precomputed_as_zyx_from_its_voxel_offset(tmp_path, data):
    spec = {
        "driver": "neuroglancer_precomputed",
        "kvstore": {"driver": "file", "path": str(tmp_path / "p")},
        "multiscale_metadata": {"type": "image", "data_type": "uint16", "num_channels": 1},
        "scale_metadata": {
            "size": [10, 12, 5],  # x, y, z
            "resolution": [5, 4, 40],
            "encoding": "raw",
            "chunk_size": [8, 8, 2],
            "voxel_offset": [100, 200, 3],
        },
    }
    arr = ts.open(spec, create=True).result()
    arr[ts.d["z", "y", "x", "channel"].transpose[:]][..., 0].write(data).result()
    v = open_volume(tmp_path / "p")
    assert v.shape == (5, 12, 10) and v.axes == ("z", "y", "x")
    assert v.voxel_size == (40.0, 4.0, 5.0) and v.translation == (120.0, 800.0, 500.0)
    np.testing.assert_array_equal(v.read(), data)
    np.testing.assert_array_equal(
        v.read((slice(1, 3), slice(0, 4), slice(2, 9))), data[1:3, :4, 2:9]
    )


def test_4d_has_channel_axis(tmp_path):
    x = np.zeros((2, 4, 4, 3), np.float32)
    v = write_array(tmp_path / "c", x)
    v = open_volume(tmp_path / "c")
    assert v.axes == ("z", "y", "x", "c") and v.spatial_shape == (2, 4, 4)


def _ome_group(root: Path, scales):
    root.mkdir()
    datasets = []
    for i, s in enumerate(scales):
        n = 16 // 2**i
        write_array(root / f"s{i}", np.full((2, n, n), i, np.uint8))
        datasets.append(
            {"path": f"s{i}", "coordinateTransformations": [{"type": "scale", "scale": s}]}
        )
    attrs = {
        "ome": {
            "version": "0.5",
            "multiscales": [
                {"axes": [{"name": a, "type": "space"} for a in "zyx"], "datasets": datasets}
            ],
        }
    }
    (root / "zarr.json").write_text(
        json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attrs})
    )


def test_ome_zarr_level_by_index_and_by_voxel_size(tmp_path):
    _ome_group(tmp_path / "g", [[50, 4, 4], [50, 8, 8], [50, 16, 16]])
    v0 = open_volume(tmp_path / "g")
    assert v0.shape == (2, 16, 16) and v0.voxel_size == (50.0, 4.0, 4.0) and v0.read().max() == 0
    v2 = open_volume(tmp_path / "g", level=2)
    assert v2.shape == (2, 4, 4) and v2.voxel_size == (50.0, 16.0, 16.0) and v2.read().max() == 2
    v1 = open_volume(tmp_path / "g", voxel_size=(50, 9, 9))
    assert v1.shape == (2, 8, 8) and v1.voxel_size == (50.0, 8.0, 8.0)
    with pytest.raises(VolumeError, match="level 3.*has 3"):
        open_volume(tmp_path / "g", level=3)


def test_missing_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.zarr"):
        open_volume(tmp_path / "nope.zarr")


def test_directory_that_is_not_a_volume(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "a.txt").write_text("x")
    with pytest.raises(VolumeError, match="plain.*no zarr.json"):
        open_volume(tmp_path / "plain")


@pytest.mark.parametrize("dtype", ["bool", "complex64"])
def test_unsupported_dtype(tmp_path, dtype):
    _ts_create(tmp_path / dtype, "zarr3", np.zeros((2, 4, 4), dtype), (2, 4, 4))
    with pytest.raises(VolumeError, match=f"{dtype}.*dtype {dtype} is not supported"):
        open_volume(tmp_path / dtype)


@pytest.mark.parametrize("shape", [(8,), (1, 2, 2, 2, 2)])
def test_wrong_dimensionality(tmp_path, shape):
    _ts_create(tmp_path / "bad", "zarr3", np.zeros(shape, np.uint8), shape)
    with pytest.raises(VolumeError, match=f"bad: {len(shape)} dimensions"):
        open_volume(tmp_path / "bad")


def test_corrupt_chunk_names_volume_and_region(tmp_path, data):
    write_array(tmp_path / "v", data, chunks=(2, 4, 4))
    chunk = tmp_path / "v" / "c" / "0" / "0" / "0"
    assert chunk.is_file()
    chunk.write_bytes(b"not zstd at all" * 7)
    v = open_volume(tmp_path / "v")
    with pytest.raises(VolumeError, match=r"reading \[0:2, 0:4, 0:4\] of volume .*v failed"):
        v.read((slice(0, 2), slice(0, 4), slice(0, 4)))
    np.testing.assert_array_equal(
        v.read((slice(2, 4), slice(0, 4), slice(0, 4))), data[2:4, :4, :4]
    )


def test_create_volume_exist_ok_checks_shape(tmp_path):
    create_volume(tmp_path / "o", (4, 4, 4), np.uint8, chunks=(4, 4, 4))
    assert create_volume(
        tmp_path / "o", (4, 4, 4), np.uint8, chunks=(4, 4, 4), exist_ok=True
    ).shape == (4, 4, 4)
    with pytest.raises(VolumeError, match="exists with shape"):
        create_volume(tmp_path / "o", (4, 4, 8), np.uint8, chunks=(4, 4, 4), exist_ok=True)


class Flaky:
    """A tensorstore stand-in whose reads fail `fails` times with a transient error, then
    succeed."""

    def __init__(self, data, fails, error="UNAVAILABLE: connection reset by peer"):
        self.data, self.fails, self.error, self.calls = data, fails, error, 0
        self.shape, self.dtype = data.shape, ts.uint8

    def __getitem__(self, region):
        return _FlakyView(self, region)


class _FlakyView:
    def __init__(self, parent, region):
        self.parent, self.region = parent, region

    def read(self):
        p = self.parent
        p.calls += 1
        fail = p.calls <= p.fails
        region = self.region

        class Fut:
            def result(self):
                if fail:
                    raise ValueError(p.error)
                return p.data[region]

        return Fut()


def _flaky_volume(fails, error="UNAVAILABLE: connection reset by peer"):
    data = np.arange(64, dtype=np.uint8).reshape(1, 8, 8)
    arr = Flaky(data, fails, error)
    return volmod.Volume(
        path="gs://bucket/flaky", array=arr, voxel_size=(1.0, 1.0, 1.0), axes=("z", "y", "x")
    ), arr


def test_transient_read_failures_are_retried(monkeypatch):
    sleeps = []
    monkeypatch.setattr(volmod.time, "sleep", sleeps.append)
    v, arr = _flaky_volume(fails=2)
    region = (slice(0, 1), slice(2, 4), slice(0, 8))
    np.testing.assert_array_equal(v.read(region), arr.data[region])
    assert arr.calls == 3 and sleeps == [volmod.BACKOFF_S, 2 * volmod.BACKOFF_S]
    # the loader's path: a future that was already started fails, the re-read succeeds
    v, arr = _flaky_volume(fails=2)
    np.testing.assert_array_equal(v.result(v.read_async(region), region), arr.data[region])
    assert arr.calls == 3


def test_persistent_or_permanent_failures_raise(monkeypatch):
    monkeypatch.setattr(volmod.time, "sleep", lambda s: None)
    v, arr = _flaky_volume(fails=100)
    with pytest.raises(
        VolumeError, match=r"\[0:1, 0:8, 0:8\] of volume gs://bucket/flaky failed: UNAVAILABLE"
    ):
        v.read((slice(0, 1), slice(0, 8), slice(0, 8)))
    assert arr.calls == volmod.READ_TRIES
    v, arr = _flaky_volume(fails=100, error="FAILED_PRECONDITION: corrupt chunk")
    with pytest.raises(VolumeError, match="corrupt chunk"):
        v.read((slice(0, 1), slice(0, 8), slice(0, 8)))
    assert arr.calls == 1  # not transient: no retry


def test_bundled_sample_opens():
    from emfm.data import bundled

    v = open_volume(bundled.sample_raw())
    assert v.shape == (30, 384, 384) and v.voxel_size == (50.0, 4.0, 4.0) and os.fspath(v.path)


def test_an_empty_volume_is_a_clear_error(tmp_path):
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / "e.zarr")}}
    spec["metadata"] = {"shape": [0, 64, 64], "data_type": "uint8"}
    ts.open(spec, create=True).result()
    with pytest.raises(VolumeError, match=r"shape \(0, 64, 64\).*no voxels"):
        open_volume(tmp_path / "e.zarr")


def test_a_group_given_as_a_volume_names_its_arrays(tmp_path):
    g = tmp_path / "g.zarr"
    g.mkdir()
    (g / ".zgroup").write_text('{"zarr_format": 2}')
    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(g / "raw")}}
    spec["metadata"] = {"shape": [2, 8, 8], "dtype": "|u1", "chunks": [1, 8, 8]}
    ts.open(spec, create=True).result()
    with pytest.raises(VolumeError, match=r"is a group, not an array; arrays in it: raw \(give"):
        open_volume(g)
    assert open_volume(g / "raw").shape == (2, 8, 8)


def test_ome_zarr_units_and_singleton_time_and_channel_axes(tmp_path):
    # NGFF 0.4 layout of bioformats2raw: TCZYX with t = c = 1, scale in micrometres
    g = tmp_path / "ome.zarr"
    g.mkdir()
    img = np.arange(2 * 8 * 8, dtype=np.uint8).reshape(1, 1, 2, 8, 8)
    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(g / "0")}}
    spec["metadata"] = {"shape": list(img.shape), "dtype": "|u1", "chunks": [1, 1, 1, 8, 8]}
    ts.open(spec, create=True).result().write(img).result()
    axes = [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"}]
    axes += [{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"]
    scale = {"type": "scale", "scale": [1, 1, 0.04, 0.0059, 0.0059]}
    ms = {
        "version": "0.4",
        "axes": axes,
        "datasets": [{"path": "0", "coordinateTransformations": [scale]}],
    }
    (g / ".zgroup").write_text('{"zarr_format": 2}')
    (g / ".zattrs").write_text(json.dumps({"multiscales": [ms]}))
    v = open_volume(g)
    assert v.shape == (2, 8, 8) and v.axes == ("z", "y", "x")
    assert np.allclose(v.voxel_size, (40.0, 5.9, 5.9))
    np.testing.assert_array_equal(v.read(), img[0, 0])


def test_a_tiff_file_given_as_a_volume_points_to_data_import(tmp_path):
    (tmp_path / "stack.tif").write_bytes(b"II*\x00")
    with pytest.raises(VolumeError, match=r"is a TIFF file.*emfm data import .*stack.tif OUT.zarr"):
        open_volume(tmp_path / "stack.tif")


def test_a_scale_level_of_a_single_array_is_an_error(tmp_path):
    v = write_array(tmp_path / "a.zarr", np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(VolumeError, match=r"level=1 picks a scale of an OME-Zarr"):
        open_volume(v.path, level=1)
