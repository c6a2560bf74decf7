"""Configs of probing: the main job's linear probe (`probe.*`), the tasks of the probing benchmark
(configs/probe_task/) and the benchmark itself (`emfm probe checkpoints=[...]`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from emfm.config.common import (
    MISSING_PATH,
    ConfigError,
    ModelConfig,
    choice,
    resolve_zoo,
    validate_tiles,
)

# emfm.eval.linear_probe.UPSAMPLING
Upsample = choice("Upsample", "bilinear", "subpixel")
# the names of emfm.eval.tasks.TARGETS
ProbeTarget = choice("ProbeTarget", "membranes", "neuron_boundaries", "mitochondria")
# emfm.eval.probes.PROBES
Probe = choice("Probe", "linear", "mlp", "knn")
# emfm.eval.tasks.SPLITS
Split = choice("Split", "test", "val")


@dataclass
class ProbeConfig:
    """Linear probe on frozen features for the main job (membranes of the bundled sample)."""

    path: str = MISSING_PATH  # image volume; empty = bundled sample
    labels: str = MISSING_PATH  # label volume; empty = bundled sample membranes
    positive_label: int = 1  # label value of the foreground class (membrane)
    train_slices: list[int] = field(default_factory=lambda: [0, 16])
    # validation sections: every choice (decision threshold, cell parameters) is made on them; the
    # test sections are scored once. [] = choose on the training sections (no validation split)
    val_slices: list[int] = field(default_factory=lambda: [16, 20])
    test_slices: list[int] = field(default_factory=lambda: [20, 30])
    # a zoo checkpoint (zoo:NAME) or run directory probed beside the checkpoint and random init
    zoo: str = ""
    steps: int = 300
    lr: float = 0.05
    weight_decay: float = 1e-4
    compare_random: bool = True
    seed: int = 0
    # token logits to pixels: bilinear, or subpixel (a logit per pixel of each token)
    upsample: Upsample = Upsample.bilinear
    # encoder blocks whose features are concatenated; [] = final output
    blocks: list[int] = field(default_factory=list)
    # >0: each training step sees a random window of this many pixels per side of its sections
    # (a multiple of the pixels per token), not whole sections; 0 = whole sections
    crop: int = 0
    # ViT: also the patch embedding (tokens before the first block), concatenated first
    embed: bool = False
    tile: int = 128  # sections are encoded in tiles of this many pixels ...
    margin: int = 32  # ... each with this much context on every side (dropped), as in export
    class_balance: bool = True
    # random-init encoders (seeds seed+1000, +1001, ...); the table gives their mean and std
    random_seeds: int = 1
    # Region scores: watershed parameters chosen per encoder on the training sections (lowest
    # adapted Rand error) from this grid; one value each = fixed post-processing.
    # seed: interior p < threshold
    cell_thresholds: list[float] = field(default_factory=lambda: [0.5])
    cell_min_seeds: list[int] = field(default_factory=lambda: [16])  # smallest seed (pixels)
    # Gaussian smoothing of the map (pixels)
    cell_sigmas: list[float] = field(default_factory=lambda: [0.0])
    # cell_thresholds are quantiles of each section's own map (calibration-free seeds)
    cell_rank: bool = False
    # then join adjacent cells whose border's mean membrane probability is below this (0: never)
    cell_merges: list[float] = field(default_factory=lambda: [0.0])


def check_apart(splits: list[tuple[str, list[int]]], where: str = "", key: str = "") -> None:
    """Section ranges [start, stop) named by their keys (written `key` + name, the message
    starting with `where`) must not overlap: the sections a probe is trained on, chosen on and
    scored on are apart."""
    for i, (ka, a) in enumerate(splits):
        for kb, b in splits[i + 1 :]:
            if a[0] < b[1] and b[0] < a[1]:
                raise ConfigError(
                    f"{where}{key}{kb}={list(b)} overlaps {key}{ka}={list(a)}: the sections a "
                    "probe is trained on, chosen on and scored on must be apart"
                )


def validate_probe(pc: ProbeConfig, m: ModelConfig) -> None:
    """Checks of the main job's probe (`probe.*`) for the encoder `m`; raises ConfigError."""
    if pc.zoo:  # checked here; the probe resolves it and labels its row with the name given
        resolve_zoo(pc.zoo, "probe.zoo")
    for key in ("train_slices", "test_slices") + (("val_slices",) if pc.val_slices else ()):
        s = getattr(pc, key)
        if len(s) != 2 or s[0] >= s[1] or s[0] < 0:
            raise ConfigError(f"probe.{key}={s}: give [start, stop) with 0 <= start < stop")
    splits = [("train_slices", pc.train_slices), ("val_slices", pc.val_slices)]
    splits = [x for x in splits if x[1]] + [("test_slices", pc.test_slices)]
    check_apart(splits, key="probe.")
    validate_tiles(pc.tile, pc.margin, m, "probe")
    if pc.random_seeds < 1:
        raise ConfigError(
            f"probe.random_seeds={pc.random_seeds}: need at least 1 random-init encoder"
        )
    if pc.crop < 0:
        raise ConfigError(f"probe.crop={pc.crop}: must be >= 0 (0 = whole sections)")
    if (
        not pc.cell_thresholds
        or not pc.cell_min_seeds
        or not pc.cell_sigmas
        or not pc.cell_merges
        or any(not 0.0 < t < 1.0 for t in pc.cell_thresholds)
        or any(not 0.0 <= m < 1.0 for m in pc.cell_merges)
        or min(pc.cell_min_seeds) < 1
        or min(pc.cell_sigmas) < 0
    ):
        raise ConfigError(
            f"probe.cell_thresholds={pc.cell_thresholds} (each in (0, 1)), probe.cell_min_seeds="
            f"{pc.cell_min_seeds} (each >= 1), probe.cell_sigmas={pc.cell_sigmas} (each >= 0), "
            f"probe.cell_merges={pc.cell_merges} (each in [0, 1), 0 = no merging): "
            "give at least one value each"
        )
    if pc.embed and m.name != "vit":
        raise ConfigError(
            f"probe.embed=true takes a ViT's patch embedding; model.name={m.name!r} has none"
        )


