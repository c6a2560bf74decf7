"""Typed configuration of every emfm command.

These dataclasses are the single source of truth for what a config may contain. They are
registered in Hydra's ConfigStore (`register()`), so a YAML file or a command-line override with an
unknown key, a value of the wrong type or a string option outside its set of values (a `Choice`) is
rejected by Hydra before any compute, naming the key. `validate()` adds the checks a type cannot
express, mostly rules that span several fields. Only `emfm/cli/` imports Hydra; library code
receives these dataclasses (or plain arguments), never a DictConfig.

The configs live in one module per concern, each with its checks next to its dataclasses:
`emfm.config.common` (ConfigError, `Choice` and the blocks several commands share: model, optim,
trainer, mesh, distributed), `.objective` (one dataclass per objective), `.pretrain` (pretraining
data, the top-level `EmfmConfig`), `.probe` (probe, probing benchmark and its tasks), `.export`
(export, discover), `.finetune` (finetune, predict) and `.instances` (instances, evaluate,
tuning). This module re-exports all of them, so `from emfm.config.schema import X` keeps working,
and registers them with Hydra.
"""

from __future__ import annotations

from emfm.config.common import (
    MISSING_PATH,
    Choice,
    ConfigError,
    DistributedConfig,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainerConfig,
    resolve_zoo,
    run_dir_for,
    unet_pool,
    validate_model,
    validate_patch_shape,
    validate_run,
    validate_signals,
    validate_tiles,
)
from emfm.config.export import DiscoverConfig, ExportConfig, validate_discover, validate_export
from emfm.config.finetune import (
    FinetuneConfig,
    HeadConfig,
    LossConfig,
    PredictConfig,
    RegimeConfig,
    SegDataConfig,
    SegTaskConfig,
    r_init_pretrained,
    validate_finetune,
)
from emfm.config.instances import (
    EvaluateConfig,
    InstancesConfig,
    segment_params,
    validate_evaluate,
    validate_instances,
    validate_tune,
)
from emfm.config.objective import (
    OBJECTIVE_CONFIGS,
    ObjectiveConfig,
    objective_from_record,
    validate_objective,
)
from emfm.config.pretrain import (
    AugmentConfig,
    DataConfig,
    EmfmConfig,
    SourceConfig,
    validate,
    validate_data,
)
from emfm.config.probe import BenchmarkConfig, ProbeConfig, TaskConfig, validate_probe

__all__ = [
    "MISSING_PATH",
    "ConfigError",
    "Choice",
    "ModelConfig",
    "ObjectiveConfig",
    "OBJECTIVE_CONFIGS",
    "SourceConfig",
    "AugmentConfig",
    "DataConfig",
    "OptimConfig",
    "TrainerConfig",
    "MeshConfig",
    "DistributedConfig",
    "RunConfig",
    "ProbeConfig",
    "ExportConfig",
    "DiscoverConfig",
    "TaskConfig",
    "BenchmarkConfig",
    "EmfmConfig",
    "EvaluateConfig",
    "InstancesConfig",
    "SegDataConfig",
    "SegTaskConfig",
    "HeadConfig",
    "LossConfig",
    "RegimeConfig",
    "PredictConfig",
    "FinetuneConfig",
    "validate",
    "validate_model",
    "validate_data",
    "validate_objective",
    "validate_probe",
    "validate_export",
    "validate_discover",
    "validate_evaluate",
    "validate_instances",
    "validate_tune",
    "validate_finetune",
    "validate_signals",
    "validate_run",
    "validate_patch_shape",
    "validate_tiles",
    "objective_from_record",
    "segment_params",
    "resolve_zoo",
    "unet_pool",
    "r_init_pretrained",
    "run_dir_for",
    "register",
    "compose",
    "load_saved",
]


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
    for name, cls in OBJECTIVE_CONFIGS.items():  # configs/objective/NAME.yaml start from these
        cs.store(group="objective", name=f"{name}_schema", node=cls)


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


def load_saved(
    path,
) -> EmfmConfig | FinetuneConfig | InstancesConfig | EvaluateConfig | DiscoverConfig:
    """The typed config a command saved in its run directory (`config.yaml`; `path` is the file or
    the directory), checked against the schema as a composed config is, but not by `validate` (its
    paths may be gone). The schema is the one whose fields hold every saved key. The `objective`
    of configs saved before each objective had its own dataclass, which holds the fields of every
    objective, is read by `objective_from_record`; their `predict.instances: ''` (probabilities
    only) is `none`."""
    from dataclasses import fields
    from pathlib import Path

    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    p = Path(path)
    p = p / "config.yaml" if p.is_dir() else p
    saved = OmegaConf.to_container(OmegaConf.load(p))
    kinds = (EmfmConfig, FinetuneConfig, InstancesConfig, EvaluateConfig, DiscoverConfig)
    kind = next((k for k in kinds if set(saved) <= {f.name for f in fields(k)}), None)
    if kind is None:
        raise ConfigError(f"{p}: not a config saved by an emfm command (keys {sorted(saved)})")
    objective = saved.pop("objective", None)
    if (saved.get("predict") or {}).get("instances") == "":  # saved before it was a choice
        saved["predict"]["instances"] = "none"
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(kind), saved))
    except OmegaConfBaseException as e:
        raise ConfigError(f"{p}: {e.full_key}: {str(e).splitlines()[0]}") from None
    if objective is not None:
        cfg.objective = objective_from_record(objective)
    return cfg
