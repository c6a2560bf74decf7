"""Self-supervised pretraining: the loop behind `emfm pretrain` and the main job's first step.

One jitted, pure train step over a `TrainState` placed on a `data` x `fsdp` mesh; each JAX process
feeds its own slice of the global batch. The run directory is the unit of work: a run restarts
from its own latest checkpoint (model, optimizer, step, RNG, EMA teacher, data position), so
`emfm pretrain` after a crash or preemption continues exactly where the last checkpoint left it.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emfm import objectives
from emfm.config.pretrain import EmfmConfig
from emfm.data import device
from emfm.data.loader import PatchLoader
from emfm.data.sources import make_loader, open_sources
from emfm.models.vit import count_params
from emfm.objectives import mae
from emfm.train import loop, optim

# re-exported: the CLI catches them here
from emfm.train.loop import NonFiniteLoss as NonFiniteLoss
from emfm.train.loop import Preempted as Preempted
from emfm.train.state import build_pretraining_model, init_state, make_train_step, model_meta

log = logging.getLogger("emfm")


def _to_model_input(x: np.ndarray, ndim: int) -> np.ndarray:
    """`[b, z, y, x]` patches to channel-last model input: 2D models take `[b, y, x, 1]`."""
    return x[:, 0, ..., None] if ndim == 2 else x[..., None]


def _model_batch(batch: dict, ndim: int) -> dict:
    """The loader's batch with its images in model layout (views of the native-dtype patches); their
    normalisation / augmentation entries ride along to the step (emfm.data.device.finish)."""
    return {
        k: _to_model_input(v, ndim) if k in ("image", "image2") else v for k, v in batch.items()
    }


class _ModelBatches:
    """The loader's batches in model layout, for the step loop (state, close and wait time pass
    through)."""

    def __init__(self, loader: PatchLoader, ndim: int):
        self.loader, self.ndim = loader, ndim

    def __next__(self) -> dict:
        return _model_batch(next(self.loader), self.ndim)

    def state(self) -> dict:
        return self.loader.state()

    def example(self) -> dict:
        """A batch like the ones to come (the first of the run), for compiling the step."""
        return _model_batch(self.loader.load(0), self.ndim)

    def close(self) -> None:
        self.loader.close()

    @property
    def wait_s(self) -> float:
        return self.loader.wait_s


def pretrain(cfg: EmfmConfig, *, init: str | None = None) -> dict:
    """Train an encoder with the configured objective; resumes from `cfg.run_dir` if it holds a
    checkpoint. A new run's encoder starts from random init or from the encoder of checkpoint
    `init` (continued pretraining), its heads fresh. Returns a summary (steps, losses,
    throughput, data-wait fraction, checkpoint path)."""
    job = loop.start_job(cfg.run_dir, cfg.data.batch_size, cfg.mesh)
    sources = open_sources(cfg.data, seed=cfg.trainer.seed)
    definition = objectives.get(cfg.objective.name)

    def create_model():
        return build_pretraining_model(cfg.model, cfg.objective, seed=cfg.trainer.seed)

    abstract_model = nnx.eval_shape(create_model)
    ndim = abstract_model.encoder.spec.ndim
    n_enc = _log_size(cfg, abstract_model)
    tx, sched = optim.build(
        cfg.optim,
        steps=cfg.trainer.steps,
        batch_size=job.batch_size,
        params=nnx.state(abstract_model, nnx.Param),
    )

    def create(encoder_params=None):
        model = create_model()
        if encoder_params is not None:
            nnx.update(model.encoder, encoder_params)
        return init_state(model, tx, cfg.trainer.seed, teacher=definition.teacher)[1]

    graphdef = nnx.split(abstract_model, nnx.Param, ...)[0]
    engine = loop.Engine(
        job,
        _train_step(cfg, definition, graphdef, tx),
        jax.eval_shape(create),
        trainer=cfg.trainer,
        min_shard_size=cfg.mesh.min_shard_size,
    )
    state, start = engine.restore_or_init(  # the init checkpoint is read only for a new run
        lambda sh: jax.jit(create, out_shardings=sh)(
            _encoder_params_of(init, cfg) if init else None
        )
    )
    loader = make_loader(
        cfg.data,
        sources,
        batch_size=job.batch_size // job.process_count,
        seed=cfg.trainer.seed,
        process_index=job.process_index,
        process_count=job.process_count,
        start_step=start,
        views=definition.views,
    )
    result = engine.run(
        state,
        start,
        _ModelBatches(loader, ndim),
        meta=_checkpoint_record(cfg, sources),
        sched=sched,
        accumulate_steps=cfg.optim.accumulate_steps,
        desc="pretrain",
    )
    fig = _mae_figure(cfg, job, result, graphdef, loader, ndim)
    return _summary(cfg, job, result, n_enc, fig)


def _mae_figure(cfg: EmfmConfig, job: loop.Job, result, graphdef, loader, ndim: int):
    """MAE and its combinations: the reconstruction figure of the trained model (process 0);
    its path, or None."""
    if not (cfg.objective.name.startswith("mae") and job.main_proc):
        return None
    fig = job.dir / "figures" / "mae_reconstruction.png"
    host = jax.device_get(result.state)
    _reconstruction_figure(nnx.merge(graphdef, host.params, host.rest), loader, ndim, cfg, fig)
    return fig


def _encoder_params_of(init: str, cfg: EmfmConfig):
    """The encoder parameters of checkpoint `init`, whose parameters must have the shapes of
    `cfg.model`'s; a mismatch names the model keys that differ."""
    from emfm.config.schema import ModelConfig
    from emfm.errors import UserError
    from emfm.train.state import build_encoder, load_encoder

    enc, meta = load_encoder(init)
    params = nnx.state(enc, nnx.Param)
    want = nnx.state(nnx.eval_shape(lambda: build_encoder(cfg.model)), nnx.Param)
    shapes = [jax.tree.structure(t) for t in (params, want)]
    if shapes[0] != shapes[1] or any(
        a.shape != b.shape for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want))
    ):
        theirs, ours = ModelConfig(**meta["model"]).__dict__, cfg.model.__dict__
        differ = [k for k in ours if theirs.get(k) != ours[k]]

        def hydra(v):  # a value as written on the command line
            return "null" if v is None else json.dumps(v, separators=(",", ":")).strip('"')

        raise UserError(
            f"checkpoint={init}: its encoder is not the configured model; set "
            + " ".join(f"model.{k}={hydra(theirs[k])}" for k in differ)
            + f" (configured: {', '.join(f'{k}={ours[k]}' for k in differ)})"
        )
    log.info("encoder starts from the checkpoint %s", init)
    return params


