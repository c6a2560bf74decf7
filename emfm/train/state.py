"""Training state, model construction from configs, and loading encoders back from runs."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from emfm.config.schema import ModelConfig, ObjectiveConfig
from emfm.models.vit import ViT, ViTSpec
from emfm.objectives.mae import MAE
from emfm.train import checkpoint


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # nnx.State of nnx.Param
    opt_state: Any
    rng: jax.Array  # raw uint32 key; batch randomness is fold_in(rng, step)


def build_encoder(model_cfg: ModelConfig, *, seed: int = 0) -> ViT:
    if model_cfg.name != "vit":
        raise ValueError(f"model.name={model_cfg.name!r}: known encoders are 'vit'")
    return ViT(ViTSpec.from_config(model_cfg), rngs=nnx.Rngs(seed))


def build_pretraining_model(model_cfg: ModelConfig, obj_cfg: ObjectiveConfig, *, seed: int = 0) -> MAE:
    if obj_cfg.name != "mae":
        raise ValueError(f"objective.name={obj_cfg.name!r}: known objectives are 'mae'")
    enc = build_encoder(model_cfg, seed=seed)
    return MAE(enc, decoder_width=obj_cfg.decoder_width, decoder_depth=obj_cfg.decoder_depth,
               decoder_heads=obj_cfg.decoder_heads, rngs=nnx.Rngs(seed + 1))


def init_state(model: nnx.Module, tx: optax.GradientTransformation, seed: int) -> tuple[Any, TrainState]:
    graphdef, params = nnx.split(model, nnx.Param)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                       rng=jax.random.PRNGKey(seed))
    return graphdef, state


def make_train_step(graphdef, loss_fn, tx: optax.GradientTransformation):
    """A pure `(state, batch) -> (state, metrics)`, jitted once with the state donated."""

    def step(state: TrainState, batch: dict):
        rng = jax.random.fold_in(state.rng, state.step)

        def f(params):
            return loss_fn(nnx.merge(graphdef, params), batch, rng)

        (_, metrics), grads = jax.value_and_grad(f, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, grad_norm=optax.global_norm(grads))
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return jax.jit(step, donate_argnums=0)


def model_meta(model_cfg: ModelConfig, obj_cfg: ObjectiveConfig) -> dict:
    return {"model": dataclasses.asdict(model_cfg), "objective": dataclasses.asdict(obj_cfg)}


def load_encoder(run_dir: str) -> tuple[ViT, dict]:
    """The pretrained encoder of a run (latest finished checkpoint) and the checkpoint's meta record."""
    run_dir = str(checkpoint.find_checkpoint_dir(run_dir))
    meta = checkpoint.read_meta(run_dir)
    try:
        model_cfg = ModelConfig(**meta["model"])
        obj_cfg = ObjectiveConfig(**meta["objective"])
    except (KeyError, TypeError) as e:
        raise checkpoint.CheckpointError(f"checkpoint in {run_dir} has no usable model record: {e}") from e
    abstract = nnx.eval_shape(lambda: build_pretraining_model(model_cfg, obj_cfg))
    graphdef, abstract_params = nnx.split(abstract, nnx.Param)
    mngr = checkpoint.manager(run_dir, create=False)
    import orbax.checkpoint as ocp

    step = mngr.latest_step()
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item={"params": abstract_params}, partial_restore=True)))
    mngr.close()
    model = nnx.merge(graphdef, restored.state["params"])
    return model.encoder, meta
