"""Convert TIFF stacks and HDF5 datasets to OME-Zarr (zarr v3, zstd) multiscale groups.

The source is read one slab of `chunks[0]` sections at a time, so a stack larger than memory
converts. Level 0 is the data as it is; level k is downsampled 2x in y and x (z is kept: EM sections
are usually thicker than the in-plane pixels) by the mean for images and by the mode of each 2 x 2
block for label volumes. The group's `zarr.json` carries OME-NGFF 0.5 `ome.multiscales` attributes
with one scale transform per level, which `open_volume(path, level=..., voxel_size=...)` reads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from emfm.data.ome import multiscale_group
from emfm.data.volume import SUPPORTED_DTYPES, VolumeError, create_volume


def downsample2(x: np.ndarray, labels: bool = False) -> np.ndarray:
    """2x in-plane downsampling of `[z, y, x]`: block mean (images) or block mode (labels).

    Odd sizes are padded by repeating the last row / column, so the output is `ceil(n / 2)`.
    """
    z, h, w = x.shape
    if h % 2 or w % 2:
        x = np.pad(x, ((0, 0), (0, h % 2), (0, w % 2)), mode="edge")
    blocks = np.stack([x[:, i::2, j::2] for i in (0, 1) for j in (0, 1)])  # [4, z, h/2, w/2]
    if not labels:
        m = blocks.astype(np.float64).mean(axis=0)
        return (np.rint(m) if np.issubdtype(x.dtype, np.integer) else m).astype(x.dtype)
    # the most frequent of the 4 values (ties: the first in raster order), without a Python loop
    counts = sum((blocks == blocks[k]).astype(np.uint8) for k in range(4))
    return np.take_along_axis(blocks, counts.argmax(axis=0)[None], axis=0)[0]


class _Source:
    shape: tuple[int, int, int]
    dtype: np.dtype

    def slabs(self, depth: int) -> Iterator[tuple[int, np.ndarray]]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _Tiff(_Source):
    def __init__(self, path: str):
        import tifffile

        try:
            self.tif = tifffile.TiffFile(path)
        except Exception as e:  # noqa: BLE001 - tifffile raises several types
            raise VolumeError(f"cannot read TIFF {path}: {e}") from e
        series = self.tif.series[0]
        self.pages = series.pages
        page = self.pages[0]
        if len(page.shape) != 2:
            raise VolumeError(
                f"TIFF {path}: pages of shape {page.shape}; expected 2D grey-value sections"
            )
        self.shape = (len(self.pages),) + tuple(page.shape)
        self.dtype = np.dtype(page.dtype)

    def slabs(self, depth: int):
        for z0 in range(0, self.shape[0], depth):
            z1 = min(z0 + depth, self.shape[0])
            yield z0, np.stack([self.pages[z].asarray() for z in range(z0, z1)])

    def close(self) -> None:
        self.tif.close()


class _Sections(_Source):
    """Sections [z0, z1) of another source, renumbered from 0; the others are never read."""

    def __init__(self, inner: _Source, z0: int, z1: int, path: str):
        if not 0 <= z0 < z1 <= inner.shape[0]:
            inner.close()
            raise VolumeError(
                f"import source {path}: sections [{z0}, {z1}) outside its {inner.shape[0]} sections"
            )
        self.inner, self.z0, self.z1 = inner, z0, z1
        self.shape, self.dtype = (z1 - z0,) + tuple(inner.shape[1:]), inner.dtype

    def slabs(self, depth: int):
        if isinstance(self.inner, _Tiff):
            for a in range(self.z0, self.z1, depth):
                b = min(a + depth, self.z1)
                yield a - self.z0, np.stack([self.inner.pages[z].asarray() for z in range(a, b)])
        else:
            for a in range(self.z0, self.z1, depth):
                b = min(a + depth, self.z1)
                yield a - self.z0, np.asarray(self.inner.ds[a:b])

    def close(self) -> None:
        self.inner.close()


class _Hdf5(_Source):
    def __init__(self, path: str, dataset: str | None):
        try:
            import h5py
        except ImportError as e:
            raise VolumeError(f"importing HDF5 {path} needs h5py (pip install h5py)") from e
        self.f = h5py.File(path, "r")
        names: list[str] = []
        self.f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        if dataset is None:
            if len(names) != 1:
                raise VolumeError(f"HDF5 {path} holds datasets {names}; choose one with --dataset")
            dataset = names[0]
        if dataset not in self.f:
            raise VolumeError(f"HDF5 {path} has no dataset {dataset!r} (it has {names})")
        self.ds = self.f[dataset]
        if self.ds.ndim not in (2, 3):
            raise VolumeError(f"HDF5 {path}:{dataset} has shape {self.ds.shape}; expected z, y, x")
        self.shape = tuple(self.ds.shape) if self.ds.ndim == 3 else (1,) + tuple(self.ds.shape)
        self.dtype = np.dtype(self.ds.dtype)

    def slabs(self, depth: int):
        for z0 in range(0, self.shape[0], depth):
            z1 = min(z0 + depth, self.shape[0])
            yield z0, (self.ds[z0:z1] if self.ds.ndim == 3 else self.ds[()][None])

    def close(self) -> None:
        self.f.close()


def open_source(
    path: str, dataset: str | None = None, sections: Sequence[int] | None = None
) -> _Source:
    src = _open_source(path, dataset)
    return src if sections is None else _Sections(src, int(sections[0]), int(sections[1]), path)


def _open_source(path: str, dataset: str | None = None) -> _Source:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"import source not found: {path}")
    suffix = p.suffix.lower()
    if suffix in (".tif", ".tiff"):
        return _Tiff(path)
    if suffix in (".h5", ".hdf5", ".hdf"):
        return _Hdf5(path, dataset)
    raise VolumeError(
        f"import source {path}: unknown format {suffix!r}; give a .tif/.tiff stack or .h5/.hdf5 "
        "file"
    )


def import_volume(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    chunks: Sequence[int] = (64, 64, 64),
    levels: int = 3,
    labels: bool = False,
    dataset: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
    sections: Sequence[int] | None = None,
) -> dict:
    """Convert `src` (TIFF stack or HDF5 dataset) into an OME-Zarr multiscale group at `dst`.
    `sections`: only source sections [start, stop) are read and written (renumbered from 0); the
    group's attributes record them (`emfm.source_sections`).

    Returns a summary: shape, dtype and voxel size per level.
    """
    src, dst = str(src), str(dst)
    if Path(dst).exists() and not overwrite:
        raise VolumeError(f"import destination {dst} exists; remove it or pass --overwrite")
    if len(voxel_size) != 3 or len(chunks) != 3 or levels < 1:
        raise VolumeError("voxel size and chunks need 3 values (z y x) and levels must be >= 1")
    source = open_source(src, dataset, sections)
    try:
        if source.dtype.name not in SUPPORTED_DTYPES:
            raise VolumeError(f"import source {src}: dtype {source.dtype} is not supported")
        if labels and not np.issubdtype(source.dtype, np.integer):
            raise VolumeError(
                f"import source {src}: --labels needs an integer dtype, found {source.dtype}"
            )
        Path(dst).mkdir(parents=True, exist_ok=overwrite)
        vols = _create_levels(src, dst, source, voxel_size, chunks, levels)
        scales = [list(v.voxel_size) for v in vols]
        group = multiscale_group(
            Path(src).stem,
            scales,
            kind="mode" if labels else "mean",
            attributes={
                "source": Path(src).name,
                "source_shape": list(getattr(source, "inner", source).shape),
                "source_sections": [int(v) for v in sections] if sections is not None else None,
            },
        )
        (Path(dst) / "zarr.json").write_text(json.dumps(group, indent=1))
        _copy(source, vols, int(chunks[0]), labels, f"import {Path(src).name}", progress)
    finally:
        source.close()
    return {
        "path": dst,
        "dtype": str(source.dtype),
        "levels": [
            {"path": str(k), "shape": list(v.shape), "voxel_size": scale}
            for k, (v, scale) in enumerate(zip(vols, scales))
        ],
    }


def _create_levels(src: str, dst: str, source: _Source, voxel_size, chunks, levels: int) -> list:
    """The empty level arrays "0", "1", ... of `dst`: level k is 2**k times coarser in y and x."""
    vols = []
    for k in range(levels):
        f = 2**k
        shape = (source.shape[0], -(-source.shape[1] // f), -(-source.shape[2] // f))
        scale = [float(voxel_size[0]), float(voxel_size[1]) * f, float(voxel_size[2]) * f]
        vols.append(
            create_volume(
                Path(dst) / str(k),
                shape,
                source.dtype,
                chunks=[min(c, s) for c, s in zip(chunks, shape)],
                voxel_size=scale,
                attributes={"source": src, "level": k},
                exist_ok=False,
            )
        )
    return vols


def _copy(source: _Source, vols: list, depth: int, labels: bool, desc: str, progress: bool):
    """Every slab of `depth` sections into every level, downsampled level by level."""
    from emfm.train.logging import progress as _progress

    bar = _progress(source.shape[0], desc=desc, enabled=progress, unit="section")
    for z0, slab in source.slabs(depth):
        for k, vol in enumerate(vols):
            if k:
                slab = downsample2(slab, labels)
            vol.array[z0 : z0 + slab.shape[0]].write(slab).result()
        bar.update(slab.shape[0])
    bar.close()
