"""What a volume is: shape, dtype, chunks, voxel size, OME-Zarr scales, a grey-value range
estimate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from emfm.data.formats import detect_driver
from emfm.data.ome import ome_level_path
from emfm.data.volume import Volume, open_volume


def _scales(path: str) -> list[dict]:
    """Every level of an OME-Zarr group (empty for a plain array)."""
    p = Path(path)
    if "://" in path or not p.is_dir():
        return []
    driver = detect_driver(path)
    if driver not in ("zarr3", "zarr") or ome_level_path(path, driver, 0, None) is None:
        return []
    out = []
    level = 0
    while True:
        try:
            v = open_volume(path, level=level)
        except ValueError:  # VolumeError: past the last level
            break
        out.append(
            {
                "level": level,
                "path": v.path,
                "shape": list(v.shape),
                "chunks": list(v.chunks),
                "voxel_size": list(v.voxel_size),
            }
        )
        level += 1
    return out


def value_range(vol: Volume, *, samples: int = 16, seed: int = 0) -> dict:
    """Min / max and 0.5 / 99.5 percentiles of a few random crops (exact for small volumes)."""
    rng = np.random.default_rng(seed)
    shape = vol.spatial_shape
    crop = [min(s, c) for s, c in zip(shape, (1, 256, 256)[-len(shape) :])]
    if np.prod(shape) <= 2**22:
        vals = vol.read().ravel()
        exact = True
    else:
        boxes = []
        for _ in range(samples):
            o = [int(rng.integers(0, s - c + 1)) for s, c in zip(shape, crop)]
            boxes.append(tuple(slice(a, a + c) for a, c in zip(o, crop)))
        futures = [vol.read_async(b) for b in boxes]
        vals = np.concatenate([vol.result(f, b).ravel() for f, b in zip(futures, boxes)])
        exact = False
    v = vals.astype(np.float64)
    p_lo, p_hi = np.percentile(v, [0.5, 99.5])
    return {
        "min": float(v.min()),
        "max": float(v.max()),
        "p0.5": float(p_lo),
        "p99.5": float(p_hi),
        "mean": float(v.mean()),
        "exact": exact,
    }


def volume_info(path: str, *, level: int | None = None, samples: int = 16) -> dict:
    vol = open_volume(path, level=level)
    nbytes = int(np.prod(vol.shape)) * vol.dtype.itemsize
    return {
        "path": str(path),
        "array": vol.path,
        "shape": list(vol.shape),
        "axes": "".join(vol.axes),
        "dtype": str(vol.dtype),
        "chunks": list(vol.chunks),
        "voxel_size": list(vol.voxel_size),
        "size_mb": nbytes / 1e6,
        "scales": _scales(str(path)),
        "range": value_range(vol, samples=samples),
    }


def format_table(info: dict) -> str:
    def t(x):
        return " x ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in x)

    r = info["range"]
    rows = [
        ("path", info["path"]),
        ("array", info["array"]),
        ("shape", f"{t(info['shape'])} ({info['axes']})"),
        ("dtype", info["dtype"]),
        ("chunks", t(info["chunks"])),
        ("voxel size", f"{t(info['voxel_size'])} nm"),
        ("size", f"{info['size_mb']:.1f} MB uncompressed"),
        (
            "values",
            f"min {r['min']:g}  max {r['max']:g}  p0.5 {r['p0.5']:g}  p99.5 {r['p99.5']:g}  "
            f"mean {r['mean']:.4g}" + ("" if r["exact"] else "  (sampled)"),
        ),
    ]
    w = max(len(k) for k, _ in rows)
    lines = [f"{k:<{w}}  {v}" for k, v in rows]
    if info["scales"]:
        lines += ["", f"{'level':<6}{'shape':<24}{'chunks':<20}voxel size (nm)"]
        lines += [
            f"{s['level']:<6}{t(s['shape']):<24}{t(s['chunks']):<20}{t(s['voxel_size'])}"
            for s in info["scales"]
        ]
    return "\n".join(lines)


def to_json(info: dict) -> str:
    return json.dumps(info, indent=1)
