"""The one checkpoint module: orbax CheckpointManager over `<run_dir>/checkpoints`.

A checkpoint holds the training state pytree (model parameters, optimizer state, step, RNG) and a
JSON record (model/objective config, data-iterator state), written atomically by orbax: a
checkpoint is only listed once fully written, so a half-written one is never restored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from emfm.errors import UserError


class CheckpointError(UserError):
    pass


def manager(
    run_dir: str | Path, *, keep: int = 2, interval: int = 1, create: bool = True
) -> ocp.CheckpointManager:
    d = Path(run_dir).resolve() / "checkpoints"
    opts = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        save_interval_steps=max(1, interval),
        create=create,
        enable_async_checkpointing=True,
    )
    return ocp.CheckpointManager(d, options=opts, item_names=("state", "meta"))


def best_manager(run_dir: str | Path, metric: str) -> ocp.CheckpointManager:
    """Keeps the single checkpoint with the lowest `metric`, in `<run_dir>/checkpoints_best`."""
    d = Path(run_dir).resolve() / "checkpoints_best"
    opts = ocp.CheckpointManagerOptions(
        max_to_keep=1,
        best_fn=lambda m: m[metric],
        best_mode="min",
        create=True,
        enable_async_checkpointing=True,
    )
    return ocp.CheckpointManager(d, options=opts, item_names=("state", "meta"))


def save(
    mngr: ocp.CheckpointManager,
    step: int,
    state: Any,
    meta: dict,
    *,
    force: bool = False,
    metrics: dict | None = None,
) -> bool:
    return mngr.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=force,
        metrics=metrics,
    )


def on_local_device(abstract: Any) -> Any:
    """Abstract arrays placed on this process's first device, so that every process of a
    multi-process run restores its own full copy of a model (a checkpoint written by one process
    records that process's device, which the others cannot address)."""
    import jax

    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev), abstract)


def params_restore_args(abstract_params: Any):
    """Restore arguments of a checkpoint's `params` alone (partial restore), onto this process's
    device."""
    item = {"params": on_local_device(abstract_params)}
    return ocp.args.PyTreeRestore(
        item=item,
        restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True,
    )


def restore(
    mngr: ocp.CheckpointManager, abstract_state: Any, step: int | None = None
) -> tuple[Any, dict]:
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"no checkpoint in {mngr.directory}")
    out = mngr.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
        ),
    )
    return out.state, dict(out.meta)


def find_checkpoint_dir(path: str | Path) -> Path:
    """Accept a run dir (containing checkpoints/) or a checkpoints dir; name what is missing."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint path not found: {p}")
    if (p / "checkpoints").is_dir():
        return p
    if p.name == "checkpoints":
        return p.parent
    raise CheckpointError(
        f"{p} holds no checkpoints/ folder: give the directory of an emfm run (pretrain, finetune) "
        "or zoo:NAME"
    )


def read_meta(run_dir: str | Path) -> dict:
    """The JSON record of the latest checkpoint of a run (model config etc.) without loading
    arrays."""
    mngr = manager(run_dir, create=False)
    step = mngr.latest_step()
    if step is None:
        raise CheckpointError(f"no finished checkpoint in {Path(run_dir) / 'checkpoints'}")
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    mngr.close()
    return json.loads(json.dumps(meta))
