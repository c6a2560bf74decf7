"""What `emfm view` shows (emfm.view): the volumes of the paths it is given (volumes and run
directories), what kind each is (`classify`) and where it lies in physical space.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from emfm.data.volume import Volume, open_volume
from emfm.errors import UserError

KINDS = ("raw", "features", "probabilities", "labels")
# Sub-directories of a run that never hold its volumes (checkpoints, TensorBoard, figures, Hydra's
# record).
SKIP_DIRS = {"checkpoints", "tb", "figures", ".hydra", "__pycache__"}
# config.yaml keys that name a run's input image volume, in the order they are looked up.
CONFIG_INPUT_KEYS = (("predict", "path"), ("export", "path"), ("probe", "path"), ("data", "path"))
LABEL_NAME = re.compile(
    r"(label|instance|cluster|segment|_gt\b|^gt\b|groundtruth|ground_truth)", re.I
)
LABEL_CONTENT = re.compile(r"(label|instance|cluster|segment|\b\d+\s*=)", re.I)
FEATURE_CONTENT = re.compile(r"(feature|pca|token|decoder output|encoder)", re.I)


@dataclass
class Entry:
    """One volume to show: its path, the open volume, its kind (one of KINDS) and its offset (nm, z
    y x: where the centre of voxel 0 lies, in the frame where voxel centres of the raw input lie at
    index x voxel size); `placed` is False when nothing in the file said where it lies."""

    path: str
    volume: Volume
    kind: str
    offset_nm: tuple[float, float, float]
    placed: bool = True
    name: str = ""


@dataclass
class Plan:
    """What `serve` shows: the volumes in layer order and notes on what was skipped or guessed."""

    entries: list[Entry] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------- finding
def _json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def is_volume_dir(path: Path) -> bool:
    """Whether `path` is one volume: a zarr / N5 / precomputed array, or an OME-Zarr multiscale
    group. A plain zarr or N5 group (a container of arrays) is not: it is looked into like a run
    directory."""
    if not path.is_dir():
        return False
    if (path / ".zarray").exists() or (path / "info").exists():
        return True
    if (path / "zarr.json").exists():
        meta = _json(path / "zarr.json")
        attrs = meta.get("attributes") or {}
        return meta.get("node_type") == "array" or "multiscales" in (attrs.get("ome") or attrs)
    if (path / ".zgroup").exists():
        return "multiscales" in _json(path / ".zattrs")
    if (path / "attributes.json").exists():
        return "dimensions" in _json(path / "attributes.json")
    return False


def classify(vol: Volume, name: str = "") -> str:
    """The kind of a volume (see KINDS) from its shape, dtype, attributes and (for 8/16-bit
    integers) its name."""
    attrs = vol.attributes or {}
    content = str(attrs.get("content", ""))
    if vol.ndim == 4:
        if content == "probabilities" or "channels" in attrs or "window" in attrs:
            return "probabilities"
        if "export" in attrs or "pca" in attrs or FEATURE_CONTENT.search(content):
            return "features"
        return "probabilities" if vol.shape[3] <= 3 else "features"
    if vol.dtype.kind in "iu":
        # 32/64-bit integers are labels; 8/16-bit ones (EM grey values are often uint16) when the
        # file or its name says so: an instance or cluster record, a class legend ("1 = membrane"),
        # a mode-downsampled OME-Zarr pyramid (`emfm data import --labels`)
        ms = (attrs.get("ome") or {}).get("multiscales") or attrs.get("multiscales") or [{}]
        pyramid = (
            ms[0].get("type") if isinstance(ms, list) and ms and isinstance(ms[0], dict) else None
        )
        if vol.dtype.itemsize > 2 or "instances" in attrs or "k" in attrs or pyramid == "mode":
            return "labels"
        if pyramid != "mean" and (
            LABEL_CONTENT.search(content) or (not content and LABEL_NAME.search(name))
        ):
            return "labels"
        return "raw"
    if content == "probabilities":
        return "probabilities"
    return "raw"


def _resolve(p: str, run_dir: Path) -> Path | None:
    """An input path as recorded by a run: absolute, relative to the current directory (where emfm
    ran), or relative to the run directory or one of its parents."""
    cand = Path(p)
    if cand.is_absolute():
        return cand if cand.exists() else None
    for base in [Path.cwd(), run_dir, *run_dir.resolve().parents]:
        if (base / cand).exists():
            return base / cand
    return None


def _config_input(run_dir: Path) -> tuple[str | None, str]:
    """The input volume named by a run's config.yaml: (path or None, the key it came from)."""
    import yaml

    cfg_file = run_dir / "config.yaml"
    if not cfg_file.exists():
        cfg_file = run_dir / ".hydra" / "config.yaml"
    if not cfg_file.exists():
        return None, ""
    try:
        cfg = yaml.safe_load(cfg_file.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"run directory {run_dir}: {cfg_file.name} is not valid YAML: {e}") from e
    for section, key in CONFIG_INPUT_KEYS:
        sec = cfg.get(section)
        if not isinstance(sec, dict) or key not in sec:
            continue
        value = sec.get(key) or ""
        if section == "data" and not value and sec.get("sources"):
            value = sec["sources"][0].get("path", "") if isinstance(sec["sources"][0], dict) else ""
        if not value:
            from emfm.data.bundled import sample_raw

            return sample_raw(), f"{section}.{key} (empty: the bundled sample)"
        return str(value), f"{section}.{key}"
    return None, ""