def _log_size(cfg: EmfmConfig, model) -> int:
    """Log the parameter count of the encoder and of the whole model; returns the encoder's."""
    n_enc, n_all = count_params(model.encoder), count_params(model)
    log.info(
        "model: %s encoder, %.2f M parameters (%.2f M with the objective's heads)",
        cfg.model.name,
        n_enc / 1e6,
        n_all / 1e6,
    )
    return n_enc


def _train_step(cfg: EmfmConfig, definition: objectives.ObjectiveDef, graphdef, tx):
    """The pure step of the objective's loss on finished (normalised, augmented) batches."""

    def loss_fn(model, batch, rng, teacher):
        return definition.loss(model, device.finish(batch), rng, cfg.objective, teacher)

    # the EMA teacher's base momentum, for the objectives that have one
    ema = {"ema_base": cfg.objective.ema_momentum} if definition.teacher else {}
    return make_train_step(graphdef, loss_fn, tx, total_steps=cfg.trainer.steps, **ema)


def _checkpoint_record(cfg: EmfmConfig, sources) -> dict:
    """What each checkpoint records besides the state: model and objective configs, the grey
    range and the data."""
    vol, (lo, hi) = sources[0].region.volume, sources[0].grey_range
    return {
        **model_meta(cfg.model, cfg.objective),
        "grey_range": [lo, hi],
        "data_path": vol.path,
        "data_sources": [s.describe() for s in sources],
    }


def _summary(cfg: EmfmConfig, job: loop.Job, result: loop.LoopResult, n_enc: int, fig) -> dict:
    """The run's summary, written to pretrain_summary.json (process 0) and logged."""
    steps_run, loop_s = cfg.trainer.steps - result.start, result.loop_s
    kept = loop.kept_summary(job.dir / "pretrain_summary.json", steps_run)
    if kept is not None:
        return kept
    summary = {
        "steps": cfg.trainer.steps,
        "resumed_from": result.start,
        "encoder_params": n_enc,
        "first_loss": result.losses[0] if result.losses else None,
        "final_loss": result.losses[-1] if result.losses else None,
        "images_per_s": result.images / loop_s if steps_run else None,
        "compile_s": result.compile_s,
        "data_wait_fraction": result.wait_s / loop_s if steps_run else None,
        "skipped_batches": int(result.state.nonfinite),
        "devices": job.mesh.size,
        "processes": job.process_count,
        "host": loop.host_record(),
        "train_s": loop_s,
        "total_s": time.perf_counter() - job.started,
        "checkpoint": str(job.dir / "checkpoints"),
        "figure": str(fig) if fig else None,
    }
    if job.main_proc:
        (job.dir / "pretrain_summary.json").write_text(json.dumps(summary, indent=1))
    log.info("pretrain: %s", summary)
    return summary


def _reconstruction_figure(
    model, loader: PatchLoader, ndim: int, cfg: EmfmConfig, path: Path
) -> None:
    from emfm.eval import figures

    batch = loader.finished(10**6)  # a batch never used in training, same distribution
    x = jnp.asarray(_to_model_input(batch["image"][:4], ndim))
    norm = cfg.objective.target_norm or cfg.objective.norm_pix_loss
    masked, recon = mae.reconstruct(
        model, x, jax.random.PRNGKey(1), mask_ratio=cfg.objective.mask_ratio, norm_pix_loss=norm
    )
    sl = (
        (lambda a: np.asarray(a)[..., 0])
        if ndim == 2
        else (lambda a: np.asarray(a)[:, a.shape[1] // 2, ..., 0])
    )
    figures.image_grid(
        path, [("input", sl(x)), ("masked input", sl(masked)), ("reconstruction", sl(recon))]
    )
