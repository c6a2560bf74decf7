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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree
from skimage import measure

from emfm.errors import UserError

# Intensities in [0, 1] before blur and noise.
_CYTOPLASM, _MEMBRANE, _ORGANELLE, _RIM = 0.72, 0.18, 0.45, 0.30
_TEXTURE = 0.04  # std of the smooth cytoplasm texture
_GAUSS_TRUNCATE = 4.0  # scipy's default; the halo of a blurred slab depends on it

# Independent random streams, each drawn from default_rng([seed, stream, ...]).
_SEEDS, _WARP, _TEXTURE_STREAM, _ORGANELLES, _NOISE = 1, 2, 3, 4, 5

_IMAGE_DTYPES = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0, np.dtype(np.float32): 1.0}


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


@dataclass(frozen=True)
class _Params:
    shape: tuple[int, ...]
    seed: int
    spacing: tuple[float, ...]
    cell_size: float
    membrane_width: int
    n_organelles: int
    organelle_radius: tuple[float, float]
    noise: float
    blur: float
    warp: float
    dtype: np.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def membrane_window(self) -> tuple[int, ...]:
        # a box of w + 1 pixels straddles a boundary from w positions: a membrane w pixels wide
        ref = self.spacing[-1]
        return tuple(max(1, round(self.membrane_width * ref / s)) + 1 for s in self.spacing)

    @property
    def blur_sigma(self) -> tuple[float, ...]:
        return tuple(self.blur * self.spacing[-1] / s for s in self.spacing)


def _params(
    shape,
    seed,
    spacing,
    cell_size,
    membrane_width,
    n_organelles,
    organelle_radius,
    noise,
    blur,
    warp,
    dtype,
) -> _Params:
    """Validate the arguments, fail fast naming the bad one, and fill in the defaults."""
    if not isinstance(shape, (tuple, list)) or len(shape) not in (2, 3):
        raise UserError(f"shape must be (y, x) or (z, y, x), got {shape!r}")
    if not all(isinstance(n, (int, np.integer)) and n > 0 for n in shape):
        raise UserError(f"shape must hold positive integers, got {shape!r}")
    shape = tuple(int(n) for n in shape)
    ndim = len(shape)
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}")
    spacing = (1.0,) * ndim if spacing is None else tuple(float(s) for s in spacing)
    if len(spacing) != ndim or not all(s > 0 for s in spacing):
        raise UserError(f"spacing must hold {ndim} positive numbers, got {spacing!r}")
    if not cell_size > 0:
        raise UserError(f"cell_size must be positive, got {cell_size!r}")
    if not isinstance(membrane_width, (int, np.integer)) or membrane_width < 1:
        raise UserError(f"membrane_width must be a positive integer, got {membrane_width!r}")
    extent = np.asarray(shape) * np.asarray(spacing)
    if n_organelles is None:  # about one per cell
        n_organelles = int(round(float(np.prod(extent / cell_size))))
    if not isinstance(n_organelles, (int, np.integer)) or n_organelles < 0:
        raise UserError(f"n_organelles must be a non-negative integer, got {n_organelles!r}")
    if organelle_radius is None:  # minor radius; mitochondria-like, a few pixels wide
        lo = max(0.08 * cell_size, 2.0 * min(spacing[1:]))
        organelle_radius = (lo, max(0.15 * cell_size, 1.25 * lo))
    organelle_radius = tuple(float(r) for r in organelle_radius)
    if len(organelle_radius) != 2 or not 0 < organelle_radius[0] <= organelle_radius[1]:
        raise UserError(
            f"organelle_radius must be (low, high) with 0 < low <= high, got {organelle_radius!r}"
        )
    for name, value in (("noise", noise), ("blur", blur), ("warp", warp)):
        if not value >= 0:
            raise UserError(f"{name} must be non-negative, got {value!r}")
    dtype = np.dtype(dtype)
    if dtype not in _IMAGE_DTYPES:
        raise UserError(f"dtype must be one of {sorted(map(str, _IMAGE_DTYPES))}, got {dtype}")
    return _Params(
        shape,
        int(seed),
        spacing,
        float(cell_size),
        int(membrane_width),
        int(n_organelles),
        organelle_radius,
        float(noise),
        float(blur),
        float(warp),
        dtype,
    )


# ------------------------------------------------------------------------------------------------
# Smooth random fields and the cell tessellation
# ------------------------------------------------------------------------------------------------


