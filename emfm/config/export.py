"""Configs of dense feature export (`export.*` of `emfm export`) and of `emfm discover` (k-means
over the exported features).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from emfm.config.common import MISSING_PATH, ConfigError, ModelConfig, choice, validate_tiles

# the names of emfm.export.features.OUT_DTYPES
FeatureDType = choice("FeatureDType", "float16", "bfloat16", "float32")
# emfm.export.encode.BLENDS
ExportBlend = choice("ExportBlend", "auto", "cosine", "gaussian", "constant", "none")


@dataclass
class ExportConfig:
    """Dense feature export, block by block over z-slices and in-plane tiles."""

    path: str = MISSING_PATH  # volume to export; empty = bundled sample
    out: str = ""  # zarr output; empty = <run_dir>/features.zarr
    tile: int = 128  # in-plane tile size (pixels), a multiple of the patch size
    margin: int = 32  # context around each tile, dropped on write (pixels)
    dtype: FeatureDType = FeatureDType.float16
    batch_size: int = 8
    # 3D encoders: blocks of block_z sections, read with margin_z sections of context above and
    # below
    block_z: int = 16
    margin_z: int = 4
    # encoder blocks (ViT) / levels (U-Net), concatenated; index `depth` = the final output (e.g.
    # [0, 1, 2, 3, 4]: a 4-level U-Net's hypercolumn and its decoder output); [] = final output
    layers: list[int] = field(default_factory=list)
    # >0: reduce the features to this many principal components (fitted on a sample of blocks)
    pca_k: int = 0
    pca_sample_blocks: int = 16
    roi: list[list[int]] | None = None  # [[z0, z1], [y0, y1], [x0, x1]]; None = whole volume
    prefetch: int = 2  # batches of blocks read ahead of the encoder
    # skip blocks an earlier run of the same export finished; false = start over
    resume: bool = True
    # windows of tile + 2 margin blended over their overlap (cosine | gaussian | constant, no ViT
    # position seams, U-Net group-norm seams) or none (margin dropped); auto = none for a U-Net with
    # a per-pixel norm (exact), else cosine
    blend: ExportBlend = ExportBlend.auto


def validate_export(e: ExportConfig, m: ModelConfig) -> None:
    """Checks of `export.*` for the encoder `m`; raises ConfigError naming the key."""
    validate_tiles(e.tile, e.margin, m, "export")
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
