"""The probing benchmark: rank any number of checkpoints on every task with every probe.

`run_benchmark(tasks, checkpoints, bench, run_dir)` runs each task x probe x label fraction x seed x
checkpoint (emfm.eval.tasks, emfm.eval.probes) and writes one table `benchmark.{csv,md,json}`
(mean and standard deviation over seeds), label-efficiency curves and prediction overlays
(`figures/`). Checkpoints: `random` (the other checkpoints' architecture(s), or `model` when there
is none, freshly initialised), a run directory (its latest checkpoint), or a sweep directory (each
run below it).

Every result is cached in `bench.cache_dir` under a hash of (checkpoint content, task settings and
files, probe settings, label fraction, seed), so a re-run with an added checkpoint computes only
the new entries; encoder features are cached per (checkpoint, task) too. Sections are normalised
per task (0.5 / 99.5 grey-value percentiles of the training sections), the same for all checkpoints.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from emfm.config.common import ConfigError, ModelConfig
from emfm.config.probe import BenchmarkConfig
from emfm.eval import probes as probes_mod
from emfm.eval import tasks as tasks_mod
from emfm.eval.probe import normalise
from emfm.train import checkpoint as ckpt

log = logging.getLogger("emfm")

RANDOM = "random"


@dataclass
class Checkpoint:
    name: str
    identity: str  # content hash
    model: dict  # ModelConfig fields
    run_dir: str = ""  # "" = random init
    seed: int = 0
    _encoder: object = field(default=None, repr=False)

    def encoder(self):
        if self._encoder is None:
            from emfm.train.state import build_encoder, load_encoder

            if self.run_dir:
                self._encoder, _ = load_encoder(self.run_dir)
            else:
                self._encoder = build_encoder(ModelConfig(**self.model), seed=self.seed)
        return self._encoder


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _latest_step_dir(run: Path) -> Path:
    steps = sorted(
        (int(p.name), p) for p in (run / "checkpoints").iterdir() if p.name.isdigit() and p.is_dir()
    )
    if not steps:
        raise ckpt.CheckpointError(
            f"checkpoint {run}: no finished checkpoint in {run / 'checkpoints'}"
        )
    return steps[-1][1]


def content_hash(run: Path) -> str:
    """sha256 of the files of a run's latest checkpoint (parameters, optimiser state, record)."""
    d = _latest_step_dir(run)
    h = hashlib.sha256()
    for f in sorted(p for p in d.rglob("*") if p.is_file() and p.name != "commit_success.txt"):
        h.update(str(f.relative_to(d)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:20]


def _runs_below(p: Path) -> list[Path]:
    return sorted({c.parent for c in p.rglob("checkpoints") if c.is_dir()})


def expand_checkpoints(
    entries: list[str], model: ModelConfig, random_seed: int = 1000
) -> list[Checkpoint]:
    """`random`, run directories and sweep directories -> checkpoints, each named uniquely."""
    if not entries:
        raise ConfigError("checkpoints=[]: give run directories, sweep directories and/or random")
    from emfm import zoo

    runs: list[tuple[str, Path]] = []
    for e in entries:
        if e == RANDOM:
            continue
        if zoo.is_zoo(e):  # a packaged checkpoint, named as given
            try:
                runs.append((e, Path(zoo.resolve(e))))
            except zoo.ZooError as err:
                raise ConfigError(f"checkpoints: {err}") from None
            continue
        p = Path(e)
        if not p.exists():
            raise FileNotFoundError(f"checkpoint path not found: {p}")
        if (p / "checkpoints").is_dir() or p.name == "checkpoints":
            p = p if (p / "checkpoints").is_dir() else p.parent
            runs.append((p.name, p))
            continue
        below = _runs_below(p)
        if not below:
            raise ckpt.CheckpointError(
                f"checkpoint {p} is not a run (no checkpoints/ folder) and no run lies below it"
            )
        runs += [(f"{p.name}/{r.relative_to(p)}", r) for r in below]
    out, seen = [], set()
    for name, run in runs:
        meta = ckpt.read_meta(str(run))
        if "model" not in meta:
            raise ckpt.CheckpointError(f"checkpoint in {run} has no model record")
        base, k = name, 1
        while name in seen:
            k += 1
            name = f"{base}~{k}"
        seen.add(name)
        try:
            # defaults filled in: comparable
            model_dict = dataclasses.asdict(ModelConfig(**meta["model"]))
        except TypeError as e:
            raise ckpt.CheckpointError(
                f"checkpoint in {run} has an unusable model record: {e}"
            ) from None
        out.append(
            Checkpoint(name=name, identity=content_hash(run), model=model_dict, run_dir=str(run))
        )
    if RANDOM in entries:
        archs = {json.dumps(c.model, sort_keys=True): c.model for c in out} or {
            "": dataclasses.asdict(model)
        }
        for m in archs.values():
            name = (
                RANDOM
                if len(archs) == 1
                else f"{RANDOM}:{out[[c.model for c in out].index(m)].name}"
            )
            out.append(
                Checkpoint(
                    name=name, identity=_hash("random", m, random_seed), model=m, seed=random_seed
                )
            )
    return out


# ---- features
# -------------------------------------------------------------------------------------


def encode_3d(
    encoder,
    images: np.ndarray,
    *,
    tile: int,
    margin: int,
    batch_size: int = 4,
    blocks: tuple[int, ...] = (),
) -> np.ndarray:
    """Per-section features `[n, gy, gx, d]` of a 3D encoder: the stack is encoded in 3D blocks of
    4 token layers x `tile`^2 pixels with one token layer / `margin` pixels of mirrored context;
    section z takes the features of the token layer that contains it."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from emfm.export.features import layer_index

    spec = encoder.spec
    pz, py, px = spec.patch_size
    if tile % py or margin % py or tile % px or margin % px:
        raise ConfigError(
            f"benchmark.tile={tile}, margin={margin}: must be multiples of the patch size "
            f"{spec.patch_size}"
        )
    core, ctx = (4 * pz, tile, tile), (pz, margin, margin)
    n, ny, nx = images.shape
    grid = [-(-s // c) * c for s, c in zip((n, ny, nx), core)]
    pad = [(c, g - s + c) for s, g, c in zip((n, ny, nx), grid, ctx)]
    vol = np.pad(images, pad, mode="symmetric")
    blocks = tuple(layer_index(b, spec.depth) for b in blocks)
    graphdef, params = nnx.split(encoder)
    t0 = [c // p for c, p in zip(ctx, (pz, py, px))]
    tn = [c // p for c, p in zip(core, (pz, py, px))]

    @jax.jit
    def fwd(prm, x):
        collect = tuple(b for b in blocks if b != spec.depth)
        _, aux = nnx.merge(graphdef, prm)(x[..., None], return_blocks=collect)
        m = aux["patch_map"]
        if blocks:
            aux["blocks"][spec.depth] = m
            m = jnp.concatenate(
                [aux["blocks"][b].reshape(m.shape[:-1] + (-1,)) for b in blocks], axis=-1
            )
        return m[:, t0[0] : t0[0] + tn[0], t0[1] : t0[1] + tn[1], t0[2] : t0[2] + tn[2]]

    origins = [
        (z, y, x)
        for z in range(0, grid[0], core[0])
        for y in range(0, grid[1], core[1])
        for x in range(0, grid[2], core[2])
    ]
    width = spec.width * max(1, len(blocks))
    out = np.zeros((grid[0] // pz, grid[1] // py, grid[2] // px, width), np.float32)
    win = [c + 2 * m for c, m in zip(core, ctx)]
    for i in range(0, len(origins), batch_size):
        chunk = origins[i : i + batch_size]
        w = np.stack([vol[z : z + win[0], y : y + win[1], x : x + win[2]] for z, y, x in chunk])
        if len(w) < batch_size:
            w = np.concatenate([w, np.zeros((batch_size - len(w),) + w.shape[1:], w.dtype)])
        f = np.asarray(fwd(params, jnp.asarray(w, jnp.float32)))
        for (z, y, x), fz in zip(chunk, f):
            out[z // pz : z // pz + tn[0], y // py : y // py + tn[1], x // px : x // px + tn[2]] = (
                fz
            )
    gy, gx = -(-ny // py), -(-nx // px)
    return out[np.arange(n) // pz, :gy, :gx]


def encode(encoder, images: np.ndarray, bench: BenchmarkConfig) -> np.ndarray:
    """Dense features `[n, gy, gx, d]` of sections `[n, y, x]` in [0, 1] (2D or 3D encoder)."""
    from emfm.export.features import encode_sections

    if encoder.spec.ndim == 3:
        return encode_3d(
            encoder, images, tile=bench.tile, margin=bench.margin, blocks=tuple(bench.blocks)
        )
    return encode_sections(
        encoder,
        images,
        tile=bench.tile,
        margin=bench.margin,
        batch_size=bench.batch_size,
        blocks=tuple(bench.blocks),
    )


def grey_range(task: tasks_mod.TaskData) -> tuple[float, float]:
    lo, hi = np.percentile(task.train.images, [0.5, 99.5])
    return (float(lo), float(hi)) if hi > lo else (float(lo), float(lo) + 1.0)


class FeatureStore:
    """Features per (checkpoint, task), computed on first use and kept on disk (float16)."""

    def __init__(self, root: Path | None, bench: BenchmarkConfig):
        self.root, self.bench, self.mem = root, bench, {}

    def get(
        self, c: Checkpoint, task: tasks_mod.TaskData, task_id: str, blocks=None
    ) -> dict[str, np.ndarray]:
        blocks = list(self.bench.blocks if blocks is None else blocks)
        key = _hash(c.identity, task_id, blocks, self.bench.tile, self.bench.margin)
        if key in self.mem:
            return self.mem[key]
        path = self.root / f"{key}.npz" if self.root else None
        if path is not None and path.exists():
            with np.load(path) as z:
                feats = {k: z[k].astype(np.float32) for k in z.files}
            os.utime(path)  # most recently used: kept longest by `prune_cache`
        else:
            rng = grey_range(task)
            splits = {"train": task.train, "test": task.test} | (
                {"val": task.val} if task.val else {}
            )
            t0 = time.perf_counter()
            # rounded to float16 as stored, so a result does not depend on whether features were
            # cached
            bench = dataclasses.replace(self.bench, blocks=blocks)
            feats = {
                k: encode(c.encoder(), normalise(s.images, rng), bench)
                .astype(np.float16)
                .astype(np.float32)
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
                np.savez(tmp, **{k: v.astype(np.float16) for k, v in feats.items()})
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


def _preview_index(task: tasks_mod.TaskData) -> int:
    fg = task.test.fg.reshape(len(task.test.fg), -1).mean(1)
    return int(np.argmax(fg > 0) if task.target == "mitochondria" else len(fg) // 2)


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
                        key = _hash(
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


def seeded_random(c: Checkpoint, seed: int) -> Checkpoint:
    """Seed `seed`'s network of a random-init checkpoint (its own initialisation); others unchanged.
    Seed 0 is the checkpoint itself, so the cache of a run with one network stays valid."""
    if c.run_dir or seed == 0:
        return c
    return Checkpoint(
        name=c.name,
        identity=_hash("random", c.model, c.seed + seed),
        model=c.model,
        seed=c.seed + seed,
    )


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
    k = _preview_index(task)
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


def aggregate(records: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds of every (task, probe, fraction, checkpoint)."""
    groups: dict = {}
    for r in records:
        groups.setdefault((r["task"], r["probe"], r["fraction"], r["checkpoint"]), []).append(r)
    rows = []
    for (task, kind, frac, name), rs in groups.items():
        row = {"task": task, "probe": kind, "fraction": frac, "checkpoint": name, "seeds": len(rs)}
        for m in sorted(
            {
                k
                for r in rs
                for k, v in r.items()
                if isinstance(v, (int, float))
                and k not in ("fraction", "seed", "seconds", "labelled_pixels")
            }
        ):
            v = np.array([r[m] for r in rs], float)
            row[f"{m}_mean"], row[f"{m}_std"] = (
                float(v.mean()),
                float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            )
        rows.append(row)
    return rows


def split_words(split: str) -> str:
    return (
        "test sections"
        if split == "test"
        else "validation sections (model selection; test sections unread)"
    )


def write_tables(
    run_dir: Path, rows: list[dict], loaded: list, split: str = "test", picks: dict | None = None
) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    cols = ["task", "probe", "fraction", "checkpoint", "seeds"]
    cols += sorted({k for r in rows for k in r} - set(cols))
    with open(run_dir / "benchmark.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    lines = [
        f"Probing benchmark: mean ± std (ddof 1) over seeds, on the {split_words(split)} of each "
        "task.",
        "",
    ]
    if picks:
        lines += [
            "Features chosen per checkpoint on the validation sections (blocks; [] = final "
            "output): " + ", ".join(f"{n} {b}" for n, b in picks.items()),
            "",
        ]
    for t in loaded:
        ms = [
            m
            for m in tasks_mod.METRICS[tasks_mod.TARGETS[t.target]["kind"]]
            if m not in ("threshold", "n_gt")
        ]
        lines += [
            f"### {t.name} ({t.target})",
            "",
            "| probe | labels | checkpoint | " + " | ".join(ms) + " |",
            "|---" * (3 + len(ms)) + "|",
        ]
        for r in (r for r in rows if r["task"] == t.name):
            vals = [
                f"{r[m + '_mean']:.3f} ± {r[m + '_std']:.3f}" if m + "_mean" in r else ""
                for m in ms
            ]
            lines.append(
                f"| {r['probe']} | {100 * r['fraction']:g} % | {r['checkpoint']} | "
                + " | ".join(vals)
                + " |"
            )
        lines.append("")
    (run_dir / "benchmark.md").write_text("\n".join(lines))
    print("\n".join(lines))


def figures(
    run_dir: Path, rows, loaded, checkpoints, bench: BenchmarkConfig, records, cache: Path
) -> None:
    from emfm.eval.figures import _plt

    plt = _plt()
    fig_dir = run_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    for t in loaded:
        metric = tasks_mod.TARGETS[t.target]["primary"]
        fig, axes = plt.subplots(
            1, len(bench.probes), figsize=(4 * len(bench.probes), 3.4), squeeze=False
        )
        for ax, kind in zip(axes[0], bench.probes):
            for c in checkpoints:
                rs = sorted(
                    (
                        r
                        for r in rows
                        if (r["task"], r["probe"], r["checkpoint"]) == (t.name, kind, c.name)
                    ),
                    key=lambda r: r["fraction"],
                )
                ax.errorbar(
                    [100 * r["fraction"] for r in rs],
                    [r[metric + "_mean"] for r in rs],
                    yerr=[r[metric + "_std"] for r in rs],
                    marker="o",
                    capsize=3,
                    label=c.name,
                )
            ax.set_xscale("log")
            ax.set_xlabel("training labels (%)")
            ax.set_ylabel(f"test {metric}")
            ax.set_title(f"{t.name}: {kind}")
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(fig_dir / f"label_efficiency_{t.name}.png", dpi=90)
        plt.close(fig)
        # overlays: the largest label fraction, first seed, one test section
        frac, seed = max(bench.fractions), bench.seeds[0]
        k = _preview_index(t)
        ny, nx = t.test.images.shape[1:]
        y0, x0 = max(0, ny // 2 - 128), max(0, nx // 2 - 128)
        win = (slice(y0, y0 + 256), slice(x0, x0 + 256))  # the central 256 x 256 pixels
        cols = len(checkpoints) + 1
        fig, axes = plt.subplots(
            len(bench.probes), cols, figsize=(2.6 * cols, 2.6 * len(bench.probes)), squeeze=False
        )
        for i, kind in enumerate(bench.probes):
            axes[i][0].imshow(t.test.images[k][win], cmap="gray")
            axes[i][0].contour(t.test.fg[k][win], levels=[0.5], colors="lime", linewidths=0.5)
            axes[i][0].set_title("image + label" if i == 0 else "", fontsize=9)
            axes[i][0].set_ylabel(kind)
            for j, c in enumerate(checkpoints, start=1):
                rec = next(
                    r
                    for r in records
                    if (r["task"], r["probe"], r["checkpoint"], r["fraction"], r["seed"])
                    == (t.name, kind, c.name, frac, seed)
                )
                p = cache / "results" / f"{rec['key']}.preview.npy"
                axes[i][j].imshow(t.test.images[k][win], cmap="gray")
                if p.exists():
                    axes[i][j].imshow(
                        np.ma.masked_less(np.load(p)[win] / 255.0, rec["threshold"]),
                        cmap="autumn",
                        alpha=0.6,
                        vmin=0,
                        vmax=1,
                    )
                axes[i][j].set_title(f"{c.name}\nF1 {rec['f1']:.3f}", fontsize=8)
        for ax in axes.ravel():
            ax.set_xticks([])
            ax.set_yticks([])
        fig.tight_layout()
        fig.savefig(fig_dir / f"overlay_{t.name}.png", dpi=72)
        plt.close(fig)
