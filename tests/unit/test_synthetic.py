"""Synthetic EM generator: shapes, determinism, exact ground truth, contrast, zarr writer."""

import itertools
import json

import numpy as np
import pytest
import tensorstore as ts
from scipy import ndimage
from skimage import measure

from emfm.data.synthetic import SyntheticEM, synthetic_em, synthetic_volume_zarr


@pytest.fixture(scope="module")
def em2d() -> SyntheticEM:
    return synthetic_em((160, 144), seed=3)


@pytest.fixture(scope="module")
def em3d() -> SyntheticEM:
    # strong warp: the raw tessellation splits cells here, so the renumbering path is exercised
    return synthetic_em((16, 72, 64), seed=5, cell_size=24.0, warp=0.6)


@pytest.fixture(scope="module")
def em3d_aniso() -> SyntheticEM:
    return synthetic_em((12, 64, 64), seed=7, spacing=(4.0, 1.0, 1.0))


ALL = ["em2d", "em3d", "em3d_aniso"]


def neighbour_differs(cells: np.ndarray, offsets: list[tuple[int, ...]]) -> np.ndarray:
    """True where some in-bounds pixel at one of the offset combinations holds another id."""
    out = np.zeros(cells.shape, bool)
    for off in itertools.product(*offsets):
        here = tuple(slice(max(0, -o), n - max(0, o)) for o, n in zip(off, cells.shape))
        there = tuple(slice(max(0, o), n + min(0, o)) for o, n in zip(off, cells.shape))
        out[here] |= cells[here] != cells[there]
    return out


# ----------------------------------------------------------------------------- shapes and dtypes


@pytest.mark.parametrize("name", ALL)
def test_shapes_and_dtypes(name, request):
    em = request.getfixturevalue(name)
    shape = em.image.shape
    assert em.image.dtype == np.uint8
    assert (em.cells.dtype, em.organelles.dtype) == (np.uint32, np.uint32)
    assert (em.membranes.dtype, em.semantic.dtype) == (bool, np.uint8)
    for a in (em.cells, em.membranes, em.organelles, em.semantic):
        assert a.shape == shape
    assert len(em.spacing) == len(shape)
    assert em.n_cells > 5 and em.n_organelles > 0
    assert em.image.std() > 10  # not a flat image


@pytest.mark.parametrize("dtype, top", [(np.uint16, 65535), (np.float32, 1.0)])
def test_other_image_dtypes(dtype, top):
    em = synthetic_em((48, 40), seed=1, dtype=dtype)
    ref = synthetic_em((48, 40), seed=1)
    assert em.image.dtype == dtype and 0 <= em.image.min() and em.image.max() <= top
    np.testing.assert_array_equal(em.cells, ref.cells)
    # the same picture, quantised differently
    np.testing.assert_allclose(em.image / top, ref.image / 255, atol=1 / 255)


def test_deterministic_given_seed():
    a, b = synthetic_em((12, 48, 40), seed=11), synthetic_em((12, 48, 40), seed=11)
    for field in ("image", "cells", "membranes", "organelles", "semantic"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    c = synthetic_em((12, 48, 40), seed=12)
    assert not np.array_equal(a.cells, c.cells) and not np.array_equal(a.image, c.image)


# ----------------------------------------------------------------------------- exact ground truth


@pytest.mark.parametrize("name", ALL)
def test_cells_dense_consecutive_and_each_one_component(name, request):
    cells = request.getfixturevalue(name).cells
    assert cells.min() == 1
    np.testing.assert_array_equal(np.unique(cells), np.arange(1, cells.max() + 1))
    # face connectivity, the strictest: one 4-/6-connected piece per id
    assert measure.label(cells, connectivity=1).max() == cells.max()


@pytest.mark.parametrize(
    "name, width, offsets",
    [
        ("em2d", 2, [(-1, 0, 1)] * 2),
        ("em3d", 2, [(-1, 0, 1)] * 3),
        # z pixels are 4 times thicker: a width of 2 x pixels is one z pixel, the minimum
        ("em3d_aniso", 2, [(-1, 0), (-1, 0, 1), (-1, 0, 1)]),
    ],
)
def test_membranes_exactly_where_neighbouring_ids_differ(name, width, offsets, request):
    em = request.getfixturevalue(name)
    np.testing.assert_array_equal(em.membranes, neighbour_differs(em.cells, offsets))


def test_membrane_width_one_is_one_sided():
    em = synthetic_em((96, 80), seed=2, membrane_width=1)
    np.testing.assert_array_equal(em.membranes, neighbour_differs(em.cells, [(-1, 0)] * 2))


def test_membrane_width_scales_membrane_area():
    thin = synthetic_em((128, 128), seed=4, membrane_width=1, n_organelles=0)
    thick = synthetic_em((128, 128), seed=4, membrane_width=4, n_organelles=0)
    np.testing.assert_array_equal(thin.cells, thick.cells)
    assert 3.0 < thick.membranes.sum() / thin.membranes.sum() < 4.5


@pytest.mark.parametrize("name", ALL)
def test_organelles_inside_one_cell_off_membranes_and_apart(name, request):
    em = request.getfixturevalue(name)
    n = em.n_organelles
    np.testing.assert_array_equal(np.unique(em.organelles), np.arange(n + 1))
    assert not (em.membranes & (em.organelles > 0)).any()
    for k, sl in enumerate(ndimage.find_objects(em.organelles), start=1):
        mask = em.organelles[sl] == k
        assert ndimage.label(mask)[1] == 1, f"organelle {k} is split"
        assert len(np.unique(em.cells[sl][mask])) == 1, f"organelle {k} crosses cells"
    # no two organelles touch, even diagonally
    full = ndimage.generate_binary_structure(em.organelles.ndim, em.organelles.ndim)
    assert ndimage.label(em.organelles > 0, full)[1] == n


@pytest.mark.parametrize("name", ALL)
def test_semantic_matches_instances(name, request):
    em = request.getfixturevalue(name)
    expected = np.where(em.organelles > 0, 2, np.where(em.membranes, 1, 0))
    np.testing.assert_array_equal(em.semantic, expected)


def test_n_organelles_is_reached_when_room():
    em = synthetic_em((192, 192), seed=0, n_organelles=10)
    assert em.n_organelles == 10
    assert synthetic_em((64, 64), seed=0, n_organelles=0).organelles.max() == 0


# ----------------------------------------------------------------------------- the image


@pytest.mark.parametrize("name", ALL)
def test_image_darker_on_membranes_and_organelles(name, request):
    em = request.getfixturevalue(name)
    image = em.image.astype(float)
    cytoplasm = image[em.semantic == 0].mean()
    assert image[em.semantic == 1].mean() < cytoplasm - 40
    assert image[em.semantic == 2].mean() < cytoplasm - 30


def test_noise_and_blur_off_gives_piecewise_image():
    em = synthetic_em((64, 64), seed=1, noise=0.0, blur=0.0, warp=0.0)
    assert np.ptp(em.image[em.membranes]) == 0  # membranes are one flat grey
    assert em.image[em.membranes].max() < em.image[em.semantic == 0].min()


# ----------------------------------------------------------------------------- zarr writer


def read(path) -> np.ndarray:
    return (
        ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}, open=True)
        .result()
        .read()
        .result()
    )


