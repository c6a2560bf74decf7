"""Volumes on disk or in buckets, read and written through tensorstore.

A `Volume` is an open tensorstore array plus what EM code needs to know about it: axes (always
reported in `z, y, x` order, with an optional trailing channel axis `c`), dtype, and voxel size in
nanometres. Nothing is loaded into memory until `read` is called on a region.

Supported: zarr v3 and v2 (including OME-Zarr multiscale groups: pick a level), N5, neuroglancer
precomputed, on local paths or tensorstore kvstore URLs (gs://, s3://, http(s)://).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts

from emfm.data.formats import (
    VolumeError,
    detect_driver,
    kvstore,
    read_attributes,
    units_voxel_size,
    zarr3_metadata,
)
from emfm.data.ome import NM_PER_UNIT, emfm_order, multiscale_group, ome_level

SUPPORTED_DTYPES = (
    "uint8",
    "uint16",
    "int8",
    "int16",
    "int32",
    "uint32",
    "int64",
    "uint64",
    "float16",
    "bfloat16",
    "float32",
    "float64",
)


# Object stores and network file systems fail now and then; a read is retried a few times with
# exponential backoff before it fails. Only errors that look transient are retried: a corrupt chunk
# (FAILED_PRECONDITION, DATA_LOSS) or a bad request fails at once.
READ_TRIES = 4
BACKOFF_S = 0.05
_TRANSIENT_CODES = (
    "UNAVAILABLE",
    "DEADLINE_EXCEEDED",
    "RESOURCE_EXHAUSTED",
    "ABORTED",
    "INTERNAL",
    "UNKNOWN",
)


def is_transient(e: BaseException) -> bool:
    if isinstance(e, (TimeoutError, ConnectionError, InterruptedError)):
        return True
    return str(e).lstrip().startswith(_TRANSIENT_CODES)


def with_retries(fn, *, tries: int = READ_TRIES, backoff_s: float = BACKOFF_S, first=None):
    """`fn()`, retried on transient errors with delays backoff_s * 2**i; `first` is an already
    started attempt (a callable giving its result, e.g. a tensorstore future's `.result`)."""
    attempt = first or fn
    for i in range(tries):
        try:
            return attempt()
        except Exception as e:  # noqa: BLE001 - tensorstore raises ValueError/RuntimeError variants
            if i + 1 >= tries or not is_transient(e):
                raise
            time.sleep(backoff_s * 2**i)
            attempt = fn


@dataclass(frozen=True)
class Volume:
    """An open EM volume. `array` is the tensorstore handle; axes are `z y x` (+ optional `c`)."""

    path: str
    array: Any  # tensorstore.TensorStore
    voxel_size: tuple[float, ...]
    axes: tuple[str, ...]
    attributes: dict = field(default_factory=dict, compare=False)
    # physical position of voxel 0 (OME-Zarr translation), () = origin
    translation: tuple[float, ...] = ()

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.array.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype.numpy_dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return self.shape[:3] if "c" in self.axes else self.shape

    @property
    def chunks(self) -> tuple[int, ...]:
        return tuple(int(c) for c in self.array.chunk_layout.read_chunk.shape)

    def read(self, region: Sequence[slice] | None = None) -> np.ndarray:
        """Read a region (tuple of slices in `z y x` order) into a numpy array."""
        return self.result(None, region)

    def read_async(self, region: Sequence[slice]):
        """Start reading a region; returns a tensorstore future (`.result()` gives numpy)."""
        return self.array[tuple(region)].read()

    def result(self, future, region: Sequence[slice] | None) -> np.ndarray:
        """Wait for a read started by `read_async` (or start one if `future` is None), re-reading
        on transient errors; any failure is a VolumeError naming the volume and the region."""
        sub = self.array if region is None else self.array[tuple(region)]
        try:
            return np.asarray(
                with_retries(
                    lambda: sub.read().result(), first=None if future is None else future.result
                )
            )
        except Exception as e:  # noqa: BLE001
            raise VolumeError(
                f"reading {_region_str(region)} of volume {self.path} failed: {e}"
            ) from e

    def __repr__(self) -> str:
        return (
            f"Volume({self.path!r}, shape={self.shape}, dtype={self.dtype}, "
            f"axes={''.join(self.axes)}, "
            f"voxel_size={self.voxel_size}, chunks={self.chunks})"
        )


def _region_str(region) -> str:
    if region is None:
        return "the whole array"

    def one(s):
        if not isinstance(s, slice):
            return str(s)
        return f"{'' if s.start is None else s.start}:{'' if s.stop is None else s.stop}"

    return "[" + ", ".join(one(s) for s in region) + "]"


_SHARED_CONTEXT: list = []


def chunk_cache(cache_mb: int | None = None):
    """The tensorstore context volumes are opened in. By default one process-wide context whose
    decoded-chunk cache holds EMFM_CHUNK_CACHE_MB (default 256) MB in total, shared by every volume,
    so memory stays bounded however many volumes a mixture has and however large they are (a
    small volume ends up cached whole; random patches of a large one re-hit it in proportion).
    `cache_mb` gives a private context with a cache of that size instead (benchmarks)."""
    if cache_mb is not None:
        return ts.Context({"cache_pool": {"total_bytes_limit": int(cache_mb) << 20}})
    if not _SHARED_CONTEXT:
        mb = int(os.environ.get("EMFM_CHUNK_CACHE_MB", "256"))
        _SHARED_CONTEXT.append(ts.Context({"cache_pool": {"total_bytes_limit": mb << 20}}))
    return _SHARED_CONTEXT[0]


def open_volume(
    path: str | os.PathLike,
    *,
    level: int | None = None,
    voxel_size: Sequence[float] | None = None,
    driver: str | None = None,
    write: bool = False,
    cache_mb: int | None = None,
) -> Volume:
    """Open a volume by path or URL. `level`/`voxel_size` choose an OME-Zarr scale; `cache_mb`
    gives the volume a private chunk cache instead of the shared one (see `chunk_cache`).

    Raises FileNotFoundError for a missing local path and VolumeError for anything unreadable,
    each naming the path.
    """
    path = str(path)
    remote = "://" in path and not path.startswith("file://")
    if not remote and not Path(path.removeprefix("file://")).exists():
        raise FileNotFoundError(f"volume not found: {path}")
    local = path.removeprefix("file://")
    if driver is None:
        if remote:
            raise VolumeError(
                f"volume {path}: give driver= (zarr3, zarr, n5, neuroglancer_precomputed) for "
                "remote stores"
            )
        driver = detect_driver(local)
    ome = None
    if not remote and driver in ("zarr3", "zarr"):
        ome = ome_level(local, driver, level, voxel_size)
        if ome is not None:
            local = path = ome["path"]
    if level is not None and ome is None:
        raise VolumeError(
            f"volume {path}: level={level} picks a scale of an OME-Zarr multiscale group, but this "
            "is a single array (give the group's path, or leave level out)"
        )
    arr = _open_array(path, driver, kvstore(local if not remote else path), write, cache_mb)
    attrs = read_attributes(local, driver) if not remote else {}
    shift = None
    if ome is not None:  # the group's metadata (emfm's own under "emfm") with the level's
        group = ome["group_attributes"]
        arr = emfm_order(arr, ome["axes"], drop_single_channel="emfm" not in group)
        attrs = {**group, **(group.get("emfm") or {}), **attrs}
    elif driver == "neuroglancer_precomputed":
        arr, shift = _precomputed_zyx(arr)
    elif driver == "n5":
        arr, attrs = _n5_zyx(arr, attrs)
    _check_rank(arr, path)
    axes = (
        ("y", "x") if arr.rank == 2 else ("z", "y", "x") if arr.rank == 3 else ("z", "y", "x", "c")
    )
    if not write and 0 in tuple(arr.shape):
        raise VolumeError(
            f"volume {path} has shape {tuple(arr.shape)} (axes {''.join(axes)}): it holds no "
            "voxels, so there is nothing to read"
        )
    vs, placed = _placement(arr, attrs, ome, voxel_size)
    if shift is not None:  # a precomputed volume's voxel offset, in nm
        placed = tuple(float(o) * v for o, v in zip(shift, vs))
    return Volume(
        path=path, array=arr, voxel_size=vs, axes=axes, attributes=attrs, translation=placed
    )


def _precomputed_zyx(arr):
    """A neuroglancer precomputed volume (x, y, z, channel, starting at its voxel offset) as
    z, y, x (and c when it has several channels) from 0, and the voxel offset (z, y, x)."""
    arr = arr[ts.d["z", "y", "x", "channel"].transpose[:]]
    if arr.shape[-1] == 1:
        arr = arr[..., 0]
    origin = tuple(int(v) for v in arr.domain.inclusive_min[:3])
    return arr.translate_to[0], origin


def _n5_zyx(arr, attrs: dict):
    """An N5 array as z, y, x. N5 lists dimensions fastest first (x, y, z: n5-java, z5py,
    BigDataViewer, and tensorstore keeps that order), so the axes are reversed unless an "axes"
    attribute puts z first; the voxel size ("resolution" or n5-viewer's "pixelResolution", in
    the same order, in "units") goes with them, in nm."""
    names = [str(a).lower() for a in attrs.get("axes") or []]
    reverse = not (names and names[0] in ("z", "c"))
    pr = attrs.get("pixelResolution")
    res = pr.get("dimensions") if isinstance(pr, dict) else attrs.get("resolution")
    unit = pr.get("unit") if isinstance(pr, dict) else (attrs.get("units") or [None])[0]
    attrs = dict(attrs)
    if res is not None and len(res) == arr.rank:
        factor = NM_PER_UNIT.get(str(unit or "nm").lower())
        if factor is None:
            raise VolumeError(f"N5 unit {unit!r}: use one of {sorted(NM_PER_UNIT)}")
        res = [float(v) * factor for v in (res[::-1] if reverse else res)]
        attrs["voxel_size"] = res
    return (arr.T if reverse else arr), attrs


def _is_array(p: Path) -> bool:
    """Whether the local folder `p` holds a zarr v2 / v3 or N5 array (not a group)."""
    if (p / ".zarray").exists():
        return True
    for name, key in (("zarr.json", "node_type"), ("attributes.json", "dimensions")):
        try:
            meta = json.loads((p / name).read_text())
        except (OSError, ValueError):
            continue
        return meta.get(key) == "array" if key == "node_type" else key in meta
    return False


def _arrays_in_group(path: str) -> list[str] | None:
    """The arrays (folder names, sorted, up to two levels down) of the local group at `path`, or
    None when `path` is not a local group."""
    p = _local(path)
    if p is None or not p.is_dir() or _is_array(p):
        return None
    if not any((p / f).exists() for f in (".zgroup", "zarr.json", "attributes.json")):
        return None
    found = []
    for sub in sorted(q for q in p.iterdir() if q.is_dir()):
        if _is_array(sub):
            found.append(sub.name)
        else:
            found += [f"{sub.name}/{q.name}" for q in sorted(sub.iterdir()) if _is_array(q)]
    return found


def _open_array(path: str, driver: str, kv, write: bool, cache_mb: int | None):
    """The tensorstore array, checked for a supported dtype (its rank is checked once it is in
    emfm's axis order)."""
    spec = {"driver": driver, "kvstore": kv}
    try:
        arr = ts.open(spec, read=True, write=write, context=chunk_cache(cache_mb)).result()
    except Exception as e:  # noqa: BLE001
        inside = _arrays_in_group(path)
        if inside is not None:
            hint = f"give {path.rstrip('/')}/{inside[0]}" if inside else "it holds no arrays"
            raise VolumeError(
                f"volume {path} is a group, not an array; arrays in it: "
                f"{', '.join(inside) or 'none'} ({hint})"
            ) from None
        raise VolumeError(f"cannot open volume {path} as {driver}: {e}") from e
    if arr.dtype.name not in SUPPORTED_DTYPES:
        raise VolumeError(
            f"volume {path}: dtype {arr.dtype.name} is not supported "
            f"({', '.join(SUPPORTED_DTYPES)})"
        )
    return arr


def _check_rank(arr, path: str) -> None:
    if arr.rank not in (2, 3, 4):
        raise VolumeError(
            f"volume {path}: {arr.rank} dimensions (shape {tuple(arr.shape)}); expected 2 (y x), "
            "3 (z y x) or 4 (z y x c)"
        )


def _placement(arr, attrs: dict, ome: dict | None, voxel_size) -> tuple[tuple, tuple]:
    """Voxel size and translation of the spatial axes: the OME-Zarr level's, else the attributes'
    or the dimension units' (or `voxel_size`, an override for stores lacking metadata), else 1."""
    scale = None if ome is None else ome["scale"]
    vs = scale or attrs.get("voxel_size") or attrs.get("resolution") or units_voxel_size(arr)
    n_sp = 2 if arr.rank == 2 else 3
    vs = tuple(float(v) for v in (vs or [1.0] * n_sp))[-n_sp:]
    if voxel_size is not None and scale is None:
        vs = tuple(float(v) for v in voxel_size)
    shift = (
        tuple(float(v) for v in ome["translation"])[-n_sp:] if ome is not None else (0.0,) * n_sp
    )
    return vs, shift


def _local(path: str) -> Path | None:
    """A local path as an absolute Path; None for a remote URL (gs://, s3://, http(s)://)."""
    path = str(path)
    if "://" in path and not path.startswith("file://"):
        return None
    return Path(os.path.abspath(path.removeprefix("file://")))


def _stored_attributes(path: Path) -> dict | None:
    """The attributes in `path`/zarr.json (a zarr v3 array or group; a group's under "emfm"
    merged in), None when there is no readable zarr.json."""
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    attrs = dict(meta.get("attributes") or {})
    return {**attrs, **(attrs.get("emfm") or {})} if isinstance(attrs.get("emfm"), dict) else attrs


def guard_output(out: str, job: str, inputs: Sequence[str] = (), marker: str = "") -> None:
    """Refuse an output path that would destroy data emfm did not write for this kind of job.

    `out` may not be (or lie inside, or contain) any of `inputs`. If something exists at `out`, it
    must be an earlier output of `emfm {job}`: a zarr.json whose attributes (or, for a group, its
    "emfm" attributes) hold `"job": job`, or `marker` (a key such outputs have always had). An
    empty folder is fine. Remote outputs are not checked (listing a bucket prefix can be costly).
    """
    o = _local(out)
    if o is None:
        return
    for src in inputs:
        i = _local(src)
        if i is not None and (o == i or i in o.parents or o in i.parents):
            raise VolumeError(
                f"{job} output {out} is the input volume {src} or lies inside it (or it inside "
                "the output): writing there would destroy the input. Choose another output path."
            )
    if not o.exists() or (o.is_dir() and not any(o.iterdir())):
        return
    attrs = _stored_attributes(o)
    if attrs is not None and (attrs.get("job") == job or (marker and marker in attrs)):
        return
    what = "a file" if o.is_file() else "a folder that is not an output of an earlier emfm " + job
    raise VolumeError(
        f"{job} output {out} exists and is {what}; emfm does not overwrite data it did not write. "
        "Remove it or choose another output path."
    )


def create_volume(
    path: str | os.PathLike,
    shape: Sequence[int],
    dtype,
    *,
    chunks: Sequence[int],
    voxel_size: Sequence[float] | None = None,
    attributes: dict | None = None,
    compression_level: int = 3,
    exist_ok: bool = False,
) -> Volume:
    """Create a zarr v3 array (zstd) ready for block-wise writes.

    With `exist_ok`, an existing array of the same shape and dtype is opened as it is (so an
    interrupted writer can resume); one of another shape or dtype is an error naming it.
    """
    path = str(path)
    dtype = np.dtype(dtype)
    if exist_ok and (Path(path) / "zarr.json").exists():
        vol = open_volume(path, write=True)
        if vol.shape != tuple(shape) or vol.dtype != dtype:
            raise VolumeError(
                f"output {path} exists with shape {vol.shape} dtype {vol.dtype}; "
                f"this job writes shape {tuple(shape)} dtype {dtype}. Remove it or choose another "
                "path."
            )
        return vol
    names = ["z", "y", "x", "c"][: len(shape)] if len(shape) != 2 else ["y", "x"]
    attrs = dict(attributes or {})
    if voxel_size is not None:
        attrs["voxel_size"] = [float(v) for v in voxel_size]
        attrs["unit"] = "nanometer"
    meta = zarr3_metadata(
        shape, dtype, chunks, names, compression_level=compression_level, attributes=attrs
    )
    spec = {"driver": "zarr3", "kvstore": kvstore(path), "metadata": meta}
    try:
        arr = ts.open(spec, create=True, delete_existing=not exist_ok).result()
    except Exception as e:  # noqa: BLE001
        raise VolumeError(f"cannot create volume {path}: {e}") from e
    vs = tuple(attrs.get("voxel_size", [1.0] * min(3, len(shape))))
    return Volume(path=path, array=arr, voxel_size=vs, axes=tuple(names), attributes=attrs)


def create_ome_zarr(
    path: str | os.PathLike,
    shape: Sequence[int],
    dtype,
    *,
    chunks: Sequence[int],
    voxel_size: Sequence[float],
    translation: Sequence[float] | None = None,
    attributes: dict | None = None,
    name: str = "",
    unit: str = "nanometer",
    compression_level: int = 3,
) -> Volume:
    """Create an OME-Zarr (NGFF 0.5, zarr v3) image group with one scale level, array "0".

    `shape`, `chunks` in emfm's order (z, y, x[, c]); the array is stored in NGFF's order (c, z, y,
    x), with axes metadata (channel axis, z / y / x in `unit`), the level's scale (`voxel_size`,
    physical size of one array cell) and `translation` (physical position of cell 0's centre).
    `attributes` go into the group's attributes under "emfm". Whatever was at `path` before is
    deleted. Returns the level opened for writing in emfm's axis order (what `open_volume(path,
    write=True)` gives).
    """
    path = str(path)
    if len(shape) not in (3, 4) or len(chunks) != len(shape):
        raise VolumeError(
            f"OME-Zarr output {path}: shape {tuple(shape)} / chunks {tuple(chunks)} must both be "
            "(z, y, x) or (z, y, x, c)"
        )
    has_c = len(shape) == 4
    order = [3, 0, 1, 2] if has_c else [0, 1, 2]
    group = multiscale_group(
        name or Path(path).name,
        [voxel_size],
        [translation if translation is not None else (0.0, 0.0, 0.0)],
        channels=has_c,
        unit=unit,
        attributes=attributes,
    )
    meta = zarr3_metadata(
        [shape[i] for i in order],
        dtype,
        [chunks[i] for i in order],
        ("c", "z", "y", "x") if has_c else ("z", "y", "x"),
        compression_level=compression_level,
    )
    try:
        _write_group(path, meta, group)
    except Exception as e:  # noqa: BLE001
        raise VolumeError(f"cannot create OME-Zarr {path}: {e}") from e
    return open_volume(path, write=True)


def _write_group(path: str, meta: dict, group: dict) -> None:
    """Replace whatever is at `path` by an empty array "0" of `meta` and the group's zarr.json."""
    spec = kvstore(path)
    spec = (
        {**spec, "path": spec["path"].rstrip("/") + "/"}
        if isinstance(spec, dict)
        else spec.rstrip("/") + "/"
    )
    kv = ts.KvStore.open(spec).result()
    kv.delete_range(ts.KvStore.KeyRange()).result()
    ts.open(
        {"driver": "zarr3", "kvstore": kvstore(path.rstrip("/") + "/0"), "metadata": meta},
        create=True,
    ).result()
    kv.write("zarr.json", json.dumps(group, indent=1).encode()).result()


def write_array(
    path: str | os.PathLike,
    data: np.ndarray,
    *,
    chunks: Sequence[int] | None = None,
    voxel_size: Sequence[float] | None = None,
    attributes: dict | None = None,
) -> Volume:
    """Write an in-memory array as a new zarr v3 volume (small arrays: samples, previews, tests)."""
    chunks = chunks or tuple(min(s, 64) for s in data.shape)
    vol = create_volume(
        path,
        data.shape,
        data.dtype,
        chunks=chunks,
        voxel_size=voxel_size,
        attributes=attributes,
        compression_level=19,
    )
    vol.array.write(data).result()
    return vol


def written_chunks(vol: Volume) -> set[tuple[int, int, int]]:
    """Chunk grid indices (z, y, x) of the chunks present in a zarr v3 store whose arrays are `[z,
    y, x]` or `[z, y, x, c]` with one chunk along c (in emfm's axis order, also when the store keeps
    NGFF's c, z, y, x): resumable writers (export, predict, discover) skip these."""
    # stored dim -> view dim
    out_dims = [o.input_dimension for o in vol.array.spec().transform.output]
    done = set()
    for key in vol.array.kvstore.list().result():
        k = key.decode() if isinstance(key, bytes) else key
        if k.startswith("c/"):
            parts = k[2:].split("/")
            if len(parts) == len(out_dims):
                idx = [0] * len(parts)
                for stored, view in enumerate(out_dims):
                    idx[view] = int(parts[stored])
                done.add(tuple(idx[:3]))
    return done
