"""Probing benchmark library: probes on features with a known answer, exact metrics on synthetic
ground truth, a 3D encoder end to end on a synthetic volume, and the errors for bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import CONFIGS

from emfm.config.schema import BenchmarkConfig, ConfigError, ModelConfig, TaskConfig
from emfm.data.synthetic import synthetic_em
from emfm.data.volume import VolumeError, write_array
from emfm.eval import benchmark, probes, tasks
from emfm.eval.checkpoints import expand_checkpoints


def _separable(seed=0, n=6, g=16, cell=4, d=16):
    """Token features that cluster by the class of the token's pixels (first channel +-2 plus
    noise)."""
    rng = np.random.default_rng(seed)
    cls = rng.random((n, g, g)) < 0.3
    f = (0.5 * rng.normal(size=(n, g, g, d))).astype(np.float32)
    f[..., 0] += np.where(cls, 2.0, -2.0)
    return f, np.repeat(np.repeat(cls, cell, 1), cell, 2)


@pytest.mark.parametrize("kind", probes.PROBES)
def test_probes_learn_a_separable_task_from_few_labels(kind):
    f, fg = _separable()
    s = probes.ProbeSettings(
        steps=60, batch_tokens=128, lr=0.05, hidden=32, knn_k=5, knn_references=400, knn_stride=2
    )
    mask = probes.label_mask(fg.shape, 0.25, seed=0, fg=fg)
    (p,) = probes.fit_predict(kind, s, f[:5], fg[:5], mask[:5], [f[5:]], seed=0)
    assert p.shape == fg[5:].shape and p.min() >= 0 and p.max() <= 1
    tp = ((p >= 0.5) & fg[5:]).sum()
    f1 = 2 * tp / ((p >= 0.5).sum() + fg[5:].sum())
    # kNN interpolates features between token centres, which blurs the class edges at token borders
    assert f1 > (0.75 if kind == "knn" else 0.85), (kind, f1)


@pytest.mark.parametrize("kind", ["linear", "knn"])
def test_probes_read_float16_features_as_the_float32_they_round_to(kind):
    """The benchmark keeps features as float16 (half the memory of a wide hypercolumn): the probes
    standardise them a batch at a time and must give what the same values in float32 give."""
    f, fg = _separable(seed=1)
    h = f.astype(np.float16)
    mean, std = probes._standardise(h)
    flat = h.astype(np.float64).reshape(-1, h.shape[-1])
    np.testing.assert_allclose(mean, flat.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(std, flat.std(0) + 1e-6, rtol=1e-6)
    np.testing.assert_allclose(probes._standardise(h, chunk=7)[1], std, rtol=1e-6)
    s = probes.ProbeSettings(steps=30, batch_tokens=64, lr=0.05, knn_k=5, knn_references=300)
    mask = probes.label_mask(fg.shape, 0.25, seed=0, fg=fg)
    args = (fg[:5], mask[:5])
    (p16,) = probes.fit_predict(kind, s, h[:5], *args, [h[5:]], seed=0)
    (p32,) = probes.fit_predict(
        kind, s, h[:5].astype(np.float32), *args, [h[5:].astype(np.float32)], seed=0
    )
    np.testing.assert_allclose(p16, p32, atol=1e-6)


def test_label_mask_is_seeded_sized_and_checked():
    fg = np.zeros((2, 50, 50), bool)
    fg[0, 0, 0] = True
    a = probes.label_mask(fg.shape, 0.01, seed=1, fg=fg)
    assert np.array_equal(a, probes.label_mask(fg.shape, 0.01, seed=1, fg=fg))
    assert not np.array_equal(a, probes.label_mask(fg.shape, 0.01, seed=2, fg=fg))
    assert 20 <= a.sum() <= 80 and (a & fg).any()  # the single foreground pixel is always kept
    assert probes.label_mask(fg.shape, 1.0, seed=0).all()
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match="must be in \\(0, 1\\]"):
            probes.label_mask(fg.shape, bad, seed=0)


def _task_on(tmp_path, img, lab, **kw) -> TaskConfig:
    write_array(tmp_path / "img.zarr", img)
    write_array(tmp_path / "lab.zarr", lab)
    base = dict(name="t", image=str(tmp_path / "img.zarr"), labels=str(tmp_path / "lab.zarr"))
    return TaskConfig(**(base | kw))


def _membrane_task(tmp_path, em, **slices) -> TaskConfig:
    """The membranes of a synthetic image as a task (label 1 = membrane)."""
    labels = em.membranes.astype(np.uint8)
    return _task_on(tmp_path, em.image, labels, target="membranes", positive_label=1, **slices)


def test_exact_predictions_score_perfectly(tmp_path):
    em = synthetic_em((6, 64, 64), seed=3, cell_size=24.0)
    tc = _membrane_task(tmp_path, em, train_slices=[0, 3], test_slices=[3, 6])
    t = tasks.load(tc)
    s = tasks.scores(t, t.test.fg.astype(float), t.test)
    assert s["f1"] == 1.0 and s["iou"] == 1.0 and s["adapted_rand_error"] < 0.02
    worse = tasks.scores(t, np.zeros_like(t.test.fg, float), t.test)
    assert worse["f1"] == 0.0 and worse["adapted_rand_error"] > 0.5
    # mitochondria: organelles as foreground, instance F1 of connected components
    tm = tasks.load(
        _task_on(
            tmp_path / "m",
            em.image,
            (em.organelles > 0).astype(np.uint8),
            target="mitochondria",
            train_slices=[0, 3],
            test_slices=[3, 6],
        )
    )
    sm = tasks.scores(tm, tm.test.fg.astype(float), tm.test)
    assert sm["iou"] == 1.0 and sm["instance_f1"] == 1.0 and sm["n_pred"] == sm["n_gt"] > 0
    # neuron boundaries: the label values are the instances, 0 = boundary
    cells = np.where(em.membranes, 0, em.cells).astype(np.uint32)
    tb = tasks.load(
        _task_on(
            tmp_path / "b",
            em.image,
            cells,
            target="neuron_boundaries",
            positive_label=0,
            train_slices=[0, 3],
            test_slices=[3, 6],
        )
    )
    sb = tasks.scores(tb, tb.test.fg.astype(float), tb.test)
    assert sb["f1"] == 1.0 and sb["voi"] < 0.2


def test_task_errors_name_the_culprit(tmp_path):
    img = np.zeros((4, 32, 32), np.uint8)
    with pytest.raises(VolumeError, match="labels .* have shape \\(4, 32, 16\\)"):
        tasks.load(
            _task_on(
                tmp_path,
                img,
                np.zeros((4, 32, 16), np.uint8),
                train_slices=[0, 2],
                test_slices=[2, 4],
            )
        )
    with pytest.raises(VolumeError, match="test_slices=\\[2, 9\\] lies outside"):
        tasks.load(_task_on(tmp_path / "b", img, img, train_slices=[0, 2], test_slices=[2, 9]))
    # the same from the volumes' shapes alone, before any encoding (and for validation sections)
    with pytest.raises(VolumeError, match="test_slices=\\[2, 9\\] lies outside"):
        tasks.check_inputs(
            _task_on(tmp_path / "b2", img, img, train_slices=[0, 2], test_slices=[2, 9])
        )
    with pytest.raises(VolumeError, match="val_slices=\\[2, 5\\] lies outside"):
        tc = _task_on(
            tmp_path / "b3", img, img, train_slices=[0, 2], val_slices=[2, 5], test_slices=[5, 6]
        )
        tasks.check_inputs(tc)
    with pytest.raises(VolumeError, match="no pixel of both classes"):
        tasks.load(_task_on(tmp_path / "c", img, img, train_slices=[0, 2], test_slices=[2, 4]))
    with pytest.raises(ConfigError, match="target='cells'"):
        tasks.validate(TaskConfig(name="x", target="cells"))
    # sections trained on, chosen on and scored on are apart (a separate test volume is)
    for split, msg in (
        (dict(test_slices=[2, 8]), r"test_slices=\[2, 8\] overlaps train_slices=\[0, 4\]"),
        (dict(val_slices=[3, 5]), r"val_slices=\[3, 5\] overlaps train_slices"),
        (dict(val_slices=[4, 6], test_slices=[5, 9]), r"test_slices=\[5, 9\] overlaps val_slices"),
    ):
        base = dict(name="x", target="membranes", train_slices=[0, 4], test_slices=[6, 9])
        with pytest.raises(ConfigError, match=msg):
            tasks.validate(TaskConfig(**{**base, **split}))
    sep = dict(test_image="t.tif", test_labels="l.tif", train_slices=[0, 4], test_slices=[0, 4])
    assert tasks.validate(TaskConfig(name="x", target="membranes", **sep))
    from emfm.config.probe import ProbeConfig, validate_probe

    with pytest.raises(ConfigError, match=r"probe.test_slices=\[2, 4\] overlaps probe.train"):
        validate_probe(ProbeConfig(test_slices=[2, 4]), ModelConfig(name="unet", patch_size=[1, 1]))
    from emfm.cli.probe import load_task

    with pytest.raises(ConfigError, match="unknown task 'nope'; known tasks are .*isbi_membranes"):
        load_task("nope", str(CONFIGS))
    bad = tmp_path / "bad.yaml"
    bad.write_text("target: membranes\nlabel_path: x\n")
    with pytest.raises(ConfigError, match="label_path"):
        load_task(str(bad), str(CONFIGS))
    for t in ("isbi_membranes", "cdeep3m_mito", "gala_boundaries", "sample_membranes"):
        assert tasks.validate(load_task(t, str(CONFIGS))).name == t


def test_benchmark_and_checkpoint_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown probe 'svm'"):
        benchmark.validate(BenchmarkConfig(tasks=["x"], probes=["linear", "svm"]))
    with pytest.raises(ConfigError, match="fractions=\\[0.5, 2.0\\].*\\(0, 1\\]"):
        benchmark.validate(BenchmarkConfig(tasks=["x"], fractions=[0.5, 2.0]))
    (tmp_path / "notarun" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match="is not a run"):
        expand_checkpoints([str(tmp_path / "notarun")], ModelConfig())
    with pytest.raises(FileNotFoundError, match="not found"):
        expand_checkpoints([str(tmp_path / "missing")], ModelConfig())
    (c,) = expand_checkpoints(["random"], ModelConfig(width=32, depth=1, heads=2))
    assert c.name == "random" and c.run_dir == "" and c.model["width"] == 32


def test_3d_encoder_benchmark_on_a_synthetic_volume(tmp_path):
    em = synthetic_em((16, 64, 64), seed=1, cell_size=20.0, spacing=(2.0, 1.0, 1.0))
    tc = _membrane_task(tmp_path, em, train_slices=[0, 8], val_slices=[8, 10], test_slices=[10, 16])
    model = ModelConfig(patch_size=[2, 8, 8], width=32, depth=1, heads=2)
    (ck,) = expand_checkpoints(["random"], model)
    feats = benchmark.encode(
        ck.encoder(),
        np.random.rand(5, 40, 48).astype(np.float32),
        BenchmarkConfig(tile=16, margin=8),
    )
    assert (
        feats.shape == (5, 5, 6, 32)
        and np.array_equal(feats[0], feats[1])
        and not np.array_equal(feats[1], feats[2])
    )
    bench = BenchmarkConfig(
        tasks=["t"],
        probes=["linear", "knn"],
        fractions=[0.5],
        seeds=[0, 1],
        steps=30,
        batch_tokens=128,
        knn_references=300,
        tile=32,
        margin=8,
        cache_dir=str(tmp_path / "cache"),
        figures=False,
    )
    out = benchmark.run_benchmark([tc], [ck], bench, tmp_path / "run")
    assert out["computed"] == 4 and out["from_cache"] == 0
    rows = json.loads((tmp_path / "run" / "benchmark.json").read_text())["rows"]
    assert {(r["probe"], r["seeds"]) for r in rows} == {("linear", 2), ("knn", 2)}
    assert all(0.2 < r["f1_mean"] <= 1 and r["voi_mean"] >= 0 for r in rows)


def test_feature_cache_keeps_the_most_recently_used_files_under_its_size(tmp_path):
    import os

    paths = []
    for i in range(5):  # 5 files of 1 MB, oldest first
        p = tmp_path / f"f{i}.npz"
        p.write_bytes(b"\0" * 1_000_000)
        os.utime(p, (1000 + i, 1000 + i))
        paths.append(p)
    os.utime(paths[0], (2000, 2000))  # f0 read again: now the most recently used
    removed = benchmark.prune_cache(tmp_path, max_gb=0.0035, keep=paths[4])
    assert sorted(p.name for p in removed) == ["f1.npz", "f2.npz"]
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == ["f0.npz", "f3.npz", "f4.npz"]
    assert benchmark.prune_cache(tmp_path, max_gb=0.0, keep=paths[4]) and [
        p.name for p in tmp_path.glob("*.npz")
    ] == ["f4.npz"]