def test_zarr_round_trip_independent_of_slab_thickness(tmp_path):
    shape, spacing = (20, 56, 48), (2.0, 1.0, 1.0)
    thin = synthetic_volume_zarr(tmp_path / "thin", shape, (3, 32, 32), seed=9, spacing=spacing)
    whole = synthetic_volume_zarr(tmp_path / "whole", shape, (20, 56, 48), seed=9, spacing=spacing)
    assert set(thin) == {"image", "cells", "organelles", "semantic"}
    arrays = {name: read(path) for name, path in thin.items()}
    for name, array in arrays.items():
        assert array.shape == shape
        np.testing.assert_array_equal(array, read(whole[name]), err_msg=name)
    assert arrays["image"].dtype == np.uint8 and arrays["cells"].dtype == np.uint32
    meta = json.loads((thin["cells"] / "zarr.json").read_text())
    assert meta["attributes"]["voxel_size"] == list(spacing)
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [3, 32, 32]
    assert json.loads((tmp_path / "thin" / "zarr.json").read_text())["node_type"] == "group"

    # the labels on disk are exact across slab borders
    cells, semantic, organelles = arrays["cells"], arrays["semantic"], arrays["organelles"]
    membranes = neighbour_differs(cells, [(-1, 0), (-1, 0, 1), (-1, 0, 1)])
    np.testing.assert_array_equal(semantic == 1, membranes)
    np.testing.assert_array_equal(semantic == 2, organelles > 0)
    assert organelles.max() > 0
    for k, sl in enumerate(ndimage.find_objects(organelles), start=1):
        assert len(np.unique(cells[sl][organelles[sl] == k])) == 1
    image = arrays["image"].astype(float)
    assert image[semantic == 1].mean() < image[semantic == 0].mean() - 40


def test_zarr_refuses_to_overwrite(tmp_path):
    synthetic_volume_zarr(tmp_path / "v", (4, 16, 16), (4, 16, 16))
    with pytest.raises(ValueError, match="overwrite"):
        synthetic_volume_zarr(tmp_path / "v", (4, 16, 16), (4, 16, 16))
    synthetic_volume_zarr(tmp_path / "v", (4, 16, 16), (2, 16, 16), overwrite=True)
    assert read(tmp_path / "v" / "image").shape == (4, 16, 16)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(shape=(64,)), "shape"),
        (dict(shape=(2, 3, 4, 5)), "shape"),
        (dict(shape=(0, 32)), "shape"),
        (dict(shape=(-4, 32, 32)), "shape"),
        (dict(shape=(32.5, 32)), "shape"),
        (dict(cell_size=0), "cell_size"),
        (dict(cell_size=-3.0), "cell_size"),
        (dict(membrane_width=0), "membrane_width"),
        (dict(spacing=(1.0, 1.0, 1.0)), "spacing"),
        (dict(spacing=(0.0, 1.0)), "spacing"),
        (dict(n_organelles=-1), "n_organelles"),
        (dict(organelle_radius=(3.0, 1.0)), "organelle_radius"),
        (dict(noise=-0.1), "noise"),
        (dict(blur=-1.0), "blur"),
        (dict(warp=-0.5), "warp"),
        (dict(dtype=np.int64), "dtype"),
        (dict(seed=-1), "seed"),
    ],
)
def test_bad_input_names_the_argument(kwargs, name):
    kwargs = {"shape": (32, 32), **kwargs}
    with pytest.raises(ValueError, match=name):
        synthetic_em(**kwargs)


@pytest.mark.parametrize(
    "shape, chunks, name",
    [
        ((32, 32), (8, 8, 8), "shape"),
        ((8, 32, 32), (8, 8), "chunks"),
        ((8, 32, 32), (0, 8, 8), "chunks"),
    ],
)
def test_zarr_bad_input_names_the_argument(tmp_path, shape, chunks, name):
    with pytest.raises(ValueError, match=name):
        synthetic_volume_zarr(tmp_path / "v", shape, chunks)
