"""Blocks and helpers shared by the configs of several commands: ConfigError, the encoder
(`ModelConfig`), optimiser, trainer, device mesh and multi-process settings, and the checks and
run-directory helpers the commands' `validate*` functions share.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from emfm.errors import UserError

MISSING_PATH = ""  # empty path = the bundled real EM sample


class ConfigError(UserError):
    """A config value that is well-typed but unusable; the message names the key."""


class Choice(enum.StrEnum):
    """The fixed set of values of a string option. A config field typed with a Choice is checked by
    OmegaConf as the config is composed: a value outside the set stops the run before any compute,
    naming the key, the value and the allowed values. Members are strings whose name is their value,
    so code compares them with plain strings (`cfg.trainer.nonfinite == "stop"`) and they print and
    serialise (JSON, checkpoint records) as that value."""

    def __repr__(self) -> str:
        return repr(self.value)


def choice(name: str, *values: str) -> type[Choice]:
    """The Choice `name` of `values` (each member named by its value), made in the caller's module
    (where pickle finds it)."""
    import sys

    return Choice(name, [(v, v) for v in values], module=sys._getframe(1).f_globals["__name__"])


# the names of emfm.models.ENCODERS
Encoder = choice("Encoder", "vit", "unet")
ComputeDType = choice("ComputeDType", "float32", "bfloat16", "float16")
Norm = choice("Norm", "group", "layer")
Optimizer = choice("Optimizer", "adamw")
NonFinite = choice("NonFinite", "stop", "skip")


@dataclass
class ModelConfig:
    """Vision Transformer encoder. `size` picks width/depth/heads from the ViT table
    (emfm.models.vit.SIZES); `width`, `depth`, `heads` override it for custom small models."""

    name: Encoder = Encoder.vit
    size: str = "Ti"
    patch_size: list[int] = field(default_factory=lambda: [8, 8])
    in_channels: int = 1
    width: int | None = None
    depth: int | None = None
    heads: int | None = None
    mlp_ratio: float = 4.0
    num_registers: int = 0
    dtype: ComputeDType = ComputeDType.float32  # compute dtype; parameters stay float32
    remat: bool = False
    # U-Net (name=unet; emfm.models.unet): patch_size [1, 1] (2D) or [1, 1, 1] (3D); `widths` per
    # level, else `depth` levels of `width * 2**level` channels; z is pooled into level l only when
    # l >= pool_z_from_level (anisotropic sections are pooled in-plane first).
    widths: list[int] | None = None
    blocks_per_level: int = 1
    pool_z_from_level: int = 1
    norm: Norm = Norm.group
    norm_groups: int = 8


@dataclass
class OptimConfig:
    name: Optimizer = Optimizer.adamw
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
    # a non-finite loss or gradient: stop (name the step, keep the last good checkpoint) or skip the
    # batch
    nonfinite: NonFinite = NonFinite.stop
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
class RunConfig:
    """What the configs of the training and inference commands share (EmfmConfig, FinetuneConfig):
    the encoder, optimiser, trainer, device mesh and processes, and the run directory."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    run_dir: str = "runs/default"
    # a named run lives in runs/<command>/NAME and resumes when the same command runs again
    name: str = ""
    # false: a named run whose directory holds a run already starts in a fresh one
    resume: bool = True
    # a run directory or checkpoint directory (or zoo:NAME) the command starts from
    checkpoint: str = ""