def run_volumes(run_dir: Path, notes: list[str]) -> tuple[list[Path], list[Path]]:
    """The volumes a run directory holds (itself and one level of sub-directories, plus the features
    a cluster map was made of) and the raw volumes it read: those its products name as their
    "source", else the input its config.yaml names."""
    found: list[Path] = []
    for child in sorted(run_dir.iterdir()):
        if (
            child.name.startswith(".")
            or child.name in SKIP_DIRS
            or not child.is_dir()
            or child.name.endswith(".work")
        ):
            continue
        if is_volume_dir(child):
            found.append(child)
            continue
        found += [
            g
            for g in sorted(child.iterdir())
            if g.is_dir() and not g.name.endswith(".work") and is_volume_dir(g)
        ]
    raws: list[Path] = []
    missing: set[str] = set()
    inputs: list[Path] = []
    for p in list(found):  # the products name the volumes they were made from
        try:
            attrs = open_volume(p).attributes
        except (OSError, ValueError):
            continue
        for key in ("source", "features"):  # the raw volume; the features clusters were made of
            src = attrs.get(key)
            if not isinstance(src, str) or not src or src in missing:
                continue
            got = _resolve(src, run_dir)
            if got is None:
                missing.add(src)
                notes.append(f"{p} was made from {src}, which is not there; it is not shown")
            elif got.resolve() not in {r.resolve() for r in raws + inputs + found}:
                (raws if key == "source" else inputs).append(got)
    found += inputs
    if not raws:
        src, key = _config_input(run_dir)
        if src is not None:
            raw = _resolve(src, run_dir)
            if raw is None:
                notes.append(f"{run_dir}/config.yaml names input {src} ({key}), which is not there")
            else:
                raws.append(raw)
    return found, raws


# --------------------------------------------------------------------------------------- placing
def _roi_origin(attrs: dict) -> list[int] | None:
    roi = attrs.get("roi")
    if (
        isinstance(roi, list)
        and len(roi) == 3
        and all(isinstance(r, list) and len(r) == 2 for r in roi)
    ):
        return [int(r[0]) for r in roi]
    return None


def _offset(vol: Volume) -> tuple[tuple[float, float, float], bool]:
    """Where the centre of voxel 0 lies (nm, z y x) and whether the file said so."""
    vs = spatial_vs(vol)
    if vol.translation and any(vol.translation):
        return tuple(float(t) for t in (list(vol.translation) + [0.0] * 3)[:3]), True
    origin = _roi_origin(vol.attributes or {})
    if origin is not None and vol.attributes.get("source"):
        return tuple(float(o * v) for o, v in zip(origin, vs)), True
    # OME-Zarr: translation given
    ome = "ome" in (vol.attributes or {}) or "multiscales" in (vol.attributes or {})
    return (0.0, 0.0, 0.0), ome or origin is not None


def spatial_vs(vol: Volume) -> tuple[float, float, float]:
    vs = tuple(float(v) for v in vol.voxel_size)
    return vs if len(vs) == 3 else (1.0,) + vs[-2:]


def spatial_shape(vol: Volume) -> tuple[int, int, int]:
    s = vol.shape[:3] if vol.ndim == 4 else vol.shape
    return tuple(s) if len(s) == 3 else (1,) + tuple(s)


def plan(paths: Sequence[str | Path]) -> Plan:
    """Open every path (a volume or a run directory) and decide how each volume is shown."""
    if not paths:
        raise UserError("give at least one volume or run directory")
    out = Plan()
    found: list[tuple[Path, bool]] = []  # (volume path, the run's raw input)
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise UserError(f"{p} does not exist")
        if is_volume_dir(path):
            found.append((path, False))
        elif path.is_dir():
            vols, raws = run_volumes(path, out.notes)
            if not vols and not raws:
                raise UserError(
                    f"{p} is neither a volume (zarr, N5, neuroglancer precomputed) "
                    "nor a run directory holding any"
                )
            found += [(r, True) for r in raws] + [(v, False) for v in vols]
        else:
            raise UserError(
                f"{p} is a file, not a volume directory (zarr, N5, neuroglancer precomputed)"
            )
    seen: set[Path] = set()
    for path, is_input in found:
        key = path.resolve()
        if key in seen:
            continue
        seen.add(key)
        vol = open_volume(path)  # a VolumeError (a UserError) names the path
        kind = (
            "raw"
            if is_input and vol.ndim != 4 and vol.dtype.kind == "f"
            else classify(vol, path.name)
        )
        if is_input and vol.ndim == 3 and vol.dtype.kind in "iu" and vol.dtype.itemsize <= 2:
            kind = "raw"  # the input a run read is its image, whatever its integer type
        offset, placed = _offset(vol)
        out.entries.append(Entry(str(path), vol, kind, offset, placed))
    # A product without a recorded place (instances from a prediction) shares the grid of a product
    # of the same shape and voxel size that has one.
    for e in out.entries:
        if e.placed or e.kind == "raw":
            continue
        for o in out.entries:
            if (
                o.placed
                and o.kind != "raw"
                and spatial_shape(o.volume) == spatial_shape(e.volume)
                and spatial_vs(o.volume) == spatial_vs(e.volume)
            ):
                e.offset_nm = o.offset_nm
                break
    out.entries.sort(key=lambda e: KINDS.index(e.kind))
    _name_entries(out.entries)
    return out


def _name_entries(entries: list[Entry]) -> None:
    names: dict[str, int] = {}
    for e in entries:
        p = Path(e.path)
        base = p.name[: -len(".zarr")] if p.name.endswith(".zarr") else p.name
        if (
            p.name in ("0", "s0", "raw") and p.parent.name
        ):  # an OME level or a container's array: name the container
            base = p.parent.name.removesuffix(".zarr") + "/" + base
        n = names.get(base, 0)
        names[base] = n + 1
        e.name = base if n == 0 else f"{base} ({n + 1})"
