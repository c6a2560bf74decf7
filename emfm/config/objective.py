"""Configs of the self-supervised objectives: one dataclass per objective (`OBJECTIVE_CONFIGS`,
keyed by the names of the objective registry emfm.objectives.OBJECTIVES), each holding only the
fields its objective reads, built from the groups of fields several objectives share.

Each `configs/objective/NAME.yaml` starts from the schema `NAME_schema` (registered with Hydra by
emfm.config.schema.register), so the config's `objective` is that objective's dataclass from the
start: a key of another objective (`objective=mae objective.prototypes=3`) is rejected as the config
is composed, naming the key and the dataclass (`MAEConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from emfm.config.common import ConfigError, ModelConfig, choice

TargetNorm = choice("TargetNorm", "patch", "image", "none")
DenseFeatures = choice("DenseFeatures", "output", "hypercolumn")


@dataclass
class ObjectiveConfig:
    """What every objective has: its name in the objective registry (emfm.objectives.OBJECTIVES);
    it must be the name of the dataclass's objective (`OBJECTIVE_CONFIGS`)."""

    name: str = ""


@dataclass
class MaskingFields(ObjectiveConfig):
    """Masked image modelling: the fraction of patches masked and the normalisation of the
    pixel targets."""

    mask_ratio: float = 0.75
    tube_masking: bool = False  # 3D: the same in-plane mask on every section
    norm_pix_loss: bool = True
    # None = from norm_pix_loss ("patch" if true, else "none")
    target_norm: TargetNorm | None = None


@dataclass
class DecoderFields(ObjectiveConfig):
    """MAE's light decoder (He et al. 2022)."""

    decoder_width: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4


@dataclass
class ProjectorFields(ObjectiveConfig):
    """The projector MLP on the encoder's features: hidden and output widths."""

    proj_hidden: int = 512
    proj_dim: int = 128


@dataclass
class ContrastiveFields(ProjectorFields):
    """InfoNCE / NT-Xent contrastive objectives: the temperature of the logits."""

    temperature: float = 0.2


@dataclass
class TeacherFields(ObjectiveConfig):
    """Objectives with an EMA teacher: its base momentum (raised to 1 on a cosine schedule)."""

    ema_momentum: float = 0.996


@dataclass
class PrototypeFields(ProjectorFields, TeacherFields):
    """DINO's head (Caron et al. 2021): prototypes, teacher / student temperatures and the momentum
    of the teacher's centre."""

    prototypes: int = 1024
    teacher_temp: float = 0.04
    student_temp: float = 0.1
    center_momentum: float = 0.9


@dataclass
class MAEConfig(MaskingFields, DecoderFields):
    name: str = "mae"
    # Gaussian sigma (pixels) smoothing the reconstruction target in plane; 0 = raw pixels
    target_blur: float = 0.0


@dataclass
class MIMUNetConfig(MaskingFields):
    name: str = "mim_unet"
    mim_patch: int = 8  # side of the square in-plane mask patches (pixels)


@dataclass
class SimCLRConfig(ContrastiveFields):
    name: str = "simclr"


@dataclass
class MoCoConfig(ContrastiveFields, TeacherFields):
    name: str = "moco"
    pred_hidden: int = 512  # MoCo v3's predictor hidden width


@dataclass
class DenseConfig(ContrastiveFields):
    name: str = "dense"
    dense_samples: int = 64  # locations sampled per example for the InfoNCE


@dataclass
class DINOConfig(PrototypeFields):
    """The local crops are made on-device from the two global views: side = local_crop_size *
    global side, cut from a random square of side local_crop_scale * global side."""

    name: str = "dino"
    local_crops: int = 2
    local_crop_size: float = 0.5
    local_crop_scale: list[float] = field(default_factory=lambda: [0.25, 0.5])


@dataclass
class DINODenseConfig(PrototypeFields, MaskingFields):
    """Dense self-distillation (emfm.objectives.dino_dense): the student's view is zoomed in from a
    random square of side local_crop_scale * side and a mask_ratio of its mim_patch squares is
    masked (0 = none); dense_samples locations per example are distilled. With mim_weight > 0 (a
    U-Net) a masked-image-modelling loss of weight mim_weight is added: the student predicts the
    pixels of a mim_mask_ratio of the mim_patch squares of the plain patch, zeroed (targets
    normalised as MaskingFields say). dense_features says which feature map is distilled: the
    encoder's final output, or (a U-Net) the hypercolumn of its levels and final output, each
    upsampled to full resolution and normalised per pixel, the features a probe of
    `blocks=[0, ..., depth]` reads."""

    name: str = "dino_dense"
    local_crop_scale: list[float] = field(default_factory=lambda: [0.25, 0.5])
    mim_patch: int = 8
    dense_samples: int = 64
    mim_weight: float = 0.0
    mim_mask_ratio: float = 0.75
    dense_features: DenseFeatures = DenseFeatures.output


@dataclass
class ComboFields(MaskingFields, DecoderFields):
    """MAE plus a contrastive objective in one run (emfm.objectives.combo)."""

    combo_weights: list[float] = field(default_factory=lambda: [1.0, 1.0])  # [MAE, contrastive]


