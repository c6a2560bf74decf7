"""emfm as a real package: a wheel built from the repository carries its configs, bundled sample and
zoo checkpoints, and installed elsewhere runs the main job from another directory."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def test_an_installed_wheel_runs_the_main_job_from_another_directory(tmp_path):
    whl_dir, site, work = tmp_path / "whl", tmp_path / "site", tmp_path / "elsewhere"
    work.mkdir()
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(REPO),
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(whl_dir),
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    (wheel,) = whl_dir.glob("emfm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "emfm/configs/main.yaml" in names and "emfm/configs/model/unet3d.yaml" in names
    assert any(n.startswith("emfm/data/sample/") for n in names)
    from emfm import zoo

    for entry in zoo.names():  # every shipped checkpoint, with its model card
        assert any(n.startswith(f"emfm/zoo_models/{entry}/checkpoints/") for n in names), entry
        assert f"emfm/zoo_models/{entry}/MODEL_CARD.md" in names, entry
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--target",
            str(site),
            str(wheel),
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    # the installed copy comes first on the path (the repository's editable install is only a
    # fallback)
    env = {k: v for k, v in os.environ.items() if k != "EMFM_CONFIG_DIR"}
    env.update(PYTHONPATH=str(site), PYTHONUNBUFFERED="1")
    where = subprocess.run(
        [
            sys.executable,
            "-c",
            "import emfm.config.paths as p; print(p.__file__); print(p.config_dir())",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=work,
    )
    mod, cfg = where.stdout.split()
    assert mod.startswith(str(site)) and cfg.startswith(str(site)), where.stdout + where.stderr
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "emfm.cli.main",
            "main",
            "debug=tiny",
            "probe.zoo=",
            "export.layers=[0,1,2]",  # the tiny 2-level U-Net's levels and decoder output
            "trainer.progress=false",
            "name=from_wheel",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=work,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    run = work / "runs" / "main" / "from_wheel"
    assert (run / "probe.md").exists() and (run / "summary.json").exists()
