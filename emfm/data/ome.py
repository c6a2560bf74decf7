"""OME-Zarr (NGFF 0.4 and 0.5) multiscale metadata: reading the scale levels of an image group,
and writing the group of a one-level image.

emfm keeps arrays in `z, y, x[, c]` order; NGFF stores a channel axis before space.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorstore as ts

from emfm.data.formats import VolumeError

OME_VERSION = "0.5"


def ome_level(
    path: str, driver: str, level: int | None, voxel_size: Sequence[float] | None
) -> dict | None:
    """If `path` is an OME-Zarr multiscale group (NGFF 0.4 or 0.5), the chosen level (`level`, or
    the one nearest `voxel_size`): its array path, the spatial scale and translation (z, y, x),
    the axis names, and the group's attributes."""
    meta_file = Path(path) / ("zarr.json" if driver == "zarr3" else ".zattrs")
    if not meta_file.exists():
        return None
    meta = json.loads(meta_file.read_text())
    attrs = meta.get("attributes", meta) if driver == "zarr3" else meta
    ms = attrs.get("ome", {}).get("multiscales") or attrs.get("multiscales")
    if not ms or (driver == "zarr3" and meta.get("node_type") != "group"):
        return None
    datasets = ms[0]["datasets"]
    axes = ms[0].get("axes") or []
    scales, shifts = _level_transforms(datasets, axes)
    if voxel_size is not None:
        want = np.asarray(voxel_size, float)
        level = int(np.argmin([np.abs(np.log(np.asarray(s) / want)).sum() for s in scales]))
        got = np.asarray(scales[level], float)
        if np.any(np.abs(got / want - 1) > 0.1):
            import logging

            logging.getLogger("emfm").warning(
                "volume %s: no scale level near voxel_size %s nm; the nearest, level %d, has %s nm",
                path,
                list(want),
                level,
                list(got),
            )
    level = 0 if level is None else level
    if not 0 <= level < len(datasets):
        raise VolumeError(
            f"volume {path}: scale level {level} requested, the group has {len(datasets)}"
        )
    return {
        "path": str(Path(path) / datasets[level]["path"]),
        "scale": tuple(scales[level]),
        "translation": tuple(shifts[level]),
        "axes": [a["name"] if isinstance(a, dict) else str(a) for a in axes],
        "group_attributes": attrs,
    }


# length units in nanometres: NGFF's space units (UDUNITS-2 names, as NGFF 0.4/0.5 list them) and
# the abbreviations N5 metadata uses
NM_PER_UNIT = {
    "angstrom": 0.1,
    "nanometer": 1.0,
    "micrometer": 1e3,
    "millimeter": 1e6,
    "centimeter": 1e7,
    "meter": 1e9,
    "picometer": 1e-3,
    "nm": 1.0,
    "um": 1e3,
    "µm": 1e3,
    "mm": 1e6,
}


def _level_transforms(datasets: list, axes: list) -> tuple[list, list]:
    """Per level, the scale and translation of the spatial axes in nanometres (all 1 and 0 where
    not given; an axis without a unit is taken as nanometres)."""
    space = [
        i for i, a in enumerate(axes) if isinstance(a, dict) and a.get("type") == "space"
    ] or None
    to_nm = [
        NM_PER_UNIT.get(str(axes[i].get("unit") or "nanometer").lower(), None) for i in space or []
    ]
    if None in to_nm:
        units = [axes[i].get("unit") for i in space]
        raise VolumeError(f"OME-Zarr space units {units}: use one of {sorted(NM_PER_UNIT)}")
    scales, shifts = [], []
    for d in datasets:
        scale, shift = None, None
        for t in d.get("coordinateTransformations", []):
            if t.get("type") == "scale":
                scale = [float(v) for v in t["scale"]]
            elif t.get("type") == "translation":
                shift = [float(v) for v in t["translation"]]
        pick = (
            (lambda v: [v[i] for i in space])
            if space and scale and len(scale) == len(axes)
            else (lambda v: v[-3:])
        )
        scales.append(pick(scale) if scale else [1.0] * 3)
        shifts.append(pick(shift) if shift else [0.0] * len(scales[-1]))
        if to_nm and len(to_nm) == len(scales[-1]):
            scales[-1] = [v * f for v, f in zip(scales[-1], to_nm)]
            shifts[-1] = [v * f for v, f in zip(shifts[-1], to_nm)]
    return scales, shifts


def ome_level_path(path: str, driver: str, level: int | None, voxel_size: Sequence[float] | None):
    """If `path` is an OME-Zarr multiscale group, return (array path, scale) of the chosen level."""
    lv = ome_level(path, driver, level, voxel_size)
    return None if lv is None else (lv["path"], lv["scale"])


def emfm_order(arr, names: Sequence[str], drop_single_channel: bool = True):
    """A view of an OME-Zarr level in emfm's axis order: the spatial axes (z, y, x) first, then a
    channel axis (NGFF stores channels before space). A time axis of length 1 is dropped (the
    TCZYX layout of bioformats2raw), and so is a channel axis of length 1 when
    `drop_single_channel` (a one-channel image is a z, y, x volume)."""
    if len(names) != arr.rank:
        return arr
    space = [i for i, n in enumerate(names) if n in ("z", "y", "x")]
    order = space + [i for i in range(arr.rank) if i not in space]
    if order != list(range(arr.rank)):
        arr = arr[ts.d[tuple(order)].transpose[:]]
    for k in reversed(range(len(space), arr.rank)):
        name = str(names[order[k]]).lower()
        if arr.shape[k] == 1 and (name == "t" or (name == "c" and drop_single_channel)):
            arr = arr[ts.d[k][0]]
    return arr


def multiscale_group(
    name: str,
    scales: Sequence[Sequence[float]],
    translations: Sequence[Sequence[float]] | None = None,
    *,
    channels: bool = False,
    unit: str = "nanometer",
    kind: str | None = None,
    attributes: dict | None = None,
) -> dict:
    """The zarr.json of an OME-Zarr image group whose level k is array "k": axes (an optional
    channel axis, then z / y / x in `unit`), each level's scale (and translation, if given), the
    downsampling `kind` ("mean", "mode") if given, and `attributes` under "emfm"."""
    c = [1.0] if channels else []
    axes = ([{"name": "c", "type": "channel"}] if channels else []) + [
        {"name": a, "type": "space", "unit": unit} for a in ("z", "y", "x")
    ]
    datasets = []
    for k, scale in enumerate(scales):
        transforms = [{"type": "scale", "scale": c + [float(v) for v in scale]}]
        if translations is not None:
            shift = [0.0] * len(c) + [float(v) for v in translations[k]]
            transforms.append({"type": "translation", "translation": shift})
        datasets.append({"path": str(k), "coordinateTransformations": transforms})
    multiscale = {"name": name, "axes": axes, "datasets": datasets}
    if kind is not None:
        multiscale["type"] = kind
    return {
        "zarr_format": 3,
        "node_type": "group",
        "attributes": {
            "ome": {"version": OME_VERSION, "multiscales": [multiscale]},
            "emfm": dict(attributes or {}),
        },
    }
