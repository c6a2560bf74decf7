"""The random scene behind a synthetic EM image: parameters, smooth fields, cells and membranes.

Every random quantity is a function of `seed` and of global pixel coordinates only (see
emfm.data.synthetic), so any region can be rendered on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree
from skimage import measure

from emfm.errors import UserError

# Independent random streams, each drawn from default_rng([seed, stream, ...]).
SEEDS, WARP, TEXTURE_STREAM, ORGANELLES, NOISE = 1, 2, 3, 4, 5

# image dtypes and the value of intensity 1 in each
IMAGE_DTYPES = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0, np.dtype(np.float32): 1.0}


@dataclass(frozen=True)
class SceneParams:
    """The validated options of one synthetic image or volume (`scene_params`)."""

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


def scene_params(
    shape,
    seed=0,
    *,
    spacing=None,
    cell_size=32.0,
    membrane_width=2,
    n_organelles=None,
    organelle_radius=None,
    noise=0.06,
    blur=1.0,
    warp=0.3,
    dtype=np.uint8,
) -> SceneParams:
    """The options of a synthetic image, validated (a UserError names the bad one), with defaults.

    shape: (y, x) or (z, y, x) pixels; seed: a non-negative integer.
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
    """
    shape = _check_shape(shape)
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
    n_organelles, organelle_radius = _organelle_options(
        shape, spacing, cell_size, n_organelles, organelle_radius
    )
    for name, value in (("noise", noise), ("blur", blur), ("warp", warp)):
        if not value >= 0:
            raise UserError(f"{name} must be non-negative, got {value!r}")
    return SceneParams(
        shape,
        int(seed),
        spacing,
        float(cell_size),
        int(membrane_width),
        n_organelles,
        organelle_radius,
        float(noise),
        float(blur),
        float(warp),
        _image_dtype(dtype),
    )


def _image_dtype(dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in IMAGE_DTYPES:
        raise UserError(f"dtype must be one of {sorted(map(str, IMAGE_DTYPES))}, got {dtype}")
    return dtype


def _check_shape(shape) -> tuple[int, ...]:
    if not isinstance(shape, (tuple, list)) or len(shape) not in (2, 3):
        raise UserError(f"shape must be (y, x) or (z, y, x), got {shape!r}")
    if not all(isinstance(n, (int, np.integer)) and n > 0 for n in shape):
        raise UserError(f"shape must hold positive integers, got {shape!r}")
    return tuple(int(n) for n in shape)


def _organelle_options(shape, spacing, cell_size, n_organelles, organelle_radius):
    """`n_organelles` and `organelle_radius`, checked, with their size-dependent defaults."""
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
    return int(n_organelles), organelle_radius


class SplineField:
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


class Scene:
    """Everything random about one volume, as functions of global coordinates."""

    def __init__(self, p: SceneParams):
        self.p = p
        sp = np.asarray(p.spacing)
        extent = (np.asarray(p.shape) - 1) * sp
        # One seed per cell_size box, jittered; boxes reach one past each face so border cells are
        # as big as inner ones.
        rng = np.random.default_rng([p.seed, SEEDS])
        n_box = np.ceil(extent / p.cell_size).astype(int) + 3
        corners = np.stack(np.meshgrid(*[np.arange(n) for n in n_box], indexing="ij"), -1)
        corners = (corners.reshape(-1, p.ndim) - 1) * p.cell_size
        jitter = 0.5 + 0.8 * (rng.random(corners.shape) - 0.5)
        self.tree = cKDTree(corners + jitter * p.cell_size)
        self.warp = SplineField(
            np.random.default_rng([p.seed, WARP]), p.shape, p.spacing, p.cell_size, p.ndim
        )
        self.texture = SplineField(
            np.random.default_rng([p.seed, TEXTURE_STREAM]), p.shape, p.spacing, p.cell_size / 4, 1
        )

    def raw_cells(self, region: tuple[slice, ...]) -> np.ndarray:
        """Warped-Voronoi ids (seed index + 1) on a region; not yet split into connected pieces."""
        axes = [np.arange(sl.start, sl.stop) * s for sl, s in zip(region, self.p.spacing)]
        points = np.stack(np.meshgrid(*axes, indexing="ij"), -1)
        if self.p.warp > 0:
            points += np.moveaxis(self.warp(region), 0, -1) * (self.p.warp * self.p.cell_size)
        _, nearest = self.tree.query(points.reshape(-1, self.p.ndim), workers=-1)
        return (nearest + 1).astype(np.uint32).reshape(points.shape[:-1])


def membranes(cells: np.ndarray, window: tuple[int, ...]) -> np.ndarray:
    """Pixels whose box neighbourhood holds another id; 'nearest' adds no boundary at the edges."""
    hi = ndimage.maximum_filter(cells, size=window, mode="nearest")
    lo = ndimage.minimum_filter(cells, size=window, mode="nearest")
    return hi != lo


def connected(raw: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
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
