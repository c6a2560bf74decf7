"""Look at volumes and what emfm made of them in neuroglancer, served from this process.

`serve(paths)` opens every path with tensorstore and adds one neuroglancer layer per volume (or per
channel of a probability map), each streamed chunk by chunk from the file as the browser asks for
it, so a volume larger than memory is never read whole. What a volume is, and so how it is shown,
comes from its dtype, shape and attributes (`classify`):

- raw     grey image (z, y, x), grey shader with a contrast range from the volume's central chunk;
- features  `emfm export` output (z, y, x, c): the first three principal components as RGB. The PCA
            basis is fitted on a random sample of chunks; each chunk the browser asks for is then
            read, projected and scaled to uint8 on the fly (`PCAProjection`), nothing is written;
- probabilities  `emfm predict` output (z, y, x, c, "content": "probabilities"): one image layer per
            channel with a heat shader whose opacity is the probability;
- labels  integer label volumes (instances, `emfm discover` clusters, ground truth):
          segmentation layers; 32/64-bit integers always, 8/16-bit ones when their attributes or
          name say they are labels.

A run directory shows every volume the run wrote plus the raw volume it read (found from the
products' "source" attribute, or from its config.yaml; an empty path there is the bundled sample).
Volumes are placed in physical space (nm) from their voxel sizes and offsets: an OME-Zarr
translation (feature grids), or the `roi` a prediction was made of.
"""

from __future__ import annotations

import json
import logging
import re
import webbrowser
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts

from emfm.data.volume import Volume, open_volume
from emfm.errors import UserError

log = logging.getLogger("emfm.view")

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
PCA_SAMPLE_VOXELS = 200_000
PANEL_PX = 900  # the width of the viewer in a browser window the initial zoom fits the volume into
NG_IMAGE_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")

GREY_SHADER = """#uicontrol invlerp normalized(range=[{lo}, {hi}])
void main() {{
  emitGrayscale(normalized());
}}
"""
RGB_SHADER = """void main() {
  emitRGB(vec3(toNormalized(getDataValue(0)), toNormalized(getDataValue(1)), \
toNormalized(getDataValue(2))));
}
"""
HEAT_SHADER = """#uicontrol invlerp normalized(range=[{lo}, {hi}])
#uicontrol float opacity slider(min=0, max=1, default=0.7)
void main() {{
  float p = clamp(normalized(), 0.0, 1.0);
  emitRGBA(vec4(colormapJet(p), p * opacity));
}}
"""


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
    vs = _spatial_vs(vol)
    if vol.translation and any(vol.translation):
        return tuple(float(t) for t in (list(vol.translation) + [0.0] * 3)[:3]), True
    origin = _roi_origin(vol.attributes or {})
    if origin is not None and vol.attributes.get("source"):
        return tuple(float(o * v) for o, v in zip(origin, vs)), True
    # OME-Zarr: translation given
    ome = "ome" in (vol.attributes or {}) or "multiscales" in (vol.attributes or {})
    return (0.0, 0.0, 0.0), ome or origin is not None


def _spatial_vs(vol: Volume) -> tuple[float, float, float]:
    vs = tuple(float(v) for v in vol.voxel_size)
    return vs if len(vs) == 3 else (1.0,) + vs[-2:]


def _spatial_shape(vol: Volume) -> tuple[int, int, int]:
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
                and _spatial_shape(o.volume) == _spatial_shape(e.volume)
                and _spatial_vs(o.volume) == _spatial_vs(e.volume)
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


