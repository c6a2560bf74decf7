"""The storage formats volumes come in, as tensorstore sees them: where a path's bytes are (kvstore
specs), which driver reads them, the metadata files beside them, and the metadata of a new zarr v3
array. Nothing here opens an array (emfm.data.volume does).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from emfm.errors import UserError


class VolumeError(UserError):
    """Bad volume input; the message names the volume (and chunk or region, where known)."""


def kvstore(path: str) -> dict | str:
    """The tensorstore kvstore of a local path or URL."""
    if "://" in path:
        scheme, rest = path.split("://", 1)
        if scheme == "file":
            return {"driver": "file", "path": rest}
        return path  # tensorstore parses gs://, s3://, http(s):// URLs itself
    return {"driver": "file", "path": os.path.abspath(path)}


def detect_driver(path: str) -> str:
    """Guess the tensorstore driver of a local path from its metadata files."""
    p = Path(path)
    if p.is_file():
        kind = {".tif": "TIFF", ".tiff": "TIFF", ".h5": "HDF5", ".hdf5": "HDF5", ".hdf": "HDF5"}
        what = kind.get(p.suffix.lower())
        raise VolumeError(
            f"volume {path} is a {what + ' ' if what else ''}file; volumes are read from zarr "
            "(v2/v3), OME-Zarr, N5 or neuroglancer precomputed folders"
            + (f": import it once with `emfm data import {path} OUT.zarr`" if what else "")
        )
    if (p / "zarr.json").exists():
        return "zarr3"
    if (p / ".zarray").exists() or (p / ".zgroup").exists():
        return "zarr"
    if (p / "attributes.json").exists():
        return "n5"
    if (p / "info").exists():
        return "neuroglancer_precomputed"
    raise VolumeError(
        f"volume {path}: no zarr.json, .zarray, attributes.json or info file there; "
        "is it a zarr (v2/v3), N5 or neuroglancer precomputed volume?"
    )


def read_attributes(path: str, driver: str) -> dict:
    """The user attributes stored beside a local zarr (v2, v3) or N5 array; {} for others."""
    p = Path(path)
    try:
        if driver == "zarr3":
            return json.loads((p / "zarr.json").read_text()).get("attributes", {})
        if driver == "zarr" and (p / ".zattrs").exists():
            return json.loads((p / ".zattrs").read_text())
        if driver == "n5":
            return json.loads((p / "attributes.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise VolumeError(f"volume {path}: unreadable metadata: {e}") from e
    return {}


def units_voxel_size(arr) -> list[float] | None:
    """The voxel size an open tensorstore array's dimension units give, if every axis has one."""
    try:
        units = arr.dimension_units
    except Exception:  # noqa: BLE001
        return None
    if not units or any(u is None for u in units):
        return None
    return [float(u.multiplier) for u in units]


def zarr3_metadata(
    shape: Sequence[int],
    dtype,
    chunks: Sequence[int],
    dimension_names: Sequence[str],
    *,
    compression_level: int = 3,
    **extra,
) -> dict:
    """The tensorstore `metadata` of a new zarr v3 array: regular chunks, little-endian bytes
    compressed with zstd; `extra` adds keys (`attributes`, `fill_value`)."""
    return {
        "shape": [int(s) for s in shape],
        "data_type": np.dtype(dtype).name,
        "chunk_grid": {
            "name": "regular",
            "configuration": {"chunk_shape": [int(c) for c in chunks]},
        },
        "codecs": [
            {"name": "bytes", "configuration": {"endian": "little"}},
            {"name": "zstd", "configuration": {"level": compression_level}},
        ],
        "dimension_names": list(dimension_names),
        **extra,
    }
