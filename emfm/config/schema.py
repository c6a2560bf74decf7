"""Typed configuration of every emfm command.

These dataclasses are the single source of truth for what a config may contain. They are
registered in Hydra's ConfigStore (`register()`), so a YAML file or a command-line override with an
unknown key or a value of the wrong type is rejected by Hydra before any compute, naming the key.
`validate()` adds the checks that span several fields. Only `emfm/cli/` imports Hydra; library code
receives these dataclasses (or plain arguments), never a DictConfig.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from emfm.errors import UserError

MISSING_PATH = ""  # empty path = the bundled real EM sample


class ConfigError(UserError):
    """A config value that is well-typed but unusable; the message names the key."""


@dataclass
class ModelConfig:
    """Vision Transformer encoder. `size` picks width/depth/heads from the ViT table
    (emfm.models.vit.SIZES); `width`, `depth`, `heads` override it for custom small models."""

    name: str = "vit"
    size: str = "Ti"
    patch_size: list[int] = field(default_factory=lambda: [8, 8])
    in_channels: int = 1
    width: int | None = None
    depth: int | None = None
    heads: int | None = None
    mlp_ratio: float = 4.0
    num_registers: int = 0
    dtype: str = "float32"  # compute dtype; parameters stay float32
    remat: bool = False
    # U-Net (name=unet; emfm.models.unet): patch_size [1, 1] (2D) or [1, 1, 1] (3D); `widths` per
    # level, else `depth` levels of `width * 2**level` channels; z is pooled into level l only when
    # l >= pool_z_from_level (anisotropic sections are pooled in-plane first).
    widths: list[int] | None = None
    blocks_per_level: int = 1
    pool_z_from_level: int = 1
    norm: str = "group"  # group | layer
    norm_groups: int = 8


@dataclass
class ObjectiveConfig:
    """Self-supervised objective (emfm.objectives.OBJECTIVES). One schema for all objectives; each
    reads the fields it needs. MAE (He et al. 2022): mask ratio, light decoder, norm-pixel loss.
    Teacher-based objectives: `ema_momentum` is the EMA teacher's base momentum."""

    name: str = "mae"
    mask_ratio: float = 0.75
    tube_masking: bool = False
    decoder_width: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    norm_pix_loss: bool = True
    # "" = from norm_pix_loss ("patch" if true, else "none"); or "patch", "image", "none"
    target_norm: str = ""
    # MAE: Gaussian sigma (pixels) smoothing the reconstruction target in plane; 0 = raw pixels
    target_blur: float = 0.0
    ema_momentum: float = 0.996
    # Contrastive objectives (simclr, moco, dino, dense; emfm/objectives/): temperature of the
    # InfoNCE / NT-Xent logits; projector MLP hidden and output widths; MoCo v3 predictor hidden
    # width.
    temperature: float = 0.2
    proj_hidden: int = 512
    proj_dim: int = 128
    pred_hidden: int = 512
    # DINO (Caron et al. 2021): prototypes, teacher / student temperatures, centre momentum, and the
    # local crops made on-device from the two global views (side = local_crop_size * global side,
    # cut from a random square of side local_crop_scale * global side).
    prototypes: int = 1024
    teacher_temp: float = 0.04
    student_temp: float = 0.1
    center_momentum: float = 0.9
    local_crops: int = 2
    local_crop_size: float = 0.5
    local_crop_scale: list[float] = field(default_factory=lambda: [0.25, 0.5])
    # dense: locations sampled per example for pixel / patch-level InfoNCE
    dense_samples: int = 64
    # mim_unet: side of the square in-plane mask patches (pixels)
    mim_patch: int = 8
    # combinations (mae_simclr, mae_dino): weights of [MAE loss, contrastive loss]
    combo_weights: list[float] = field(default_factory=lambda: [1.0, 1.0])


@dataclass
class SourceConfig:
    """One volume of a pretraining mixture (`data.sources`). `path` empty = the bundled sample.
    `level` or `voxel_size` (nm, z y x) picks an OME-Zarr scale; for a plain array `voxel_size`
    overrides missing metadata. `mask`: a volume of the same shape (or coarser by an integer
    factor per axis); patches are drawn only where it is > 0 (see data.min_mask). `labels`: a
    label volume of the same shape that steers sampling (data.min_foreground,
    data.balance_classes)."""

    path: str = MISSING_PATH
    weight: float = 1.0
    level: int | None = None
    voxel_size: list[float] | None = None
    roi: list[list[int]] | None = None  # [[z0, z1], [y0, y1], [x0, x1]]; None = whole volume
    mask: str = ""
    labels: str = ""
    # Built on first use: `source` (a TIFF stack or HDF5 file) is imported into `path` (an OME-Zarr
    # group with `source_levels` scales, each 2x coarser in plane) writing only the sections
    # `source_sections` [start, stop) of it, so sections left out (a benchmark's test sections)
    # are not in the volume and can never be sampled (emfm.data.sources.ensure_built).
    source: str = ""
    source_sections: list[int] | None = None
    source_voxel_size: list[float] | None = None  # nm, z y x
    source_levels: int = 2


@dataclass
class AugmentConfig:
    """Augmentation of pretraining patches (emfm.data.augment), used when data.augment is true.
    `ops`: the single-view pipeline; `view_ops`: each view of two-view (contrastive) objectives.
    Known ops: flip_rot, elastic, sections, blur, intensity, noise (applied in that order)."""

    ops: list[str] = field(default_factory=lambda: ["flip_rot", "intensity", "noise"])
    view_ops: list[str] = field(default_factory=lambda: ["flip_rot", "blur", "intensity", "noise"])
    brightness: float = 0.1  # additive, U(-b, b)
    contrast: float = 0.2  # gain 1 + U(-c, c) around the patch mean
    gamma: float = 0.2  # exponent exp(U(-g, g))
    noise: float = 0.03  # Gaussian noise std ~ U(0, noise)
    # in-plane sigma range (pixels)
    blur_sigma: list[float] = field(default_factory=lambda: [0.0, 1.5])
    p_blur: float = 0.5
    elastic_strength: float = 3.0  # displacement std of the coarse lattice (pixels)
    elastic_grid: int = 4
    p_elastic: float = 0.5
    p_missing: float = 0.02  # per section: zeroed
    p_duplicate: float = 0.02  # per section: a copy of the one before
    p_shift: float = 0.05  # per section: misaligned by up to max_shift pixels
    max_shift: int = 8
    p_section_contrast: float = 0.05  # per section: darker / brighter by up to section_contrast
    section_contrast: float = 0.3