class _SplineField:
    """Cubic B-spline through random control points every `scale` physical units, about unit std.

    Evaluated on an axis-aligned region one axis at a time with elementwise arithmetic only, so a
    pixel's value does not depend on which region it was computed in (no BLAS reductions).
    """

    def __init__(self, rng: np.random.Generator, shape, spacing, scale: float, components: int):
        self.spacing, self.scale = spacing, scale
        knots = [int(np.ceil((n - 1) * s / scale)) + 4 for n, s in zip(shape, spacing)]
        # per axis the B-spline weights' squares sum to about 0.48; undo that to get unit std
        self.coef = rng.standard_normal((components, *knots)) / np.sqrt(0.48 ** len(shape))

    def __call__(self, region: tuple[slice, ...]) -> np.ndarray:  # (components, *region shape)
        out = self.coef
        for axis, (sl, s) in enumerate(zip(region, self.spacing), start=1):
            t = np.arange(sl.start, sl.stop) * s / self.scale + 1.0
            i = np.floor(t).astype(np.int64)
            f = t - i
            weights = (
                (1 - f) ** 3 / 6,
                (3 * f**3 - 6 * f**2 + 4) / 6,
                (-3 * f**3 + 3 * f**2 + 3 * f + 1) / 6,
                f**3 / 6,
            )
            bshape = [1] * out.ndim
            bshape[axis] = -1
            acc = 0.0
            for a, w in enumerate(weights):
                acc = acc + np.take(out, i - 1 + a, axis=axis) * w.reshape(bshape)
            out = acc
        return out


class _Scene:
    """Everything random about one volume, as functions of global coordinates."""

    def __init__(self, p: _Params):
        self.p = p
        sp = np.asarray(p.spacing)
        extent = (np.asarray(p.shape) - 1) * sp
        # One seed per cell_size box, jittered; boxes reach one past each face so border cells are
        # as big as inner ones.
        rng = np.random.default_rng([p.seed, _SEEDS])
        n_box = np.ceil(extent / p.cell_size).astype(int) + 3
        corners = np.stack(np.meshgrid(*[np.arange(n) for n in n_box], indexing="ij"), -1)
        corners = (corners.reshape(-1, p.ndim) - 1) * p.cell_size
        jitter = 0.5 + 0.8 * (rng.random(corners.shape) - 0.5)
        self.tree = cKDTree(corners + jitter * p.cell_size)
        self.warp = _SplineField(
            np.random.default_rng([p.seed, _WARP]), p.shape, p.spacing, p.cell_size, p.ndim
        )
        self.texture = _SplineField(
            np.random.default_rng([p.seed, _TEXTURE_STREAM]), p.shape, p.spacing, p.cell_size / 4, 1
        )

    def raw_cells(self, region: tuple[slice, ...]) -> np.ndarray:
        """Warped-Voronoi ids (seed index + 1) on a region; not yet split into connected pieces."""
        axes = [np.arange(sl.start, sl.stop) * s for sl, s in zip(region, self.p.spacing)]
        points = np.stack(np.meshgrid(*axes, indexing="ij"), -1)
        if self.p.warp > 0:
            points += np.moveaxis(self.warp(region), 0, -1) * (self.p.warp * self.p.cell_size)
        _, nearest = self.tree.query(points.reshape(-1, self.p.ndim), workers=-1)
        return (nearest + 1).astype(np.uint32).reshape(points.shape[:-1])


def _membranes(cells: np.ndarray, window: tuple[int, ...]) -> np.ndarray:
    """Pixels whose box neighbourhood holds another id; 'nearest' adds no boundary at the edges."""
    hi = ndimage.maximum_filter(cells, size=window, mode="nearest")
    lo = ndimage.minimum_filter(cells, size=window, mode="nearest")
    return hi != lo


