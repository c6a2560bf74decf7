"""`emfm probe checkpoints=[...]` through the CLI on the bundled real EM sample: one table over
checkpoints, probes, label fractions and seeds; a re-run with an added checkpoint computes only the
new entries, and a sweep directory holding a copy of a run is recognised by content (all cached)."""
import csv
import json
import shutil
from pathlib import Path

from conftest import run_cli


def _task(tmp_path: Path) -> Path:
    p = tmp_path / "tiny_membranes.yaml"
    p.write_text("target: membranes\npositive_label: 1\ncrop: [[0, 128], [0, 128]]\n"
                 "train_slices: [0, 4]\nval_slices: [4, 5]\ntest_slices: [5, 7]\n")
    return p


def _probe(tmp_path: Path, name: str, checkpoints: str, *extra: str):
    args = ["probe", "debug=tiny", f"checkpoints=[{checkpoints}]", f"benchmark.tasks=[{_task(tmp_path)}]",
            "benchmark.fractions=[0.1,1.0]", "benchmark.steps=20", "benchmark.batch_tokens=256",
            "benchmark.knn_references=500", f"benchmark.cache_dir={tmp_path / 'cache'}",
            f"hydra.run.dir={tmp_path / name}", "trainer.progress=false", *extra]
    return run_cli(*args)


def test_benchmark_table_and_cache_over_checkpoints(tiny_main_run: Path, tmp_path):
    r = _probe(tmp_path, "a", "random")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    first = json.loads((tmp_path / "a" / "benchmark.json").read_text())
    assert (first["computed"], first["from_cache"]) == (3 * 2 * 3, 0)  # probes x fractions x seeds

    r = _probe(tmp_path, "b", f"random,{tiny_main_run}")
    assert r.returncode == 0, r.stderr[-3000:]
    second = json.loads((tmp_path / "b" / "benchmark.json").read_text())
    assert (second["computed"], second["from_cache"]) == (18, 18)  # only the added checkpoint ran
    rows = list(csv.DictReader(open(tmp_path / "b" / "benchmark.csv")))
    assert len(rows) == 2 * 3 * 2 and {r["checkpoint"] for r in rows} == {"random", tiny_main_run.name}
    for row in rows:
        assert row["seeds"] == "3" and 0 <= float(row["f1_mean"]) <= 1 and float(row["f1_std"]) >= 0
        assert float(row["adapted_rand_error_mean"]) <= 1 and float(row["voi_mean"]) >= 0
    md = (tmp_path / "b" / "benchmark.md").read_text()
    assert "| knn | 10 % | random |" in md and "± " in md
    for f in ("label_efficiency_tiny_membranes.png", "overlay_tiny_membranes.png"):
        assert (tmp_path / "b" / "figures" / f).stat().st_size > 1000

    sweep = tmp_path / "sweep"
    shutil.copytree(tiny_main_run / "checkpoints", sweep / "0" / "checkpoints")
    r = _probe(tmp_path, "c", f"random,{sweep}", "benchmark.figures=false")
    assert r.returncode == 0, r.stderr[-3000:]
    third = json.loads((tmp_path / "c" / "benchmark.json").read_text())
    assert (third["computed"], third["from_cache"]) == (0, 36)  # same weights, same cache entries
    assert set(third["checkpoints"]) == {"random", "sweep/0"}


def test_benchmark_bad_input_is_one_line(tmp_path):
    r = _probe(tmp_path, "e", "random", "benchmark.fractions=[0.5,1.5]")
    assert r.returncode == 2 and "emfm: error: benchmark.fractions=[0.5, 1.5]" in r.stderr
    assert "Traceback" not in r.stderr
