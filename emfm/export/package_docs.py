"""The human-facing files of a BioImage.IO package (emfm.export.bioimageio_package): README.md with
the model card, the cover image, and the citations of the data and architecture.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from emfm.export.exportable import Exportable
from emfm.export.onnx_export import TOLERANCE, output_id

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


def cover(raw: np.ndarray, out: np.ndarray, ex: Exportable, path: Path) -> None:
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


def readme(ex: Exportable, license_id: str, check: dict, validated: bool) -> str:
    """README.md of the package: what the model does, its input and output, how it was checked,
    its licence and provenance, and the checkpoint's model card where it has one."""
    what = _what(ex)
    card = ex.run_dir / "MODEL_CARD.md"
    lines = [
        f"# emfm {ex.name}",
        "",
        f"An electron-microscopy model exported from emfm (checkpoint `{ex.checkpoint}`): {what}.",
        "",
        *_io_section(ex),
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


def _what(ex: Exportable) -> str:
    """What the model outputs, in one phrase."""
    if ex.kind != "encoder":
        return (
            f"{ex.meta['task'].get('kind')} segmentation: channels {', '.join(ex.channel_names)} "
            "(softmax class probabilities, sigmoid affinities / distance / heatmap, offsets in "
            "voxels)"
        )
    if ex.architecture == "unet":
        return (
            "dense features of the self-supervised encoder (the U-Net's decoder output, full "
            "resolution)"
        )
    return (
        "dense features of the self-supervised encoder (the ViT's final patch tokens at token "
        f"resolution, one per {ex.out_stride} voxels)"
    )


def _io_section(ex: Exportable) -> list[str]:
    """The README's input / output section: tile shapes and the preprocessing."""
    lo, hi = ex.grey_range
    io = f"[batch, 1, {', '.join(map(str, ex.tile))}]"
    oshape = f"[batch, {len(ex.channel_names)}, {', '.join(map(str, ex.out_tile))}]"
    return [
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
    ]
