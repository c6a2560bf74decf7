"""Configs of pretraining (`emfm main|pretrain`): the unlabelled data (volumes, mixtures of
sources, augmentation), and `EmfmConfig`, the top-level config that `emfm
main|pretrain|probe|export` share, with `validate()`, its cross-field checks. The objectives'
configs are in emfm.config.objective.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from emfm.config.common import (
    MISSING_PATH,
    ConfigError,
    RunConfig,
    checkpoint_model,
    resolve_zoo,
    validate_model,
    validate_patch_shape,
    validate_run,
)
from emfm.config.export import ExportConfig, validate_export
from emfm.config.objective import ObjectiveConfig, validate_objective
from emfm.config.probe import BenchmarkConfig, ProbeConfig, validate_probe


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


def validate_data(d: DataConfig) -> DataConfig:
    """Checks of the data section alone (sources, rejection, augmentation); raises ConfigError."""
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
        _validate_source(s, f"data.sources[{i}]")
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
    _validate_augment(d.aug)
    return d


def _validate_source(s: SourceConfig, key: str) -> None:
    """One source of a mixture: its weight, the volume to import it from, its paths and scale."""
    from pathlib import Path

    if s.weight < 0 or s.weight != s.weight:
        raise ConfigError(f"{key}.weight={s.weight}: weights must be non-negative")
    if s.source:
        # a volume already built at `path` needs no source file (a corpus copied to a machine
        # without ../shared); emfm.data.sources.ensure_built checks it was built from a file of
        # that name and from the same sections
        built = bool(s.path) and (Path(s.path) / "zarr.json").exists()
        if not built and not Path(s.source).exists():
            raise ConfigError(
                f"{key}.source={s.source!r}: no such file, and no volume built from it at "
                f"{s.path!r} (the corpus is built from the EM volumes in ../shared/data; set "
                "EMFM_SHARED_DATA_ROOT to where they are, or EMFM_CORPUS_DIR to a built corpus)"
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
    # the path of a source to import is built from it on first use
    for name in ("mask", "labels") if s.source else ("path", "mask", "labels"):
        p = getattr(s, name)
        if p and "://" not in p and not Path(p).exists():
            raise ConfigError(f"{key}.{name}={p!r}: no such file or directory")
    if s.level is not None and s.voxel_size is not None:
        raise ConfigError(f"{key}: give level or voxel_size, not both")
    if s.voxel_size is not None and (len(s.voxel_size) != 3 or min(s.voxel_size) <= 0):
        raise ConfigError(f"{key}.voxel_size={s.voxel_size}: give 3 positive sizes (z, y, x) in nm")


def _validate_augment(a: AugmentConfig) -> None:
    from emfm.data import augment

    for key in ("ops", "view_ops"):
        try:
            augment.check_ops(getattr(a, key), f"data.aug.{key}")
        except ValueError as e:
            raise ConfigError(str(e)) from None
    for key in ("p_blur", "p_elastic", "p_missing", "p_duplicate", "p_shift", "p_section_contrast"):
        if not 0.0 <= getattr(a, key) <= 1.0:
            raise ConfigError(f"data.aug.{key}={getattr(a, key)}: a probability must be in [0, 1]")
    scales = ("brightness", "contrast", "gamma", "noise", "elastic_strength", "section_contrast")
    for key in (*scales, "max_shift"):
        if getattr(a, key) < 0:
            raise ConfigError(f"data.aug.{key}={getattr(a, key)}: must be >= 0")
    if len(a.blur_sigma) != 2 or not 0 <= a.blur_sigma[0] <= a.blur_sigma[1]:
        raise ConfigError(
            f"data.aug.blur_sigma={a.blur_sigma}: give [low, high] with 0 <= low <= high"
        )
    if a.elastic_grid < 2:
        raise ConfigError(f"data.aug.elastic_grid={a.elastic_grid}: must be >= 2")


@dataclass
class EmfmConfig(RunConfig):
    """Top-level config shared by `emfm main|pretrain|probe|export`; `checkpoint` is the run or
    checkpoint directory to load the encoder from (probe, export)."""

    # the chosen objective's dataclass (objective=NAME; emfm.config.objective.OBJECTIVE_CONFIGS)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    # probe benchmark: run dirs, sweep dirs, "random"
    checkpoints: list[str] = field(default_factory=list)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)


def validate(cfg: EmfmConfig) -> EmfmConfig:
    """Cross-field checks; raises ConfigError naming the offending key."""
    cfg.checkpoint = resolve_zoo(cfg.checkpoint, "checkpoint")
    from emfm import zoo

    if cfg.checkpoint and zoo.is_packaged(cfg.checkpoint):  # a zoo entry brings its architecture
        cfg.model = checkpoint_model(cfg.checkpoint)
    m, d = cfg.model, cfg.data
    for c in cfg.checkpoints:  # checked here, resolved (keeping the zoo name) by the benchmark
        resolve_zoo(c, "checkpoints")
    validate_model(m)
    validate_patch_shape(d.patch_shape, m)
    if d.batch_size <= 0:
        raise ConfigError(f"data.batch_size={d.batch_size}: must be positive")
    validate_data(d)
    validate_objective(cfg.objective, m)
    validate_run(cfg)
    validate_probe(cfg.probe, m)
    validate_export(cfg.export, m)
    return cfg
