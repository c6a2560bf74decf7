"""`emfm export-model`: the shipped zoo encoder and a fine-tuned segmentation model leave emfm as
ONNX (checked against the JAX forward pass on the bundled real EM sample) and as BioImage.IO
packages that bioimageio.spec validates and bioimageio.core runs on their own test tensors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from conftest import run_cli

from emfm.export import bioimageio_package, onnx_export
from emfm.export.exportable import load_exportable, normalise, sample_tiles

pytestmark = pytest.mark.slow

TILE = "1,1,64,64"  # small tiles keep conversion and bioimageio.core's test quick


def _core_test(source) -> None:
    from bioimageio.core import test_model
    from bioimageio.spec import load_description

    descr = load_description(str(source))
    assert descr.validation_summary.status != "failed", descr.validation_summary.format()
    summary = test_model(str(source))
    assert summary.status == "passed", summary.format()


def test_zoo_encoder_to_onnx_and_bioimageio(tmp_path):
    onnx_path = tmp_path / "em_unet16.onnx"
    rep = onnx_export.export_onnx("zoo:em_unet16", onnx_path, shape=TILE)
    assert rep["kind"] == "encoder" and rep["architecture"] == "unet"
    assert rep["check_vs_jax"]["max_abs_diff"] <= 1e-4, rep["check_vs_jax"]
    assert rep["check_vs_jax"]["batch"] == 2 and rep["output"]["shape"] == ["batch", 16, 64, 64]
    # dynamic batch: 3 tiles of real EM through ONNX Runtime and JAX
    ex = load_exportable("zoo:em_unet16", shape=TILE)
    x = np.concatenate([normalise(sample_tiles(ex.tile, 2), ex.grey_range)] * 2)[:3]
    chk = onnx_export.compare_with_jax(ex, onnx_path, x)
    assert chk["output_shape"] == [3, 16, 64, 64] and chk["max_abs_diff"] <= 1e-4, chk

    # the README's command, default out: ./em_unet16.bioimageio (+ .zip) in the working directory
    (tmp_path / "pkg").mkdir()
    out = tmp_path / "pkg" / "em_unet16.bioimageio"
    r = run_cli(
        "export-model",
        "checkpoint=zoo:em_unet16",
        "format=bioimageio",
        f"shape={TILE}",
        cwd=tmp_path / "pkg",
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "bioimageio.core test: passed" in r.stdout and "max abs difference" in r.stdout
    rdf = yaml.safe_load((out / "rdf.yaml").read_text())
    assert str(rdf["format_version"]).startswith("0.5.")
    assert rdf["license"] == "CC-BY-NC-4.0"
    assert {c["doi"] for c in rdf["cite"]} >= {
        "10.1371/journal.pbio.1000502",
        "10.3389/fnana.2015.00142",
    }
    lo, hi = rdf["config"]["emfm"]["grey_range"]
    pre = {p["id"]: p.get("kwargs", {}) for p in rdf["inputs"][0]["preprocessing"]}
    assert pre["scale_linear"]["gain"] == pytest.approx(1 / (hi - lo))
    assert pre["scale_linear"]["offset"] == pytest.approx(-lo / (hi - lo))
    assert (pre["clip"]["min"], pre["clip"]["max"]) == (0.0, 1.0)
    assert [a.get("id", a["type"]) for a in rdf["inputs"][0]["axes"]] == [
        "batch",
        "channel",
        "y",
        "x",
    ]
    raw = np.load(out / "test_input.npy")
    assert raw.shape == (1, 1, 64, 64) and raw.max() > 1  # grey values; the package normalises them
    from PIL import Image

    w, h = Image.open(out / "cover.png").size
    assert w == 2 * h
    assert "## Validation" in (out / "README.md").read_text()
    report = json.loads((out / "export_report.json").read_text())
    assert report["validation"]["zip"]["core_test"] == "passed"
    _core_test(out.with_name(out.name + ".zip"))  # the zip on its own, as a user would get it


def test_finetuned_segmentation_model_to_onnx_and_bioimageio(tmp_path):
    run = tmp_path / "ft"
    r = run_cli(
        "finetune",
        "debug=seg_tiny",
        "trainer.steps=2",
        "data.test_roi=null",
        "model=unet2d",
        "model.patch_size=[1,1]",
        "head=unet",
        "model.width=8",
        "model.depth=2",
        "data.patch_shape=[1,32,32]",
        "trainer.progress=false",
        f"hydra.run.dir={run}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rep = onnx_export.export_onnx(str(run), tmp_path / "seg.onnx", shape=TILE)
    assert rep["kind"] == "segmentation" and rep["output"]["name"] == "probabilities"
    assert rep["check_vs_jax"]["max_abs_diff"] <= 1e-4, rep["check_vs_jax"]
    ex = load_exportable(str(run), shape=TILE)
    x = normalise(sample_tiles(ex.tile, 1), ex.grey_range)
    p = onnx_export.onnx_session(tmp_path / "seg.onnx").run(None, {"raw": x})[0]
    assert p.shape == (1, 2, 64, 64) and np.allclose(
        p.sum(1), 1, atol=1e-5
    )  # softmax over the classes

    rep = bioimageio_package.export_bioimageio(
        str(run), tmp_path / "seg.bioimageio", shape=TILE, authors=["Test Author"]
    )
    assert (
        rep["validation"]["folder"]["spec"] != "failed"
        and rep["validation"]["zip"]["core_test"] == "passed"
    )
    rdf = yaml.safe_load((tmp_path / "seg.bioimageio" / "rdf.yaml").read_text())
    assert rdf["outputs"][0]["axes"][1]["channel_names"] == ["class_0", "class_1"]
    assert (
        rdf["authors"] == [{"name": "Test Author"}]
        and rdf["config"]["emfm"]["kind"] == "segmentation"
    )
    _core_test(tmp_path / "seg.bioimageio" / "rdf.yaml")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["checkpoint=zoo:em_unet16", "format=tiff"], "format='tiff'"),
        (["checkpoint=zoo:em_unet16", "format=onnx", "shape=1,1,60,60"], "multiple of (8, 8)"),
        (["checkpoint=zoo:em_unet16", "format=onnx", "shape=1,1,64"], "takes 4 numbers"),
        (["checkpoint=zoo:em_unet16", "format=onnx", "tile=64"], "unknown key 'tile'"),
        (["checkpoint=zoo:no_such_model", "format=onnx"], "unknown zoo checkpoint 'no_such_model'"),
    ],
)
def test_bad_input_is_one_line(tmp_path, args, needle):
    r = run_cli("export-model", *args, f"out={tmp_path / 'x.onnx'}")
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("emfm: error:") and needle in last and "Traceback" not in r.stderr, (
        r.stderr[-2000:]
    )


def test_licence_of_a_run_on_other_data_must_be_named():
    from types import SimpleNamespace

    from emfm.errors import UserError

    ex = SimpleNamespace(
        is_zoo=False, checkpoint="runs/x", meta={"data_path": "/elsewhere/vol.zarr"}
    )
    with pytest.raises(UserError, match="records no licence.*license=SPDX-ID"):
        bioimageio_package.default_license(ex)
    assert (
        bioimageio_package.default_license(
            SimpleNamespace(is_zoo=True, checkpoint="zoo:x", meta={})
        )
        == "CC-BY-NC-4.0"
    )