@dataclass
class DataConfig:
    """Unlabelled volume(s) for pretraining. `path` empty = the bundled ISBI 2012 sample; or
    `sources`, a weighted mixture of volumes (then leave `path` and `roi` unset)."""

    path: str = MISSING_PATH
    patch_shape: list[int] = field(default_factory=lambda: [1, 128, 128])  # z, y, x
    batch_size: int = 32
    roi: list[list[int]] | None = None  # [[z0, z1], [y0, y1], [x0, x1]]; None = whole volume
    augment: bool = True
    prefetch: int = 4
    intensity_samples: int = 64  # patches used to estimate mean/std for normalisation
    # >0: redraw patches whose normalised grey-value std is below this (resin, padding)
    min_std: float = 0.0
    # a weighted mixture instead of `path`
    sources: list[SourceConfig] = field(default_factory=list)
    min_mask: float = 0.5  # with source masks: minimum fraction of a patch inside mask > 0
    # with source labels: minimum fraction of non-zero (or balanced-class) labels
    min_foreground: float = 0.0
    # label values given equal shares of each batch
    balance_classes: list[int] = field(default_factory=list)
    max_redraws: int = 8  # rejected patches are redrawn up to this many times, then kept
    aug: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1.5e-4  # base rate for batch 256, scaled by batch/256 (MAE's rule)
    scale_lr_by_batch: bool = True
    weight_decay: float = 0.05
    b1: float = 0.9
    b2: float = 0.95
    warmup_steps: int = 50
    min_lr_ratio: float = 0.0
    clip_norm: float | None = 1.0
    accumulate_steps: int = 1  # gradient accumulation: one optimizer update every N micro-batches
    # <1: layer-wise lr decay for fine-tuning (block i of L gets decay^(L-i))
    layer_decay: float = 1.0
    freeze: list[str] = field(default_factory=list)  # regexes of parameter paths not to train


@dataclass
class TrainerConfig:
    steps: int = 1000
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 0  # 0 = only at the end
    keep_checkpoints: int = 2
    # also keep the checkpoint with the lowest value of this logged metric (e.g. "loss")
    best_metric: str = ""
    progress: bool = True
    # a non-finite loss/gradient: "stop" (name the step, keep the last good checkpoint) or "skip"
    # the batch
    nonfinite: str = "stop"
    tensorboard: bool = True
    # signals that mean "checkpoint now and stop": Slurm via the submitit launcher sends USR2 before
    # the time limit (hydra.launcher.signal_delay_s), some schedulers USR1, and SIGTERM ends any job
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGUSR1", "SIGUSR2", "SIGTERM"])


@dataclass
class MeshConfig:
    """Device mesh: `data` x `fsdp` devices (data=-1: all devices not used by fsdp)."""

    data: int = -1
    fsdp: int = 1
    min_shard_size: int = 16384  # smaller parameters stay replicated


@dataclass
class DistributedConfig:
    """Multi-process runs through jax.distributed (auto-detected on Slurm)."""

    enabled: bool = False
    coordinator_address: str = ""  # host:port of process 0
    num_processes: int = 1
    process_id: int = 0
    cpu_devices: int = 0  # >0: simulate this many CPU devices per process (tests, benchmarks)
    timeout_s: int = 300  # start-up: seconds to wait for every process before a clear error


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
    # token logits to pixels: "bilinear", or "subpixel" (a logit per pixel of each token)
    upsample: str = "bilinear"
    # encoder blocks whose features are concatenated; [] = final output
    blocks: list[int] = field(default_factory=list)
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


@dataclass
class ExportConfig:
    """Dense feature export, block by block over z-slices and in-plane tiles."""

    path: str = MISSING_PATH  # volume to export; empty = bundled sample
    out: str = ""  # zarr output; empty = <run_dir>/features.zarr
    tile: int = 128  # in-plane tile size (pixels), a multiple of the patch size
    margin: int = 32  # context around each tile, dropped on write (pixels)
    dtype: str = "float16"
    batch_size: int = 8
    # 3D encoders: blocks of block_z sections, read with margin_z sections of context above and
    # below
    block_z: int = 16
    margin_z: int = 4
    # encoder blocks (ViT) / levels (U-Net), concatenated; [] = final output
    layers: list[int] = field(default_factory=list)
    # >0: reduce the features to this many principal components (fitted on a sample of blocks)
    pca_k: int = 0
    pca_sample_blocks: int = 16
    roi: list[list[int]] | None = None  # [[z0, z1], [y0, y1], [x0, x1]]; None = whole volume
    prefetch: int = 2  # batches of blocks read ahead of the encoder
    # skip blocks an earlier run of the same export finished; false = start over
    resume: bool = True
    # windows of tile + 2 margin blended over their overlap (cosine | gaussian | constant, no ViT
    # position seams) or none (margin dropped); auto = cosine for a ViT, none for a U-Net
    blend: str = "auto"


@dataclass
class DiscoverConfig:
    """`emfm discover features=PATH`: mini-batch k-means over exported features, cluster map,
    galleries."""

    features: str = ""  # a feature array written by `emfm export`
    image: str = ""  # the image volume for galleries and overview; empty = the export's source
    k: int = 8
    batch_size: int = 4096  # feature vectors per k-means update
    epochs: int = 1  # passes over the features for fitting
    sample_fraction: float = 1.0  # fraction of each block's vectors used for fitting
    examples: int = 12  # gallery crops per cluster
    crop: int = 64  # gallery crop side (image pixels)
    seed: int = 0
    out: str = ""  # cluster label volume; empty = <run_dir>/clusters.zarr
    progress: bool = True
    run_dir: str = "runs/discover"
    # a named run lives in runs/<command>/NAME and resumes when the same command runs again
    name: str = ""
    # continue an interrupted discover of the same job in run_dir; false = start over (a named run:
    # in a fresh directory, runs/discover/NAME_<date>_<time>)
    resume: bool = True


