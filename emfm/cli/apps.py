"""Hydra apps, one per command: compose, convert to typed dataclasses once, call the library."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from emfm.cli import report
from emfm.config import schema

log = logging.getLogger("emfm")


def _quiet_libraries() -> None:
    import warnings

    warnings.filterwarnings("ignore", message="Sharding info not provided when restoring")
    for name in ("absl", "jax._src", "orbax", "matplotlib", "PIL"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)
    except ImportError:
        pass


def _git(*args: str) -> str:
    """The output of a git command in emfm's source tree."""
    cwd = Path(__file__).resolve().parents[2]
    return subprocess.run(
        ["git", *args], capture_output=True, text=True, cwd=cwd, timeout=5
    ).stdout.strip()


# what a resumed run must share with the run it continues (dotted keys, where the config has them)
RESUME_KEYS = (
    "model",
    "head",
    "objective",
    "task",
    "data.path",
    "data.labels",
    "data.sources",
    "data.roi",
    "data.train_roi",
    "data.batch_size",
    "data.patch_shape",
    "trainer.seed",
)


def _check_resumable(run_dir: Path, cfg: DictConfig) -> None:
    """A run directory with checkpoints is resumed by the same command: its recorded model, head,
    objective, task, data and seed (RESUME_KEYS) must be the configured ones, checked before
    anything in it is written (its config.yaml keeps the run's record)."""
    from emfm.errors import UserError

    old = run_dir / "config.yaml"
    if not (old.exists() and (run_dir / "checkpoints").exists()):
        return
    prev = OmegaConf.load(old)
    differ = []
    for key in RESUME_KEYS:
        a, b = OmegaConf.select(prev, key), OmegaConf.select(cfg, key)
        if a is None and b is None:
            continue
        a = OmegaConf.to_container(a, resolve=True) if OmegaConf.is_config(a) else a
        b = OmegaConf.to_container(b, resolve=True) if OmegaConf.is_config(b) else b
        if isinstance(a, dict) and isinstance(b, dict):
            differ += [f"{key}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            differ.append(key)
    if differ:
        shown = ", ".join(
            f"{k}={OmegaConf.select(prev, k)} there, {OmegaConf.select(cfg, k)} here"
            for k in differ[:6]
        )
        raise UserError(
            f"run directory {run_dir} was trained with other settings ({shown}); resuming it "
            "with this config would mix two runs. Use the run's own settings (its config.yaml), "
            "or another run directory (name=NAME or hydra.run.dir=DIR)."
        )


def _save_provenance(run_dir: Path, cfg: DictConfig) -> None:
    import jax

    _check_resumable(run_dir, cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    try:
        rev, dirty = _git("rev-parse", "HEAD"), _git("status", "--porcelain") != ""
    except (OSError, subprocess.SubprocessError):
        rev, dirty = "", False
    from importlib.metadata import PackageNotFoundError, version

    pkgs = {}
    for p in (
        "emfm",
        "jax",
        "jaxlib",
        "flax",
        "optax",
        "orbax-checkpoint",
        "tensorstore",
        "numpy",
        "hydra-core",
    ):
        try:
            pkgs[p] = version(p)
        except PackageNotFoundError:
            pass
    info = {
        "git_revision": rev,
        "git_dirty": dirty,
        "packages": pkgs,
        "python": sys.version.split()[0],
        "devices": [str(d) for d in jax.devices()],
        "argv": sys.argv,
    }
    (run_dir / "provenance.json").write_text(json.dumps(info, indent=1))


# ----------------------------------------------------------------------------- commands
# Each takes its typed, checked config.


def _evaluate(c: schema.EvaluateConfig) -> None:
    from emfm.eval.evaluate import evaluate_paths

    res = evaluate_paths(
        c.pred,
        c.gt,
        c.run_dir,
        kinds=tuple(c.kinds),
        ignore_gt=tuple(c.ignore_gt),
        ignore_pred=tuple(c.ignore_pred),
        background=c.background,
        num_classes=c.num_classes,
        ignore_index=c.ignore_index,
        block_z=c.block_z,
    )
    md = Path(c.run_dir) / "metrics.md"
    print(md.read_text() if md.exists() else json.dumps(res, indent=1, default=float))


def _instances(c: schema.InstancesConfig) -> None:
    from emfm.config.instances import run_instances
    from emfm.train.logging import progress

    bars = []

    def tick(i: int, n: int) -> None:
        """One more block segmented in this run (`n`: all this run does; a resumed run does the
        rest)."""
        if not bars:
            bars.append(progress(total=n, desc="instances: blocks"))
        bars[0].update(1)

    res = run_instances(c, c.input, c.out, progress=tick)
    for b in bars:
        b.close()
    (Path(c.run_dir) / "instances.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


# the fields of DiscoverConfig that are arguments of emfm.export.discover.discover by their name
DISCOVER_ARGS = "image k batch_size epochs sample_fraction examples crop seed out resume".split()


def _discover(c: schema.DiscoverConfig) -> None:
    from emfm.export.discover import discover

    kw = {k: getattr(c, k) for k in DISCOVER_ARGS}
    res = discover(c.features, c.run_dir, show_progress=c.progress, **kw)
    print(
        f"[emfm] {c.k} clusters over {res['vectors']} feature vectors: labels {res['labels']}, "
        f"galleries in {Path(c.run_dir) / 'galleries'}, overview {res['overview']}"
    )


def _finetune(c: schema.FinetuneConfig) -> None:
    from emfm.finetune import train

    res = train.finetune(c)
    print(json.dumps(res.get("test", res), indent=1, default=float))


def _predict(c: schema.FinetuneConfig) -> None:
    from emfm.finetune import predict

    print(json.dumps(predict.run_predict(c), indent=1, default=float))


def _main(c: schema.EmfmConfig) -> None:
    from emfm import pipeline

    pipeline.main_job(c)


def _pretrain(c: schema.EmfmConfig) -> None:
    from emfm.train.pretrain import pretrain

    pretrain(c, init=c.checkpoint or None)  # checkpoint=RUN|zoo:NAME: continue from its encoder


def _probe(c: schema.EmfmConfig) -> None:
    if c.checkpoints:  # the benchmark: tasks x probes x fractions x checkpoints
        from emfm.cli import probe as probe_cli
        from emfm.config.paths import config_dir

        probe_cli.run_benchmark(c, config_dir())
        return
    from emfm import pipeline

    pipeline.run_probe(c, checkpoint=c.checkpoint or None)


def _export(c: schema.EmfmConfig) -> None:
    from emfm import pipeline

    pipeline.run_export(c, checkpoint=c.checkpoint or None)


COMMANDS = {
    "main": _main,
    "pretrain": _pretrain,
    "probe": _probe,
    "export": _export,
    "discover": _discover,
    "evaluate": _evaluate,
    "instances": _instances,
    "finetune": _finetune,
    "predict": _predict,
}
CHECKS = {  # the validate of each command's config; the others: schema.validate
    "discover": schema.validate_discover,
    "evaluate": schema.validate_evaluate,
    "instances": schema.validate_instances,
    "finetune": lambda c: schema.validate_finetune(c, command="finetune"),
    "predict": lambda c: schema.validate_finetune(c, command="predict"),
}


def unknown_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Keys of `cfg` that no field of its typed config declares (added with `+KEY=VALUE`, which
    Hydra lets through and the typed config would silently drop), as dotted paths."""
    import dataclasses

    out = []
    typ = OmegaConf.get_type(cfg)
    fields = {f.name for f in dataclasses.fields(typ)} if dataclasses.is_dataclass(typ) else None
    for k in cfg.keys():
        if fields is not None and k not in fields:
            out.append(f"{prefix}{k}")
            continue
        node = cfg._get_node(k)
        if isinstance(node, DictConfig) and not node._is_missing() and not node._is_none():
            out += unknown_keys(node, f"{prefix}{k}.")
    return out


def to_config(cfg: DictConfig, cmd: str = "main"):
    """The typed dataclasses of command `cmd`'s composed config, checked by its validate; a key
    no typed config declares is an error naming it."""
    from emfm.config.common import ConfigError

    unknown = unknown_keys(cfg)
    if unknown:
        raise ConfigError(
            f"unknown config key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
            f"(added with +KEY=...?): emfm {cmd} has no such setting; see `emfm {cmd} --help` "
            "or the configs for the keys there are"
        )
    return CHECKS.get(cmd, schema.validate)(OmegaConf.to_object(cfg))


def _run(cmd: str, cfg: DictConfig) -> None:
    c = to_config(cfg, cmd)
    if hasattr(c, "distributed"):  # processes split the batch (training), blocks or chunks
        from emfm.train import distributed

        distributed.initialize(c.distributed)
    _save_provenance(Path(c.run_dir), cfg)
    COMMANDS[cmd](c)


def _preempted():
    from emfm.train.pretrain import Preempted

    return Preempted


def _reported(cmd: str, cfg: DictConfig) -> None:
    """Run `cmd`, reporting a failure as the CLI does: the user's input in one line (exit 2), a
    preemption with 128 + the signal number, a bug with its traceback (exit 1)."""
    _quiet_libraries()
    try:
        with report.user_errors(log):
            _run(cmd, cfg)
    except _preempted() as e:
        log.warning("%s", e)
        print(f"emfm: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None
    except KeyboardInterrupt:
        if os.environ.get("EMFM_DEBUG"):
            raise
        log.warning("interrupted (Ctrl-C)")
        print(
            f"emfm: {cmd} interrupted (Ctrl-C); what it finished is kept: the same command "
            "resumes it (runs from their last checkpoint, export / predict / instances skip the "
            "blocks already written)",
            file=sys.stderr,
        )
        raise SystemExit(128 + 2) from None
    except SystemExit:
        raise
    except Exception as e:  # not the user's input: a bug, shown whole
        import traceback

        log.error("internal error %s: %s", type(e).__name__, e, exc_info=True)
        traceback.print_exc(file=sys.stderr)
        print(
            f"emfm: internal error ({type(e).__name__}): this is a bug in emfm, not in your "
            "input; please report it with the traceback above",
            file=sys.stderr,
        )
        raise SystemExit(1) from None


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:  # no Hydra context (a direct call)
        return False


def _record_failed_job(cfg: DictConfig, code) -> None:
    """A sweep job that stopped: its config and status.json ("failed", exit status) in its run
    directory, so that `emfm runs summarize` lists it beside the others."""
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "config.yaml").exists():
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=False))
    status = run_dir / "status.json"
    old = json.loads(status.read_text()) if status.exists() else {}
    if old.get("status") in (None, "running"):
        status.write_text(json.dumps({"status": "failed", "exit_status": code}))


def _task(cmd: str, started: list, failed: list):
    """The Hydra task function of command `cmd` (it appends to `started` when it runs). In a
    sweep (`-m`) a job that stops with an error is recorded (`failed`, its run directory marked)
    and the sweep goes on with the next job; the sweep's exit status is that of the first
    failure."""

    def task(cfg: DictConfig) -> None:
        started.append(True)
        if not _multirun():
            _reported(cmd, cfg)
            return
        try:
            _reported(cmd, cfg)
        except SystemExit as e:
            if e.code in (0, None):
                raise
            try:
                _record_failed_job(cfg, e.code)
            except Exception:  # noqa: BLE001 (the record is a courtesy; the sweep goes on)
                log.warning("could not record the failed job's status", exc_info=True)
            log.error("sweep job stopped (exit status %s); going on with the next job", e.code)
            failed.append(e.code)

    return task


def _check_name(argv: list[str]) -> None:
    """`name=NAME` on the command line, checked before Hydra resolves it into the run directory
    (where an error surfaces as a traceback of Hydra's own)."""
    from emfm.config.common import ConfigError

    for arg in argv:
        if arg.startswith("name="):
            name = arg.split("=", 1)[1]
            for one in name.split(",") if "-m" in argv or "--multirun" in argv else [name]:
                if "/" in one or one.strip() in (".", ".."):
                    raise ConfigError(f"name={one!r}: a run name is one directory name (no '/')")


def run(cmd: str, config_dir: str) -> None:
    """Run command `cmd` through Hydra. Errors of the command line or the configs that Hydra
    meets while composing (an unknown group option or key, a value of the wrong type) exit with
    status 2 like every other error of the user's input; Hydra prints its own message naming
    the key and the choices."""
    schema.register()
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    try:
        _check_name(sys.argv[1:])
    except ValueError as e:
        print(f"emfm: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    started: list = []
    failed: list = []
    app = hydra.main(version_base=None, config_path=config_dir, config_name=cmd)(
        _task(cmd, started, failed)
    )
    try:
        app()
        if failed:
            print(
                f"emfm: error: {len(failed)} job(s) of the sweep stopped with an error (see "
                "above; `emfm runs summarize` lists them as failed)",
                file=sys.stderr,
            )
            raise SystemExit(failed[0])
    except SystemExit as e:
        if e.code == 1 and not started:  # Hydra's report of a composition error
            print(
                f"emfm: error: emfm {cmd}: the command line or config could not be composed "
                "(Hydra's message above names the key)",
                file=sys.stderr,
            )
            raise SystemExit(2) from None
        raise
