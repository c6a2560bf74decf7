"""Models that leave emfm: ONNX (through jax2onnx) and BioImage.IO model packages.

What is exported (`load_exportable`):
  - an encoder (a pretraining run, or a zoo entry `zoo:NAME`): its dense features. A U-Net gives its
    decoder output, `[batch, widths[0], (z,) y, x]` at full resolution; a ViT gives the final
    patch-token map at token resolution, `[batch, width, (z/p,) y/p, x/p]` (p = the patch size; not
    upsampled).
  - a fine-tuned segmentation model (an `emfm finetune` run, encoder + head): what `emfm predict`
    writes, `[batch, channels, (z,) y, x]`: softmax class probabilities, sigmoid affinities /
    distance / heatmap, offsets in voxels (emfm.finetune.losses.probabilities).

The exported graph takes the normalised image, float32 `[batch, 1, (z,) y, x]` (NCHW / NCDHW as the
BioImage.IO tools expect; emfm's own models are channels-last, the graph transposes). The batch axis
is dynamic; the spatial tile is fixed at export (`shape`): jax2onnx 0.13 cannot trace the U-Net's
max pooling with symbolic spatial sizes (its output shape comes out unreduced), so a fixed tile is
exported and larger images are predicted tile by tile (BioImage.IO tools do the tiling).

Normalisation is not part of the graph: emfm maps grey values linearly with the checkpoint's
`grey_range` (lo, hi) to [0, 1] and clips (emfm.export.encode.normalise). The BioImage.IO package
states it as preprocessing `ensure_dtype(float32)`, `scale_linear(gain=1/(hi-lo),
offset=-lo/(hi-lo))`, `clip(0, 1)`, so a consumer feeds raw grey values; a plain ONNX user applies
it before the graph.

Every export is checked against the JAX forward pass on tiles of the bundled real EM sample
(`max_abs_diff` in the report; above `TOLERANCE` it is an error).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from emfm.errors import UserError

log = logging.getLogger("emfm")

FORMATS = ("onnx", "bioimageio")
TOLERANCE = 1e-4  # max abs difference ONNX vs JAX (float32) accepted on the bundled sample
OPSET = 23  # jax2onnx's default; onnxruntime >= 1.20 runs it
DEFAULT_TILE_2D = (256, 256)
DEFAULT_TILE_3D = (16, 128, 128)
# a held-out section of the bundled ISBI sample (finetune's test sections are 20-29)
SAMPLE_SECTION = 25
# research / non-commercial (MODEL_CARD.md): the closest SPDX id bioimage.io accepts
ZOO_LICENSE = "CC-BY-NC-4.0"

CITATIONS = [
    (
        "Cardona A. et al. (2010) An integrated micro- and macroarchitectural analysis of the "
        "Drosophila brain "
        "by computer-assisted serial section electron microscopy. PLoS Biol 8(10): e1000502 (ISBI "
        "2012 data)",
        "10.1371/journal.pbio.1000502",
    ),
    (
        "Arganda-Carreras I. et al. (2015) Crowdsourcing the creation of image segmentation "
        "algorithms for "
        "connectomics. Front. Neuroanat. 9:142 (ISBI 2012 challenge)",
        "10.3389/fnana.2015.00142",
    ),
]
ARCH_CITATIONS = {
    "unet": (
        "Ronneberger O., Fischer P., Brox T. (2015) U-Net: Convolutional networks for biomedical "
        "image "
        "segmentation. MICCAI 2015",
        "10.1007/978-3-319-24574-4_28",
    ),
    "vit": (
        "Dosovitskiy A. et al. (2021) An image is worth 16x16 words: Transformers for image "
        "recognition at "
        "scale. ICLR 2021",
        "10.48550/arXiv.2010.11929",
    ),
}


# ---------------------------------------------------------------------------- what is exported


@dataclass
class Exportable:
    """A model ready to export: `forward(x [b, 1, *tile]) -> [b, c, *out]` (jax, channels first)."""

    kind: str  # "encoder" | "segmentation"
    name: str
    checkpoint: str  # as given (zoo:NAME or a run directory)
    run_dir: Path  # the resolved directory
    meta: dict
    model: Any
    ndim: int
    tile: tuple[int, ...]  # spatial input shape (z, y, x) or (y, x)
    out_stride: tuple[int, ...]  # input voxels per output cell, per spatial axis
    channel_names: list[str]
    grey_range: tuple[float, float]
    architecture: str  # "unet" | "vit"
    is_zoo: bool
    forward: Callable = field(repr=False, default=None)

    @property
    def out_tile(self) -> tuple[int, ...]:
        return tuple(t // s for t, s in zip(self.tile, self.out_stride))


def _alignment(model) -> tuple[int, ...]:
    spec = model.spec
    return tuple(spec.total_pool()) if hasattr(model, "decode") else tuple(spec.patch_size)


def parse_shape(shape: str | Sequence[int] | None, ndim: int) -> tuple[int, ...] | None:
    """`"1,1,256,256"` (or a sequence) -> the spatial tile `(256, 256)`; None stays None."""
    if shape is None or shape == "":
        return None
    try:
        dims = [
            int(s)
            for s in (shape.replace("x", ",").split(",") if isinstance(shape, str) else shape)
        ]
    except ValueError:
        raise UserError(f"shape={shape!r}: give whole numbers, e.g. shape=1,1,256,256") from None
    want = 2 + ndim
    if len(dims) != want:
        ex = "1,1,256,256" if ndim == 2 else "1,1,16,128,128"
        raise UserError(
            f"shape={shape!r}: a {ndim}D model takes {want} numbers "
            f"[batch, channel, {'z, ' if ndim == 3 else ''}y, x], e.g. shape={ex}"
        )
    if dims[1] != 1:
        raise UserError(
            f"shape={shape!r}: emfm models take one grey channel (the second number must be 1)"
        )
    if dims[0] < 1 or any(d < 1 for d in dims[2:]):
        raise UserError(f"shape={shape!r}: sizes must be positive")
    return tuple(dims[2:])


def load_exportable(checkpoint: str, *, shape: str | Sequence[int] | None = None) -> Exportable:
    """The model of `checkpoint` (zoo:NAME, a pretraining run or an `emfm finetune` run) and its jax
    forward function over `[batch, 1, *tile]` normalised images."""
    import jax.numpy as jnp
    from flax import nnx

    from emfm import zoo
    from emfm.train import checkpoint as ckpt

    if not checkpoint:
        raise UserError(
            "export-model needs checkpoint=RUN_DIR (a pretraining or finetune run) or "
            "checkpoint=zoo:NAME"
        )
    is_zoo = zoo.is_zoo(checkpoint)
    resolved = zoo.resolve(checkpoint)
    run = Path(ckpt.find_checkpoint_dir(resolved))
    meta = ckpt.read_meta(str(run))
    seg = "task" in meta and "head" in meta
    if seg:
        from emfm.config.finetune import SegTaskConfig
        from emfm.finetune import targets
        from emfm.finetune.losses import probabilities
        from emfm.finetune.train import load_seg_model

        model, meta = load_seg_model(str(run))
        enc = model.encoder
        task = SegTaskConfig(**meta["task"])
        lay = targets.layout(task, enc.spec.ndim)
        names = targets.channel_names(task, enc.spec.ndim)
    else:
        from emfm.train.state import load_encoder

        model, meta = load_encoder(str(run))
        enc = model
    grey = meta.get("grey_range")
    if not grey or len(grey) != 2 or not float(grey[1]) > float(grey[0]):
        raise UserError(
            f"checkpoint {checkpoint}: no usable grey_range in its record ({grey!r}); the exported "
            "model's normalisation would be unknown"
        )
    ndim = enc.spec.ndim
    is_unet = hasattr(enc, "decode")
    align = _alignment(enc)
    tile = parse_shape(shape, ndim) or (DEFAULT_TILE_2D if ndim == 2 else DEFAULT_TILE_3D)
    if any(t % a for t, a in zip(tile, align)):
        raise UserError(
            f"shape: spatial tile {tile} must be a multiple of {align}, the "
            f"{'pooling' if is_unet else 'patch size'} of checkpoint {checkpoint}"
        )
    if seg or is_unet:
        stride = (1,) * ndim
    else:
        stride = tuple(int(p) for p in enc.spec.patch_size)
    if not seg:
        width = enc.spec.widths[0] if is_unet else enc.spec.width
        names = [f"feature_{i}" for i in range(width)]
    name = checkpoint[len(zoo.PREFIX) :] if is_zoo else Path(resolved).resolve().name
    graphdef, state = nnx.split(model)
    to_last = (0, *range(2, 2 + ndim), 1)
    to_first = (0, ndim + 1, *range(1, ndim + 1))

    def forward(x):
        m = nnx.merge(graphdef, state)
        xin = jnp.transpose(x, to_last)
        if seg:
            out = probabilities(m(xin), lay)
        else:
            out = m(xin)[1]["patch_map"]
        return jnp.transpose(out.astype(jnp.float32), to_first)

    return Exportable(
        kind="segmentation" if seg else "encoder",
        name=name,
        checkpoint=checkpoint,
        run_dir=Path(resolved),
        meta=meta,
        model=model,
        ndim=ndim,
        tile=tuple(tile),
        out_stride=stride,
        channel_names=list(names),
        grey_range=(float(grey[0]), float(grey[1])),
        architecture="unet" if is_unet else "vit",
        is_zoo=is_zoo,
        forward=forward,
    )


# ---------------------------------------------------------------------------- sample data


def sample_tiles(tile: Sequence[int], n: int = 1) -> np.ndarray:
    """`n` raw tiles `[n, 1, *tile]` (the sample's dtype) of the bundled ISBI 2012 sample, from its
    held-out sections (section 25 on for 2D tiles; the last `z` sections for 3D tiles), mirrored
    where the tile is larger than the sample."""
    from emfm.data import bundled
    from emfm.data.volume import open_volume

    vol = open_volume(bundled.sample_raw())
    zn, yn, xn = vol.spatial_shape
    tiles = []
    for i in range(n):
        if len(tile) == 2:
            z = min(SAMPLE_SECTION + i, zn - 1)
            box = (slice(z, z + 1), slice(0, min(tile[0], yn)), slice(0, min(tile[1], xn)))
            want = (1, *tile)
        else:
            d = min(tile[0], zn)
            z0 = max(0, zn - d - i)
            box = (slice(z0, z0 + d), slice(0, min(tile[1], yn)), slice(0, min(tile[2], xn)))
            want = tuple(tile)
        a = np.asarray(vol.read(box))
        pad = [(0, w - s) for w, s in zip(want, a.shape)]
        if any(p[1] for p in pad):
            a = np.pad(a, pad, mode="symmetric")
        tiles.append(a)
    out = np.stack(tiles)  # [n, 1, y, x] (2D: the section axis is the channel) or [n, z, y, x]
    return out if len(tile) == 2 else out[:, None]


def normalise(raw: np.ndarray, grey_range: tuple[float, float]) -> np.ndarray:
    """emfm's normalisation (emfm.export.encode.normalise): linear to [0, 1] by the grey range,
    clipped."""
    from emfm.export.encode import normalise as _normalise

    return _normalise(raw, grey_range)


# ---------------------------------------------------------------------------- ONNX


def _prune_initializers(model_proto) -> int:
    """Drop initializers no node reads (jax2onnx leaves reshape constants behind); returns how
    many."""
    used: set[str] = set()

    def visit(graph):
        for node in graph.node:
            used.update(node.input)
            for attr in node.attribute:
                if attr.g is not None and attr.g.node:
                    visit(attr.g)
                for g in attr.graphs:
                    visit(g)

    visit(model_proto.graph)
    used.update(o.name for o in model_proto.graph.output)
    keep = [i for i in model_proto.graph.initializer if i.name in used]
    dropped = len(model_proto.graph.initializer) - len(keep)
    if dropped:
        del model_proto.graph.initializer[:]
        model_proto.graph.initializer.extend(keep)
    return dropped


def to_onnx_file(ex: Exportable, path: str | Path, *, opset: int = OPSET) -> Path:
    """Convert `ex.forward` with jax2onnx to one self-contained .onnx file (weights inside, dynamic
    batch axis "batch"; input "raw" [batch, 1, *tile], output "features" or "probabilities")."""
    import onnx
    from jax2onnx import to_onnx

    from emfm.models import conv3d

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # jax2onnx's dm_pix plugins do not import under this jax (batching.not_mapped); emfm needs none
    # of them and onnx_ir warns about shape constants it leaves untyped (they are pruned below)
    quiet = [logging.getLogger(n) for n in ("jax2onnx.plugins.plugin_system", "onnx_ir.serde")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.CRITICAL)
    try:
        # ONNX has 3D convolutions of its own: the graph keeps them (no CPU depth-folding)
        with conv3d.use_impl("native"):
            proto = to_onnx(
                ex.forward,
                [("batch", 1, *ex.tile)],
                model_name=f"emfm_{ex.name}",
                opset=opset,
                input_names=["raw"],
                output_names=[output_id(ex)],
            )
    finally:
        for q, lv in zip(quiet, levels):
            q.setLevel(lv)
    _prune_initializers(proto)
    proto.doc_string = (
        f"emfm {ex.kind} {ex.name}: input float32 [batch, 1, {', '.join(map(str, ex.tile))}] "
        f"normalised with grey_range {list(ex.grey_range)} (x - lo) / (hi - lo) clipped to [0, 1]"
    )
    onnx.checker.check_model(proto)
    onnx.save_model(proto, str(path))  # < 2 GB: one file, no external data
    return path


def output_id(ex: Exportable) -> str:
    return "probabilities" if ex.kind == "segmentation" else "features"


def onnx_session(path: str | Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # no warnings about unused initializers etc.
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def compare_with_jax(ex: Exportable, onnx_path: str | Path, x: np.ndarray) -> dict:
    """ONNX Runtime vs the JAX forward pass on normalised input `x` [b, 1, *tile]."""
    import jax

    a = onnx_session(onnx_path).run(None, {"raw": x.astype(np.float32)})[0]
    b = np.asarray(jax.jit(ex.forward)(x.astype(np.float32)))
    if a.shape != b.shape:
        raise RuntimeError(f"ONNX output shape {a.shape} differs from JAX's {b.shape}")
    return {
        "max_abs_diff": float(np.abs(a - b).max()),
        "batch": int(x.shape[0]),
        "output_shape": list(a.shape),
        "max_abs_output": float(np.abs(b).max()),
    }


def export_onnx(
    checkpoint: str,
    out: str | Path | None = None,
    *,
    shape=None,
    opset: int = OPSET,
    ex: Exportable | None = None,
) -> dict:
    """`checkpoint` -> one .onnx file (default `./<name>.onnx`), checked against JAX on 2 tiles of
    the bundled sample (batch 2: the dynamic batch axis is exercised). Returns the report (also
    written next to the file as `<file>.json`)."""
    ex = ex or load_exportable(checkpoint, shape=shape)
    path = Path(out) if out else Path(f"{ex.name}.onnx")
    if path.suffix != ".onnx":
        raise UserError(f"out={path}: an ONNX file name ends in .onnx")
    to_onnx_file(ex, path, opset=opset)
    x = normalise(sample_tiles(ex.tile, 2), ex.grey_range)
    check = compare_with_jax(ex, path, x)
    report = _report(ex, "onnx", path, check, opset)
    Path(str(path) + ".json").write_text(json.dumps(report, indent=1))
    if check["max_abs_diff"] > TOLERANCE:
        raise RuntimeError(
            f"ONNX export of {checkpoint} differs from JAX by {check['max_abs_diff']:.3g} "
            f"(> {TOLERANCE}) on the bundled sample; the file is kept at {path} for inspection"
        )
    return report


def _report(ex: Exportable, fmt: str, path: Path, check: dict, opset: int) -> dict:
    return {
        "format": fmt,
        "path": str(path),
        "checkpoint": ex.checkpoint,
        "kind": ex.kind,
        "architecture": ex.architecture,
        "input": {"name": "raw", "shape": ["batch", 1, *ex.tile], "dtype": "float32"},
        "output": {
            "name": output_id(ex),
            "shape": ["batch", len(ex.channel_names), *ex.out_tile],
            "dtype": "float32",
            "stride": list(ex.out_stride),
        },
        "grey_range": list(ex.grey_range),
        "opset": opset,
        "check_vs_jax": check,
        "tolerance": TOLERANCE,
    }


# ---------------------------------------------------------------------------- BioImage.IO


def default_license(ex: Exportable) -> str:
    """The licence of the exported weights: a zoo entry's terms (research / non-commercial, as its
    MODEL_CARD.md says: CC-BY-NC-4.0 is the closest SPDX id); a run trained on the bundled ISBI
    sample inherits the same terms. Any other run records no licence: the caller must name one."""
    from emfm.data import bundled
    from emfm.data.volume import open_volume

    if ex.is_zoo:
        return ZOO_LICENSE
    sample = str(Path(open_volume(bundled.sample_raw()).path).resolve())
    data = ex.meta.get("data_path")
    if data and str(Path(data).resolve()) == sample:
        return ZOO_LICENSE
    raise UserError(
        f"checkpoint {ex.checkpoint} records no licence and was not trained on the bundled ISBI "
        "sample; give license=SPDX-ID (the terms of its training data, e.g. license=CC-BY-4.0)"
    )


def _cover(raw: np.ndarray, out: np.ndarray, ex: Exportable, path: Path) -> None:
    """A 2:1 PNG: the raw test tile beside the output (features: first 3 principal components as
    RGB; segmentation: the last class / first sigmoid channel as a grey map)."""
    from PIL import Image

    img = raw[0, 0].astype(np.float32)
    o = out[0]
    if ex.ndim == 3:
        img, o = img[img.shape[0] // 2], o[:, o.shape[1] // 2]
    lo, hi = np.percentile(img, [1, 99])
    left = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)
    left = np.repeat(left[..., None], 3, -1)
    if ex.kind == "encoder":
        f = o.reshape(o.shape[0], -1).T
        f = f - f.mean(0)
        _, _, vt = np.linalg.svd(f[:: max(1, len(f) // 4096)], full_matrices=False)
        p = (f @ vt[:3].T).reshape(*o.shape[1:], 3)
        plo, phi = np.percentile(p, [1, 99], axis=(0, 1))
        right = np.clip((p - plo) / np.maximum(phi - plo, 1e-6), 0, 1)
    else:
        ch = (
            1 if len(ex.channel_names) > 1 and not ex.channel_names[0].startswith("affinity") else 0
        )
        right = np.repeat(np.clip(o[ch], 0, 1)[..., None], 3, -1)
    side = 256
    panels = []
    for a in (left, right):
        im = Image.fromarray((a * 255).astype(np.uint8))
        panels.append(im.resize((side, side), Image.NEAREST if a is right else Image.BILINEAR))
    canvas = Image.new("RGB", (2 * side, side))
    canvas.paste(panels[0], (0, 0))
    canvas.paste(panels[1], (side, 0))
    canvas.save(path)


def _readme(ex: Exportable, license_id: str, check: dict, validated: bool) -> str:
    lo, hi = ex.grey_range
    io = f"[batch, 1, {', '.join(map(str, ex.tile))}]"
    oshape = f"[batch, {len(ex.channel_names)}, {', '.join(map(str, ex.out_tile))}]"
    what = (
        "dense features of the self-supervised encoder"
        + (
            " (the U-Net's decoder output, full resolution)"
            if ex.architecture == "unet"
            else f" (the ViT's final patch tokens at token resolution, one per {ex.out_stride} "
            "voxels)"
        )
        if ex.kind == "encoder"
        else f"{ex.meta['task'].get('kind')} segmentation: channels {', '.join(ex.channel_names)} "
        "(softmax class probabilities, sigmoid affinities / distance / heatmap, offsets in voxels)"
    )
    card = ex.run_dir / "MODEL_CARD.md"
    lines = [
        f"# emfm {ex.name}",
        "",
        f"An electron-microscopy model exported from emfm (checkpoint `{ex.checkpoint}`): {what}.",
        "",
        "## Input and output",
        "",
        f"- input `raw`: grey values of one EM image tile {io} (batch, channel, "
        f"{'z, ' * (ex.ndim == 3)}y, x). "
        f"The spatial tile is fixed at export; larger images are processed tile by tile.",
        f"- preprocessing: `scale_linear` (gain {1 / (hi - lo):.6g}, offset {-lo / (hi - lo):.6g}: "
        "grey values "
        f"{lo:g}..{hi:g} -> 0..1, the grey range the model was trained with) then `clip` to [0, "
        "1]; "
        "a raw ONNX user applies `clip((x - lo) / (hi - lo), 0, 1)` first.",
        f"- output `{output_id(ex)}`: float32 {oshape}.",
        "",
        "## Validation",
        "",
        "ONNX Runtime against emfm's JAX forward pass on tiles of the bundled ISBI 2012 sample: "
        "max abs "
        f"difference {check['max_abs_diff']:.3g} (limit {TOLERANCE:g}). "
        + (
            "emfm exported this package only after bioimageio.spec's validation and "
            "bioimageio.core's test "
            "(`bioimageio test rdf.yaml`: the test input reproduces the test output) passed."
            if validated
            else "The export skipped bioimageio.spec's validation and bioimageio.core's test."
        ),
        "",
        "## Licence and data",
        "",
        f"{license_id}. "
        + (
            "The weights inherit the most restrictive terms of their training data: research and "
            "non-commercial use with the citations listed (CC-BY-NC-4.0 is the closest SPDX "
            "identifier)."
            if license_id == ZOO_LICENSE
            else "As chosen by the exporter for this checkpoint's training data."
        ),
        "",
        "## Provenance",
        "",
        f"Exported by `emfm export-model checkpoint={ex.checkpoint} format=bioimageio`. Model "
        "record: "
        f"`{json.dumps(ex.meta.get('model', {}))}`.",
    ]
    if card.is_file():
        lines += ["", "## Model card", "", card.read_text().strip()]
    return "\n".join(lines) + "\n"


def _model_descr(
    ex: Exportable,
    *,
    license_id: str,
    authors: Sequence[str],
    files: dict,
    opset: int,
    tags: Sequence[str],
):
    from bioimageio.spec.model import v0_5 as m

    lo, hi = ex.grey_range
    sp_ids = ["z", "y", "x"][-ex.ndim :]
    in_axes = [m.BatchAxis(), m.ChannelAxis(channel_names=[m.Identifier("raw")])] + [
        m.SpaceInputAxis(id=m.AxisId(a), size=int(s)) for a, s in zip(sp_ids, ex.tile)
    ]
    out_axes = [
        m.BatchAxis(),
        m.ChannelAxis(channel_names=[m.Identifier(c) for c in ex.channel_names]),
    ] + [
        m.SpaceOutputAxis(id=m.AxisId(a), size=int(s), scale=float(st))
        for a, s, st in zip(sp_ids, ex.out_tile, ex.out_stride)
    ]
    pre = [
        m.EnsureDtypeDescr(kwargs=m.EnsureDtypeKwargs(dtype="float32")),
        m.ScaleLinearDescr(
            kwargs=m.ScaleLinearKwargs(gain=1.0 / (hi - lo), offset=-lo / (hi - lo))
        ),
        m.ClipDescr(kwargs=m.ClipKwargs(min=0.0, max=1.0)),
    ]
    inp = m.InputTensorDescr(
        id=m.TensorId("raw"),
        axes=in_axes,
        test_tensor=m.FileDescr(source=files["test_input"]),
        sample_tensor=m.FileDescr(source=files["sample_input"]),
        description=f"EM grey values, normalised by the preprocessing (grey range {lo:g}..{hi:g})",
        data=m.IntervalOrRatioDataDescr(type="float32"),
        preprocessing=pre,
    )
    out = m.OutputTensorDescr(
        id=m.TensorId(output_id(ex)),
        axes=out_axes,
        test_tensor=m.FileDescr(source=files["test_output"]),
        sample_tensor=m.FileDescr(source=files["sample_output"]),
        description=(
            "dense encoder features"
            if ex.kind == "encoder"
            else "per-pixel probabilities (emfm predict's output)"
        ),
        data=m.IntervalOrRatioDataDescr(type="float32"),
    )
    cites = [
        m.CiteEntry(text=t, doi=m.Doi(d)) for t, d in CITATIONS + [ARCH_CITATIONS[ex.architecture]]
    ]
    from emfm import __version__ as emfm_version

    return m.ModelDescr(
        name=f"emfm {ex.name}"[:128],
        description=(
            f"emfm {ex.kind} for cellular electron microscopy ({ex.architecture}), exported from "
            f"{ex.checkpoint}"
        )[:1024],
        authors=[m.Author(name=a) for a in authors],
        cite=cites,
        license=license_id,
        documentation=m.FileDescr(source=files["readme"]),
        covers=[m.FileDescr(source=files["cover"])],
        tags=list(tags),
        inputs=[inp],
        outputs=[out],
        weights=m.WeightsDescr(onnx=m.OnnxWeightsDescr(source=files["onnx"], opset_version=opset)),
        config={
            "emfm": {
                "version": emfm_version,
                "checkpoint": ex.checkpoint,
                "kind": ex.kind,
                "grey_range": list(ex.grey_range),
                "model": ex.meta.get("model", {}),
                **(
                    {"task": ex.meta["task"], "head": ex.meta["head"]}
                    if ex.kind == "segmentation"
                    else {}
                ),
                "exported": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            }
        },
    )


def validate_package(source: str | Path) -> dict:
    """bioimageio.spec's static validation and bioimageio.core's test (inference on the package's
    own test input against its test output) of an rdf.yaml or package .zip; raises on failure."""
    from bioimageio.core import test_model
    from bioimageio.spec import ValidationContext, load_description

    with ValidationContext(perform_io_checks=True):
        descr = load_description(str(source))
    s = descr.validation_summary
    if s.status == "failed":
        raise RuntimeError(f"bioimageio.spec rejects {source}:\n{s.format()}")
    summary = test_model(str(source))
    if summary.status == "failed":
        raise RuntimeError(f"bioimageio.core's test of {source} failed:\n{summary.format()}")
    return {
        "spec": s.status,
        "core_test": summary.status,
        "tests": [d.name for d in summary.details],
        "warnings": [w.msg for d in summary.details for w in d.warnings][:20],
    }


def export_bioimageio(
    checkpoint: str,
    out: str | Path | None = None,
    *,
    shape=None,
    license: str | None = None,
    authors: Sequence[str] = ("emfm contributors",),
    opset: int = OPSET,
    validate: bool = True,
    overwrite: bool = False,
) -> dict:
    """`checkpoint` -> a BioImage.IO model package: folder `out` (default `./<name>.bioimageio`)
    holding rdf.yaml (format 0.5), the ONNX weights, test tensors from the bundled sample, cover.png
    and README.md, and the same as `<out>.zip`. Validated with bioimageio.spec and run with
    bioimageio.core (`validate=False` skips both). Returns the report (written to
    `<out>/export_report.json` as well, which is not part of the package)."""
    import yaml

    ex = load_exportable(checkpoint, shape=shape)
    license_id = license or default_license(ex)
    folder = Path(out) if out else Path(f"{ex.name}.bioimageio")
    if folder.suffix == ".zip":
        folder = folder.with_suffix("")
    zip_path = folder.with_name(folder.name + ".zip")
    for p in (folder, zip_path):
        if p.exists():
            if not overwrite:
                raise UserError(f"out={folder}: {p} exists (overwrite=true replaces it)")
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    # the files the description names, before packaging
    src = folder.with_name(folder.name + ".src")
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    try:
        onnx_path = to_onnx_file(ex, src / "weights.onnx", opset=opset)
        raw = sample_tiles(ex.tile, 1).astype(np.float32)
        x = normalise(raw, ex.grey_range)
        check = compare_with_jax(
            ex,
            onnx_path,
            np.concatenate([x, normalise(sample_tiles(ex.tile, 2)[1:], ex.grey_range)]),
        )
        if check["max_abs_diff"] > TOLERANCE:
            raise RuntimeError(
                f"ONNX export of {checkpoint} differs from JAX by {check['max_abs_diff']:.3g} "
                f"(> {TOLERANCE}) on the bundled sample"
            )
        y = onnx_session(onnx_path).run(None, {"raw": x})[0]
        np.save(src / "test_input.npy", raw)
        np.save(src / "test_output.npy", y.astype(np.float32))
        # sample tensors (for people and the bioimage.io website): the test tile without batch
        import tifffile

        tifffile.imwrite(src / "sample_input.tif", raw[0, 0])
        tifffile.imwrite(src / "sample_output.tif", y[0].astype(np.float32))
        _cover(raw, y, ex, src / "cover.png")
        (src / "README.md").write_text(_readme(ex, license_id, check, validate))
        files = {
            k: src / f
            for k, f in (
                ("onnx", "weights.onnx"),
                ("test_input", "test_input.npy"),
                ("test_output", "test_output.npy"),
                ("cover", "cover.png"),
                ("readme", "README.md"),
                ("sample_input", "sample_input.tif"),
                ("sample_output", "sample_output.tif"),
            )
        }
        tags = [
            "electron-microscopy",
            "emfm",
            "onnx",
            "2d" if ex.ndim == 2 else "3d",
            "self-supervised" if ex.kind == "encoder" else "segmentation",
            ex.architecture,
        ]
        from bioimageio.spec import (
            ValidationContext,
            save_bioimageio_package,
            save_bioimageio_package_as_folder,
        )

        with ValidationContext(perform_io_checks=True, root=src):
            descr = _model_descr(
                ex, license_id=license_id, authors=authors, files=files, opset=opset, tags=tags
            )
        save_bioimageio_package_as_folder(descr, output_path=folder)
        save_bioimageio_package(descr, output_path=zip_path)
    finally:
        shutil.rmtree(src, ignore_errors=True)
    report = _report(ex, "bioimageio", folder, check, opset)
    report.update(
        zip=str(zip_path),
        rdf=str(folder / "rdf.yaml"),
        license=license_id,
        format_version=yaml.safe_load((folder / "rdf.yaml").read_text()).get("format_version"),
    )
    if validate:
        try:
            report["validation"] = {
                "folder": validate_package(folder / "rdf.yaml"),
                "zip": validate_package(zip_path),
            }
        except RuntimeError as e:  # its README says it passed: do not leave it behind
            shutil.rmtree(folder, ignore_errors=True)
            zip_path.unlink(missing_ok=True)
            raise RuntimeError(
                f"{e}\n(package removed; validate=false keeps an unvalidated one to inspect)"
            ) from None
    (folder / "export_report.json").write_text(json.dumps(report, indent=1))
    return report


NEEDS = {
    "onnx": ("jax2onnx", "onnx", "onnxruntime"),
    "bioimageio": ("jax2onnx", "onnx", "onnxruntime", "bioimageio.spec", "bioimageio.core", "PIL"),
}


def check_installed(fmt: str) -> None:
    """The optional packages of `format=fmt` (the `export` extra), or one line saying how to get
    them."""
    import importlib.util

    missing = [
        m
        for m in NEEDS[fmt]
        if importlib.util.find_spec(m.split(".")[0]) is None or importlib.util.find_spec(m) is None
    ]
    if missing:
        raise UserError(
            f"format={fmt} needs {', '.join(missing)}: pip install 'emfm[export]' (run.sh and CI "
            "install them from requirements.lock)"
        )


def export_model(
    checkpoint: str, fmt: str, out: str | Path | None = None, *, shape=None, **kwargs
) -> dict:
    """`emfm export-model`: ONNX file or BioImage.IO package of `checkpoint`."""
    if fmt not in FORMATS:
        raise UserError(f"format={fmt!r}: use one of {', '.join(FORMATS)}")
    check_installed(fmt)
    if fmt == "onnx":
        extra = set(kwargs) - {"opset"}
        if extra:
            raise UserError(f"{', '.join(sorted(extra))}=: only for format=bioimageio")
        return export_onnx(checkpoint, out, shape=shape, **kwargs)
    return export_bioimageio(checkpoint, out, shape=shape, **kwargs)
