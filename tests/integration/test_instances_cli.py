"""`emfm instances input=... out=... method=...` end to end on zarr volumes (boundary maps and
affinities)."""

import json

import numpy as np
from conftest import run_cli

from emfm.data.synthetic import synthetic_em
from emfm.data.volume import open_volume, write_array
from emfm.eval.metrics import region_scores
from emfm.instances import affinities_from_labels, boundaries_from_labels


def test_instances_cli_boundaries_and_affinities(tmp_path):
    s = synthetic_em((16, 64, 64), seed=1, cell_size=24.0)
    rng = np.random.default_rng(0)
    b = np.clip(boundaries_from_labels(s.cells) + rng.normal(0, 0.05, s.cells.shape), 0, 1)
    # integer probabilities are scaled to [0, 1]
    write_array(tmp_path / "b.zarr", (b * 255).astype(np.uint8))
    # on disk: z y x c
    affs = np.moveaxis(affinities_from_labels(s.cells), 0, -1).astype(np.float16)
    write_array(tmp_path / "a.zarr", affs)
    blocks = ["block=[8,32,32]", "halo=[4,8,8]"]
    res = run_cli(
        "instances",
        f"input={tmp_path / 'b.zarr'}",
        f"out={tmp_path / 'mc.zarr'}",
        "method=multicut",
        *blocks,
        f"hydra.run.dir={tmp_path / 'run1'}",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "run1" / "instances.json").read_text())
    assert summary["kind"] == "boundary" and summary["blocks"] == 8
    assert not (tmp_path / "mc.zarr.work").exists()  # scratch removed after a finished job
    lab = open_volume(tmp_path / "mc.zarr").read()
    assert lab.max() == summary["segments"]
    assert region_scores(lab, s.cells)["adapted_rand_error"] < 0.06
    res = run_cli(
        "instances",
        f"input={tmp_path / 'a.zarr'}",
        f"out={tmp_path / 'mws.zarr'}",
        "method=mws",
        *blocks,
        f"hydra.run.dir={tmp_path / 'run2'}",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert (
        region_scores(open_volume(tmp_path / "mws.zarr").read(), s.cells)["adapted_rand_error"]
        < 0.01
    )
    # bad input: one line naming the culprit, no traceback; the finished output is left alone
    res = run_cli(
        "instances",
        f"input={tmp_path / 'b.zarr'}",
        f"out={tmp_path / 'mws.zarr'}",
        "method=mws",
        f"hydra.run.dir={tmp_path / 'run3'}",
    )
    assert (
        res.returncode == 2
        and "mws needs affinities" in res.stderr
        and "Traceback" not in res.stderr
    )
    assert open_volume(tmp_path / "mws.zarr").read().max() > 0


def test_instances_config_fails_fast():
    import pytest

    from emfm.config import schema

    ok = dict(input="in.zarr", out="out.zarr")
    for bad, msg in [
        (dict(halo=[4, 8]), "halo=[4, 8]"),
        (dict(method="foo"), "method='foo'"),
        (dict(halo=[8, 64, 64], block=[8, 32, 32]), "exceeds block"),
        (dict(beta=1.5), "beta"),
        (dict(input=""), "input=PATH"),
        (dict(tune=True), "tune_labels=LABELS"),
        (
            dict(
                tune=True, tune_labels="gt.zarr", tune_roi=[[0, 1]] * 3, tune_grid={"thresh": [0.5]}
            ),
            "thresh",
        ),
        (
            dict(tune=True, tune_labels="gt.zarr", tune_roi=[[0, 1]] * 3, tune_input="no.zarr"),
            "tune_input=no.zarr: no such volume",
        ),
    ]:
        with pytest.raises(schema.ConfigError, match=msg.replace("[", r"\[").replace("]", r"\]")):
            schema.validate_instances(schema.InstancesConfig(**{**ok, **bad}))


def test_instances_yaml_composes_against_the_schema():
    import pytest
    from conftest import CONFIGS
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException
    from omegaconf import OmegaConf

    from emfm.config import schema

    schema.register()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None, job_name="t"):
        cfg = compose(
            "instances", overrides=["input=a.zarr", "out=b.zarr", "run_dir=r", "method=multicut"]
        )
        c = schema.validate_instances(OmegaConf.to_object(cfg))
        assert c.method == "multicut" and c.offsets[3] == [-3, 0, 0]
        assert schema.segment_params(c).offsets[0] == (-1, 0, 0)
        with pytest.raises(ConfigCompositionException, match="nope"):
            compose("instances", overrides=["nope=1"])
        with pytest.raises(ConfigCompositionException, match="tune_metric=dice") as e:
            compose("instances", overrides=["tune_metric=dice"])
        assert "expected one of [adapted_rand_error, voi," in str(e.value.__cause__)


def test_instances_cli_tunes_on_validation_labels(tmp_path):
    """instances.tune=true: a boundary map whose membranes a model scores only 0.4 merges everything
    at the default level 0.5; the level chosen on a labelled region (here of a separate
    validation volume, `tune_input`) separates the cells of the segmented volume."""
    s = synthetic_em((8, 48, 48), seed=2, cell_size=20.0)
    b = np.clip(0.05 + 0.35 * boundaries_from_labels(s.cells), 0, 1).astype(np.float32)
    write_array(tmp_path / "val.zarr", b[:4])
    write_array(tmp_path / "b.zarr", b[4:])
    write_array(tmp_path / "gt.zarr", s.cells[:4].astype(np.uint32))
    res = run_cli(
        "instances",
        f"input={tmp_path / 'b.zarr'}",
        f"tune_input={tmp_path / 'val.zarr'}",
        f"out={tmp_path / 'ws.zarr'}",
        "method=watershed",
        "block=[8,48,48]",
        "halo=[0,0,0]",
        "tune=true",
        f"tune_labels={tmp_path / 'gt.zarr'}",
        "tune_roi=[[0,4],[0,48],[0,48]]",
        "tune_metric=adapted_rand_error",
        "+tune_grid.threshold=[0.2,0.5]",
        "+tune_grid.min_seed=[8]",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    tuned = json.loads((tmp_path / "run" / "instances.json").read_text())["tuned"]
    assert tuned["chosen"] == {"threshold": 0.2, "min_seed": 8} and len(tuned["trials"]) == 2
    lab = open_volume(tmp_path / "ws.zarr").read()
    assert lab.shape == (4, 48, 48)
    assert region_scores(lab, s.cells[4:])["adapted_rand_error"] < 0.1  # held-out half
