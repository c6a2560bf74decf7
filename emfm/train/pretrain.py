"""Self-supervised pretraining: the loop behind `emfm pretrain` and the main job's first step."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emfm.config.schema import EmfmConfig
from emfm.data import bundled
from emfm.data.loader import PatchLoader, PatchSampler, Region, estimate_range
from emfm.data.volume import open_volume
from emfm.models.vit import count_params
from emfm import objectives
from emfm.objectives import mae
from emfm.train import checkpoint, optim
from emfm.train.logging import MetricWriter, progress
from emfm.train.state import TrainState, build_pretraining_model, init_state, make_train_step, model_meta

log = logging.getLogger("emfm")


class NonFiniteLoss(FloatingPointError):
    pass


def _to_model_input(x: np.ndarray, ndim: int) -> np.ndarray:
    """`[b, z, y, x]` patches to channel-last model input: 2D models take `[b, y, x, 1]`."""
    return x[:, 0, ..., None] if ndim == 2 else x[..., None]


def _model_batch(batch: dict, ndim: int) -> dict:
    return {k: _to_model_input(v, ndim) for k, v in batch.items() if k in ("image", "image2")}


def pretrain(cfg: EmfmConfig) -> dict:
    """Train an encoder with the configured objective; resumes from `cfg.run_dir` if it holds a checkpoint.

    Returns a summary (steps, losses, throughput, data-wait fraction, checkpoint path).
    """
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    vol = open_volume(bundled.resolve(cfg.data.path, bundled.sample_raw()))
    region = Region.of(vol, cfg.data.roi)
    lo, hi = estimate_range(region, samples=cfg.data.intensity_samples, seed=cfg.trainer.seed)
    log.info("data: %s roi=%s grey range [%.1f, %.1f]", vol, region.box, lo, hi)

    model = build_pretraining_model(cfg.model, cfg.objective, seed=cfg.trainer.seed)
    ndim = model.encoder.spec.ndim
    n_enc, n_all = count_params(model.encoder), count_params(model)
    log.info("model: encoder %s, %.2f M parameters (%.2f M with decoder)", model.encoder.spec, n_enc / 1e6, n_all / 1e6)
    tx, sched = optim.build(cfg.optim, steps=cfg.trainer.steps, batch_size=cfg.data.batch_size)
    definition = objectives.get(cfg.objective.name)
    graphdef, state = init_state(model, tx, cfg.trainer.seed, teacher=definition.teacher)
    del model

    def loss_fn(model, batch, rng, teacher):
        return definition.loss(model, batch, rng, cfg.objective, teacher)

    train_step = jax.jit(make_train_step(graphdef, loss_fn, tx, ema_base=cfg.objective.ema_momentum,
                                         total_steps=cfg.trainer.steps), donate_argnums=0)

    mngr = checkpoint.manager(run_dir, keep=cfg.trainer.keep_checkpoints,
                              interval=cfg.trainer.checkpoint_every or cfg.trainer.steps)
    meta = {**model_meta(cfg.model, cfg.objective), "grey_range": [lo, hi], "data_path": vol.path}
    start = 0
    if mngr.latest_step() is not None:
        state, saved = checkpoint.restore(mngr, jax.eval_shape(lambda: state))
        start = int(state.step)
        log.info("resumed from %s at step %d", mngr.directory, start)

    sampler = PatchSampler([region], cfg.data.patch_shape, cfg.data.batch_size, seed=cfg.trainer.seed)
    loader = PatchLoader(sampler, [(lo, hi)], augment_batches=cfg.data.augment, prefetch=cfg.data.prefetch,
                         start_step=start, views=definition.views)
    example = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32), _model_batch(loader.load(0), ndim))
    t0 = time.perf_counter()
    compiled = train_step.lower(state, example).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    if mem is not None:
        log.info("compiled in %.1f s; temp %.1f MB, arguments %.1f MB", compile_s,
                 getattr(mem, "temp_size_in_bytes", 0) / 2**20, getattr(mem, "argument_size_in_bytes", 0) / 2**20)

    writer = MetricWriter(run_dir)
    losses: list[float] = []
    bar = progress(cfg.trainer.steps, initial=start, desc="pretrain", enabled=cfg.trainer.progress)
    t_loop = time.perf_counter()
    wait0 = loader.wait_s
    images = 0
    step = start
    try:
        for step in range(start, cfg.trainer.steps):
            batch = _model_batch(next(loader), ndim)
            state, metrics = compiled(state, batch)
            images += cfg.data.batch_size
            if (step + 1) % cfg.trainer.log_every == 0 or step + 1 == cfg.trainer.steps:
                m = jax.device_get(metrics)
                loss = float(m["loss"])
                if not math.isfinite(loss) or not math.isfinite(float(m["grad_norm"])):
                    raise NonFiniteLoss(f"non-finite loss {loss} or gradient norm at step {step + 1}; the last "
                                        f"good checkpoint in {mngr.directory} is kept")
                losses.append(loss)
                rate = images / (time.perf_counter() - t_loop)
                m.update(lr=sched(step), images_per_s=rate)
                writer.write(step + 1, m)
                bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate:.1f}")
            bar.update(1)
            if cfg.trainer.checkpoint_every and (step + 1) % cfg.trainer.checkpoint_every == 0:
                checkpoint.save(mngr, step + 1, state, {**meta, "data": loader.state()})
        if start < cfg.trainer.steps:
            jax.block_until_ready(state)
        loop_s = time.perf_counter() - t_loop
        checkpoint.save(mngr, cfg.trainer.steps, state, {**meta, "data": loader.state()}, force=True)
        mngr.wait_until_finished()
    finally:
        bar.close()
        loader.close()
        writer.close()
        mngr.close()

    fig = None
    if cfg.objective.name == "mae":
        fig = run_dir / "figures" / "mae_reconstruction.png"
        _reconstruction_figure(nnx.merge(graphdef, state.params, state.rest), loader, ndim, cfg, fig)
    steps_run = cfg.trainer.steps - start
    summary = {
        "steps": cfg.trainer.steps, "resumed_from": start, "encoder_params": n_enc,
        "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
        "images_per_s": images / loop_s if steps_run else None, "compile_s": compile_s,
        "data_wait_fraction": (loader.wait_s - wait0) / loop_s if steps_run else None,
        "train_s": loop_s, "total_s": time.perf_counter() - t_start,
        "checkpoint": str(run_dir / "checkpoints"), "figure": str(fig) if fig else None,
    }
    (run_dir / "pretrain_summary.json").write_text(json.dumps(summary, indent=1))
    log.info("pretrain: %s", summary)
    return summary


def _reconstruction_figure(model, loader: PatchLoader, ndim: int, cfg: EmfmConfig, path: Path) -> None:
    from emfm.eval import figures

    batch = loader.load(10**6)  # a batch never used in training, same distribution
    x = jnp.asarray(_to_model_input(batch["image"][:4], ndim))
    norm = cfg.objective.target_norm or cfg.objective.norm_pix_loss
    masked, recon = mae.reconstruct(model, x, jax.random.PRNGKey(1), mask_ratio=cfg.objective.mask_ratio,
                                    norm_pix_loss=norm)
    sl = (lambda a: np.asarray(a)[..., 0]) if ndim == 2 else (lambda a: np.asarray(a)[:, a.shape[1] // 2, ..., 0])
    figures.image_grid(path, [("input", sl(x)), ("masked input", sl(masked)), ("reconstruction", sl(recon))])
