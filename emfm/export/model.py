"""Models that leave emfm: ONNX (through jax2onnx) and BioImage.IO model packages; `export_model`
is `emfm export-model`. The modules: exportable.py (what is exported, the sample tiles),
onnx_export.py, bioimageio_package.py and package_docs.py (its README and cover).

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
`grey_range` (lo, hi) to [0, 1] and clips (emfm.eval.probe.normalise). The BioImage.IO package
states it as preprocessing `ensure_dtype(float32)`, `scale_linear(gain=1/(hi-lo),
offset=-lo/(hi-lo))`, `clip(0, 1)`, so a consumer feeds raw grey values; a plain ONNX user applies
it before the graph.

Every export is checked against the JAX forward pass on tiles of the bundled real EM sample
(`max_abs_diff` in the report; above `TOLERANCE` it is an error).
"""

from __future__ import annotations

from pathlib import Path

from emfm.errors import UserError
from emfm.export.bioimageio_package import export_bioimageio
from emfm.export.onnx_export import export_onnx

FORMATS = ("onnx", "bioimageio")


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
