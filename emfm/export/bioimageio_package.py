"""BioImage.IO model packages of an Exportable: rdf.yaml (format 0.5) with the ONNX weights,
emfm's normalisation as preprocessing, test tensors from the bundled sample, cover image and README,
kept only after bioimageio.spec validates it and bioimageio.core runs it on its test input.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from emfm.errors import UserError
from emfm.export.exportable import Exportable, load_exportable, normalise, sample_tiles
from emfm.export.onnx_export import (
    OPSET,
    compare_with_jax,
    onnx_session,
    output_id,
    report_of,
    require_close,
    to_onnx_file,
)
from emfm.export.package_docs import ARCH_CITATIONS, CITATIONS, ZOO_LICENSE, cover, readme


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

    from emfm import __version__ as emfm_version

    cites = [
        m.CiteEntry(text=t, doi=m.Doi(d)) for t, d in CITATIONS + [ARCH_CITATIONS[ex.architecture]]
    ]
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
        inputs=[_input_descr(ex, files)],
        outputs=[_output_descr(ex, files)],
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


def _input_descr(ex: Exportable, files: dict):
    """The input tensor: raw grey values with emfm's normalisation as preprocessing."""
    from bioimageio.spec.model import v0_5 as m

    lo, hi = ex.grey_range
    axes = [m.BatchAxis(), m.ChannelAxis(channel_names=[m.Identifier("raw")])] + [
        m.SpaceInputAxis(id=m.AxisId(a), size=int(s))
        for a, s in zip(["z", "y", "x"][-ex.ndim :], ex.tile)
    ]
    pre = [
        m.EnsureDtypeDescr(kwargs=m.EnsureDtypeKwargs(dtype="float32")),
        m.ScaleLinearDescr(
            kwargs=m.ScaleLinearKwargs(gain=1.0 / (hi - lo), offset=-lo / (hi - lo))
        ),
        m.ClipDescr(kwargs=m.ClipKwargs(min=0.0, max=1.0)),
    ]
    return m.InputTensorDescr(
        id=m.TensorId("raw"),
        axes=axes,
        test_tensor=m.FileDescr(source=files["test_input"]),
        sample_tensor=m.FileDescr(source=files["sample_input"]),
        description=f"EM grey values, normalised by the preprocessing (grey range {lo:g}..{hi:g})",
        data=m.IntervalOrRatioDataDescr(type="float32"),
        preprocessing=pre,
    )


def _output_descr(ex: Exportable, files: dict):
    """The output tensor: features or probabilities, each spatial axis scaled by its stride."""
    from bioimageio.spec.model import v0_5 as m

    axes = [
        m.BatchAxis(),
        m.ChannelAxis(channel_names=[m.Identifier(c) for c in ex.channel_names]),
    ] + [
        m.SpaceOutputAxis(id=m.AxisId(a), size=int(s), scale=float(st))
        for a, s, st in zip(["z", "y", "x"][-ex.ndim :], ex.out_tile, ex.out_stride)
    ]
    return m.OutputTensorDescr(
        id=m.TensorId(output_id(ex)),
        axes=axes,
        test_tensor=m.FileDescr(source=files["test_output"]),
        sample_tensor=m.FileDescr(source=files["sample_output"]),
        description=(
            "dense encoder features"
            if ex.kind == "encoder"
            else "per-pixel probabilities (emfm predict's output)"
        ),
        data=m.IntervalOrRatioDataDescr(type="float32"),
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
    from bioimageio.spec import (
        ValidationContext,
        save_bioimageio_package,
        save_bioimageio_package_as_folder,
    )

    ex = load_exportable(checkpoint, shape=shape)
    license_id = license or default_license(ex)
    folder, zip_path = _outputs(ex, out, overwrite)
    # the files the description names, before packaging
    src = folder.with_name(folder.name + ".src")
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    try:
        files, check = _package_files(ex, src, license_id, validate, opset)
        with ValidationContext(perform_io_checks=True, root=src):
            descr = _model_descr(
                ex, license_id=license_id, authors=authors, files=files, opset=opset, tags=_tags(ex)
            )
        save_bioimageio_package_as_folder(descr, output_path=folder)
        save_bioimageio_package(descr, output_path=zip_path)
    finally:
        shutil.rmtree(src, ignore_errors=True)
    report = report_of(ex, "bioimageio", folder, check, opset)
    report.update(
        zip=str(zip_path),
        rdf=str(folder / "rdf.yaml"),
        license=license_id,
        format_version=yaml.safe_load((folder / "rdf.yaml").read_text()).get("format_version"),
    )
    if validate:
        report["validation"] = _validate_or_remove(folder, zip_path)
    (folder / "export_report.json").write_text(json.dumps(report, indent=1))
    return report


def _outputs(ex: Exportable, out, overwrite: bool) -> tuple[Path, Path]:
    """The package folder and zip, with whatever was there removed (only with `overwrite`)."""
    folder = (Path(out) if out else Path(f"{ex.name}.bioimageio")).absolute()
    if folder.suffix == ".zip":
        folder = folder.with_suffix("")
    zip_path = folder.with_name(folder.name + ".zip")
    for p in (folder, zip_path):
        if p.exists():
            if not overwrite:
                raise UserError(f"out={folder}: {p} exists (overwrite=true replaces it)")
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return folder, zip_path


def _package_files(ex: Exportable, src: Path, license_id: str, validate: bool, opset: int):
    """Write the package's files into `src`: ONNX weights (checked against JAX on two tiles), test
    and sample tensors, cover and README. Returns {role: path} and the check."""
    import tifffile

    onnx_path = to_onnx_file(ex, src / "weights.onnx", opset=opset)
    raw = sample_tiles(ex.tile, 1).astype(np.float32)
    x = normalise(raw, ex.grey_range)
    check = compare_with_jax(
        ex,
        onnx_path,
        np.concatenate([x, normalise(sample_tiles(ex.tile, 2)[1:], ex.grey_range)]),
    )
    require_close(check, ex.checkpoint)
    y = onnx_session(onnx_path).run(None, {"raw": x})[0]
    np.save(src / "test_input.npy", raw)
    np.save(src / "test_output.npy", y.astype(np.float32))
    # sample tensors (for people and the bioimage.io website): the test tile without batch
    tifffile.imwrite(src / "sample_input.tif", raw[0, 0])
    tifffile.imwrite(src / "sample_output.tif", y[0].astype(np.float32))
    cover(raw, y, ex, src / "cover.png")
    (src / "README.md").write_text(readme(ex, license_id, check, validate))
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
    return files, check


def _tags(ex: Exportable) -> list[str]:
    return [
        "electron-microscopy",
        "emfm",
        "onnx",
        "2d" if ex.ndim == 2 else "3d",
        "self-supervised" if ex.kind == "encoder" else "segmentation",
        ex.architecture,
    ]


def _validate_or_remove(folder: Path, zip_path: Path) -> dict:
    """`validate_package` of the folder and the zip; a package that fails is removed."""
    try:
        return {
            "folder": validate_package(folder / "rdf.yaml"),
            "zip": validate_package(zip_path),
        }
    except RuntimeError as e:  # its README says it passed: do not leave it behind
        shutil.rmtree(folder, ignore_errors=True)
        zip_path.unlink(missing_ok=True)
        raise RuntimeError(
            f"{e}\n(package removed; validate=false keeps an unvalidated one to inspect)"
        ) from None
