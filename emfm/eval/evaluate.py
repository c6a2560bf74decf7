"""Evaluate a predicted segmentation on disk against ground truth; write metrics.json + metrics.md.

Inputs are TIFF stacks (read page range by page range) or zarr v3 / zarr v2 / N5 arrays (read
through tensorstore, driver detected from ``zarr.json`` / ``.zarray`` / ``attributes.json``).
Large 3D inputs are evaluated ``block_z`` slices at a time, so memory stays bounded by one block
plus the sparse contingency table. The Hydra CLI (``emfm evaluate pred=... gt=...``) only calls
:func:`evaluate_paths`.
"""

from __future__ import annotations

import inspect
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from emfm.errors import UserError
from emfm.eval.metrics import check_kinds, evaluate_volumes

__all__ = ["evaluate_paths", "open_label_volume", "write_markdown"]

_TIFF_SUFFIXES = (".tif", ".tiff")
# Read ~256 MB of each input per block when the caller does not choose.
_BLOCK_BYTES = 256 << 20


class _TiffStack:
    """Lazy (z, y, x) view of a multi-page TIFF: slicing axis 0 reads only those pages."""

    def __init__(self, path: Path):
        import tifffile

        self.path = path
        self._tif = tifffile.TiffFile(path)
        series = self._tif.series[0]
        self.shape = tuple(series.shape)
        self.dtype = np.dtype(series.dtype)
        self._paged = len(self._tif.pages) == (self.shape[0] if len(self.shape) == 3 else 1)

    def __getitem__(self, sl):
        sl = sl if isinstance(sl, tuple) else (sl,)
        if len(self.shape) == 3 and self._paged and isinstance(sl[0], slice):
            pages = range(*sl[0].indices(self.shape[0]))
            arr = self._tif.asarray(key=pages) if len(pages) else np.zeros((0,) + self.shape[1:])
            arr = arr.reshape((len(pages),) + self.shape[1:])
            return arr[(slice(None),) + sl[1:]]
        return self._tif.asarray()[sl]


class _VolumeArray:
    """A tensorstore-backed emfm Volume; slicing returns numpy."""

    def __init__(self, vol):
        self._vol, self.path = vol, vol.path
        self.shape, self.dtype = vol.shape, vol.dtype

    def __getitem__(self, sl):
        return self._vol.read(sl if isinstance(sl, tuple) else (sl,))


def open_label_volume(path, name: str = "volume"):
    """Open a TIFF / zarr / N5 volume lazily; returns an object with shape, dtype, [slicing]."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{name} path does not exist: {path}")
    if path.is_file():
        if path.suffix.lower() not in _TIFF_SUFFIXES:
            raise UserError(
                f"{name} {path}: unsupported file type {path.suffix!r} (want .tif/.tiff)"
            )
        return _TiffStack(path)
    from emfm.data.volume import VolumeError, open_volume

    try:
        # zarr v3 / v2 / N5 / precomputed, as everywhere in emfm
        return _VolumeArray(open_volume(path))
    except VolumeError as e:
        raise UserError(f"{name}: {e}; point at the array, not its group") from None


def _check_pair(pred, gt, pred_path, gt_path, kinds):
    if tuple(pred.shape) != tuple(gt.shape):
        raise UserError(
            f"shape mismatch: pred {pred_path} has shape {tuple(pred.shape)}, "
            f"gt {gt_path} has shape {tuple(gt.shape)}"
        )
    needs_ids = set(kinds) & {"region", "instance", "semantic"}
    for vol, p, name in ((pred, pred_path, "pred"), (gt, gt_path, "gt")):
        integer = np.issubdtype(vol.dtype, np.integer) or vol.dtype == np.bool_
        if needs_ids and not integer:
            raise UserError(
                f"{name} {p} has dtype {vol.dtype}, but {sorted(needs_ids)} metrics need integer "
                "label ids; threshold/label the prediction first"
            )


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if v is None:
        return "n/a"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def write_markdown(results: dict, path, title: str = "Segmentation metrics") -> None:
    """One table per metric family (nested per-threshold instance scores get their own table)."""
    lines = [f"# {title}", ""]
    meta = results.get("inputs", {})
    for k, v in meta.items():
        lines.append(f"- {k}: `{v}`")
    lines.append("")
    for kind, scores in results.get("metrics", {}).items():
        lines += [f"## {kind}", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in scores.items() if k != "per_threshold"]
        lines.append("")
        if "per_threshold" in scores:
            per = scores["per_threshold"]
            cols = list(next(iter(per.values())).keys())
            lines += [
                "| IoU threshold | " + " | ".join(cols) + " |",
                "|---" * (len(cols) + 1) + "|",
            ]
            for t, row in per.items():
                lines.append(f"| {t} | " + " | ".join(_fmt(row[c]) for c in cols) + " |")
            lines.append("")
    Path(path).write_text("\n".join(lines))


def evaluate_paths(
    pred_path,
    gt_path,
    out_dir,
    kinds: Sequence[str] = ("region", "instance"),
    *,
    block_z: int | None = None,
    **options,
) -> dict:
    """Evaluate ``pred_path`` against ``gt_path`` and write ``out_dir``/metrics.{json,md}.

    Paths: TIFF files or zarr v3 / zarr v2 / N5 array directories. ``kinds`` and the keyword
    ``options`` (ignore_gt, ignore_pred, background, iou_thresholds, num_classes, ignore_index, ...)
    are those of :func:`emfm.eval.metrics.evaluate_volumes`. ``block_z`` (slices per block)
    defaults to what keeps one block of each input near 256 MB. Raises FileNotFoundError for a
    missing path and ValueError (naming the file) for a shape mismatch or float labels where
    integer ids are needed. Returns the dict written to metrics.json.
    """
    kinds = tuple(kinds)
    check_kinds(kinds)
    pred = open_label_volume(pred_path, "pred")
    gt = open_label_volume(gt_path, "gt")
    _check_pair(pred, gt, pred_path, gt_path, kinds)
    if block_z is None and len(pred.shape) == 3:
        slice_bytes = int(np.prod(pred.shape[1:])) * max(pred.dtype.itemsize, gt.dtype.itemsize)
        block_z = min(pred.shape[0], max(1, _BLOCK_BYTES // max(1, slice_bytes)))
    opts = _VOLUME_OPTIONS | options
    t0 = time.perf_counter()
    metrics = evaluate_volumes(pred, gt, kinds, block_z=block_z, **options)
    results = {
        "inputs": {
            "pred": str(pred_path),
            "gt": str(gt_path),
            "shape": list(pred.shape),
            "pred_dtype": str(pred.dtype),
            "gt_dtype": str(gt.dtype),
            "kinds": list(kinds),
            "ignore_gt": list(opts["ignore_gt"]),
            "ignore_pred": list(opts["ignore_pred"]),
            "block_z": block_z,
            "seconds": round(time.perf_counter() - t0, 3),
        },
        "metrics": metrics,
    }
    results = _jsonable(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(results, indent=2))
    write_markdown(results, out / "metrics.md")
    return results


# evaluate_volumes' keyword options and their defaults (recorded in metrics.json)
_VOLUME_OPTIONS = {
    k: p.default
    for k, p in inspect.signature(evaluate_volumes).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
}