@dataclass
class TaskConfig:
    """One task of the probing benchmark (configs/probe_task/NAME.yaml; emfm.eval.tasks): a labelled
    volume, its split into train / validation / test sections, and the target whose metrics are
    reported."""

    name: str = ""  # defaults to the YAML file's name
    # membranes | neuron_boundaries | mitochondria (emfm.eval.tasks.TARGETS)
    target: str = "membranes"
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
    probes: list[str] = field(default_factory=lambda: ["linear", "mlp", "knn"])
    # of the training pixels
    fractions: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    # encoder blocks concatenated as features; [] = final output
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
    split: str = "test"
    # Feature choices selected per checkpoint on the validation sections: each entry a `blocks` list
    # ([] = the encoder's final output; U-Net levels / ViT blocks otherwise). With two or more,
    # every checkpoint is first probed on the validation sections with each (seed `seeds[0]`, all
    # probes and fractions), the choice with the best mean primary metric is kept, and only it is
    # scored on the test sections. Empty = `blocks` for every checkpoint.
    blocks_choices: list[list[int]] = field(default_factory=list)


@dataclass
class EmfmConfig:
    """Top-level config shared by `emfm main|pretrain|probe|export`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    run_dir: str = "runs/default"
    # a named run lives in runs/<command>/NAME and resumes when the same command runs again
    name: str = ""
    # false: a named run whose directory holds a run already starts in a fresh one
    resume: bool = True
    checkpoint: str = ""  # a run dir or checkpoint dir to load the encoder from (probe/export)
    # probe benchmark: run dirs, sweep dirs, "random"
    checkpoints: list[str] = field(default_factory=list)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)


@dataclass
class EvaluateConfig:
    """`emfm evaluate pred=PATH gt=PATH`: segmentation metrics of a prediction (TIFF, zarr, N5)."""

    pred: str = ""
    gt: str = ""
    kinds: list[str] = field(default_factory=lambda: ["region", "instance"])
    ignore_gt: list[int] = field(default_factory=lambda: [0])
    ignore_pred: list[int] = field(default_factory=list)
    background: int = 0
    num_classes: int | None = None
    ignore_index: int | None = None
    block_z: int | None = None
    run_dir: str = "runs/evaluate"
    # a named run lives in runs/<command>/NAME and resumes when the same command runs again
    name: str = ""
    # false: a named run whose directory holds a run already starts in a fresh one
    resume: bool = True


@dataclass
class InstancesConfig:
    """`emfm instances input=PROB_ZARR out=LABELS_ZARR method=...`: instance labels from boundary
    probabilities (z y x, or one `channel` of z y x c) or affinities (z y x c, one channel per
    offset), block by block with stitching (emfm.instances)."""

    input: str = ""
    out: str = ""
    method: str = "watershed"  # watershed | link2d | agglomeration | multicut | mws
    kind: str = "auto"  # auto | boundary | affinities
    channel: int | None = None  # boundary class of a multi-channel probability volume
    invert: bool = False  # the input is a foreground / same-object probability: use 1 - p
    offsets: list[list[int]] = field(
        default_factory=lambda: [
            [-1, 0, 0],
            [0, -1, 0],
            [0, 0, -1],
            [-3, 0, 0],
            [0, -9, 0],
            [0, 0, -9],
        ]
    )
    threshold: float = 0.5  # boundary level for seeds and fragments
    min_seed: int = 16
    sigma: float = 2.0
    two_d: bool = False
    fragment_min_size: int = 0
    agglomeration_threshold: float = 0.5
    beta: float = 0.5
    size_weighted: bool = True
    link_threshold: float = 0.5
    link_criterion: str = "fraction"
    link_2d: str = "watershed"  # link2d's per-section step: watershed | agglomeration
    link_on_interior: bool = True
    # link2d: one-to-one links only (False chains objects through 2D merges)
    link_mutual_best: bool = True
    link_min_overlap: int = 1  # link2d: voxels a link needs at least
    repulsive_stride: int = 1
    block: list[int] = field(default_factory=lambda: [64, 256, 256])
    halo: list[int] = field(default_factory=lambda: [8, 32, 32])
    stitch_threshold: float = 0.5
    work_dir: str = ""  # scratch for resumable blocks; empty = OUT.work beside the output
    keep_work: bool = False
    # processes split the blocks
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    run_dir: str = "runs/instances"
    # a named run lives in runs/<command>/NAME and resumes when the same command runs again
    name: str = ""
    # false: a named run whose directory holds a run already starts in a fresh one
    resume: bool = True
    # choose the parameters on labelled validation data first (emfm.instances.tune): every
    # combination of `tune_grid` (parameter -> values, e.g.
    # `+tune_grid.threshold=[0.3,0.5] +tune_grid.min_seed=[16]`; empty = the method's default grid)
    # is applied to `tune_roi` of the input and scored against `tune_labels` (aligned with the
    # source volume) by `tune_metric` (adapted_rand_error | voi | cremi_score | instance_f1); the
    # best is used for the whole volume
    tune: bool = False
    tune_labels: str = ""
    tune_roi: list[list[int]] | None = None
    tune_metric: str = "voi"
    # numbers, or e.g. link_criterion=[fraction,iou]
    tune_grid: dict[str, list[Any]] = field(default_factory=dict)
    tune_per_section: bool = False  # score sections separately and average (2D ground truth)
    # label ids not scored (boundary, unlabelled)
    tune_ignore: list[int] = field(default_factory=lambda: [0])


def validate_instances(cfg: InstancesConfig) -> InstancesConfig:
    if not cfg.input or not cfg.out:
        raise ConfigError(
            "instances needs input=PATH (probability or affinity zarr) and out=PATH (label zarr)"
        )
    if cfg.kind not in ("auto", "boundary", "affinities"):
        raise ConfigError(f"kind={cfg.kind!r}: use auto, boundary or affinities")
    for key in ("block", "halo"):
        v = getattr(cfg, key)
        if len(v) != 3 or any(x < 0 for x in v) or (key == "block" and any(x == 0 for x in v)):
            raise ConfigError(f"{key}={v}: give 3 sizes (z, y, x), block positive, halo >= 0")
    if any(h > b for h, b in zip(cfg.halo, cfg.block)):
        raise ConfigError(f"halo={cfg.halo} exceeds block={cfg.block}")
    if not 0.0 < cfg.stitch_threshold <= 1.0:
        raise ConfigError(f"stitch_threshold={cfg.stitch_threshold}: must be in (0, 1]")
    try:
        segment_params(cfg).check()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    validate_tune(cfg)
    return cfg


def validate_tune(cfg: InstancesConfig) -> None:
    """instances.tune needs validation labels, a region and a known metric; grid names are
    checked."""
    from dataclasses import fields

    from emfm.instances.tune import METRICS

    if not cfg.tune:
        return
    if not cfg.tune_labels or not cfg.tune_roi:
        raise ConfigError(
            "instances.tune=true needs tune_labels=LABELS (zarr) and "
            "tune_roi=[[z0,z1],[y0,y1],[x0,x1]]"
        )
    if cfg.tune_metric not in METRICS:
        raise ConfigError(f"tune_metric={cfg.tune_metric!r}: choose one of {', '.join(METRICS)}")
    known = {f.name for f in fields(segment_params(cfg))}
    grid = cfg.tune_grid or {}
    bad = sorted(set(grid) - known)
    if bad or any(not v for v in grid.values()):
        raise ConfigError(
            f"tune_grid={dict(grid)}: parameters {bad or 'with no values'}; known: "
            f"{', '.join(sorted(known))}"
        )


def segment_params(cfg: InstancesConfig):
    """The library's SegmentParams of an InstancesConfig."""
    from emfm.instances.segment import SegmentParams

    return SegmentParams(
        method=cfg.method,
        offsets=tuple(tuple(o) for o in cfg.offsets),
        threshold=cfg.threshold,
        min_seed=cfg.min_seed,
        sigma=cfg.sigma,
        two_d=cfg.two_d,
        fragment_min_size=cfg.fragment_min_size,
        agglomeration_threshold=cfg.agglomeration_threshold,
        beta=cfg.beta,
        size_weighted=cfg.size_weighted,
        link_threshold=cfg.link_threshold,
        link_criterion=cfg.link_criterion,
        link_2d=cfg.link_2d,
        link_on_interior=cfg.link_on_interior,
        repulsive_stride=cfg.repulsive_stride,
        link_mutual_best=cfg.link_mutual_best,
        link_min_overlap=cfg.link_min_overlap,
    )


