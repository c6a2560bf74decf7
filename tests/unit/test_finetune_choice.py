"""The fine-tuning recipe of a pretrained start is chosen on validation scores only
(experiments/foundation/finetune.py --choose)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _script(file: str):
    """A script of experiments/foundation, imported as a module."""
    spec = importlib.util.spec_from_file_location(
        f"foundation_{Path(file).stem}", REPO / "experiments" / "foundation" / file
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _finetune_script():
    return _script("finetune.py")


def _rec(dataset, recipe, seed, fraction=0.1, **val):
    # no test-section scores at all: the choice must not need them
    return {
        "kind": "finetune",
        "init": "zoo",
        "fraction": fraction,
        "dataset": dataset,
        "recipe": recipe,
        "seed": seed,
        **val,
    }


def _write(tmp_path, recs):
    p = tmp_path / "results.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return p


def test_choose_mean_of_validation_scores(tmp_path, capsys):
    ft = _finetune_script()
    recs = []
    for seed in (0, 1):
        # a: better ISBI pixels, much worse adapted Rand error; b: better overall
        recs += [
            _rec("isbi", "a", seed, val_f1=0.80, val_adapted_rand_error=0.30),
            _rec("isbi", "b", seed, val_f1=0.78, val_adapted_rand_error=0.10),
            _rec("cdeep3m", "a", seed, val_iou=0.60, val_instance_f1=0.60),
            _rec("cdeep3m", "b", seed, val_iou=0.60, val_instance_f1=0.62),
        ]
    # a seed that only one recipe has is left out of the means, and so are other label fractions
    recs.append(_rec("isbi", "a", 2, val_f1=0.99, val_adapted_rand_error=0.0))
    recs.append(_rec("isbi", "a", 0, fraction=1.0, val_f1=0.99, val_adapted_rand_error=0.0))
    assert ft.choose(_write(tmp_path, recs), ["a", "b"]) == "b"
    out = capsys.readouterr().out
    assert "seeds [0, 1]" in out and "chosen: b" in out


def test_choose_needs_every_validation_score(tmp_path):
    ft = _finetune_script()
    recs = [
        _rec("isbi", "a", 0, val_f1=0.8),  # no validation adapted Rand error recorded
        _rec("cdeep3m", "a", 0, val_iou=0.6, val_instance_f1=0.6),
    ]
    with pytest.raises(SystemExit, match="val_adapted_rand_error missing"):
        ft.choose(_write(tmp_path, recs), ["a"])


def test_val_test_agreement_counts_each_run_once_and_filters(tmp_path, capsys):
    mod = _script("val_test_agreement.py")

    def rec(run, v, t, **kw):
        d = {"kind": "finetune", "dataset": "isbi", "fraction": 0.1, "run": run}
        d.update(val_adapted_rand_error=v, adapted_rand_error=t, **kw)
        return json.dumps(d)

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(
        "\n".join(
            [
                rec("r0", 0.1, 0.3),
                rec("r1", 0.2, 0.2),
                rec("r2", 0.3, 0.1),
                rec("other", 0.9, 0.9, dataset="cdeep3m"),
                rec("probe", 0.9, 0.9, kind="probe"),
                rec("full", 0.9, 0.9, fraction=1.0),
            ]
        )
        + "\n"
    )
    b.write_text(rec("r0", 0.5, 0.5) + "\n")  # a later record of r0: the first one counts
    rows = mod.pairs([a, b], "isbi", "adapted_rand_error", 0.1)
    assert sorted(rows) == [("r0", 0.1, 0.3), ("r1", 0.2, 0.2), ("r2", 0.3, 0.1)]
    assert mod.main([str(a), str(b)]) == 0
    assert "3 runs: Spearman -1.000" in capsys.readouterr().out
    assert mod.main([str(b)]) == 1  # one run: too few for a correlation
    with pytest.raises(SystemExit):
        mod.main([str(tmp_path / "missing.jsonl")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(rec("r0", 0.1, 0.3) + "\n{not json\n")
    with pytest.raises(SystemExit, match="bad.jsonl:2: not a JSON record"):
        mod.pairs([bad], "isbi", "adapted_rand_error", 0.1)


def test_cell_merges_extend_the_frozen_cell_grid_only_when_asked():
    import argparse

    ft = _finetune_script()
    assert "merges" not in ft._cell_grid()  # the protocol of the records: no merging
    ft.CELL_MERGES = [0.0, 0.5]
    try:
        assert ft._cell_grid()["merges"] == [0.0, 0.5]
        assert ft._cell_grid()["thresholds"] == ft.CELL_GRID["thresholds"]
    finally:
        ft.CELL_MERGES = [0.0]
    ap = argparse.ArgumentParser()
    assert ft.merge_levels(ap, "--cell-merges", "0,0.3,0.9") == [0.0, 0.3, 0.9]
    for bad in ("0,1", "x"):
        with pytest.raises(SystemExit):
            ft.merge_levels(ap, "--cell-merges", bad)