def _connected(raw: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Make every id one face-connected piece, numbered 1..N in raster order.

    The warp and the pixel grid can cut slivers off a cell. The smaller pieces are first refilled
    from the nearest remaining cell; anything still split after that becomes a cell of its own.
    """
    pieces = measure.label(raw, connectivity=1)  # one label per face-connected run of one id
    n = int(pieces.max())
    piece_id = np.zeros(n + 1, raw.dtype)
    piece_id[pieces.ravel()] = raw.ravel()
    if n == len(np.unique(piece_id[1:])):
        return pieces.astype(np.uint32)
    sizes = np.bincount(pieces.ravel(), minlength=n + 1)
    order = np.lexsort((-sizes[1:], piece_id[1:])) + 1  # by id, the largest piece first
    keep = np.zeros(n + 1, bool)
    keep[order[np.r_[True, piece_id[order][1:] != piece_id[order][:-1]]]] = True
    cells = np.where(keep[pieces], raw, 0)
    nearest = ndimage.distance_transform_edt(
        cells == 0, sampling=spacing, return_distances=False, return_indices=True
    )
    return measure.label(cells[tuple(nearest)], connectivity=1).astype(np.uint32)


# ------------------------------------------------------------------------------------------------
# Organelles
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Organelle:
    lo: tuple[int, ...]  # corner of the bounding box, in pixels
    mask: np.ndarray  # bool, the bounding box
    rim: np.ndarray  # bool, mask pixels with a face neighbour outside the organelle


def _ellipsoid(center, radii, rot, spacing, shape) -> tuple[np.ndarray, np.ndarray]:
    """Pixels whose centres lie in the ellipsoid with semi-axes `radii` along `rot`'s columns."""
    sp = np.asarray(spacing)
    half = np.sqrt((rot**2) @ (radii**2))  # exact half extent of the rotated ellipsoid per axis
    lo = np.maximum(np.ceil((center - half) / sp), 0).astype(int)
    hi = np.minimum(np.floor((center + half) / sp) + 1, shape).astype(int)
    if np.any(hi <= lo):
        return lo, np.zeros((0,) * len(shape), bool)
    axes = [np.arange(a, b) * s - c for a, b, s, c in zip(lo, hi, sp, center)]
    local = np.stack(np.meshgrid(*axes, indexing="ij"), -1) @ rot
    return lo, np.sum((local / radii) ** 2, axis=-1) <= 1.0


def _rotation(rng: np.random.Generator, ndim: int) -> np.ndarray:
    """A uniformly random rotation; its columns are the ellipsoid's axes."""
    if ndim == 2:
        a = rng.uniform(0, 2 * np.pi)
        return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    w, x, y, z = (q := rng.standard_normal(4)) / np.linalg.norm(q)  # unit quaternion
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


Lookup = Callable[[tuple[slice, ...]], tuple[np.ndarray, np.ndarray]]


def _place_organelles(p: _Params, lookup: Lookup) -> list[_Organelle]:
    """Draw up to `p.n_organelles` ellipsoids; keep those wholly inside one cell, off membranes.

    `lookup(region)` returns (cells, membranes) on a region; candidates are drawn from one global
    stream in a fixed order, so the result does not depend on how the volume is later rendered.
    Bounding spheres kept a diagonal step apart mean no two organelles touch.
    """
    rng = np.random.default_rng([p.seed, _ORGANELLES])
    sp = np.asarray(p.spacing)
    upper = (np.asarray(p.shape) - 1) * sp
    gap = 1.01 * float(np.linalg.norm(sp))
    face = ndimage.generate_binary_structure(p.ndim, 1)
    placed: list[_Organelle] = []
    centers, reach = np.empty((0, p.ndim)), np.empty(0)
    for _ in range(20 * p.n_organelles):
        if len(placed) == p.n_organelles:
            break
        # draw every number every time so one rejection does not shift the others
        center = rng.random(p.ndim) * upper
        minor = rng.uniform(*p.organelle_radius)
        elongation, flatten = rng.uniform(1.3, 2.4), rng.uniform(0.75, 1.0)
        rot = _rotation(rng, p.ndim)
        radii = minor * np.array([elongation, 1.0, flatten][: p.ndim])
        if np.any(np.linalg.norm(centers - center, axis=1) < reach + radii.max() + gap):
            continue
        lo, mask = _ellipsoid(center, radii, rot, sp, p.shape)
        if mask.sum() < 4:
            continue
        cells, membranes = lookup(tuple(slice(a, a + n) for a, n in zip(lo, mask.shape)))
        inside = cells[mask]
        if inside.min() != inside.max() or membranes[mask].any():
            continue
        if ndimage.label(mask, face)[1] != 1:  # a thin, tilted ellipsoid can fall apart on the grid
            continue
        rim = mask & ~ndimage.binary_erosion(np.pad(mask, 1), face)[(slice(1, -1),) * p.ndim]
        placed.append(_Organelle(tuple(int(a) for a in lo), mask, rim))
        centers = np.vstack([centers, center])
        reach = np.append(reach, radii.max())
    return placed


def _paint(organelles: Sequence[_Organelle], region: tuple[slice, ...]):
    """Organelle ids and rim flags on a region."""
    shape = tuple(sl.stop - sl.start for sl in region)
    ids, rim = np.zeros(shape, np.uint32), np.zeros(shape, bool)
    for k, o in enumerate(organelles, start=1):
        src, dst = [], []
        for a, n, sl in zip(o.lo, o.mask.shape, region):
            start, stop = max(a, sl.start), min(a + n, sl.stop)
            if start >= stop:
                break
            src.append(slice(start - a, stop - a))
            dst.append(slice(start - sl.start, stop - sl.start))
        else:
            m = o.mask[tuple(src)]
            ids[tuple(dst)][m] = k
            rim[tuple(dst)] |= o.rim[tuple(src)]
    return ids, rim


# ------------------------------------------------------------------------------------------------
# The image
# ------------------------------------------------------------------------------------------------


def _draw(scene: _Scene, region: tuple[slice, ...], core: tuple[slice, ...], membranes, ids, rim):
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
            image = image + p.noise * np.random.default_rng([p.seed, _NOISE]).standard_normal(
                image.shape
            )
        else:
            image = image + p.noise * np.stack(
                [
                    np.random.default_rng([p.seed, _NOISE, z]).standard_normal(image.shape[1:])
                    for z in range(core[0].start, core[0].stop)
                ]
            )
    scale = _IMAGE_DTYPES[p.dtype]
    image = np.clip(image, 0.0, 1.0) * scale
    if p.dtype.kind == "u":
        image = np.rint(image)
    return image.astype(p.dtype)


def _semantic(membranes, ids) -> np.ndarray:
    semantic = membranes.astype(np.uint8)
    semantic[ids > 0] = 2
    return semantic


def synthetic_em(
    shape: Sequence[int],
    seed: int = 0,
    *,
    spacing: Sequence[float] | None = None,
    cell_size: float = 32.0,
    membrane_width: int = 2,
    n_organelles: int | None = None,
    organelle_radius: tuple[float, float] | None = None,
    noise: float = 0.06,
    blur: float = 1.0,
    warp: float = 0.3,
    dtype=np.uint8,
) -> SyntheticEM:
    """An EM-like image (`shape` = (y, x)) or volume ((z, y, x)) with exact ground truth.

    spacing: physical pixel size per axis, e.g. (4, 1, 1) for anisotropic EM (default all 1).
    cell_size: physical spacing of the Voronoi seeds.
    membrane_width: membrane thickness in x pixels (scaled by spacing along other axes).
    n_organelles: how many organelles to try to place (default about one per cell); candidates
        that do not fit wholly inside one cell, off membranes, are dropped.
    organelle_radius: (low, high) range of the minor semi-axis, physical.
    noise: std of the added Gaussian noise, in [0, 1] intensity units.
    blur: Gaussian sigma in x pixels (scaled by spacing along other axes).
    warp: amplitude of the smooth displacement of the tessellation as a fraction of cell_size;
        0 gives polygonal cells.
    dtype: of the image: uint8, uint16, or float32 in [0, 1].
    Raises ValueError naming the argument on bad input.
    """
    p = _params(
        shape,
        seed,
        spacing,
        cell_size,
        membrane_width,
        n_organelles,
        organelle_radius,
        noise,
        blur,
        warp,
        dtype,
    )
    scene = _Scene(p)
    full = tuple(slice(0, n) for n in p.shape)
    cells = _connected(scene.raw_cells(full), p.spacing)
    membranes = _membranes(cells, p.membrane_window)
    organelles = _place_organelles(p, lambda r: (cells[r], membranes[r]))
    ids, rim = _paint(organelles, full)
    return SyntheticEM(
        image=_draw(scene, full, full, membranes, ids, rim),
        cells=cells,
        membranes=membranes,
        organelles=ids,
        semantic=_semantic(membranes, ids),
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
    spacing: Sequence[float] | None = None,
    cell_size: float = 32.0,
    membrane_width: int = 2,
    n_organelles: int | None = None,
    organelle_radius: tuple[float, float] | None = None,
    noise: float = 0.06,
    blur: float = 1.0,
    warp: float = 0.3,
    dtype=np.uint8,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write a synthetic (z, y, x) volume to a zarr v3 group, one z slab of chunks at a time.

    The group at `path` holds sibling arrays `image`, `cells` (uint32), `organelles` (uint32) and
    `semantic` (uint8; membranes are `semantic == 1`), each with `voxel_size` = spacing in its
    attributes. Memory is bounded by one slab of `chunks[0]` z slices plus blur and membrane halos.
    Membranes, organelles and the image are exact across slab borders and do not depend on
    `chunks`. Unlike `synthetic_em`, cell ids are the raw Voronoi seed ids (not consecutive), and
    a cell that the warp splits is not renumbered, since that needs the whole volume at once.
    Returns the path of each array.
    """
    import tensorstore as ts  # only this writer needs it

    p = _params(
        shape,
        seed,
        spacing,
        cell_size,
        membrane_width,
        n_organelles,
        organelle_radius,
        noise,
        blur,
        warp,
        dtype,
    )
    if p.ndim != 3:
        raise UserError(f"shape must be (z, y, x) for a zarr volume, got {tuple(shape)!r}")
    if len(chunks) != 3 or not all(isinstance(c, (int, np.integer)) and c > 0 for c in chunks):
        raise UserError(f"chunks must hold 3 positive integers, got {chunks!r}")
    chunks = tuple(int(c) for c in chunks)
    root = Path(path)
    if root.exists() and not overwrite:
        raise UserError(f"path {root} exists; pass overwrite=True to replace it")
    root.mkdir(parents=True, exist_ok=True)
    attrs = {"voxel_size": list(p.spacing), "generator": "emfm.data.synthetic", "seed": p.seed}
    (root / "zarr.json").write_text(
        json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attrs})
    )
    dtypes = {"image": p.dtype, "cells": np.uint32, "organelles": np.uint32, "semantic": np.uint8}
    arrays = {}
    for name, dt in dtypes.items():
        arrays[name] = ts.open(
            {
                "driver": "zarr3",
                "kvstore": {"driver": "file", "path": str(root / name)},
                "metadata": {
                    "shape": list(p.shape),
                    "data_type": np.dtype(dt).name,
                    "chunk_grid": {
                        "name": "regular",
                        "configuration": {"chunk_shape": list(chunks)},
                    },
                    "codecs": [
                        {"name": "bytes", "configuration": {"endian": "little"}},
                        {"name": "zstd", "configuration": {"level": 3}},
                    ],
                    "dimension_names": ["z", "y", "x"],
                    "fill_value": 0,
                    "attributes": attrs,
                },
            },
            create=True,
            delete_existing=overwrite,
        ).result()

    scene = _Scene(p)
    depth, window = p.shape[0], p.membrane_window
    halo_m = tuple(w // 2 for w in window)  # the max/min filter reaches at most this far

    def labels(region):
        """Raw cells and membranes on a region, computed with a halo so borders are exact."""
        ext = tuple(
            slice(max(0, sl.start - h), min(n, sl.stop + h))
            for sl, h, n in zip(region, halo_m, p.shape)
        )
        cells = scene.raw_cells(ext)
        inner = tuple(slice(sl.start - e.start, sl.stop - e.start) for sl, e in zip(region, ext))
        return cells[inner], _membranes(cells, window)[inner]

    organelles = _place_organelles(p, labels)
    halo_b = int(_GAUSS_TRUNCATE * p.blur_sigma[0] + 0.5) if p.blur > 0 else 0
    full_yx = (slice(0, p.shape[1]), slice(0, p.shape[2]))
    for z0 in range(0, depth, chunks[0]):
        core = (slice(z0, min(depth, z0 + chunks[0])), *full_yx)
        region = (slice(max(0, z0 - halo_b), min(depth, core[0].stop + halo_b)), *full_yx)
        cells, membranes = labels(region)
        ids, rim = _paint(organelles, region)
        inner = (slice(core[0].start - region[0].start, core[0].stop - region[0].start),)
        out = {
            "image": _draw(scene, region, core, membranes, ids, rim),
            "cells": cells[inner],
            "organelles": ids[inner],
            "semantic": _semantic(membranes[inner], ids[inner]),
        }
        writes = [arrays[k][core[0]].write(v) for k, v in out.items()]
        for w in writes:
            w.result()
    return {name: root / name for name in dtypes}
