"""Configs of segmentation: `emfm finetune` (labelled data, heads, targets, losses, learning
regimes) and `emfm predict` (blockwise inference, optional instance labels).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from emfm.config.common import (
    MISSING_PATH,
    ConfigError,
    RunConfig,
    checkpoint_model,
    choice,
    resolve_zoo,
    validate_model,
    validate_patch_shape,
    validate_run,
    validate_tiles,
)
from emfm.config.instances import InstanceMethod, InstancesConfig, validate_instances

TaskKind = choice("TaskKind", "semantic", "boundary", "affinity", "center")
LabelType = choice("LabelType", "classes", "instances")
HeadName = choice("HeadName", "unetr", "progressive", "unet")
LossTerm = choice("LossTerm", "ce", "dice", "focal")
Init = choice("Init", "scratch", "pretrained")
EncoderRegime = choice("EncoderRegime", "finetune", "frozen", "partial")
Semi = choice("Semi", "none", "mean_teacher", "fixmatch")
Cluster = choice("Cluster", "none", "kmeans", "gmm")
Blend = choice("Blend", "cosine", "gaussian", "constant")
ProbDType = choice("ProbDType", "float16", "float32")
TTA = choice("TTA", "none", "flips", "dihedral")
# predict.instances: none (probabilities only) or an instance method of `emfm instances`
PredictInstances = choice("PredictInstances", "none", *(m.value for m in InstanceMethod))


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

    kind: TaskKind = TaskKind.semantic
    num_classes: int = 2
    label_type: LabelType = LabelType.classes
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
    name: HeadName = HeadName.unetr  # unetr | progressive (ViT), unet (U-Net's own decoder)
    width: int = 32
    blocks: list[int] = field(default_factory=list)  # ViT blocks fused by UNETR; [] = evenly spaced


@dataclass
class LossConfig:
    terms: list[LossTerm] = field(default_factory=lambda: [LossTerm.ce, LossTerm.dice])
    weights: list[float] = field(default_factory=list)  # per term; [] = all 1
    class_weights: list[float] = field(default_factory=list)  # per class; [] = none
    balance: bool = False  # weight classes by inverse frequency in each batch
    focal_gamma: float = 2.0
    aux_weight: float = 1.0  # distance / centre / offset regression terms


@dataclass
class RegimeConfig:
    """Learning regime (configs/regime/). init: scratch | pretrained (`checkpoint=RUN_DIR`);
    encoder: finetune | frozen | partial (`frozen_blocks` first blocks / levels frozen), with
    `layer_decay` (ViT blocks; U-Net stages from input to output), held for the first
    `frozen_steps` updates (LP-FT); `reinit_decoder` (U-Net) starts the decoder afresh. semi: none |
    mean_teacher | fixmatch, unlabelled patches per labelled = `unlabelled_ratio`. cluster: kmeans |
    gmm (unsupervised: no training; frozen features encoded in `tile` windows with `margin`)."""

    name: str = "supervised"
    init: Init = Init.scratch
    encoder: EncoderRegime = EncoderRegime.finetune
    frozen_blocks: int = 2
    layer_decay: float = 1.0
    # U-Net from a checkpoint: keep the pretrained encoder levels, fresh decoder
    reinit_decoder: bool = False
    # shrink and perturb (Ash & Adams 2020) of a pretrained start: every encoder parameter becomes
    # shrink * pretrained + perturb * fresh init (trainer.seed); 1.0 / 0.0 = the checkpoint as is.
    # With init=scratch a second random network stands in for the pretrained one (the control).
    shrink: float = 1.0
    perturb: float = 0.0
    # linear probing, then fine-tuning (LP-FT, Kumar et al. 2022): the encoder is held for the
    # first `frozen_steps` optimizer updates while the decoder and head fit to it, then all train
    frozen_steps: int = 0
    semi: Semi = Semi.none
    unlabelled_ratio: int = 1
    consistency_weight: float = 1.0
    ema_momentum: float = 0.99
    threshold: float = 0.9
    cluster: Cluster = Cluster.none
    clusters: int = 2
    cluster_samples: int = 20000
    # clustering: sections encoded in tiles of `tile` pixels, each with `margin` pixels of context
    # (dropped; a ViT's windows blended), as in the probe and export; multiples of the patch size
    # or U-Net pooling. A tile larger than the sections is cut to them.
    tile: int = 128
    margin: int = 32


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
    blend: Blend = Blend.cosine
    batch_size: int = 4
    dtype: ProbDType = ProbDType.float16
    resume: bool = True
    # test-time augmentation (emfm.finetune.tta): none | flips (4 windows for a 2D model, 8 for a
    # 3D one) | dihedral (flips and y <-> x: 8 / 16; square windows in-plane); the mean is written
    tta: TTA = TTA.none
    # instance labels from the written probabilities, block by block with stitching
    # (emfm.instances): none = probabilities only, else the method (watershed, link2d,
    # agglomeration, multicut or mws); its parameters, block, halo and boundary channel are
    # `instances.*` (as in `emfm instances`)
    instances: PredictInstances = PredictInstances.none


@dataclass
class FinetuneConfig(RunConfig):
    """Top-level config of `emfm finetune` and `emfm predict`; `checkpoint` is, for finetune, the
    pretrained encoder's run (regime.init=pretrained), for predict the finetune run."""

    run_dir: str = "runs/finetune"
    data: SegDataConfig = field(default_factory=SegDataConfig)
    task: SegTaskConfig = field(default_factory=SegTaskConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    regime: RegimeConfig = field(default_factory=RegimeConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    # predict.instances' parameters
    instances: InstancesConfig = field(default_factory=InstancesConfig)


def r_init_pretrained(cfg) -> bool:
    return cfg.regime.init == "pretrained"


def _rois(d: SegDataConfig) -> None:
    """configs/finetune.yaml's regions are the bundled sample's (sections 0-19 to train on, 20-29
    held out, 384 x 384 pixels): on a volume of the user's (`data.path`) they are dropped unless
    given anew (the whole volume, no held-out score). A held-out region that overlaps the training
    one is an error."""
    from emfm.data import bundled

    if d.path:
        if d.train_roi == bundled.FINETUNE_TRAIN_ROI:
            d.train_roi = None
        if d.test_roi == bundled.FINETUNE_TEST_ROI:
            d.test_roi = None
    if d.test_roi is None:
        return
    if d.train_roi is None:
        raise ConfigError(
            f"data.test_roi={d.test_roi} is held out, but data.train_roi is unset (the whole "
            "volume): set data.train_roi to the region to train on"
        )
    if len(d.train_roi) == len(d.test_roi) and all(
        a[0] < b[1] and b[0] < a[1] for a, b in zip(d.train_roi, d.test_roi)
    ):
        raise ConfigError(
            f"data.test_roi={d.test_roi} overlaps data.train_roi={d.train_roi}: the held-out "
            "score needs voxels the model was not trained on"
        )


def validate_finetune(cfg: FinetuneConfig, *, command: str = "finetune") -> FinetuneConfig:
    """Cross-field checks of `emfm finetune` / `emfm predict`; raises ConfigError naming the key."""
    cfg.checkpoint = resolve_zoo(cfg.checkpoint, "checkpoint")
    if command == "finetune":
        _rois(cfg.data)
    if command == "finetune" and r_init_pretrained(cfg):
        if not cfg.checkpoint:
            raise ConfigError("regime.init=pretrained needs checkpoint=RUN_DIR (a pretraining run)")
        cfg.model = checkpoint_model(cfg.checkpoint)
    elif command == "finetune" and cfg.checkpoint:
        # e.g. regime=mean_teacher (init: scratch) with checkpoint=zoo:NAME: the checkpoint would be
        # ignored without a word and the run start from random init
        raise ConfigError(
            f"checkpoint={cfg.checkpoint} is given but regime.init=scratch (regime="
            f"{cfg.regime.name} starts from random init): add regime.init=pretrained to start "
            "from the checkpoint, or leave checkpoint= out"
        )
    if command == "predict" and cfg.predict.instances != "none":
        from dataclasses import replace

        method = InstanceMethod(cfg.predict.instances)
        ic = replace(cfg.instances, method=method, input="predictions", out="instances")
        try:
            validate_instances(ic)
        except ConfigError as e:
            raise ConfigError(
                f"predict.instances={cfg.predict.instances!r} / instances.*: {e}"
            ) from None
    _validate_task(cfg.task, len(cfg.model.patch_size))
    h, lo, r = cfg.head, cfg.loss, cfg.regime
    if (cfg.model.name == "unet") != (h.name == "unet"):
        raise ConfigError(
            f"head.name={h.name!r} does not fit model.name={cfg.model.name!r}: "
            "head=unet for the U-Net, head=unetr or progressive for a ViT"
        )
    if lo.weights and len(lo.weights) != len(lo.terms):
        raise ConfigError(
            f"loss.weights={lo.weights}: one weight per term of loss.terms={lo.terms}"
        )
    if lo.class_weights and len(lo.class_weights) != cfg.task.num_classes:
        raise ConfigError(
            f"loss.class_weights={lo.class_weights}: one weight per class ({cfg.task.num_classes})"
        )
    if r.unlabelled_ratio < 1:
        raise ConfigError(f"regime.unlabelled_ratio={r.unlabelled_ratio}: at least 1")
    if not 0.0 < r.layer_decay <= 1.0:
        raise ConfigError(f"regime.layer_decay={r.layer_decay}: must be in (0, 1]")
    if not (0.0 < r.shrink <= 1.0 and 0.0 <= r.perturb <= 1.0):
        raise ConfigError(
            f"regime.shrink={r.shrink} must be in (0, 1] and regime.perturb={r.perturb} in [0, 1]"
        )
    if not 0 <= r.frozen_steps < cfg.trainer.steps:
        raise ConfigError(
            f"regime.frozen_steps={r.frozen_steps}: must be in [0, trainer.steps="
            f"{cfg.trainer.steps})"
        )
    if r.frozen_steps and r.encoder != "finetune":
        raise ConfigError(
            f"regime.frozen_steps={r.frozen_steps} holds the encoder at the start of fine-tuning: "
            f"it needs regime.encoder=finetune (got {r.encoder})"
        )
    if not 0.0 < cfg.data.label_fraction <= 1.0:
        raise ConfigError(f"data.label_fraction={cfg.data.label_fraction}: must be in (0, 1]")
    validate_model(cfg.model)
    validate_patch_shape(cfg.data.patch_shape, cfg.model)
    if r.cluster != "none":
        validate_tiles(r.tile, r.margin, cfg.model, "regime")
    _validate_windows(cfg.predict)
    validate_run(cfg)
    return cfg


def _validate_task(t: SegTaskConfig, ndim: int) -> None:
    if t.num_classes < 2:
        raise ConfigError(f"task.num_classes={t.num_classes}: at least 2")
    if t.class_values and len(t.class_values) != t.num_classes:
        raise ConfigError(
            f"task.class_values={t.class_values}: give one raw value per class ({t.num_classes})"
        )
    if t.kind == "semantic" and t.label_type != "classes":
        raise ConfigError("task.kind=semantic needs task.label_type=classes")
    if any(len(o) != 3 for o in t.offsets) or any(o[0] != 0 for o in t.offsets if ndim == 2):
        raise ConfigError(
            f"task.offsets={t.offsets}: give [dz, dy, dx] per offset (dz = 0 for 2D models)"
        )
    if t.kind == "affinity" and not t.offsets:
        raise ConfigError("task.kind=affinity needs task.offsets")
    if t.kind == "affinity" and ndim == 3 and all(o[0] == 0 for o in t.offsets):
        raise ConfigError(
            f"task.offsets={t.offsets} have no z component: a 3D model would learn no affinities "
            "across sections (and mutex watershed join nothing across them); give some, e.g. "
            "task.offsets=[[-1,0,0],[0,-1,0],[0,0,-1],[-3,0,0],[0,-9,0],[0,0,-9]]"
        )


def _validate_windows(pr: PredictConfig) -> None:
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