def validate_discover(cfg: DiscoverConfig) -> DiscoverConfig:
    if not cfg.features:
        raise ConfigError("discover needs features=PATH (a feature array written by emfm export)")
    if cfg.k < 2 or cfg.batch_size < cfg.k or cfg.epochs < 1 or cfg.examples < 1 or cfg.crop < 4:
        raise ConfigError(
            f"discover: k={cfg.k} (>= 2), batch_size={cfg.batch_size} (>= k), epochs={cfg.epochs} "
            f"(>= 1), examples={cfg.examples} (>= 1), crop={cfg.crop} (>= 4)"
        )
    if not 0.0 < cfg.sample_fraction <= 1.0:
        raise ConfigError(f"sample_fraction={cfg.sample_fraction}: must be in (0, 1]")
    return cfg


EVALUATE_KINDS = ("semantic", "binary", "region", "instance", "warping")


def validate_evaluate(cfg: EvaluateConfig) -> EvaluateConfig:
    if not cfg.pred or not cfg.gt:
        raise ConfigError(
            "evaluate needs pred=PATH and gt=PATH (TIFF stack, zarr or N5 label volumes)"
        )
    bad = [k for k in cfg.kinds if k not in EVALUATE_KINDS]
    if bad:
        raise ConfigError(f"kinds={bad}: known metric kinds are {', '.join(EVALUATE_KINDS)}")
    if "semantic" in cfg.kinds and not cfg.num_classes:
        raise ConfigError("kinds includes 'semantic': give num_classes=N")
    return cfg


def _check_fresh(cfg) -> None:
    """resume=false with an explicit run directory that already holds checkpoints: say so rather
    than resume (or overwrite) it."""
    from pathlib import Path

    ck = Path(cfg.run_dir) / "checkpoints"
    if not cfg.resume and ck.is_dir() and any(p.name.isdigit() for p in ck.iterdir()):
        raise ConfigError(
            f"resume=false but {cfg.run_dir} already holds checkpoints: give another "
            "hydra.run.dir (or name=), or drop resume=false to continue that run"
        )


def validate_signals(names: list[str]) -> None:
    import signal

    for n in names:
        if not isinstance(getattr(signal, str(n), None), signal.Signals) or str(n).startswith(
            "SIG_"
        ):
            raise ConfigError(
                f"trainer.preempt_signals: {n!r} is not a signal name of this system "
                "(e.g. SIGUSR1, SIGUSR2, SIGTERM)"
            )
        if n in ("SIGKILL", "SIGSTOP"):
            raise ConfigError(f"trainer.preempt_signals: {n} cannot be caught")


def validate_data(d: DataConfig) -> DataConfig:
    """Checks of the data section alone (sources, rejection, augmentation); raises ConfigError."""
    from pathlib import Path

    from emfm.data import augment

    if d.sources and (d.path or d.roi is not None):
        raise ConfigError(
            "data.sources is set: leave data.path and data.roi unset (give each source its own "
            "path and roi)"
        )
    if not d.sources and not d.path and d.roi is None:
        from emfm.data.bundled import PRETRAIN_ROI

        # the bundled sample's pretraining sections; a user's path: all
        d.roi = [list(r) for r in PRETRAIN_ROI]
    for i, s in enumerate(d.sources):
        key = f"data.sources[{i}]"
        if s.weight < 0 or s.weight != s.weight:
            raise ConfigError(f"{key}.weight={s.weight}: weights must be non-negative")
        if s.source:
            if not Path(s.source).exists():
                raise ConfigError(
                    f"{key}.source={s.source!r}: no such file (the corpus is built from the EM "
                    "volumes in ../shared/data; set EMFM_SHARED_DATA_ROOT to where they are)"
                )
            if not s.path:
                raise ConfigError(f"{key}: a source to import needs a path to build it at")
            ss = s.source_sections
            if ss is not None and (len(ss) != 2 or not 0 <= ss[0] < ss[1]):
                raise ConfigError(
                    f"{key}.source_sections={ss}: give [start, stop) with 0 <= start < stop"
                )
            if s.source_levels < 1:
                raise ConfigError(f"{key}.source_levels={s.source_levels}: must be >= 1")
        for name in ("path", "mask", "labels"):
            p = getattr(s, name)
            if name == "path" and s.source:
                continue  # built from the source on first use
            if p and "://" not in p and not Path(p).exists():
                raise ConfigError(f"{key}.{name}={p!r}: no such file or directory")
        if s.level is not None and s.voxel_size is not None:
            raise ConfigError(f"{key}: give level or voxel_size, not both")
        if s.voxel_size is not None and (len(s.voxel_size) != 3 or min(s.voxel_size) <= 0):
            raise ConfigError(
                f"{key}.voxel_size={s.voxel_size}: give 3 positive sizes (z, y, x) in nm"
            )
    if d.sources and sum(s.weight for s in d.sources) <= 0:
        raise ConfigError(
            f"data.sources: weights {[s.weight for s in d.sources]} have zero total weight"
        )
    if not 0.0 < d.min_mask <= 1.0:
        raise ConfigError(f"data.min_mask={d.min_mask}: must be in (0, 1]")
    if not 0.0 <= d.min_foreground <= 1.0:
        raise ConfigError(f"data.min_foreground={d.min_foreground}: must be in [0, 1]")
    if (d.min_foreground > 0 or d.balance_classes) and not any(s.labels for s in d.sources):
        raise ConfigError(
            "data.min_foreground / data.balance_classes need label volumes: set "
            "data.sources[i].labels"
        )
    if d.max_redraws < 0:
        raise ConfigError(f"data.max_redraws={d.max_redraws}: must be >= 0")
    a = d.aug
    for key in ("ops", "view_ops"):
        try:
            augment.check_ops(getattr(a, key), f"data.aug.{key}")
        except ValueError as e:
            raise ConfigError(str(e)) from None
    for key in ("p_blur", "p_elastic", "p_missing", "p_duplicate", "p_shift", "p_section_contrast"):
        if not 0.0 <= getattr(a, key) <= 1.0:
            raise ConfigError(f"data.aug.{key}={getattr(a, key)}: a probability must be in [0, 1]")
    for key in (
        "brightness",
        "contrast",
        "gamma",
        "noise",
        "elastic_strength",
        "section_contrast",
        "max_shift",
    ):
        if getattr(a, key) < 0:
            raise ConfigError(f"data.aug.{key}={getattr(a, key)}: must be >= 0")
    if len(a.blur_sigma) != 2 or not 0 <= a.blur_sigma[0] <= a.blur_sigma[1]:
        raise ConfigError(
            f"data.aug.blur_sigma={a.blur_sigma}: give [low, high] with 0 <= low <= high"
        )
    if a.elastic_grid < 2:
        raise ConfigError(f"data.aug.elastic_grid={a.elastic_grid}: must be >= 2")
    return d


