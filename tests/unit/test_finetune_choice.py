"""The fine-tuning recipe of a pretrained start is chosen on validation scores only
(experiments/foundation/finetune.py --choose)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _finetune_script():
    spec = importlib.util.spec_from_file_location(
        "foundation_finetune", REPO / "experiments" / "foundation" / "finetune.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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
