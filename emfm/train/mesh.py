"""One device mesh with `data` and `fsdp` axes, and the sharding of states and batches on it.

Parameters (and everything shaped like them: optimizer moments, EMA teacher) are placed by one
rule: a leaf of at least `min_shard_size` elements is split along its largest dimension divisible
by the `fsdp` axis size; everything else is replicated. With `fsdp=1` this is pure data parallelism;
raising `mesh.fsdp` shards parameters and optimizer state (ZeRO-3 / FSDP) without touching model
code. Batches are split over both axes (`("data", "fsdp")`).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from emfm.errors import UserError

BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if fsdp < 1 or n % fsdp:
        raise UserError(f"mesh.fsdp={fsdp} must divide the {n} devices")
    if data == -1:
        data = n // fsdp
    if data * fsdp != n:
        raise UserError(
            f"mesh data={data} x fsdp={fsdp} = {data * fsdp} devices, but {n} are available"
        )
    return Mesh(np.asarray(devices).reshape(data, fsdp), BATCH_AXES)


def leaf_spec(shape: tuple[int, ...], fsdp: int, min_shard_size: int = 2**14) -> P:
    if fsdp == 1 or math.prod(shape) < min_shard_size:
        return P()
    for ax in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[ax] % fsdp == 0:
            spec = [None] * len(shape)
            spec[ax] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(abstract_state, mesh: Mesh, min_shard_size: int = 2**14):
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(
        lambda a: NamedSharding(mesh, leaf_spec(tuple(a.shape), fsdp, min_shard_size)),
        abstract_state,
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def put_global(tree, shardings):
    """Place a pytree that every process holds identically (e.g. a freshly initialised or loaded
    state) with the given shardings: `jax.device_put` in one process; in several, each process
    supplies the shards its devices hold."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    host = jax.device_get(tree)
    return jax.tree.map(
        lambda a, s: jax.make_array_from_callback(np.shape(a), s, lambda idx: np.asarray(a)[idx]),
        host,
        shardings,
    )


def global_batch(local: dict, mesh: Mesh) -> dict:
    """Per-process numpy batches -> global jax.Arrays sharded over the batch axes."""
    sh = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sh, v) for k, v in local.items()}


def bytes_per_device(tree) -> dict[str, int]:
    """Bytes of a sharded pytree held on each addressable device (for memory reports)."""
    out: dict[str, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            k = str(shard.device)
            out[k] = out.get(k, 0) + shard.data.nbytes
    return out
