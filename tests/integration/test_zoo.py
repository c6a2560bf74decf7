"""The model zoo: checkpoints shipped in the package, used as `zoo:NAME` wherever a checkpoint is
accepted; `emfm zoo list`; a wrong name is a one-line error listing the names."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import run_cli
from flax import nnx

from emfm import zoo
from emfm.train.publish import publish


def test_shipped_zoo_lists_and_loads():
    names = zoo.names()
    assert names, "the package ships at least one zoo checkpoint"
    r = run_cli("zoo", "list")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert [ln.split()[0] for ln in lines] == names
    r = run_cli("zoo", "--help")
    assert r.returncode == 0 and "usage: emfm zoo list" in r.stdout
    assert run_cli("zoo", "lst").returncode == 2
    from emfm.train.state import load_encoder

    for n in names:
        d = zoo.path_of(n)
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        assert size <= 20 * 2**20, f"zoo entry {n} is {size / 2**20:.1f} MB (limit 20 MB)"
        assert (d / "MODEL_CARD.md").read_text().strip()
        enc, meta = load_encoder(zoo.resolve(f"zoo:{n}"))
        assert meta["grey_range"][1] > meta["grey_range"][0]
        x = np.random.default_rng(0).random((1, 64, 64, 1), np.float32)
        feats = enc(x)[1]["patch_map"]
        assert np.isfinite(np.asarray(feats)).all()


def test_unknown_zoo_name_is_one_line_listing_the_names(tmp_path):
    for args in (
        ["probe", "checkpoint=zoo:no_such_model"],
        ["export", "checkpoint=zoo:no_such_model"],
        ["probe", "checkpoints=[random,zoo:no_such_model]"],
        ["finetune", "regime=frozen", "debug=seg_tiny", "checkpoint=zoo:no_such_model"],
    ):
        debug = [] if any(a.startswith("debug=") for a in args) else ["debug=tiny"]
        r = run_cli(*args, *debug, f"hydra.run.dir={tmp_path / args[0]}")
        assert r.returncode == 2, (args, r.stderr[-1500:])
        err = r.stderr.strip().splitlines()[-1]
        assert "unknown zoo checkpoint 'no_such_model'" in err and "Traceback" not in r.stderr
        for n in zoo.names():
            assert n in err


def test_publish_round_trip(tiny_main_run: Path, tmp_path):
    from emfm.train.state import load_encoder

    d = publish(
        tiny_main_run, "tiny_test", description="tiny test model", card="# tiny\n", root=tmp_path
    )
    entry = json.loads((d / "entry.json").read_text())
    assert entry["name"] == "tiny_test" and entry["params_m"] > 0
    a, _ = load_encoder(str(tiny_main_run))
    b, meta = load_encoder(str(d))
    la, lb = jax.tree.leaves(nnx.state(a, nnx.Param)), jax.tree.leaves(nnx.state(b, nnx.Param))
    assert len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))

    # slimmer than the training checkpoint: no optimiser state
    def size(p):
        return sum(f.stat().st_size for f in (p / "checkpoints").rglob("*") if f.is_file())

    assert size(d) < size(tiny_main_run) / 2
    with pytest.raises(zoo.ZooError, match="exists"):
        publish(tiny_main_run, "tiny_test", description="", card="", root=tmp_path)
