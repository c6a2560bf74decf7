"""`emfm probe checkpoints=[...]`: resolve the benchmark's task files, then call the library.

A task is named by a file `configs/probe_task/NAME.yaml` or given as a path to a YAML file; it is
merged onto the typed `TaskConfig`, so an unknown key or a wrong type is an error naming the file
and key.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from emfm.config.common import ConfigError
from emfm.config.pretrain import EmfmConfig
from emfm.config.probe import TaskConfig


def task_dir(config_dir: str) -> Path:
    return Path(config_dir) / "probe_task"


def load_task(name: str, config_dir: str) -> TaskConfig:
    p = Path(name)
    if p.suffix not in (".yaml", ".yml"):
        p = task_dir(config_dir) / f"{name}.yaml"
        if not p.exists():
            known = sorted(f.stem for f in task_dir(config_dir).glob("*.yaml"))
            raise ConfigError(
                f"benchmark.tasks: unknown task {name!r}; known tasks are {', '.join(known)} "
                "(or give the path of a task YAML file)"
            )
    elif not p.exists():
        raise FileNotFoundError(f"task file not found: {p}")
    try:
        raw = OmegaConf.load(p)
        cfg = OmegaConf.merge(OmegaConf.structured(TaskConfig), raw)
        tc = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        key = f"{e.full_key}: " if getattr(e, "full_key", None) else ""
        raise ConfigError(f"task file {p}: {key}{str(e).splitlines()[0]}") from None
    if not tc.name:
        tc.name = p.stem
    return tc


def run_benchmark(cfg: EmfmConfig, config_dir: str) -> dict:
    from emfm.eval import benchmark
    from emfm.eval.checkpoints import expand_checkpoints

    benchmark.validate(cfg.benchmark)
    tasks = [load_task(t, config_dir) for t in cfg.benchmark.tasks]
    cps = expand_checkpoints(list(cfg.checkpoints), cfg.model, cfg.benchmark.random_seed)
    return benchmark.run_benchmark(tasks, cps, cfg.benchmark, cfg.run_dir)