def validate_run(cfg: RunConfig) -> None:
    """Checks of the shared part: the optimiser's accumulation and layer decay, the trainer's steps
    and signals, and resume=false in a directory that already holds checkpoints."""
    from pathlib import Path

    if cfg.optim.accumulate_steps < 1:
        raise ConfigError(f"optim.accumulate_steps={cfg.optim.accumulate_steps}: must be >= 1")
    if not 0.0 < cfg.optim.layer_decay <= 1.0:
        raise ConfigError(f"optim.layer_decay={cfg.optim.layer_decay}: must be in (0, 1]")
    t = cfg.trainer
    if t.steps <= 0:
        raise ConfigError(f"trainer.steps={t.steps}: must be positive")
    if t.log_every < 1 or t.checkpoint_every < 0 or t.keep_checkpoints < 1:
        raise ConfigError(
            f"trainer.log_every={t.log_every}, checkpoint_every={t.checkpoint_every}, "
            f"keep_checkpoints={t.keep_checkpoints}: log_every >= 1, checkpoint_every >= 0 "
            "(0 = at the end only), keep_checkpoints >= 1 (the final checkpoint is kept)"
        )
    if getattr(getattr(cfg, "data", None), "intensity_samples", 1) < 1:
        raise ConfigError(
            f"data.intensity_samples={cfg.data.intensity_samples}: at least 1 patch is needed to "
            "estimate the grey range"
        )
    validate_signals(cfg.trainer.preempt_signals)
    ck = Path(cfg.run_dir) / "checkpoints"
    if not cfg.resume and ck.is_dir() and any(p.name.isdigit() for p in ck.iterdir()):
        raise ConfigError(
            f"resume=false but {cfg.run_dir} already holds checkpoints: give another "
            "hydra.run.dir (or name=), or drop resume=false to continue that run"
        )


def validate_model(m: ModelConfig) -> None:
    """Checks of the encoder config alone: its patch size."""
    if len(m.patch_size) not in (2, 3):
        raise ConfigError(f"model.patch_size={m.patch_size}: give 2 (y, x) or 3 (z, y, x) sizes")
    if any(p <= 0 for p in m.patch_size):
        raise ConfigError(f"model.patch_size={m.patch_size}: sizes must be positive")


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


def validate_tiles(tile: int, margin: int, m: ModelConfig, key: str) -> None:
    """In-plane windows of `tile` pixels with `margin` pixels of context (`KEY.tile`,
    `KEY.margin`) align with the encoder `m`: multiples of its patch size (ViT) or pooling
    (U-Net)."""
    p = max(m.patch_size[-1], unet_pool(m))
    if tile <= 0 or tile % p or margin < 0 or margin % p:
        raise ConfigError(
            f"{key}.tile={tile}, {key}.margin={margin}: must be multiples of the patch size or "
            f"U-Net pooling {p}"
        )


def validate_patch_shape(shape: list[int], m: ModelConfig, key: str = "data.patch_shape") -> None:
    """Patches of `shape` (z, y, x) fit the encoder `m`: depth 1 for a 2D model, divisible by its
    patch size, and in plane by a U-Net's pooling."""
    if len(shape) != 3 or any(s <= 0 for s in shape):
        raise ConfigError(f"{key}={shape}: give 3 positive sizes (z, y, x)")
    if len(m.patch_size) == 2 and shape[0] != 1:
        raise ConfigError(
            f"{key}={shape}: a 2D model (model.patch_size={m.patch_size}) needs patches of depth 1"
        )
    spatial = shape[1:] if len(m.patch_size) == 2 else shape
    if any(s % p for s, p in zip(spatial, m.patch_size)):
        raise ConfigError(f"{key}={shape} is not divisible by model.patch_size={m.patch_size}")
    pool = unet_pool(m)
    if pool > 1 and any(s % pool for s in shape[1:]):
        raise ConfigError(
            f"{key}={shape}: the U-Net's {len(m.widths or []) or m.depth or 4} levels pool "
            f"in-plane by {pool}; y and x must be multiples of it"
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


def checkpoint_model(checkpoint: str) -> ModelConfig:
    """The encoder a checkpoint records: a pretrained encoder brings its architecture, so
    model=... need not repeat it."""
    from emfm.train import checkpoint as ckpt

    try:
        return ModelConfig(**ckpt.read_meta(ckpt.find_checkpoint_dir(checkpoint))["model"])
    except (KeyError, TypeError) as e:
        raise ConfigError(f"checkpoint={checkpoint}: no usable model record ({e})") from None
