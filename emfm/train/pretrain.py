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
from emfm.errors import UserError
from emfm.models.vit import count_params
from emfm.objectives import mae
from emfm.train import checkpoint, loop, optim
from emfm.train import mesh as meshlib

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

    def close(self) -> None:
        self.loader.close()

    @property
    def wait_s(self) -> float:
        return self.loader.wait_s


def pretrain(cfg: EmfmConfig) -> dict:
    """Train an encoder with the configured objective; resumes from `cfg.run_dir` if it holds a
    checkpoint.

    Returns a summary (steps, losses, throughput, data-wait fraction, checkpoint path).
    """
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    pid, pcount = jax.process_index(), jax.process_count()
    main_proc = pid == 0
    gbatch = cfg.data.batch_size
    if gbatch % pcount:
        raise UserError(
            f"data.batch_size={gbatch} (the global batch) is not divisible by {pcount} processes"
        )
    mesh = meshlib.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    if gbatch % mesh.size:
        raise UserError(
            f"data.batch_size={gbatch} is not divisible by the {mesh.size} devices of the mesh"
        )

    sources = open_sources(cfg.data, seed=cfg.trainer.seed)
    vol, (lo, hi) = sources[0].region.volume, sources[0].grey_range

    definition = objectives.get(cfg.objective.name)
    abstract_model = nnx.eval_shape(
        lambda: build_pretraining_model(cfg.model, cfg.objective, seed=cfg.trainer.seed)
    )
    ndim = abstract_model.encoder.spec.ndim
    n_enc, n_all = count_params(abstract_model.encoder), count_params(abstract_model)
    log.info(
        "model: %s encoder, %.2f M parameters (%.2f M with the objective's heads)",
        cfg.model.name,
        n_enc / 1e6,
        n_all / 1e6,
    )
    tx, sched = optim.build(
        cfg.optim,
        steps=cfg.trainer.steps,
        batch_size=gbatch,
        params=nnx.state(abstract_model, nnx.Param),
    )

    def create():
        model = build_pretraining_model(cfg.model, cfg.objective, seed=cfg.trainer.seed)
        return init_state(model, tx, cfg.trainer.seed, teacher=definition.teacher)[1]

    graphdef = nnx.split(abstract_model, nnx.Param, ...)[0]
    abstract_state = jax.eval_shape(create)
    state_sh = meshlib.state_shardings(abstract_state, mesh, cfg.mesh.min_shard_size)
    batch_sh = meshlib.batch_sharding(mesh)

    def loss_fn(model, batch, rng, teacher):
        return definition.loss(model, device.finish(batch), rng, cfg.objective, teacher)

    # the EMA teacher's base momentum, for the objectives that have one
    ema = {"ema_base": cfg.objective.ema_momentum} if definition.teacher else {}
    step_fn = make_train_step(graphdef, loss_fn, tx, total_steps=cfg.trainer.steps, **ema)
    train_step = jax.jit(
        step_fn, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=0
    )

    mngr = checkpoint.manager(
        run_dir,
        keep=cfg.trainer.keep_checkpoints,
        interval=cfg.trainer.checkpoint_every or cfg.trainer.steps,
    )
    best = (
        checkpoint.best_manager(run_dir, cfg.trainer.best_metric)
        if cfg.trainer.best_metric
        else None
    )
    meta = {
        **model_meta(cfg.model, cfg.objective),
        "grey_range": [lo, hi],
        "data_path": vol.path,
        "data_sources": [s.describe() for s in sources],
    }
    abstract_sharded = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_sh
    )
    state, start = loop.restore_or_init(
        mngr, abstract_sharded, jax.jit(create, out_shardings=state_sh), run_dir
    )

    loader = make_loader(
        cfg.data,
        sources,
        batch_size=gbatch // pcount,
        seed=cfg.trainer.seed,
        process_index=pid,
        process_count=pcount,
        start_step=start,
        views=definition.views,
    )
    example = {
        k: jax.ShapeDtypeStruct((gbatch,) + v.shape[1:], v.dtype, sharding=batch_sh)
        for k, v in _model_batch(loader.load(0), ndim).items()
    }
    t0 = time.perf_counter()
    compiled = train_step.lower(abstract_sharded, example).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    if mem is not None:
        log.info(
            "compiled in %.1f s; per device: temp %.1f MB, arguments %.1f MB, outputs %.1f MB",
            compile_s,
            getattr(mem, "temp_size_in_bytes", 0) / 2**20,
            getattr(mem, "argument_size_in_bytes", 0) / 2**20,
            getattr(mem, "output_size_in_bytes", 0) / 2**20,
        )

    result = loop.run(
        compiled,
        state,
        _ModelBatches(loader, ndim),
        start=start,
        steps=cfg.trainer.steps,
        mesh=mesh,
        mngr=mngr,
        meta=meta,
        run_dir=run_dir,
        trainer=cfg.trainer,
        sched=sched,
        accumulate_steps=cfg.optim.accumulate_steps,
        batch_size=gbatch,
        desc="pretrain",
        best=best,
        main_proc=main_proc,
        catch_signals=main_proc or pcount > 1,
    )
    state, losses, loop_s, images = result.state, result.losses, result.loop_s, result.images

    fig = None
    if cfg.objective.name.startswith("mae") and main_proc:  # MAE and its combinations
        fig = run_dir / "figures" / "mae_reconstruction.png"
        host_state = jax.device_get(state)
        _reconstruction_figure(
            nnx.merge(graphdef, host_state.params, host_state.rest), loader, ndim, cfg, fig
        )
    steps_run = cfg.trainer.steps - start
    summary = {
        "steps": cfg.trainer.steps,
        "resumed_from": start,
        "encoder_params": n_enc,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "images_per_s": images / loop_s if steps_run else None,
        "compile_s": compile_s,
        "data_wait_fraction": result.wait_s / loop_s if steps_run else None,
        "skipped_batches": int(state.nonfinite),
        "devices": mesh.size,
        "processes": pcount,
        "train_s": loop_s,
        "total_s": time.perf_counter() - t_start,
        "checkpoint": str(run_dir / "checkpoints"),
        "figure": str(fig) if fig else None,
    }
    if main_proc:
        (run_dir / "pretrain_summary.json").write_text(json.dumps(summary, indent=1))
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
