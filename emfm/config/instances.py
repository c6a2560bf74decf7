"""Configs of `emfm instances` (instance segmentation from probabilities or affinities, with
optional parameter tuning) and `emfm evaluate` (segmentation metrics).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emfm.config.common import ConfigError, DistributedConfig, choice

# metric families of emfm.eval.evaluate
EvaluateKind = choice("EvaluateKind", "semantic", "binary", "region", "instance", "warping")
InputKind = choice("InputKind", "auto", "boundary", "affinities")
# the names of emfm.instances.segment.METHODS
InstanceMethod = choice("InstanceMethod", "watershed", "link2d", "agglomeration", "multicut", "mws")
# emfm.instances.link2d.CRITERIA: overlap / smaller segment, or intersection over union
LinkCriterion = choice("LinkCriterion", "fraction", "iou")
# emfm.instances.link2d.METHODS_2D
Link2D = choice("Link2D", "watershed", "agglomeration")
# the names of emfm.instances.tune.METRICS
TuneMetric = choice(
    "TuneMetric",
    "adapted_rand_error",
    "voi",
    "voi_split",
    "voi_merge",
    "cremi_score",
    "instance_f1",
)


@dataclass
class EvaluateConfig:
    """`emfm evaluate pred=PATH gt=PATH`: segmentation metrics of a prediction (TIFF, zarr, N5)."""

    pred: str = ""
    gt: str = ""
    kinds: list[EvaluateKind] = field(
        default_factory=lambda: [EvaluateKind.region, EvaluateKind.instance]
    )
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


def validate_evaluate(cfg: EvaluateConfig) -> EvaluateConfig:
    if not cfg.pred or not cfg.gt:
        raise ConfigError(
            "evaluate needs pred=PATH and gt=PATH (TIFF stack, zarr or N5 label volumes)"
        )
    if "semantic" in cfg.kinds and not cfg.num_classes:
        raise ConfigError("kinds includes 'semantic': give num_classes=N")
    return cfg


@dataclass
class InstancesConfig:
    """`emfm instances input=PROB_ZARR out=LABELS_ZARR method=...`: instance labels from boundary
    probabilities (z y x, or one `channel` of z y x c) or affinities (z y x c, one channel per
    offset), block by block with stitching (emfm.instances)."""

    input: str = ""
    out: str = ""
    method: InstanceMethod = InstanceMethod.watershed
    kind: InputKind = InputKind.auto
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
    # fragments per section; null = auto: per section when the input was predicted by a 2D model
    # (`emfm predict` records it) or its voxels are >= 3x longer in z than in-plane
    two_d: bool | None = None
    # boundary maps of objects on a background (1 - p(object)): voxels above this level are
    # background, label 0; 1.0 = none; null = auto: 0.5 where `emfm predict` recorded objects on a
    # background (center task; a semantic task whose instance class is its positive class, e.g.
    # mitochondria), else none (cells between membranes fill the volume)
    background: float | None = None
    fragment_min_size: int = 0
    agglomeration_threshold: float = 0.5
    beta: float = 0.5
    size_weighted: bool = True
    link_threshold: float = 0.5
    link_criterion: LinkCriterion = LinkCriterion.fraction
    link_2d: Link2D = Link2D.watershed  # link2d's per-section step
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
    # source volume) by `tune_metric`; the best is used for the whole volume
    tune: bool = False
    # the probabilities the validation region is read from; empty = `input`. For a labelled
    # validation volume apart from the one segmented (e.g. `emfm predict` of the training volume's
    # validation sections, while `input` is the test volume)
    tune_input: str = ""
    tune_labels: str = ""
    tune_roi: list[list[int]] | None = None
    tune_metric: TuneMetric = TuneMetric.voi
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
    """instances.tune needs validation labels and a region; grid names are checked."""
    from dataclasses import fields

    if not cfg.tune:
        return
    if not cfg.tune_labels or not cfg.tune_roi:
        raise ConfigError(
            "instances.tune=true needs tune_labels=LABELS (zarr) and "
            "tune_roi=[[z0,z1],[y0,y1],[x0,x1]]"
        )
    if cfg.tune_input and "://" not in cfg.tune_input and not Path(cfg.tune_input).exists():
        raise ConfigError(f"instances.tune_input={cfg.tune_input}: no such volume")
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
        background=cfg.background,
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


def run_instances(cfg: InstancesConfig, input_path: str, out: str, progress=None) -> dict:
    """Segment `input_path` into `out` block by block (emfm.instances.blockwise.instances) with the
    method, parameters and blocks of a validated InstancesConfig, after choosing the parameters on
    validation labels first when `cfg.tune` (the search's record is the result's "tuned")."""
    from emfm.instances.blockwise import instances

    params, tuned = segment_params(cfg), None
    if cfg.tune:
        from emfm.instances.tune import tune_from_volumes_cfg

        params, tuned = tune_from_volumes_cfg(cfg, cfg.tune_input or input_path, params)
    blocks = ("block", "halo", "kind", "channel", "invert", "stitch_threshold", "keep_work")
    res = instances(
        input_path,
        out,
        params,
        work_dir=cfg.work_dir or None,
        progress=progress,
        **{k: getattr(cfg, k) for k in blocks},
    )
    return {**res, "tuned": tuned} if tuned is not None else res
