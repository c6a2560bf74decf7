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

from emfm.config import schema
from emfm.errors import UserError

log = logging.getLogger("emfm")

# Errors of the user's input, reported in one line (EMFM_DEBUG=1 shows their traceback too);
# anything else is a bug and is shown with its traceback.
USER_ERRORS = (FileNotFoundError, NotADirectoryError, UserError, FloatingPointError)


def to_config(cfg: DictConfig) -> schema.EmfmConfig:
    obj = OmegaConf.to_object(cfg)
    return schema.validate(obj)


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


def _save_provenance(run_dir: Path, cfg: DictConfig) -> None:
    import jax

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parents[2],
            timeout=5,
        ).stdout.strip()
        dirty = (
            subprocess.run(
                ["git", "status", "--porcelain"],
                capture_output=True,
                text=True,
                cwd=Path(__file__).resolve().parents[2],
                timeout=5,
            ).stdout.strip()
            != ""
        )
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


def _evaluate(cfg: DictConfig) -> None:
    from emfm.eval.evaluate import evaluate_paths

    c = schema.validate_evaluate(OmegaConf.to_object(cfg))
    _save_provenance(Path(c.run_dir), cfg)
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


def _instances(cfg: DictConfig) -> None:
    from emfm.instances.blockwise import instances
    from emfm.train import distributed
    from emfm.train.logging import progress

    c = schema.validate_instances(OmegaConf.to_object(cfg))
    distributed.initialize(c.distributed)  # several processes split the blocks; process 0 stitches
    _save_provenance(Path(c.run_dir), cfg)
    bars = []

    def tick(
        i: int, n: int
    ) -> None:  # blocks segmented in this run (a resumed run counts the rest)
        if not bars:
            bars.append(progress(total=n, desc="instances: blocks"))
        bars[0].update(1)

    params, tuned = schema.segment_params(c), None
    if c.tune:
        from emfm.instances.tune import tune_from_volumes_cfg

        params, tuned = tune_from_volumes_cfg(c, c.input, params)
    res = instances(
        c.input,
        c.out,
        params,
        block=c.block,
        halo=c.halo,
        kind=c.kind,
        channel=c.channel,
        invert=c.invert,
        stitch_threshold=c.stitch_threshold,
        work_dir=c.work_dir or None,
        keep_work=c.keep_work,
        progress=tick,
    )
    if tuned is not None:
        res["tuned"] = tuned
    for b in bars:
        b.close()
    (Path(c.run_dir) / "instances.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


def _discover(cfg: DictConfig) -> None:
    from emfm.export.discover import discover

    c = schema.validate_discover(OmegaConf.to_object(cfg))
    _save_provenance(Path(c.run_dir), cfg)
    res = discover(
        c.features,
        c.run_dir,
        image=c.image,
        k=c.k,
        batch_size=c.batch_size,
        epochs=c.epochs,
        sample_fraction=c.sample_fraction,
        examples=c.examples,
        crop=c.crop,
        seed=c.seed,
        out=c.out,
        resume=c.resume,
        show_progress=c.progress,
    )
    print(
        f"[emfm] {c.k} clusters over {res['vectors']} feature vectors: labels {res['labels']}, "
        f"galleries in {Path(c.run_dir) / 'galleries'}, overview {res['overview']}"
    )


def _finetune(cmd: str, cfg: DictConfig) -> None:
    from emfm.finetune import train
    from emfm.train import distributed

    c = schema.validate_finetune(OmegaConf.to_object(cfg), command=cmd)
    # finetune: data parallel; predict: processes split the chunks
    distributed.initialize(c.distributed)
    _save_provenance(Path(c.run_dir), cfg)
    res = train.finetune(c) if cmd == "finetune" else train.run_predict(c)
    print(json.dumps(res.get("test", res), indent=1, default=float))


def _preempted():
    from emfm.train.pretrain import Preempted

    return Preempted


def _task(cmd: str):
    def task(cfg: DictConfig) -> None:
        _quiet_libraries()
        try:
            if cmd == "evaluate":
                _evaluate(cfg)
                return
            if cmd == "instances":
                _instances(cfg)
                return
            if cmd == "discover":
                _discover(cfg)
                return
            if cmd in ("finetune", "predict"):
                _finetune(cmd, cfg)
                return
            c = to_config(cfg)
            from emfm.train import distributed

            distributed.initialize(c.distributed)
            run_dir = Path(c.run_dir)
            _save_provenance(run_dir, cfg)
            from emfm import pipeline

            if cmd == "main":
                pipeline.main_job(c)
            elif cmd == "pretrain":
                from emfm.train.pretrain import pretrain

                pretrain(c)
            elif (
                cmd == "probe" and c.checkpoints
            ):  # the benchmark: tasks x probes x fractions x checkpoints
                from emfm.cli import probe as probe_cli
                from emfm.config.paths import config_dir

                probe_cli.run_benchmark(c, config_dir())
            elif cmd == "probe":
                pipeline.run_probe(c, checkpoint=c.checkpoint or None)
            elif cmd == "export":
                pipeline.run_export(c, checkpoint=c.checkpoint or None)
        except _preempted() as e:
            log.warning("%s", e)
            print(f"emfm: {e}", file=sys.stderr)
            raise SystemExit(e.exit_code) from None
        except USER_ERRORS as e:
            if os.environ.get("EMFM_DEBUG"):
                raise
            log.error("%s: %s", type(e).__name__, e)
            print(f"emfm: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # not the user's input: a bug, shown whole
            import traceback

            log.error("internal error %s: %s", type(e).__name__, e, exc_info=True)
            traceback.print_exc(file=sys.stderr)
            print(
                f"emfm: internal error ({type(e).__name__}): this is a bug in emfm, not in your "
                "input; "
                "please report it with the traceback above",
                file=sys.stderr,
            )
            raise SystemExit(1) from None

    return task


def run(cmd: str, config_dir: str) -> None:
    schema.register()
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    app = hydra.main(version_base=None, config_path=config_dir, config_name=cmd)(_task(cmd))
    app()