def resolve_zoo(spec: str, key: str) -> str:
    """`zoo:NAME` -> the packaged checkpoint's run directory (emfm.zoo); an unknown name is a
    ConfigError naming the key and listing the zoo."""
    from emfm import zoo

    try:
        return zoo.resolve(spec)
    except zoo.ZooError as e:
        raise ConfigError(f"{key}={spec}: {e}") from None


def unet_pool(m: ModelConfig) -> int:
    """In-plane pooling of a U-Net config (2^(levels - 1)); 1 for other encoders."""
    if m.name != "unet":
        return 1
    return 2 ** ((len(m.widths) if m.widths else (m.depth or 4)) - 1)


def validate(cfg: EmfmConfig) -> EmfmConfig:
    """Cross-field checks; raises ConfigError naming the offending key."""
    m, d = cfg.model, cfg.data
    cfg.checkpoint = resolve_zoo(cfg.checkpoint, "checkpoint")
    for c in cfg.checkpoints:  # checked here, resolved (keeping the zoo name) by the benchmark
        resolve_zoo(c, "checkpoints")
    from emfm import models

    if m.name not in models.ENCODERS:
        raise ConfigError(
            f"model.name={m.name!r}: known encoders are {', '.join(sorted(models.ENCODERS))}"
        )
    if len(m.patch_size) not in (2, 3):
        raise ConfigError(f"model.patch_size={m.patch_size}: give 2 (y, x) or 3 (z, y, x) sizes")
    if any(p <= 0 for p in m.patch_size):
        raise ConfigError(f"model.patch_size={m.patch_size}: sizes must be positive")
    if m.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"model.dtype={m.dtype!r}: use float32, bfloat16 or float16")
    if len(d.patch_shape) != 3 or any(s <= 0 for s in d.patch_shape):
        raise ConfigError(f"data.patch_shape={d.patch_shape}: give 3 positive sizes (z, y, x)")
    spatial = d.patch_shape[1:] if len(m.patch_size) == 2 else d.patch_shape
    if len(m.patch_size) == 2 and d.patch_shape[0] != 1:
        raise ConfigError(
            f"data.patch_shape={d.patch_shape}: a 2D model (model.patch_size={m.patch_size}) "
            "needs patches of depth 1"
        )
    for s, p in zip(spatial, m.patch_size):
        if s % p:
            raise ConfigError(
                f"data.patch_shape={d.patch_shape} is not divisible by "
                f"model.patch_size={m.patch_size}"
            )
    pool = unet_pool(m)
    if pool > 1 and any(s % pool for s in d.patch_shape[1:]):
        raise ConfigError(
            f"data.patch_shape={d.patch_shape}: the U-Net's {len(m.widths or []) or m.depth or 4} "
            f"levels pool in-plane by {pool}; y and x must be multiples of it"
        )
    if d.batch_size <= 0:
        raise ConfigError(f"data.batch_size={d.batch_size}: must be positive")
    validate_data(d)
    from emfm import objectives

    try:
        objectives.get(cfg.objective.name)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    o = cfg.objective
    if (o.name == "mae" or o.name.startswith("mae_")) and m.name != "vit":
        raise ConfigError(
            f"objective.name={o.name!r} masks ViT tokens: use a ViT model (model.name={m.name!r}); "
            "for the U-Net use objective=mim_unet"
        )
    if o.name == "mim_unet" and m.name != "unet":
        raise ConfigError(f"objective.name=mim_unet needs model.name=unet (got {m.name!r})")
    if m.name == "unet" and any(p != 1 for p in m.patch_size):
        raise ConfigError(
            f"model.patch_size={m.patch_size}: the U-Net works per pixel, use [1, 1] or [1, 1, 1]"
        )
    if len(o.combo_weights) != 2:
        raise ConfigError(
            f"objective.combo_weights={o.combo_weights}: give [mae_weight, contrastive_weight]"
        )
    if o.temperature <= 0 or o.teacher_temp <= 0 or o.student_temp <= 0:
        raise ConfigError("objective.temperature, teacher_temp and student_temp must be positive")
    if cfg.objective.target_norm not in ("", "patch", "image", "none"):
        raise ConfigError(
            f"objective.target_norm={cfg.objective.target_norm!r}: use patch, image or none"
        )
    if cfg.objective.target_blur < 0:
        raise ConfigError(
            f"objective.target_blur={cfg.objective.target_blur}: a Gaussian sigma in pixels, >= 0"
        )
    lo_ok = (
        cfg.objective.mask_ratio >= 0.0
        if cfg.objective.name == "dino_dense"
        else cfg.objective.mask_ratio > 0.0
    )
    if not (lo_ok and cfg.objective.mask_ratio < 1.0):
        interval = "[0, 1)" if cfg.objective.name == "dino_dense" else "(0, 1)"
        raise ConfigError(f"objective.mask_ratio={cfg.objective.mask_ratio}: must be in {interval}")
    if cfg.trainer.nonfinite not in ("stop", "skip"):
        raise ConfigError(f"trainer.nonfinite={cfg.trainer.nonfinite!r}: use stop or skip")
    if cfg.optim.accumulate_steps < 1:
        raise ConfigError(f"optim.accumulate_steps={cfg.optim.accumulate_steps}: must be >= 1")
    if not 0.0 < cfg.optim.layer_decay <= 1.0:
        raise ConfigError(f"optim.layer_decay={cfg.optim.layer_decay}: must be in (0, 1]")
    if cfg.trainer.steps <= 0:
        raise ConfigError(f"trainer.steps={cfg.trainer.steps}: must be positive")
    validate_signals(cfg.trainer.preempt_signals)
    _check_fresh(cfg)
    if cfg.probe.upsample not in ("bilinear", "subpixel"):
        raise ConfigError(f"probe.upsample={cfg.probe.upsample!r}: use bilinear or subpixel")
    if cfg.probe.zoo:  # checked here; the probe resolves it and labels its row with the name given
        resolve_zoo(cfg.probe.zoo, "probe.zoo")
    for key in ("train_slices", "test_slices") + (("val_slices",) if cfg.probe.val_slices else ()):
        s = getattr(cfg.probe, key)
        if len(s) != 2 or s[0] >= s[1] or s[0] < 0:
            raise ConfigError(f"probe.{key}={s}: give [start, stop) with 0 <= start < stop")
    e = cfg.export
    # windows align with patches (ViT) or the pooling (U-Net)
    p = max(m.patch_size[-1], unet_pool(m))
    if cfg.probe.tile <= 0 or cfg.probe.tile % p or cfg.probe.margin < 0 or cfg.probe.margin % p:
        raise ConfigError(
            f"probe.tile={cfg.probe.tile}, probe.margin={cfg.probe.margin}: must be multiples of "
            f"the patch size or U-Net pooling {p}"
        )
    pc = cfg.probe
    if pc.random_seeds < 1:
        raise ConfigError(
            f"probe.random_seeds={pc.random_seeds}: need at least 1 random-init encoder"
        )
    if (
        not pc.cell_thresholds
        or not pc.cell_min_seeds
        or not pc.cell_sigmas
        or any(not 0.0 < t < 1.0 for t in pc.cell_thresholds)
        or min(pc.cell_min_seeds) < 1
        or min(pc.cell_sigmas) < 0
    ):
        raise ConfigError(
            f"probe.cell_thresholds={pc.cell_thresholds} (each in (0, 1)), probe.cell_min_seeds="
            f"{pc.cell_min_seeds} (each >= 1), probe.cell_sigmas={pc.cell_sigmas} (each >= 0): "
            "give at least one value each"
        )
    if cfg.probe.embed and m.name != "vit":
        raise ConfigError(
            f"probe.embed=true takes a ViT's patch embedding; model.name={m.name!r} has none"
        )
    if e.tile <= 0 or e.tile % p or e.margin < 0 or e.margin % p:
        raise ConfigError(
            f"export.tile={e.tile}, export.margin={e.margin}: must be multiples of the patch size "
            f"or U-Net pooling {p}"
        )
    if e.dtype not in ("float16", "bfloat16", "float32"):
        raise ConfigError(f"export.dtype={e.dtype!r}: use float16, bfloat16 or float32")
    if e.block_z <= 0 or e.margin_z < 0 or e.batch_size <= 0 or e.prefetch < 0:
        raise ConfigError(
            f"export.block_z={e.block_z}, margin_z={e.margin_z}, batch_size={e.batch_size}, "
            f"prefetch={e.prefetch}: block_z and batch_size must be positive, the others >= 0"
        )
    if e.pca_k < 0 or e.pca_sample_blocks <= 0:
        raise ConfigError(
            f"export.pca_k={e.pca_k}, export.pca_sample_blocks={e.pca_sample_blocks}: "
            "pca_k >= 0 (0 = no reduction), pca_sample_blocks > 0"
        )
    return cfg


