"""Synthetic EM-like images and volumes with exact ground truth, for tests.

Cells are a Voronoi tessellation of jittered-grid seeds, warped by a smooth random displacement so
they are not polygons. Membranes are the pixels whose neighbourhood holds another cell id, so they
follow the instance boundaries exactly. Organelles are ellipsoids placed wholly inside one cell, off
the membranes and apart from each other. The image is drawn from these labels (bright cytoplasm with
a faint texture, dark membranes, darker organelles with a darker rim), then blurred and noised: the
ground truth comes from construction, never from thresholding the image.

Every random quantity is a function of `seed` and of global pixel coordinates only, so any region
can be rendered on its own. `synthetic_volume_zarr` uses this to write a large volume slab by slab
in bounded memory, and gets the same arrays whatever the slab thickness.

Coordinates: pixel index `i` along an axis sits at physical position `i * spacing`. `cell_size` and
the organelle radii are physical; `membrane_width` and `blur` are in pixels of the last (x) axis and
are scaled by the spacing along the others, so `spacing=(4, 1, 1)` gives thinner membranes in z.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from emfm.data.formats import zarr3_metadata
from emfm.data.synthetic_organelles import paint, place_organelles
from emfm.data.synthetic_scene import (
    IMAGE_DTYPES,
    NOISE,
    Scene,
    SceneParams,
    connected,
    membranes,
    scene_params,
)
from emfm.errors import UserError

# Intensities in [0, 1] before blur and noise.
_CYTOPLASM, _MEMBRANE, _ORGANELLE, _RIM = 0.72, 0.18, 0.45, 0.30
_TEXTURE = 0.04  # std of the smooth cytoplasm texture
_GAUSS_TRUNCATE = 4.0  # scipy's default; the halo of a blurred slab depends on it


@dataclass(frozen=True, eq=False)
class SyntheticEM:
    """A synthetic image or volume and its exact ground truth; every array has the same shape."""

    image: np.ndarray  # (y, x) or (z, y, x), the requested dtype; float32 lies in [0, 1]
    cells: np.ndarray  # uint32 ids 1..N; every pixel assigned; each id one 4/6-connected piece
    membranes: np.ndarray  # bool: pixels whose neighbourhood holds another cell id
    organelles: np.ndarray  # uint32 ids 1..M, 0 = none; each inside one cell, off membranes
    semantic: np.ndarray  # uint8: 0 cytoplasm, 1 membrane, 2 organelle
    spacing: tuple[float, ...]  # physical size of a pixel along each axis

    @property
    def n_cells(self) -> int:
        return int(self.cells.max())

    @property
    def n_organelles(self) -> int:
        return int(self.organelles.max())


# ------------------------------------------------------------------------------------------------
# The image
# ------------------------------------------------------------------------------------------------


def _draw(scene: Scene, region: tuple[slice, ...], core: tuple[slice, ...], membranes, ids, rim):
    """Image on `core` (a sub-box of `region`, in global pixels) from labels given on `region`."""
    p = scene.p
    image = _CYTOPLASM + _TEXTURE * scene.texture(region)[0]
    image[membranes] = _MEMBRANE
    image[ids > 0] = _ORGANELLE
    image[rim] = _RIM
    if p.blur > 0:
        image = ndimage.gaussian_filter(
            image, p.blur_sigma, mode="nearest", truncate=_GAUSS_TRUNCATE
        )
    image = image[tuple(slice(c.start - r.start, c.stop - r.start) for c, r in zip(core, region))]
    if p.noise > 0:  # one stream per z slice, so slabs of any thickness see the same noise
        if p.ndim == 2:
            image = image + p.noise * np.random.default_rng([p.seed, NOISE]).standard_normal(
                image.shape
            )
        else:
            image = image + p.noise * np.stack(
                [
                    np.random.default_rng([p.seed, NOISE, z]).standard_normal(image.shape[1:])
                    for z in range(core[0].start, core[0].stop)
                ]
            )
    scale = IMAGE_DTYPES[p.dtype]
    image = np.clip(image, 0.0, 1.0) * scale
    if p.dtype.kind == "u":
        image = np.rint(image)
    return image.astype(p.dtype)


def _semantic(membranes, ids) -> np.ndarray:
    semantic = membranes.astype(np.uint8)
    semantic[ids > 0] = 2
    return semantic


def synthetic_em(shape: Sequence[int], seed: int = 0, **options) -> SyntheticEM:
    """An EM-like image (`shape` = (y, x)) or volume ((z, y, x)) with exact ground truth.

    `options` are keyword arguments, each with a default: spacing, cell_size, membrane_width,
    n_organelles, organelle_radius, noise, blur, warp and dtype; their meaning is in
    emfm.data.synthetic_scene.scene_params. Raises ValueError naming the argument on bad input.
    """
    p = scene_params(shape, seed, **options)
    scene = Scene(p)
    full = tuple(slice(0, n) for n in p.shape)
    cells = connected(scene.raw_cells(full), p.spacing)
    borders = membranes(cells, p.membrane_window)
    organelles = place_organelles(p, lambda r: (cells[r], borders[r]))
    ids, rim = paint(organelles, full)
    return SyntheticEM(
        image=_draw(scene, full, full, borders, ids, rim),
        cells=cells,
        membranes=borders,
        organelles=ids,
        semantic=_semantic(borders, ids),
        spacing=p.spacing,
    )


# ------------------------------------------------------------------------------------------------
# Large volumes on disk
# ------------------------------------------------------------------------------------------------


def synthetic_volume_zarr(
    path: str | Path,
    shape: Sequence[int],
    chunks: Sequence[int] = (32, 128, 128),
    seed: int = 0,
    *,
    overwrite: bool = False,
    **options,
) -> dict[str, Path]:
    """Write a synthetic (z, y, x) volume to a zarr v3 group, one z slab of chunks at a time.

    `options` are those of `synthetic_em`. The group at `path` holds sibling arrays `image`, `cells`
    (uint32), `organelles` (uint32) and `semantic` (uint8; membranes are `semantic == 1`), each
    with `voxel_size` = spacing in its attributes. Memory is bounded by one slab of `chunks[0]` z
    slices plus blur and membrane halos. Membranes, organelles and the image are exact across slab
    borders and do not depend on `chunks`. Unlike `synthetic_em`, cell ids are the raw Voronoi
    seed ids (not consecutive), and a cell that the warp splits is not renumbered, since that needs
    the whole volume at once. Returns the path of each array.
    """
    p = scene_params(shape, seed, **options)
    if p.ndim != 3:
        raise UserError(f"shape must be (z, y, x) for a zarr volume, got {tuple(shape)!r}")
    if len(chunks) != 3 or not all(isinstance(c, (int, np.integer)) and c > 0 for c in chunks):
        raise UserError(f"chunks must hold 3 positive integers, got {chunks!r}")
    chunks = tuple(int(c) for c in chunks)
    root = Path(path)
    if root.exists() and not overwrite:
        raise UserError(f"path {root} exists; pass overwrite=True to replace it")
    arrays = _create_group(root, p, chunks, overwrite)
    scene = Scene(p)
    labels = _labels_with_halo(scene)
    organelles = place_organelles(p, labels)
    halo_b = int(_GAUSS_TRUNCATE * p.blur_sigma[0] + 0.5) if p.blur > 0 else 0
    depth, full_yx = p.shape[0], (slice(0, p.shape[1]), slice(0, p.shape[2]))
    for z0 in range(0, depth, chunks[0]):
        core = (slice(z0, min(depth, z0 + chunks[0])), *full_yx)
        region = (slice(max(0, z0 - halo_b), min(depth, core[0].stop + halo_b)), *full_yx)
        cells, borders = labels(region)
        ids, rim = paint(organelles, region)
        inner = (slice(core[0].start - region[0].start, core[0].stop - region[0].start),)
        out = {
            "image": _draw(scene, region, core, borders, ids, rim),
            "cells": cells[inner],
            "organelles": ids[inner],
            "semantic": _semantic(borders[inner], ids[inner]),
        }
        writes = [arrays[k][core[0]].write(v) for k, v in out.items()]
        for w in writes:
            w.result()
    return {name: root / name for name in arrays}


def _create_group(root: Path, p: SceneParams, chunks: tuple[int, ...], overwrite: bool) -> dict:
    """The zarr v3 group at `root` and its four arrays, created empty and opened for writing."""
    import tensorstore as ts  # only this writer needs it

    root.mkdir(parents=True, exist_ok=True)
    attrs = {"voxel_size": list(p.spacing), "generator": "emfm.data.synthetic", "seed": p.seed}
    (root / "zarr.json").write_text(
        json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attrs})
    )
    dtypes = {"image": p.dtype, "cells": np.uint32, "organelles": np.uint32, "semantic": np.uint8}
    return {
        name: ts.open(
            {
                "driver": "zarr3",
                "kvstore": {"driver": "file", "path": str(root / name)},
                "metadata": zarr3_metadata(
                    p.shape, dt, chunks, ["z", "y", "x"], fill_value=0, attributes=attrs
                ),
            },
            create=True,
            delete_existing=overwrite,
        ).result()
        for name, dt in dtypes.items()
    }


def _labels_with_halo(scene: Scene):
    """`labels(region)`: raw cells and membranes on a region, computed with a halo so that the
    membranes at its borders are exact."""
    p, window = scene.p, scene.p.membrane_window
    halo = tuple(w // 2 for w in window)  # the max/min filter reaches at most this far

    def labels(region):
        ext = tuple(
            slice(max(0, sl.start - h), min(n, sl.stop + h))
            for sl, h, n in zip(region, halo, p.shape)
        )
        cells = scene.raw_cells(ext)
        inner = tuple(slice(sl.start - e.start, sl.stop - e.start) for sl, e in zip(region, ext))
        return cells[inner], membranes(cells, window)[inner]

    return labels
