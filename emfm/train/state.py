"""Training state, model construction from configs, and loading encoders back from runs."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from emfm import objectives
from emfm.config.common import ConfigError, ModelConfig
from emfm.config.objective import ObjectiveConfig, objective_from_record
from emfm.objectives.base import ema_momentum
from emfm.train import checkpoint


@struct.dataclass
class TrainState:
    """Everything a resumed run needs, checkpointed as one pytree."""

    step: jax.Array
    params: Any  # nnx.State of the nnx.Param variables
    opt_state: Any
    rng: jax.Array  # raw uint32 key; batch randomness is fold_in(rng, step)
    rest: Any = None  # non-parameter model state (e.g. DINO's centre); nnx.State, possibly empty
    ema: Any = None  # EMA teacher parameters (same structure as params) for teacher objectives
    # int32: steps whose loss or gradient was not finite (their update was skipped)
    nonfinite: Any = None
    first_bad: Any = None  # int32: the first such step (1-based), -1 if none


def build_encoder(model_cfg: ModelConfig, *, seed: int = 0):
    from emfm import models

    return models.build_encoder(model_cfg, seed=seed)


def build_pretraining_model(
    model_cfg: ModelConfig, obj_cfg: ObjectiveConfig, *, seed: int = 0
) -> nnx.Module:
    """The encoder wrapped by its objective (registry entry `obj_cfg.name`); `.encoder` is kept."""
    definition = objectives.get(obj_cfg.name)
    return definition.build(build_encoder(model_cfg, seed=seed), obj_cfg, nnx.Rngs(seed + 1))


def init_state(
    model: nnx.Module, tx: optax.GradientTransformation, seed: int, *, teacher: bool = False
) -> tuple[Any, TrainState]:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ema = jax.tree.map(jnp.copy, params) if teacher else None
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.PRNGKey(seed),
        rest=rest,
        ema=ema,
        nonfinite=jnp.zeros((), jnp.int32),
        first_bad=jnp.full((), -1, jnp.int32),
    )
    return graphdef, state


def make_train_step(
    graphdef,
    loss_fn,
    tx: optax.GradientTransformation,
    *,
    ema_base: float = 0.996,
    total_steps: int = 1,
):
    """A pure `(state, batch) -> (state, metrics)`; the caller jits it (with shardings and
    donation).

    `loss_fn(model, batch, rng, teacher)`; randomness is `fold_in(state.rng, state.step)`, so a
    resumed run draws the same numbers. With an EMA teacher, the teacher is the model merged with
    `state.ema` (no gradient flows into it) and is updated after the optimizer step. A step whose
    loss or gradient is not finite changes nothing but the counters `nonfinite` / `first_bad`.
    """

    def step(state: TrainState, batch: dict):
        rng = jax.random.fold_in(state.rng, state.step)
        teacher = None if state.ema is None else nnx.merge(graphdef, state.ema, state.rest)

        def f(params):
            model = nnx.merge(graphdef, params, state.rest)
            loss, metrics = loss_fn(model, batch, rng, teacher)
            return loss, (metrics, nnx.state(model, nnx.Not(nnx.Param)))

        (loss, (metrics, rest)), grads = jax.value_and_grad(f, has_aux=True)(state.params)
        gnorm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, grad_norm=gnorm)
        ema = state.ema
        if ema is not None:
            m = ema_momentum(ema_base, state.step, total_steps)
            ema = jax.tree.map(lambda e, p: m * e + (1.0 - m) * p, ema, params)
            metrics["ema_momentum"] = m

        def keep(new, old):
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

        bad = (~finite).astype(jnp.int32)
        return state.replace(
            step=state.step + 1,
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            rest=keep(rest, state.rest),
            ema=None if ema is None else keep(ema, state.ema),
            nonfinite=state.nonfinite + bad,
            first_bad=jnp.where((state.first_bad < 0) & (bad > 0), state.step + 1, state.first_bad),
        ), metrics

    return step


def model_meta(model_cfg: ModelConfig, obj_cfg: ObjectiveConfig) -> dict:
    return {"model": dataclasses.asdict(model_cfg), "objective": dataclasses.asdict(obj_cfg)}


def load_encoder(run_dir: str) -> tuple[nnx.Module, dict]:
    """The pretrained encoder of a run (latest finished checkpoint) and the checkpoint's meta
    record."""
    run_dir = str(checkpoint.find_checkpoint_dir(run_dir))
    meta = checkpoint.read_meta(run_dir)
    try:
        model_cfg = ModelConfig(**meta["model"])
        obj_cfg = objective_from_record(meta["objective"])
    except (KeyError, TypeError, ConfigError) as e:
        raise checkpoint.CheckpointError(
            f"checkpoint in {run_dir} has no usable model record: {e}"
        ) from e
    abstract = nnx.eval_shape(lambda: build_pretraining_model(model_cfg, obj_cfg))
    graphdef, abstract_params, _ = nnx.split(abstract, nnx.Param, ...)
    mngr = checkpoint.manager(run_dir, create=False)
    import orbax.checkpoint as ocp

    step = mngr.latest_step()
    restored = mngr.restore(
        step, args=ocp.args.Composite(state=checkpoint.params_restore_args(abstract_params))
    )
    mngr.close()
    model = nnx.merge(graphdef, restored.state["params"], rest_state(abstract))
    return model.encoder, meta


def rest_state(abstract_model):
    """Concrete zeros for non-parameter state, for merging a restored parameter tree."""
    rest = nnx.state(abstract_model, nnx.Not(nnx.Param))
    return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), rest)