def run_dir_for(root: str, command: str, name: str = "", resume: bool | str = True) -> str:
    """The run directory of a command (`hydra.run.dir` / `hydra.sweep.dir` through the
    `emfm_run_dir` resolver): `ROOT/COMMAND/<date>_<time>` for an unnamed run; `ROOT/COMMAND/NAME`
    for a named one, so that running the same command again resumes it; with resume=false a named
    directory that already holds a run is left as it is and the new run starts in
    `ROOT/COMMAND/NAME_<date>_<time>`."""
    import datetime
    from pathlib import Path

    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    name = str(name or "").strip()
    if not name:
        return f"{root}/{command}/{stamp}"
    if "/" in name or name in (".", ".."):
        raise ConfigError(f"name={name!r}: a run name is one directory name (no '/')")
    d = Path(root) / command / name
    if str(resume).lower() in ("false", "0", "no") and d.is_dir() and any(d.iterdir()):
        return f"{d}_{stamp}"
    return str(d)


def register() -> None:
    """Register the schema with Hydra's ConfigStore (called by the CLI only) and the `emfm_run_dir`
    resolver of the run directories."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("emfm_run_dir", run_dir_for, use_cache=True, replace=True)

    cs = ConfigStore.instance()
    cs.store(name="emfm_schema", node=EmfmConfig)
    cs.store(name="evaluate_schema", node=EvaluateConfig)
    cs.store(name="instances_schema", node=InstancesConfig)
    cs.store(name="discover_schema", node=DiscoverConfig)
    cs.store(name="finetune_schema", node=FinetuneConfig)


def compose(
    config_name: str = "main",
    overrides: list[str] | None = None,
    *,
    run_dir: str | None = None,
    config_dir: str | None = None,
) -> EmfmConfig | FinetuneConfig:
    """Compose `configs/<config_name>.yaml` with overrides, as the CLI does, for notebooks and
    tests."""

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    register()
    from emfm.config.paths import config_dir as default_config_dir

    cdir = config_dir or default_config_dir()
    extra = [f"run_dir={run_dir}"] if run_dir else ["run_dir=runs/notebook"]
    with initialize_config_dir(config_dir=cdir, version_base=None, job_name="compose"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides or []) + extra)
    obj = OmegaConf.to_object(cfg)
    if isinstance(obj, FinetuneConfig):  # finetune / predict
        return validate_finetune(obj, command=config_name)
    return validate(obj)


# ---------------------------------------------------------------------------------------------
# Segmentation: `emfm finetune` (heads, targets, losses, learning regimes) and `emfm predict`.


@dataclass
class SegDataConfig:
    """Labelled volume(s) for fine-tuning. Empty paths = the bundled ISBI sample and its membranes.
    `train_roi` bounds the training patches; `label_fraction` < 1 keeps labels on only the first
    fraction of its sections (the rest count as unlabelled: semi-supervised regimes use them)."""

    path: str = MISSING_PATH
    labels: str = MISSING_PATH
    train_roi: list[list[int]] | None = None  # [[z0, z1], [y0, y1], [x0, x1]]; None = whole volume
    # held-out region for the end-of-run evaluation; None = none
    test_roi: list[list[int]] | None = None
    label_fraction: float = 1.0
    patch_shape: list[int] = field(default_factory=lambda: [1, 128, 128])
    batch_size: int = 8
    augment: bool = True
    prefetch: int = 2
    intensity_samples: int = 32
    min_foreground: float = 0.0


@dataclass
class SegTaskConfig:
    """What the network predicts (emfm.finetune.targets). `kind`: semantic (classes), boundary
    (instance boundaries, + optional distance transform), affinity (`offsets`), center (foreground +
    centre heatmap + offsets to the centre, for blob-like organelles). `label_type`: the label
    volume holds classes (`class_values[i]` = raw value of class i; [] = raw values are class ids)
    or instances (0 = background / boundary). Instances of class labels are the connected components
    of class `instance_class`. `ignore_label` (raw value) marks unlabelled voxels."""

    kind: str = "semantic"
    num_classes: int = 2
    label_type: str = "classes"
    class_values: list[int] = field(default_factory=list)
    instance_class: int = 1
    ignore_label: int = -1
    distance: bool = False
    offsets: list[list[int]] = field(
        default_factory=lambda: [[0, -1, 0], [0, 0, -1], [0, -4, 0], [0, 0, -4]]
    )
    sigma: float = 4.0
    positive_class: int = 1  # class scored as foreground (F1 / IoU) at evaluation


@dataclass
class HeadConfig:
    name: str = "unetr"  # unetr | progressive (ViT), unet (U-Net's own decoder)
    width: int = 32
    blocks: list[int] = field(default_factory=list)  # ViT blocks fused by UNETR; [] = evenly spaced


@dataclass
class LossConfig:
    terms: list[str] = field(default_factory=lambda: ["ce", "dice"])  # ce | dice | focal
    weights: list[float] = field(default_factory=list)  # per term; [] = all 1
    class_weights: list[float] = field(default_factory=list)  # per class; [] = none
    balance: bool = False  # weight classes by inverse frequency in each batch
    focal_gamma: float = 2.0
    aux_weight: float = 1.0  # distance / centre / offset regression terms


@dataclass
class RegimeConfig:
    """Learning regime (configs/regime/). init: scratch | pretrained (`checkpoint=RUN_DIR`);
    encoder: finetune | frozen | partial (`frozen_blocks` first blocks / levels frozen), with
    `layer_decay` (ViT blocks); `reinit_decoder` (U-Net) starts the decoder afresh. semi: none |
    mean_teacher | fixmatch, unlabelled patches per labelled = `unlabelled_ratio`. cluster: kmeans |
    gmm (unsupervised: no training)."""

    name: str = "supervised"
    init: str = "scratch"
    encoder: str = "finetune"
    frozen_blocks: int = 2
    layer_decay: float = 1.0
    # U-Net from a checkpoint: keep the pretrained encoder levels, fresh decoder
    reinit_decoder: bool = False
    # shrink and perturb (Ash & Adams 2020) of a pretrained start: every encoder parameter becomes
    # shrink * pretrained + perturb * fresh init (trainer.seed); 1.0 / 0.0 = the checkpoint as is.
    # With init=scratch a second random network stands in for the pretrained one (the control).
    shrink: float = 1.0
    perturb: float = 0.0
    semi: str = "none"
    unlabelled_ratio: int = 1
    consistency_weight: float = 1.0
    ema_momentum: float = 0.99
    threshold: float = 0.9
    cluster: str = "none"
    clusters: int = 2
    cluster_samples: int = 20000


@dataclass
class PredictConfig:
    """Blockwise inference: windows of `window` voxels (z, y, x) overlapping by `overlap`, blended
    with a `blend` window (cosine | gaussian | constant); output written and resumed per `chunk`."""

    path: str = MISSING_PATH
    out: str = ""  # zarr; empty = <run_dir>/predictions.zarr
    roi: list[list[int]] | None = None
    window: list[int] = field(default_factory=lambda: [1, 128, 128])
    overlap: list[int] = field(default_factory=lambda: [0, 32, 32])
    chunk: list[int] = field(default_factory=lambda: [1, 256, 256])
    blend: str = "cosine"
    batch_size: int = 4
    dtype: str = "float16"
    resume: bool = True
    # instance labels from the written probabilities, block by block with stitching
    # (emfm.instances): "" = probabilities only, else watershed | link2d | agglomeration | multicut
    # | mws; the method's parameters, block, halo and boundary channel are `instances.*` (as in
    # `emfm instances`)
    instances: str = ""


@dataclass
class FinetuneConfig:
    """Top-level config of `emfm finetune` and `emfm predict`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: SegDataConfig = field(default_factory=SegDataConfig)
    task: SegTaskConfig = field(default_factory=SegTaskConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    regime: RegimeConfig = field(default_factory=RegimeConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    # predict.instances' parameters
    instances: InstancesConfig = field(default_factory=InstancesConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    run_dir: str = "runs/finetune"
    # a named run lives in runs/<command>/NAME and resumes when the same command runs again
    name: str = ""
    # false: a named run whose directory holds a run already starts in a fresh one
    resume: bool = True
    # finetune: pretrained encoder run (regime.init=pretrained); predict: the finetune run
    checkpoint: str = ""


TASK_KINDS = ("semantic", "boundary", "affinity", "center")


def r_init_pretrained(cfg) -> bool:
    return cfg.regime.init == "pretrained"


def validate_finetune(cfg: FinetuneConfig, *, command: str = "finetune") -> FinetuneConfig:
    """Cross-field checks of `emfm finetune` / `emfm predict`; raises ConfigError naming the key."""
    t, r, h, d, lo = cfg.task, cfg.regime, cfg.head, cfg.data, cfg.loss
    cfg.checkpoint = resolve_zoo(cfg.checkpoint, "checkpoint")
    if command == "finetune" and r_init_pretrained(cfg) and cfg.checkpoint:
        # a pretrained encoder brings its architecture: model=... need not repeat it
        from emfm.train import checkpoint as ckpt

        try:
            cfg.model = ModelConfig(
                **ckpt.read_meta(ckpt.find_checkpoint_dir(cfg.checkpoint))["model"]
            )
        except (KeyError, TypeError) as e:
            raise ConfigError(
                f"checkpoint={cfg.checkpoint}: no usable model record ({e})"
            ) from None
    if command == "predict" and cfg.predict.instances:
        from dataclasses import replace

        ic = replace(
            cfg.instances, method=cfg.predict.instances, input="predictions", out="instances"
        )
        try:
            validate_instances(ic)
        except ConfigError as e:
            raise ConfigError(
                f"predict.instances={cfg.predict.instances!r} / instances.*: {e}"
            ) from None
    if t.kind not in TASK_KINDS:
        raise ConfigError(f"task.kind={t.kind!r}: use one of {', '.join(TASK_KINDS)}")
    if t.label_type not in ("classes", "instances"):
        raise ConfigError(f"task.label_type={t.label_type!r}: use classes or instances")
    if t.num_classes < 2:
        raise ConfigError(f"task.num_classes={t.num_classes}: at least 2")
    if t.class_values and len(t.class_values) != t.num_classes:
        raise ConfigError(
            f"task.class_values={t.class_values}: give one raw value per class ({t.num_classes})"
        )
    if t.kind == "semantic" and t.label_type != "classes":
        raise ConfigError("task.kind=semantic needs task.label_type=classes")
    nd = len(cfg.model.patch_size)
    if any(len(o) != 3 for o in t.offsets) or any(o[0] != 0 for o in t.offsets if nd == 2):
        raise ConfigError(
            f"task.offsets={t.offsets}: give [dz, dy, dx] per offset (dz = 0 for 2D models)"
        )
    if t.kind == "affinity" and not t.offsets:
        raise ConfigError("task.kind=affinity needs task.offsets")
    if h.name not in ("unetr", "progressive", "unet"):
        raise ConfigError(f"head.name={h.name!r}: use unetr, progressive or unet")
    if (cfg.model.name == "unet") != (h.name == "unet"):
        raise ConfigError(
            f"head.name={h.name!r} does not fit model.name={cfg.model.name!r}: "
            "head=unet for the U-Net, head=unetr or progressive for a ViT"
        )
    for term in lo.terms:
        if term not in ("ce", "dice", "focal"):
            raise ConfigError(f"loss.terms has {term!r}: use ce, dice, focal")
    if lo.weights and len(lo.weights) != len(lo.terms):
        raise ConfigError(
            f"loss.weights={lo.weights}: one weight per term of loss.terms={lo.terms}"
        )
    if lo.class_weights and len(lo.class_weights) != t.num_classes:
        raise ConfigError(
            f"loss.class_weights={lo.class_weights}: one weight per class ({t.num_classes})"
        )
    if r.init not in ("scratch", "pretrained"):
        raise ConfigError(f"regime.init={r.init!r}: scratch or pretrained")
    if r.init == "pretrained" and not cfg.checkpoint and command == "finetune":
        raise ConfigError("regime.init=pretrained needs checkpoint=RUN_DIR (a pretraining run)")
    if r.encoder not in ("finetune", "frozen", "partial"):
        raise ConfigError(f"regime.encoder={r.encoder!r}: finetune, frozen or partial")
    if r.semi not in ("none", "mean_teacher", "fixmatch"):
        raise ConfigError(f"regime.semi={r.semi!r}: none, mean_teacher or fixmatch")
    if r.cluster not in ("none", "kmeans", "gmm"):
        raise ConfigError(f"regime.cluster={r.cluster!r}: none, kmeans or gmm")
    if r.unlabelled_ratio < 1:
        raise ConfigError(f"regime.unlabelled_ratio={r.unlabelled_ratio}: at least 1")
    if not 0.0 < r.layer_decay <= 1.0:
        raise ConfigError(f"regime.layer_decay={r.layer_decay}: must be in (0, 1]")
    if not (0.0 < r.shrink <= 1.0 and 0.0 <= r.perturb <= 1.0):
        raise ConfigError(
            f"regime.shrink={r.shrink} must be in (0, 1] and regime.perturb={r.perturb} in [0, 1]"
        )
    if not 0.0 < d.label_fraction <= 1.0:
        raise ConfigError(f"data.label_fraction={d.label_fraction}: must be in (0, 1]")
    if len(d.patch_shape) != 3 or (nd == 2 and d.patch_shape[0] != 1):
        raise ConfigError(f"data.patch_shape={d.patch_shape}: give z, y, x (z = 1 for a 2D model)")
    spatial = d.patch_shape[1:] if nd == 2 else d.patch_shape
    for s, p in zip(spatial, cfg.model.patch_size):
        if s % p:
            raise ConfigError(
                f"data.patch_shape={d.patch_shape} is not divisible by "
                f"model.patch_size={cfg.model.patch_size}"
            )
    pr = cfg.predict
    if pr.blend not in ("cosine", "gaussian", "constant"):
        raise ConfigError(f"predict.blend={pr.blend!r}: cosine, gaussian or constant")
    if len(pr.window) != 3 or len(pr.overlap) != 3 or len(pr.chunk) != 3:
        raise ConfigError(
            "predict.window, predict.overlap and predict.chunk take 3 sizes (z, y, x)"
        )
    if any(o < 0 or 2 * o >= w for o, w in zip(pr.overlap, pr.window) if w > 1) or any(
        o != 0 for o, w in zip(pr.overlap, pr.window) if w == 1
    ):
        raise ConfigError(
            f"predict.overlap={pr.overlap}: each in [0, window/2) (window {pr.window})"
        )
    if pr.dtype not in ("float16", "float32"):
        raise ConfigError(f"predict.dtype={pr.dtype!r}: float16 or float32")
    if cfg.trainer.steps <= 0:
        raise ConfigError(f"trainer.steps={cfg.trainer.steps}: must be positive")
    validate_signals(cfg.trainer.preempt_signals)
    _check_fresh(cfg)
    return cfg
