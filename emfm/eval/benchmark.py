"""The probing benchmark: rank any number of checkpoints on every task with every probe.

`run_benchmark(tasks, checkpoints, bench, run_dir)` runs each task x probe x label fraction x seed x
checkpoint (emfm.eval.tasks, emfm.eval.probes) and writes one table `benchmark.{csv,md,json}`
(mean and standard deviation over seeds), label-efficiency curves and prediction overlays
(`figures/`, emfm.eval.benchmark_report). Checkpoints (emfm.eval.checkpoints): `random` (the other
checkpoints' architecture(s), or `model` when there is none, freshly initialised), a run directory
(its latest checkpoint), a sweep directory (each run below it) or a zoo name.

Every result is cached in `bench.cache_dir` under a hash of (checkpoint content, task settings and
files, probe settings, label fraction, seed), so a re-run with an added checkpoint computes only
the new entries; encoder features are cached per (checkpoint, task) too. Sections are normalised
per task (0.5 / 99.5 grey-value percentiles of the training sections), the same for all checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from emfm.config.common import ConfigError
from emfm.config.probe import BenchmarkConfig
from emfm.eval import probes as probes_mod
from emfm.eval import tasks as tasks_mod
from emfm.eval.benchmark_report import aggregate, figures, preview_index, write_tables
from emfm.eval.checkpoints import Checkpoint, key_hash, seeded_random
from emfm.export.encode import alignment, normalise
from emfm.export.encode import encode as encode_windows

log = logging.getLogger("emfm")

# ---- features
# -------------------------------------------------------------------------------------


def encode(encoder, images: np.ndarray, bench: BenchmarkConfig) -> np.ndarray:
    """Dense features `[n, gy, gx, d]` of sections `[n, y, x]` in [0, 1], encoded by
    emfm.export.encode in `bench.tile` tiles with `bench.margin` context. A 3D encoder sees the
    stack in blocks of 4 token layers (or 4 x its pooling) with one of context, the stack mirrored
    once (symmetric) around its ends; section z takes the features of the token layer that contains
    it."""
    layers = tuple(bench.blocks)
    if encoder.spec.ndim == 2:
        return encode_windows(
            encoder,
            images,
            tile=bench.tile,
            margin=bench.margin,
            batch_size=bench.batch_size,
            layers=layers,
        )
    az, ay, ax = alignment(encoder)
    if bench.tile % ay or bench.margin % ay or bench.tile % ax or bench.margin % ax:
        raise ConfigError(
            f"benchmark.tile={bench.tile}, margin={bench.margin}: must be multiples of the patch "
            f"size {encoder.spec.patch_size}"
        )
    core, ctx = (4 * az, bench.tile, bench.tile), (az, bench.margin, bench.margin)
    grid = [-(-s // c) * c for s, c in zip(images.shape, core)]
    pad = [(c, g - s + c) for s, g, c in zip(images.shape, grid, ctx)]
    f = encode_windows(
        encoder,
        np.pad(images, pad, mode="symmetric"),
        tile=bench.tile,
        margin=bench.margin,
        tile_z=core[0],
        margin_z=ctx[0],
        roi=[(c, c + g) for c, g in zip(ctx, grid)],
        layers=layers,
        batch_size=bench.batch_size,
    )
    n, ny, nx = images.shape
    stride = [g // s for g, s in zip(grid, f.shape)]
    return f[np.arange(n) // stride[0], : -(-ny // stride[1]), : -(-nx // stride[2])]


def encode_half(encoder, images: np.ndarray, bench: BenchmarkConfig, sections: int = 4):
    """`encode` as float16; a 2D encoder's sections are encoded `sections` at a time, so the
    float32 features of a whole split are never held at once."""
    if encoder.spec.ndim != 2:
        return encode(encoder, images, bench).astype(np.float16)
    out = None
    for i in range(0, len(images), sections):
        part = encode(encoder, images[i : i + sections], bench)
        if out is None:
            out = np.empty((len(images),) + part.shape[1:], np.float16)
        out[i : i + len(part)] = part
    return out


def grey_range(task: tasks_mod.TaskData) -> tuple[float, float]:
    lo, hi = np.percentile(task.train.images, [0.5, 99.5])
    return (float(lo), float(hi)) if hi > lo else (float(lo), float(lo) + 1.0)


class FeatureStore:
    """Features per (checkpoint, task), computed on first use and kept in memory and on disk as
    float16."""

    def __init__(self, root: Path | None, bench: BenchmarkConfig):
        self.root, self.bench, self.mem = root, bench, {}

    def get(
        self, c: Checkpoint, task: tasks_mod.TaskData, task_id: str, blocks=None
    ) -> dict[str, np.ndarray]:
        blocks = list(self.bench.blocks if blocks is None else blocks)
        key = key_hash(c.identity, task_id, blocks, self.bench.tile, self.bench.margin)
        if key in self.mem:
            return self.mem[key]
        path = self.root / f"{key}.npz" if self.root else None
        if path is not None and path.exists():
            with np.load(path) as z:
                feats = {k: z[k] for k in z.files}
            os.utime(path)  # most recently used: kept longest by `prune_cache`
        else:
            rng = grey_range(task)
            splits = {"train": task.train, "test": task.test} | (
                {"val": task.val} if task.val else {}
            )
            t0 = time.perf_counter()
            # float16 as stored, so a result does not depend on whether features were cached, and
            # half the memory (the probes standardise them to float32 a batch at a time)
            bench = dataclasses.replace(self.bench, blocks=blocks)
            feats = {
                k: encode_half(c.encoder(), normalise(s.images, rng), bench)
                for k, s in splits.items()
            }
            log.info(
                "features %s / %s: %s in %.1f s",
                c.name,
                task.name,
                feats["train"].shape[1:],
                time.perf_counter() - t0,
            )
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp.npz")
                np.savez(tmp, **feats)
                tmp.replace(path)
                prune_cache(self.root, self.bench.cache_max_gb, keep=path)
        self.mem = {key: feats}  # one (checkpoint, task) at a time in memory
        return feats


def prune_cache(root: Path, max_gb: float, keep: Path | None = None) -> list[Path]:
    """Remove the least recently used feature files under `root` until the rest fit in `max_gb`
    (`keep`, the file just written, is never removed). Returns the removed paths."""
    files = sorted((p for p in root.glob("*.npz") if p != keep), key=lambda p: p.stat().st_mtime)
    total = sum(p.stat().st_size for p in files) + (
        keep.stat().st_size if keep and keep.exists() else 0
    )
    removed, limit = [], max_gb * 1e9
    for p in files:
        if total <= limit:
            break
        total -= p.stat().st_size
        p.unlink(missing_ok=True)
        removed.append(p)
    if removed:
        log.info(
            "feature cache %s: removed %d least recently used files to stay under %.1f GB",
            root,
            len(removed),
            max_gb,
        )
    return removed


# ---- the benchmark
# --------------------------------------------------------------------------------


def settings(bench: BenchmarkConfig) -> probes_mod.ProbeSettings:
    return probes_mod.ProbeSettings(
        steps=bench.steps,
        batch_tokens=bench.batch_tokens,
        lr=bench.lr,
        weight_decay=bench.weight_decay,
        hidden=bench.hidden,
        knn_k=bench.knn_k,
        knn_references=bench.knn_references,
        knn_stride=bench.knn_stride,
    )


def validate(bench: BenchmarkConfig) -> None:
    if not bench.tasks:
        raise ConfigError(
            "benchmark.tasks=[]: name at least one task (configs/probe_task/NAME.yaml or a YAML "
            "path)"
        )
    for p in bench.probes:
        probes_mod.check_kind(p)
    if not bench.probes or not bench.fractions or not bench.seeds:
        raise ConfigError(
            "benchmark.probes, benchmark.fractions and benchmark.seeds must not be empty"
        )
    for f in bench.fractions:
        if not 0.0 < f <= 1.0:
            raise ConfigError(
                f"benchmark.fractions={list(bench.fractions)}: each label fraction must be in (0, "
                "1]"
            )
    for key in (
        "steps",
        "batch_tokens",
        "hidden",
        "knn_k",
        "knn_references",
        "knn_stride",
        "tile",
        "cache_max_gb",
    ):
        if getattr(bench, key) <= 0:
            raise ConfigError(f"benchmark.{key}={getattr(bench, key)}: must be positive")


def run_benchmark(
    tasks: list, checkpoints: list[Checkpoint], bench: BenchmarkConfig, run_dir: str | Path
) -> dict:
    """Run (or read from the cache) every entry; write tables and figures to `run_dir`. With
    `bench.blocks_choices`, each checkpoint's features are first chosen on the validation
    sections."""
    validate(bench)
    run_dir = Path(run_dir)
    cache = Path(bench.cache_dir)
    (cache / "results").mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    store = FeatureStore(cache / "features" if bench.cache_features else None, bench)
    picks, selection = {c.name: list(bench.blocks) for c in checkpoints}, {}
    for tc in tasks:  # files, shapes and ranges of every split, before any encoding
        tasks_mod.check_inputs(tc)
    if len(bench.blocks_choices) > 1:
        picks, selection = select_features(tasks, checkpoints, bench, store, cache)
    # every input checked before any compute
    loaded = [tasks_mod.load(tc, bench.split) for tc in tasks]
    names = [t.name for t in loaded]
    if len(set(names)) != len(names):
        raise ConfigError(f"benchmark.tasks: task names {names} are not unique")
    records, computed, cached = _entries(
        loaded, checkpoints, bench, store, cache, picks, bench.seeds
    )
    rows = aggregate(records)
    out = {
        "split": bench.split,
        "features": picks,
        "feature_selection": selection,
        "rows": rows,
        "computed": computed,
        "from_cache": cached,
        "seconds": time.perf_counter() - t_start,
        "checkpoints": {
            c.name: {"run_dir": c.run_dir, "identity": c.identity} for c in checkpoints
        },
        "tasks": {t.name: dataclasses.asdict(t.config) for t in loaded},
        "records": records,
    }
    write_tables(
        run_dir, rows, loaded, bench.split, picks if len(bench.blocks_choices) > 1 else None
    )
    (run_dir / "benchmark.json").write_text(json.dumps(out, indent=1, default=float))
    if bench.figures:
        figures(run_dir, rows, loaded, checkpoints, bench, records, cache)
    log.info(
        "benchmark: %d entries computed, %d from the cache, %.0f s",
        computed,
        cached,
        out["seconds"],
    )
    return out


def _entries(loaded, checkpoints, bench, store, cache, picks: dict, seeds) -> tuple[list, int, int]:
    s = settings(bench)
    ids = {
        t.name: tasks_mod.identity(t.config)
        + (":val" if t.val is None and t.config.val_slices else "")
        for t in loaded
    }
    records, computed, cached = [], 0, 0
    for task in loaded:
        for c0 in checkpoints:
            blocks = picks[c0.name]
            for seed in seeds:  # outermost of the three: one network's features stay in memory
                c = seeded_random(c0, seed) if bench.random_per_seed else c0
                for kind in bench.probes:
                    for frac in bench.fractions:
                        key = key_hash(
                            c.identity,
                            ids[task.name],
                            s.identity(kind),
                            float(frac),
                            int(seed),
                            list(blocks),
                            bench.tile,
                            bench.margin,
                        )
                        path = cache / "results" / f"{key}.json"
                        if path.exists():
                            rec = json.loads(path.read_text())
                            cached += 1
                        else:
                            rec = _compute(
                                task,
                                c,
                                kind,
                                frac,
                                seed,
                                s,
                                store,
                                ids[task.name],
                                cache,
                                key,
                                blocks,
                            )
                            tmp = path.with_suffix(".tmp")
                            tmp.write_text(json.dumps(rec))
                            tmp.replace(path)
                            computed += 1
                        records.append(
                            dict(
                                rec,
                                task=task.name,
                                checkpoint=c.name,
                                probe=kind,
                                fraction=float(frac),
                                seed=int(seed),
                                key=key,
                                blocks=list(blocks),
                            )
                        )
    return records, computed, cached


def select_features(
    tasks: list, checkpoints: list[Checkpoint], bench: BenchmarkConfig, store, cache: Path
):
    """Per checkpoint, the entry of `bench.blocks_choices` with the best mean primary metric over
    tasks x probes x fractions on the validation sections (seed `bench.seeds[0]`); the test
    sections are not read. Returns ({name: blocks}, {name: {choice: score}})."""
    val_tasks = [tasks_mod.load(tc, "val") for tc in tasks]
    picks, selection = {}, {}
    for c in checkpoints:
        scores = {}
        for choice in bench.blocks_choices:
            recs, _, _ = _entries(
                val_tasks, [c], bench, store, cache, {c.name: list(choice)}, bench.seeds[:1]
            )
            prim = [
                r[
                    tasks_mod.TARGETS[next(t.target for t in val_tasks if t.name == r["task"])][
                        "primary"
                    ]
                ]
                for r in recs
            ]
            scores[json.dumps(list(choice))] = float(np.mean(prim))
        best = max(scores, key=scores.get)
        picks[c.name], selection[c.name] = json.loads(best), scores
        log.info(
            "features of %s chosen on validation sections: blocks %s (%s)",
            c.name,
            best,
            ", ".join(f"{k}: {v:.4f}" for k, v in scores.items()),
        )
    return picks, selection


def _compute(
    task,
    c: Checkpoint,
    kind: str,
    frac: float,
    seed: int,
    s: probes_mod.ProbeSettings,
    store: FeatureStore,
    task_id: str,
    cache: Path,
    key: str,
    blocks=None,
) -> dict:
    t0 = time.perf_counter()
    feats = store.get(c, task, task_id, blocks)
    mask = probes_mod.label_mask(task.train.fg.shape, frac, seed, task.train.fg)
    evals = [feats["test"]] + ([feats["val"]] if task.val is not None else [])
    preds = probes_mod.fit_predict(kind, s, feats["train"], task.train.fg, mask, evals, seed)
    if task.val is not None:
        thr = tasks_mod.choose_threshold(preds[1], task.val.fg)
    elif task.config.val_slices:  # split=val: the evaluated sections are the validation sections
        thr = tasks_mod.choose_threshold(preds[0], task.test.fg)
    else:
        thr = 0.5
    rec = tasks_mod.scores(task, preds[0], task.test, threshold=thr)
    rec["labelled_pixels"] = int(mask.sum())
    rec["seconds"] = time.perf_counter() - t0
    k = preview_index(task)
    np.save(cache / "results" / f"{key}.preview.npy", (preds[0][k] * 255).astype(np.uint8))
    log.info(
        "%s %s %s %.0f%% seed %d: %s (%.1f s)",
        task.name,
        c.name,
        kind,
        100 * frac,
        seed,
        ", ".join(f"{m} {rec[m]:.3f}" for m in ("f1", "iou")),
        rec["seconds"],
    )
    return rec