# ------------------------------------------------------------------------------------------ data
class PCAProjection:
    """A lazy (z, y, x, 3) uint8 view of a (z, y, x, c) feature volume: the first three principal
    components, each scaled so its 1st..99th percentile over the fitting sample spans 0..255.
    Indexing reads only the requested region of the features (the way neuroglancer asks: one chunk
    at a time)."""

    def __init__(
        self, vol: Volume, mean: np.ndarray, components: np.ndarray, lo: np.ndarray, hi: np.ndarray
    ):
        self.volume = vol
        self.mean = np.asarray(mean, np.float32)
        self.components = np.asarray(components, np.float32)  # (3, c)
        self.lo = np.asarray(lo, np.float32)
        self.scale = np.float32(255.0) / np.maximum(
            np.asarray(hi, np.float32) - self.lo, np.float32(1e-6)
        )
        self.shape = _spatial_shape(vol) + (3,)
        self.dtype = np.dtype(np.uint8)

    @property
    def ndim(self) -> int:
        return 4

    def project(self, feats: np.ndarray) -> np.ndarray:
        pcs = (feats.astype(np.float32) - self.mean) @ self.components.T
        return np.clip((pcs - self.lo) * self.scale, 0, 255).astype(np.uint8)

    def __getitem__(self, index: tuple) -> np.ndarray:
        index = tuple(index) + (slice(None),) * (4 - len(index))
        rgb = self.project(self.volume.read(tuple(index[:3]) + (slice(None),)))
        return rgb[..., index[3]]