@dataclass
class MAESimCLRConfig(ComboFields, SimCLRConfig):
    name: str = "mae_simclr"


@dataclass
class MAEDINOConfig(ComboFields, DINOConfig):
    name: str = "mae_dino"


OBJECTIVE_CONFIGS: dict[str, type[ObjectiveConfig]] = {
    "mae": MAEConfig,
    "simclr": SimCLRConfig,
    "moco": MoCoConfig,
    "dino": DINOConfig,
    "dense": DenseConfig,
    "dino_dense": DINODenseConfig,
    "mim_unet": MIMUNetConfig,
    "mae_simclr": MAESimCLRConfig,
    "mae_dino": MAEDINOConfig,
}


def _known() -> str:
    return ", ".join(sorted(OBJECTIVE_CONFIGS))


def objective_from_record(record: dict) -> ObjectiveConfig:
    """The objective config of a record (a checkpoint's `objective` entry, a saved config's
    `objective` section), by its `name`. Records written before each objective had its own
    dataclass hold the fields of every objective: those the named objective does not have are
    dropped, and their `target_norm: ''` (from norm_pix_loss) is None."""
    name = record.get("name", "")
    if name not in OBJECTIVE_CONFIGS:
        raise ConfigError(f"objective.name={name!r}: known objectives are {_known()}")
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    cls = OBJECTIVE_CONFIGS[name]
    own = {f.name for f in fields(cls)}
    kw = {k: v for k, v in record.items() if k in own}
    if kw.get("target_norm") == "":
        kw["target_norm"] = None
    try:  # typed as when composed: Choices, lists, numbers
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), kw))
    except OmegaConfBaseException as e:
        raise ConfigError(f"objective record {record}: {str(e).splitlines()[0]}") from None


def validate_objective(o: ObjectiveConfig, m: ModelConfig) -> None:
    """Checks of the objective and of its fit to the encoder; raises ConfigError."""
    if o.name not in OBJECTIVE_CONFIGS:
        raise ConfigError(
            f"objective.name={o.name!r}: choose the objective with objective=NAME ({_known()})"
        )
    if type(o) is not OBJECTIVE_CONFIGS[o.name]:
        raise ConfigError(
            f"objective.name={o.name!r} does not match the objective's settings "
            f"({type(o).__name__}): choose the objective with objective={o.name}"
        )
    if isinstance(o, DecoderFields) and m.name != "vit":
        raise ConfigError(
            f"objective.name={o.name!r} masks ViT tokens: it needs a ViT model, not "
            f"model.name={m.name!r}; for the U-Net use objective=mim_unet"
        )
    if isinstance(o, MIMUNetConfig) and m.name != "unet":
        raise ConfigError(f"objective.name=mim_unet needs model.name=unet (got {m.name!r})")
    if m.name == "unet" and any(p != 1 for p in m.patch_size):
        raise ConfigError(
            f"model.patch_size={m.patch_size}: the U-Net works per pixel, use [1, 1] or [1, 1, 1]"
        )
    if isinstance(o, ComboFields) and len(o.combo_weights) != 2:
        raise ConfigError(
            f"objective.combo_weights={o.combo_weights}: give [mae_weight, contrastive_weight]"
        )
    temperatures = {}
    if isinstance(o, ContrastiveFields):
        temperatures["temperature"] = o.temperature
    if isinstance(o, PrototypeFields):
        temperatures.update(teacher_temp=o.teacher_temp, student_temp=o.student_temp)
    for key, t in temperatures.items():
        if t <= 0:
            raise ConfigError(f"objective.{key}={t}: a temperature must be positive")
    if isinstance(o, MAEConfig) and o.target_blur < 0:
        raise ConfigError(
            f"objective.target_blur={o.target_blur}: a Gaussian sigma in pixels, >= 0"
        )
    if isinstance(o, MaskingFields):
        dense = isinstance(o, DINODenseConfig)  # mask_ratio 0: the student's view is not masked
        if not ((o.mask_ratio >= 0.0 if dense else o.mask_ratio > 0.0) and o.mask_ratio < 1.0):
            interval = "[0, 1)" if dense else "(0, 1)"
            raise ConfigError(f"objective.mask_ratio={o.mask_ratio}: must be in {interval}")
    if isinstance(o, DINODenseConfig):
        if o.mim_weight < 0 or not 0.0 < o.mim_mask_ratio < 1.0:
            raise ConfigError(
                f"objective.mim_weight={o.mim_weight}, mim_mask_ratio={o.mim_mask_ratio}: "
                "mim_weight >= 0, mim_mask_ratio in (0, 1)"
            )
        if o.mim_weight > 0 and m.name != "unet":
            raise ConfigError(
                f"objective.mim_weight={o.mim_weight}: the added masked image modelling exists for "
                f"a U-Net (got model {m.name!r})"
            )
        if o.dense_features == "hypercolumn" and (m.name != "unet" or len(m.patch_size) != 2):
            raise ConfigError(
                "objective.dense_features=hypercolumn distils the levels of a 2D U-Net (got "
                f"model {m.name!r}, patch_size {list(m.patch_size)}); use dense_features=output"
            )
