"""`emfm probe checkpoints=[...]` through the CLI on the bundled real EM sample: one table over
checkpoints, probes, label fractions and seeds; a re-run with an added checkpoint computes only the
new entries; a sweep directory expands to its runs, identified by content."""

import csv
import json
import shutil
from pathlib import Path

from conftest import run_cli


def _task(tmp_path: Path) -> Path:
    p = tmp_path / "tiny_membranes.yaml"
    p.write_text(
        "target: membranes\npositive_label: 1\ncrop: [[0, 128], [0, 128]]\n"
        "train_slices: [0, 4]\nval_slices: [4, 5]\ntest_slices: [5, 7]\n"
    )
    return p


def _probe(tmp_path: Path, name: str, checkpoints: str, *extra: str):
    args = [
        "probe",
        "debug=tiny",
        f"checkpoints=[{checkpoints}]",
        f"benchmark.tasks=[{_task(tmp_path)}]",
        "benchmark.fractions=[0.1,1.0]",
        "benchmark.seeds=[0,1]",
        "benchmark.steps=20",
        "benchmark.batch_tokens=256",
        "benchmark.knn_references=500",
        f"benchmark.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / name}",
        "trainer.progress=false",
        *extra,
    ]
    return run_cli(*args)


def test_benchmark_table_and_cache_over_checkpoints(tiny_main_run: Path, tmp_path):
    r = _probe(tmp_path, "a", "random")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    first = json.loads((tmp_path / "a" / "benchmark.json").read_text())
    assert (first["computed"], first["from_cache"]) == (3 * 2 * 2, 0)  # probes x fractions x seeds

    r = _probe(tmp_path, "b", f"random,{tiny_main_run}")
    assert r.returncode == 0, r.stderr[-3000:]
    second = json.loads((tmp_path / "b" / "benchmark.json").read_text())
    second_ids = [(k, v["identity"]) for k, v in second["checkpoints"].items()]
    assert (second["computed"], second["from_cache"]) == (12, 12)  # only the added checkpoint ran
    rows = list(csv.DictReader(open(tmp_path / "b" / "benchmark.csv")))
    assert len(rows) == 2 * 3 * 2 and {r["checkpoint"] for r in rows} == {
        "random",
        tiny_main_run.name,
    }
    for row in rows:
        assert row["seeds"] == "2" and 0 <= float(row["f1_mean"]) <= 1 and float(row["f1_std"]) >= 0
        assert float(row["adapted_rand_error_mean"]) <= 1 and float(row["voi_mean"]) >= 0
    md = (tmp_path / "b" / "benchmark.md").read_text()
    assert "| knn | 10 % | random |" in md and "± " in md
    for f in ("label_efficiency_tiny_membranes.png", "overlay_tiny_membranes.png"):
        assert (tmp_path / "b" / "figures" / f).stat().st_size > 1000

    # a sweep directory expands to its runs; a copied run has the same content hash (same cache
    # entries)
    from emfm.config.schema import ModelConfig
    from emfm.eval.checkpoints import expand_checkpoints

    sweep = tmp_path / "sweep"
    shutil.copytree(tiny_main_run / "checkpoints", sweep / "0" / "checkpoints")
    shutil.copytree(tiny_main_run / "checkpoints", sweep / "1" / "checkpoints")
    cps = expand_checkpoints(["random", str(tiny_main_run), str(sweep)], ModelConfig())
    assert [c.name for c in cps] == [tiny_main_run.name, "sweep/0", "sweep/1", "random"]
    assert len({c.identity for c in cps[:3]}) == 1
    assert cps[3].identity == next(c for c in second_ids if c[0] == "random")[1]


def test_benchmark_bad_input_is_one_line(tmp_path):
    r = _probe(tmp_path, "e", "random", "benchmark.fractions=[0.5,1.5]")
    assert r.returncode == 2 and "emfm: error: benchmark.fractions=[0.5, 1.5]" in r.stderr
    assert "Traceback" not in r.stderr


def test_val_split_never_reads_test_sections(tmp_path, monkeypatch):
    """benchmark.split=val (choosing settings and checkpoints) scores the validation sections and
    reads neither the test sections nor a separate test volume."""
    from emfm.config.schema import TaskConfig
    from emfm.eval import tasks

    read: list[str] = []
    orig = tasks._read

    def spy(tc, img, lab, z, key):
        read.append(key)
        return orig(tc, img, lab, z, key)

    monkeypatch.setattr(tasks, "_read", spy)
    tc = TaskConfig(
        name="t",
        target="membranes",
        positive_label=1,
        crop=[[0, 64], [0, 64]],
        train_slices=[0, 4],
        val_slices=[4, 6],
        test_slices=[6, 8],
        test_image="/no/such/test_volume.tif",
        test_labels="/no/such/test_labels.tif",
    )
    task = tasks.load(tc, "val")
    assert read == ["train_slices", "val_slices"] and task.val is None
    assert task.test.images.shape == (2, 64, 64)
    read.clear()
    with __import__("pytest").raises(FileNotFoundError, match="test_volume"):
        tasks.load(tc, "test")  # the test split does open the test volume


def test_val_split_table_is_labelled(tiny_main_run, tmp_path):
    r = _probe(
        tmp_path,
        "v",
        f"random,{tiny_main_run}",
        "benchmark.split=val",
        "benchmark.probes=[linear]",
        "benchmark.fractions=[1.0]",
        "benchmark.seeds=[0]",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads((tmp_path / "v" / "benchmark.json").read_text())
    assert out["split"] == "val"
    assert (
        "validation sections (model selection; test sections unread)"
        in (tmp_path / "v" / "benchmark.md").read_text()
    )


def test_features_chosen_per_checkpoint_on_validation(tiny_main_run, tmp_path):
    r = _probe(
        tmp_path,
        "s",
        f"random,{tiny_main_run}",
        "benchmark.blocks_choices=[[],[0]]",
        "benchmark.probes=[linear]",
        "benchmark.fractions=[1.0]",
        "benchmark.seeds=[0,1]",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads((tmp_path / "s" / "benchmark.json").read_text())
    assert set(out["features"]) == {"random", tiny_main_run.name}
    for name, sel in out["feature_selection"].items():
        assert set(sel) == {"[]", "[0]"}
        assert json.dumps(out["features"][name]) == max(sel, key=sel.get)  # the best on validation
    for rec in out["records"]:  # the test entries use each checkpoint's own choice only
        assert rec["blocks"] == out["features"][rec["checkpoint"]]
    assert (
        "Features chosen per checkpoint on the validation sections"
        in (tmp_path / "s" / "benchmark.md").read_text()
    )
