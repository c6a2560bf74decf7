"""`emfm export-model checkpoint=RUN_DIR|zoo:NAME format=onnx|bioimageio [out=PATH]
[shape=1,1,256,256] [license=SPDX-ID] [authors="A. Name;B. Name"] [opset=23] [validate=true]
[overwrite=false]`: the model of a checkpoint as one ONNX file or a BioImage.IO model package
(emfm.export.model). key=value arguments like the Hydra commands, parsed here without Hydra. Bad
input ends with one line `emfm: error: ...`, exit status 2."""

from __future__ import annotations

import logging
import sys

from emfm.cli.report import user_errors
from emfm.errors import UserError

USAGE = """usage: emfm export-model checkpoint=RUN_DIR|zoo:NAME format=onnx|bioimageio \
[key=value ...]

  checkpoint=  a pretraining run or zoo:NAME (the encoder's dense features), or an emfm finetune run
               (the segmentation model's probabilities)
  format=      onnx (one .onnx file) | bioimageio (a model package: folder + .zip, validated and
               run with bioimageio.spec / bioimageio.core)
  out=         output file (onnx; default ./NAME.onnx) or package folder (bioimageio; default
               ./NAME.bioimageio, and NAME.bioimageio.zip beside it)
  shape=       input tile batch,1,[z,]y,x (default 1,1,256,256; 3D models 1,1,16,128,128); the batch
               axis of the export is dynamic, the spatial tile fixed
  opset=       ONNX opset (default 23)
  bioimageio only:
  license=     SPDX id (default: CC-BY-NC-4.0 for zoo entries and runs trained on the bundled \
ISBI sample)
  authors=     names separated by ';' (default "emfm contributors")
  validate=    true|false (default true)
  overwrite=   true|false: replace an existing package (default false)

examples:
  emfm export-model checkpoint=zoo:em_unet16 format=onnx
  emfm export-model checkpoint=runs/finetune/2026-01-01_00-00-00 format=bioimageio \
out=membranes.bioimageio"""

KEYS = (
    "checkpoint",
    "format",
    "out",
    "shape",
    "opset",
    "license",
    "authors",
    "validate",
    "overwrite",
)


def _bool(key: str, v: str) -> bool:
    if v.lower() in ("true", "1", "yes"):
        return True
    if v.lower() in ("false", "0", "no"):
        return False
    raise UserError(f"{key}={v!r}: true or false")


def parse(argv: list[str]) -> dict:
    """`key=value` arguments -> keyword arguments of emfm.export.model.export_model."""
    got: dict[str, str] = {}
    for a in argv:
        key, eq, val = a.partition("=")
        if not eq:
            raise UserError(
                f"argument {a!r}: give key=value ({', '.join(KEYS)}); emfm export-model --help"
            )
        if key not in KEYS:
            raise UserError(f"unknown key {key!r}: use {', '.join(KEYS)}")
        if key in got:
            raise UserError(f"{key}= given twice")
        got[key] = val
    if not got.get("checkpoint"):
        raise UserError("export-model needs checkpoint=RUN_DIR or checkpoint=zoo:NAME")
    if not got.get("format"):
        raise UserError("export-model needs format=onnx or format=bioimageio")
    kw: dict = {
        "checkpoint": got["checkpoint"],
        "fmt": got["format"],
        "out": got.get("out") or None,
        "shape": got.get("shape") or None,
    }
    if "opset" in got:
        try:
            kw["opset"] = int(got["opset"])
        except ValueError:
            raise UserError(f"opset={got['opset']!r}: a whole number, e.g. opset=23") from None
    if "license" in got:
        kw["license"] = got["license"]
    if "authors" in got:
        names = [n.strip() for n in got["authors"].split(";") if n.strip()]
        if not names:
            raise UserError("authors=: give at least one name (names separated by ';')")
        kw["authors"] = names
    for key in ("validate", "overwrite"):
        if key in got:
            kw[key] = _bool(key, got[key])
    return kw


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    logging.basicConfig(level=logging.WARNING, format="emfm export-model: %(message)s")
    logging.getLogger("emfm").setLevel(logging.INFO)
    with user_errors():
        kw = parse(argv)
        from emfm.export.model import export_model

        report = export_model(
            kw.pop("checkpoint"), kw.pop("fmt"), kw.pop("out"), shape=kw.pop("shape"), **kw
        )
    chk = report["check_vs_jax"]
    print(f"wrote {report['path']}" + (f" and {report['zip']}" if "zip" in report else ""))
    print(
        f"  {report['kind']} ({report['architecture']}): input raw {report['input']['shape']} "
        "float32 -> "
        f"{report['output']['name']} {report['output']['shape']}"
    )
    print(
        f"  ONNX vs JAX on the bundled sample: max abs difference {chk['max_abs_diff']:.3g} "
        f"(limit {report['tolerance']:g})"
    )
    if "validation" in report:
        v = report["validation"]["zip"]
        print(
            f"  bioimageio.spec: {v['spec']}; bioimageio.core test: {v['core_test']}; licence "
            f"{report['license']}"
        )
