"""The main job end to end on the bundled real EM sample (tiny model), through the CLI, and the
quickstart notebook executed in its tiny form."""

import csv
import json
import os
from pathlib import Path

import numpy as np
import yaml
from conftest import REPO, run_cli

from emfm.data.volume import open_volume


def test_main_job_writes_everything(tiny_main_run: Path):
    d = tiny_main_run
    for f in [
        "config.yaml",
        "provenance.json",
        "metrics.jsonl",
        "probe.csv",
        "probe.json",
        "probe.md",
        "export.json",
        "summary.json",
        "figures/mae_reconstruction.png",
        "figures/probe_membranes.png",
        "figures/features_pca.png",
        "main.log",
    ]:
        assert (d / f).exists(), f
    rows = list(csv.DictReader(open(d / "probe.csv")))
    assert [r["encoder"] for r in rows] == [
        "pretrained",
        "random_init_seed1000",
        "random_init_seed1001",
        "random_init",
    ]
    for r in rows:
        assert 0.0 <= float(r["f1"]) <= 1.0 and 0.0 <= float(r["adapted_rand_error"]) <= 1.0
        assert float(r["voi"]) >= 0.0
    seeds = [float(r["f1"]) for r in rows[1:3]]
    assert float(rows[3]["f1"]) == np.mean(seeds) and float(rows[3]["f1_std"]) == np.std(
        seeds, ddof=1
    )
    probe_rec = json.loads((d / "probe.json").read_text())
    assert probe_rec["val_sections"] == [4, 6] and probe_rec["test_sections"] == [20, 22]
    assert probe_rec["results"]["pretrained"]["cells"]["threshold"] in (
        0.4,
        0.5,
    )  # chosen on validation
    pre = probe_rec["results"]["pretrained"]
    assert pre["cells"].get("merge", 0.0) in (0.0, 0.5)  # debug/tiny: cell_merges [0.0, 0.5]
    assert 0.0 <= pre["val_adapted_rand_error"] <= 1.0
    assert "mean ± std of 2 seeds, ddof 1" in (d / "probe.md").read_text()
    feats = open_volume(d / "features.zarr")
    assert feats.shape == (30, 48, 48, 32) and feats.dtype == np.float16
    assert np.isfinite(feats.read((slice(0, 2),)).astype(np.float32)).all()
    summary = json.loads((d / "summary.json").read_text())
    assert summary["pretrain"]["steps"] == 4 and summary["pretrain"]["final_loss"] > 0


def test_default_main_job_probes_zoo_pretrained_and_random(tmp_path):
    """`emfm main` as the README runs it (tiny): the zoo checkpoint, the checkpoint just pretrained
    and random init in one table; the zoo checkpoint's features exported."""
    from emfm import zoo

    d = tmp_path / "main"
    r = run_cli("main", "debug=tiny", f"hydra.run.dir={d}", "trainer.progress=false")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = [r["encoder"] for r in csv.DictReader(open(d / "probe.csv"))]
    name = next(
        ln.split(":", 1)[1].strip()
        for ln in (REPO / "configs" / "main.yaml").read_text().splitlines()
        if ln.strip().startswith("zoo:")
    )
    assert rows == [
        name,
        "pretrained",
        "random_init_seed1000",
        "random_init_seed1001",
        "random_init",
    ]
    md = (d / "probe.md").read_text()
    assert f"{name} - random" in md and "pretrained - random" in md
    # the zoo U-Net's full-resolution features: the levels and principal components of main.yaml
    main_export = yaml.safe_load((REPO / "configs" / "main.yaml").read_text())["export"]
    feats = open_volume(d / "features.zarr")
    enc = zoo.entry(name.removeprefix("zoo:"))
    assert feats.shape == (30, 384, 384, main_export["pca_k"]) and enc["architecture"] == "unet"
    rec = json.loads((d / "export.json").read_text())
    assert rec["layers"] == main_export["layers"] and rec["stride"] == [1, 1, 1]


def test_checkpoint_restores_trained_weights(tiny_main_run: Path):
    from flax import nnx

    from emfm.train.state import build_encoder, load_encoder

    enc, meta = load_encoder(str(tiny_main_run))
    fresh = build_encoder(
        enc.spec.__class__
        and __import__("emfm.config.schema", fromlist=["x"]).ModelConfig(**meta["model"]),
        seed=0,
    )
    a, b = nnx.state(enc, nnx.Param), nnx.state(fresh, nnx.Param)
    import jax

    diffs = [float(abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
    assert max(diffs) > 0  # trained, not re-initialised
    assert meta["grey_range"][1] > meta["grey_range"][0]


def test_export_resume_is_idempotent(tiny_main_run: Path, tmp_path):
    import shutil

    src = tiny_main_run / "features.zarr"
    out = tmp_path / "features.zarr"
    shutil.copytree(src, out)
    # drop some finished tiles, as an interrupted export would leave them
    chunks = sorted(p for p in (out / "0" / "c").rglob("*") if p.is_file())
    for p in chunks[::3]:
        p.unlink()
    res = run_cli(
        "export",
        "debug=tiny",
        f"checkpoint={tiny_main_run}",
        f"export.out={out}",
        f"hydra.run.dir={tmp_path / 'run'}",
        "trainer.progress=false",
    )
    assert res.returncode == 0, res.stderr[-2000:]
    rec = json.loads((tmp_path / "run" / "export.json").read_text())
    assert rec["tiles_written"] == len(chunks[::3]) and rec["tiles_skipped"] == len(chunks) - len(
        chunks[::3]
    )
    np.testing.assert_array_equal(open_volume(out).read(), open_volume(src).read())


def test_bad_inputs_give_one_line_errors(tmp_path):
    res = run_cli(
        "pretrain",
        "debug=tiny",
        "data.path=/no/such/volume.zarr",
        f"hydra.run.dir={tmp_path / 'a'}",
    )
    assert (
        res.returncode == 2 and "emfm: error: volume not found: /no/such/volume.zarr" in res.stderr
    )
    assert "Traceback" not in res.stderr
    res = run_cli(
        "pretrain", "debug=tiny", "data.patch_shape=[1,512,512]", f"hydra.run.dir={tmp_path / 'b'}"
    )
    assert res.returncode == 2 and "larger than volume" in res.stderr
    res = run_cli(
        "probe", "debug=tiny", f"checkpoint={tmp_path}", f"hydra.run.dir={tmp_path / 'c'}"
    )
    assert res.returncode == 2 and "checkpoints" in res.stderr


def test_quickstart_notebook_runs_tiny(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(REPO / "notebooks" / "quickstart.ipynb", as_version=4)
    os.environ["EMFM_NOTEBOOK_TINY"] = "1"
    os.environ["EMFM_NOTEBOOK_RUN_DIR"] = str(tmp_path / "nb")
    try:
        NotebookClient(
            nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        ).execute()
    finally:
        os.environ.pop("EMFM_NOTEBOOK_TINY")
        os.environ.pop("EMFM_NOTEBOOK_RUN_DIR")
    assert (tmp_path / "nb" / "probe.md").exists()
    assert (tmp_path / "nb" / "figures" / "features_pca.png").exists()
