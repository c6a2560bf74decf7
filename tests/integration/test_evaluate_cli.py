"""`emfm evaluate pred=... gt=...` end to end on label volumes (zarr written here, TIFF from the
synthetic generator)."""

import json

import numpy as np
import tifffile
from conftest import run_cli

from emfm.data.synthetic import synthetic_em
from emfm.data.volume import write_array


def test_evaluate_cli_zarr_and_tiff(tmp_path):
    syn = synthetic_em((4, 64, 64), seed=3)
    gt = syn.cells.astype(np.uint32)
    pred = gt.copy()
    pred[pred == 1] = 2  # one false merge
    write_array(tmp_path / "gt.zarr", gt)
    tifffile.imwrite(tmp_path / "pred.tif", pred, photometric="minisblack")
    res = run_cli(
        "evaluate",
        f"pred={tmp_path / 'pred.tif'}",
        f"gt={tmp_path / 'gt.zarr'}",
        "kinds=[region,instance]",
        "ignore_gt=[]",
        f"hydra.run.dir={tmp_path / 'ev'}",
    )
    assert res.returncode == 0, res.stderr[-2000:]
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    flat = json.dumps(m)
    assert "adapted_rand_error" in flat and "voi_merge" in flat
    region = m["metrics"]["region"]
    assert region["voi_merge"] > 0 and region["voi_split"] < 1e-12  # a merge, no split
    assert (tmp_path / "ev" / "metrics.md").exists()
    # bad input: missing file, named
    res = run_cli(
        "evaluate",
        f"pred={tmp_path / 'nope.tif'}",
        f"gt={tmp_path / 'gt.zarr'}",
        f"hydra.run.dir={tmp_path / 'ev2'}",
    )
    assert res.returncode == 2 and "nope.tif" in res.stderr
    res = run_cli("evaluate", f"hydra.run.dir={tmp_path / 'ev3'}")
    assert res.returncode == 2 and "pred=PATH" in res.stderr