@dataclass
class TaskConfig:
    """One task of the probing benchmark (configs/probe_task/NAME.yaml; emfm.eval.tasks): a labelled
    volume, its split into train / validation / test sections, and the target whose metrics are
    reported."""

    name: str = ""  # defaults to the YAML file's name
    target: ProbeTarget = ProbeTarget.membranes
    image: str = MISSING_PATH  # TIFF stack (z, y, x), zarr v2/v3 or N5; empty = bundled sample
    labels: str = MISSING_PATH  # same shape as image; empty = bundled sample membranes
    positive_label: int = 1  # label value of the probed class (membrane, boundary, mitochondrion)
    train_slices: list[int] = field(default_factory=lambda: [0, 20])  # [start, stop) sections
    val_slices: list[int] = field(default_factory=list)  # [] = none (decision threshold 0.5)
    test_slices: list[int] = field(default_factory=lambda: [20, 30])
    test_image: str = ""  # a separate test volume (test_slices index it); "" = the training volume
    test_labels: str = ""
    # in-plane [[y0, y1], [x0, x1]], applied before downsampling
    crop: list[list[int]] | None = None
    downsample: int = 1  # in-plane factor (1, 2, 4, ...): image by block mean, labels by block mode
    # predicted instances smaller than this (voxels) are dropped before matching
    min_instance_size: int = 0


@dataclass
class BenchmarkConfig:
    """`emfm probe checkpoints=[...]`: every task x probe x label fraction x seed x checkpoint
    (emfm.eval.benchmark). Results are cached in `cache_dir`, keyed by checkpoint content."""

    # names in configs/probe_task/ or paths of task YAML files
    tasks: list[str] = field(default_factory=list)
    probes: list[Probe] = field(default_factory=lambda: [Probe.linear, Probe.mlp, Probe.knn])
    # of the training pixels
    fractions: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    # encoder blocks (ViT) / levels (U-Net) concatenated as features, index `depth` = the final
    # output (e.g. [0, 1, 2, 3, 4]: a 4-level U-Net's hypercolumn and its decoder output); [] =
    # final output
    blocks: list[int] = field(default_factory=list)
    steps: int = 200  # linear / MLP optimiser steps
    batch_tokens: int = 1024  # tokens (each with its pixels' labels) per step
    lr: float = 0.01
    weight_decay: float = 1e-4
    hidden: int = 256  # MLP hidden width
    knn_k: int = 20
    knn_references: int = 3000  # labelled pixels sampled as kNN references
    knn_stride: int = 8  # kNN queries on a grid of this pixel stride, upsampled bilinearly
    tile: int = 128  # encoding tiles (pixels, in-plane) and their context margin
    margin: int = 32
    batch_size: int = 8  # tiles per encoder call
    random_seed: int = 1000  # initialisation seed of the random-init baseline
    # true: seed k of a random-init row also draws its own network (random_seed + k), so the row's
    # spread is that of random initialisation, not only of the probe and the labelled pixels
    random_per_seed: bool = True
    cache_dir: str = "runs/probe_cache"
    cache_features: bool = True
    # the feature cache (cache_dir/features) is kept under this size: after each write the least
    # recently used files are removed (results, a few kB each, are always kept)
    cache_max_gb: float = 10.0
    figures: bool = True
    # "test": probes are scored on each task's test sections (a reported row); "val": on its
    # validation sections, for choosing settings and checkpoints (the test sections are then never
    # read)
    split: Split = Split.test
    # Feature choices selected per checkpoint on the validation sections: each entry a `blocks` list
    # ([] = the encoder's final output; U-Net levels / ViT blocks otherwise, `depth` = the final
    # output). With two or more,
    # every checkpoint is first probed on the validation sections with each (seed `seeds[0]`, all
    # probes and fractions), the choice with the best mean primary metric is kept, and only it is
    # scored on the test sections. Empty = `blocks` for every checkpoint.
    blocks_choices: list[list[int]] = field(default_factory=list)