def fit_pca(vol: Volume, *, n_voxels: int = PCA_SAMPLE_VOXELS, seed: int = 0) -> PCAProjection:
    """Fit the 3-component PCA of a (z, y, x, c) feature volume on voxels of randomly chosen chunks
    (about `n_voxels` in all, so the fit reads a bounded part of any volume)."""
    if vol.ndim != 4:
        raise UserError(
            f"volume {vol.path}: features need axes z, y, x, c; it has shape {vol.shape}"
        )
    rng = np.random.default_rng(seed)
    shape = vol.shape[:3]
    chunk = tuple(max(1, min(int(c), s)) for c, s in zip(vol.chunks[:3], shape))
    grid = [-(-s // c) for s, c in zip(shape, chunk)]
    n_chunks = int(np.prod(grid))
    per_chunk = int(np.prod(chunk))
    want = max(1, min(n_chunks, -(-n_voxels // per_chunk), 64))
    picks = rng.choice(n_chunks, size=want, replace=False)
    rows = []
    for flat in picks:
        idx = np.unravel_index(int(flat), grid)
        box = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(idx, chunk, shape)) + (
            slice(None),
        )
        x = vol.read(box).reshape(-1, vol.shape[3]).astype(np.float32)
        take = max(1, n_voxels // want)
        rows.append(x if len(x) <= take else x[rng.choice(len(x), size=take, replace=False)])
    x = np.concatenate(rows)
    x = x[np.isfinite(x).all(axis=1)]
    c = vol.shape[3]
    mean = x.mean(axis=0) if len(x) else np.zeros(c, np.float32)
    comps = np.zeros((3, c), np.float32)
    if len(x) > 1:
        cov = np.cov(x - mean, rowvar=False).reshape(c, c)
        w, v = np.linalg.eigh(cov)
        order = np.argsort(w)[::-1][: min(3, c)]
        comps[: len(order)] = v[:, order].T
        # a deterministic sign: the largest-magnitude loading of each component is positive
        signs = np.sign(comps[np.arange(3), np.abs(comps).argmax(axis=1)])
        comps *= np.where(signs == 0, 1, signs)[:, None]
    pcs = (x - mean) @ comps.T if len(x) else np.zeros((1, 3), np.float32)
    lo, hi = np.percentile(pcs, 1, axis=0), np.percentile(pcs, 99, axis=0)
    return PCAProjection(vol, mean, comps, lo, hi)


def _sample_range(vol: Volume) -> tuple[float, float]:
    """A display range for a grey volume: the 0.5..99.5 percentiles of its central chunk (EM grey
    values seldom fill their dtype's range)."""
    box = tuple(
        slice(max(0, n // 2 - c // 2), min(n, max(0, n // 2 - c // 2) + max(c, 1)))
        for n, c in zip(vol.shape, vol.chunks)
    )
    x = vol.read(box).astype(np.float64)
    x = x[np.isfinite(x)]
    if not x.size:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(x, [0.5, 99.5]))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def _as_zyx(arr: Any) -> Any:
    """A rank-2 (y, x) tensorstore as (1, y, x); anything else as it is."""
    return arr[ts.newaxis, ...] if arr.rank == 2 else arr


def _image_source(arr: Any) -> Any:
    """A tensorstore view neuroglancer can serve as an image (float16 / bfloat16 / int64 cast to
    float32)."""
    return arr if arr.dtype.name in NG_IMAGE_DTYPES else ts.cast(arr, ts.float32)


def _label_source(arr: Any, path: str) -> Any:
    """A tensorstore view neuroglancer can serve as segmentation: unsigned integers (signed ones as
    the unsigned type of the same width)."""
    name = arr.dtype.name
    if name.startswith("uint"):
        return arr
    if name.startswith("int"):
        return ts.cast(arr, getattr(ts, "u" + name))
    raise UserError(f"label volume {path} holds {name}; labels must be integers")


# ------------------------------------------------------------------------------------------ viewer
def _dims(ng: Any, vs: Sequence[float], channels: bool) -> Any:
    names = ["z", "y", "x"] + (["c^"] if channels else [])
    units = ["nm"] * 3 + ([""] if channels else [])
    scales = [float(v) for v in vs] + ([1.0] if channels else [])
    return ng.CoordinateSpace(names=names, units=units, scales=scales)


def _source(ng: Any, data: Any, entry: Entry, ref_vs: Sequence[float], volume_type: str) -> Any:
    """A neuroglancer data source for `data` (z, y, x[, c]) placed where `entry` lies: voxel i of
    the volume covers [offset + (i - 1/2) vs, offset + (i + 1/2) vs) in nm, shifted by half a
    reference voxel so the reference (raw) volume's voxels sit on neuroglancer's integer grid."""
    vs = _spatial_vs(entry.volume)
    channels = len(data.shape) == 4
    dims = _dims(ng, vs, channels)
    lv = ng.LocalVolume(data=data, dimensions=dims, volume_type=volume_type)
    corner = [o - v / 2 + r / 2 for o, v, r in zip(entry.offset_nm, vs, ref_vs)]  # nm
    shift = [c / v for c, v in zip(corner, vs)]
    if not any(abs(s) > 1e-9 for s in shift):
        return lv
    rank = len(data.shape)
    matrix = np.zeros((rank, rank + 1))
    matrix[:, :rank] = np.eye(rank)
    matrix[:3, rank] = shift
    return ng.LayerDataSource(
        url=lv, transform=ng.CoordinateSpaceTransform(output_dimensions=dims, matrix=matrix)
    )


def _layers(ng: Any, entry: Entry, ref_vs: Sequence[float]) -> list[tuple[str, Any]]:
    """(name, layer) pairs for one volume."""
    vol = entry.volume
    arr = _as_zyx(vol.array)
    if entry.kind == "raw":
        lo, hi = _sample_range(vol)
        return [
            (
                entry.name,
                ng.ImageLayer(
                    source=_source(ng, _image_source(arr), entry, ref_vs, "image"),
                    shader=GREY_SHADER.format(lo=_num(lo), hi=_num(hi)),
                ),
            )
        ]
    if entry.kind == "labels":
        src = _source(ng, _label_source(arr, vol.path), entry, ref_vs, "segmentation")
        return [(entry.name, ng.SegmentationLayer(source=src))]
    if entry.kind == "features":
        proj = fit_pca(vol)
        return [
            (
                entry.name + " (PCA RGB)",
                ng.ImageLayer(source=_source(ng, proj, entry, ref_vs, "image"), shader=RGB_SHADER),
            )
        ]
    # probabilities: one heat layer per channel
    if vol.ndim == 3:
        chans = [(entry.name, arr)]
    else:
        names = vol.attributes.get("channels") or []
        if not (isinstance(names, list) and len(names) == vol.shape[3]):
            names = [f"c{i}" for i in range(vol.shape[3])]
        chans = [(f"{entry.name}:{n}", arr[..., i]) for i, n in enumerate(names)]
    hi = {"uint8": 255, "uint16": 65535}.get(vol.dtype.name, 1)
    return [
        (
            name,
            ng.ImageLayer(
                source=_source(ng, _image_source(a), entry, ref_vs, "image"),
                shader=HEAT_SHADER.format(lo=0, hi=hi),
            ),
        )
        for name, a in chans
    ]


def _num(v: float) -> str:
    return f"{v:.6g}"


def _ensure_server(ng: Any, bind: str, port: int) -> None:
    """Start neuroglancer's web server on `bind`:`port` (0: any free port); restart it if it runs
    elsewhere."""
    from neuroglancer import server as ng_server

    if ng_server.is_server_running():
        args = ng_server.global_server_args
        if args.get("bind_address") == bind and (port == 0 or ng_server.global_server.port == port):
            return
        ng.stop()
    ng.set_server_bind_address(bind_address=bind, bind_port=port)
    try:
        ng_server.start()
    except OSError as e:
        raise UserError(
            f"cannot serve on {bind}:{port}: {e} (choose another --bind / --port)"
        ) from e


def build_viewer(p: Plan, *, bind: str = "127.0.0.1", port: int = 0) -> Any:
    """A neuroglancer viewer showing the volumes of `p` (see the module doc for the layout)."""
    import neuroglancer as ng

    if not p.entries:
        raise UserError("nothing to show")
    _ensure_server(ng, bind, port)
    # the view opens on the middle of what a run made (a prediction may cover a few sections of its
    # input)
    focus = next((e for e in p.entries if e.kind != "raw"), p.entries[0])
    ref_vs = [min(_spatial_vs(e.volume)[i] for e in p.entries) for i in range(3)]
    layers: list[tuple[str, Any, str]] = []
    visible: dict[str, bool] = {}
    shown: set[str] = set()
    for e in p.entries:
        made = _layers(ng, e, ref_vs)
        # Overlays of one kind hide each other: the first volume of each kind shows (a probability
        # map its last channel, the foreground class); the others are in the layer list, switched
        # off.
        for i, (n, lay) in enumerate(made):
            visible[n] = e.kind == "raw" or (
                e.kind not in shown and (e.kind != "probabilities" or i == len(made) - 1)
            )
            layers.append((n, lay, e.kind))
        shown.add(e.kind)
    viewer = ng.Viewer()
    with viewer.txn() as s:
        s.dimensions = ng.CoordinateSpace(names=["x", "y", "z"], units="nm", scales=ref_vs[::-1])
        for name, lay, _ in layers:
            s.layers[name] = lay
            s.layers[name].visible = visible[name]
        # the middle of the focus volume, in global (x, y, z) voxel units; z on a voxel centre
        vs, shape = _spatial_vs(focus.volume), _spatial_shape(focus.volume)
        middle = (shape[0] // 2 + 0.5, shape[1] / 2, shape[2] / 2)  # voxels from the corner
        centre_nm = [
            o - v / 2 + r / 2 + v * m for o, v, r, m in zip(focus.offset_nm, vs, ref_vs, middle)
        ]
        s.position = [c / r for c, r in zip(centre_nm, ref_vs)][::-1]
        feats = [n for n, _, k in layers if k == "features"]
        others = [n for n, _, k in layers if k != "features"]
        extent = max(shape[1] * vs[1], shape[2] * vs[2]) / min(ref_vs[1:])  # global voxels across
        # fit one panel
        s.cross_section_scale = extent / (PANEL_PX / 2 if feats and others else PANEL_PX)
        if (
            feats and others
        ):  # features side by side with the raw volume and its overlays, positions linked
            s.layout = ng.row_layout(
                [
                    ng.LayerGroupViewer(layers=others, layout="xy"),
                    ng.LayerGroupViewer(layers=feats, layout="xy"),
                ]
            )
        else:
            s.layout = "xy"
    return viewer


def serve(
    paths: list[str], *, bind: str = "127.0.0.1", port: int = 0, open_browser: bool = False
) -> tuple[Any, str]:
    """Serve `paths` (volumes and run directories) in neuroglancer; returns (viewer, url). The
    server runs in a background thread of this process for as long as the process lives."""
    p = plan(paths)
    for note in p.notes:
        log.warning("%s", note)
    viewer = build_viewer(p, bind=bind, port=port)
    url = str(viewer)
    if open_browser:
        webbrowser.open(url)
    return viewer, url


def served_volume(viewer: Any, url: Any) -> Any:
    """The LocalVolume behind a layer source url (`python://volume/<viewer token>.<volume
    token>`)."""
    if not isinstance(url, str):
        return url
    token = url.rsplit(".", 1)[-1]
    return viewer.volume_manager.volumes[token]


def layer_summary(viewer: Any) -> list[dict]:
    """Name, type (image / segmentation), voxel size (nm, z y x), shape and served url of each
    layer."""
    out = []
    for layer in viewer.state.layers:
        url = layer.layer.source[0].url
        lv = served_volume(viewer, url)
        to_nm = [1e9 if u == "m" else 1.0 for u in lv.dimensions.units[:3]]
        vs = [round(float(v) * f, 6) for v, f in zip(lv.dimensions.scales[:3], to_nm)]
        out.append(
            {
                "name": layer.name,
                "type": layer.layer.type,
                "voxel_size": vs,
                "shape": [int(n) for n in lv.shape],
                "url": url,
                "volume": lv,
            }
        )
    return out


BROWSERS = (
    "chromium",
    "chromium-browser",
    "google-chrome",
    "google-chrome-stable",
    "chromium-headless-shell",
)


def find_browser() -> str | None:
    """A Chromium / Chrome executable on PATH (None: none installed)."""
    import shutil

    return next((exe for exe in map(shutil.which, BROWSERS) if exe), None)


def _end_group(proc) -> None:
    import os
    import signal
    import subprocess

    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
            if sig == signal.SIGTERM:
                try:  # children may outlive the leader for a moment
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            break
        except subprocess.TimeoutExpired:
            continue


def screenshot(
    viewer: Any,
    out_png: str | Path,
    *,
    browser: str | None = None,
    size: tuple[int, int] = (1024, 768),
    timeout_s: float = 60.0,
) -> Path:
    """Render `viewer` in a headless Chromium and save what it shows, once every visible chunk has
    loaded, as a PNG (the browser draws it with WebGL in software, SwiftShader). Raises UserError
    when no browser is found and TimeoutError when the page does not deliver a screenshot within
    `timeout_s`."""
    import subprocess
    import tempfile
    import threading

    exe = browser or find_browser()
    if exe is None:
        raise UserError(f"no Chromium or Chrome found on PATH (looked for {', '.join(BROWSERS)})")
    done, shots = threading.Event(), []
    with tempfile.TemporaryDirectory(prefix="emfm_view_browser_") as profile:
        proc = subprocess.Popen(
            [
                exe,
                "--headless",
                "--no-sandbox",
                "--no-first-run",
                "--disable-dev-shm-usage",
                "--use-angle=swiftshader",
                "--enable-unsafe-swiftshader",
                f"--window-size={size[0]},{size[1]}",
                f"--user-data-dir={profile}",
                "--remote-debugging-port=0",
                str(viewer),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        prior = viewer.config_state.state
        try:
            with viewer.config_state.txn() as c:  # the canvas alone, at exactly `size`
                c.show_ui_controls = False
                c.show_panel_borders = False
                c.viewer_size = list(size)
            with viewer.txn() as s:  # the same framing as the default window gives
                s.cross_section_scale = s.cross_section_scale * PANEL_PX / size[0]
            viewer.async_screenshot(lambda shot: (shots.append(shot), done.set()))
            if not done.wait(timeout_s):
                raise TimeoutError(f"{exe} gave no screenshot of {viewer} within {timeout_s:.0f} s")
        finally:
            viewer.config_state.set_state(prior)
            with viewer.txn() as s:
                s.cross_section_scale = s.cross_section_scale * size[0] / PANEL_PX
            _end_group(proc)  # the browser and every helper process it started
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(shots[0].screenshot.image)
    return out
