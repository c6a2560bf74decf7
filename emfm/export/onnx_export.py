"""ONNX export (through jax2onnx) of an Exportable, checked against the JAX forward pass on tiles
of the bundled real EM sample (`max_abs_diff` in the report; above `TOLERANCE` it is an error).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from emfm.errors import UserError
from emfm.export.exportable import Exportable, load_exportable, normalise, sample_tiles

TOLERANCE = 1e-4  # max abs difference ONNX vs JAX (float32) accepted on the bundled sample
OPSET = 23  # jax2onnx's default; onnxruntime >= 1.20 runs it


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
    report = report_of(ex, "onnx", path, check, opset)
    Path(str(path) + ".json").write_text(json.dumps(report, indent=1))
    require_close(check, checkpoint, f"; the file is kept at {path} for inspection")
    return report


def require_close(check: dict, checkpoint: str, note: str = "") -> None:
    """An error unless the ONNX output of `compare_with_jax` is within TOLERANCE of JAX's."""
    if check["max_abs_diff"] > TOLERANCE:
        raise RuntimeError(
            f"ONNX export of {checkpoint} differs from JAX by {check['max_abs_diff']:.3g} "
            f"(> {TOLERANCE}) on the bundled sample{note}"
        )


def report_of(ex: Exportable, fmt: str, path: Path, check: dict, opset: int) -> dict:
    """The export report of `ex` written to `path` as `fmt`, with its check against JAX."""
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
