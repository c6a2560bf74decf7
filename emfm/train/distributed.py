"""Multi-process start-up through JAX's own runtime (`jax.distributed`).

Called once by the CLI before any JAX computation. On Slurm, `jax.distributed.initialize()` finds
the coordinator, process count and id from the job's environment; elsewhere they come from config.
On CPU, cross-process collectives use gloo.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger("emfm")


def slurm_step_tasks() -> int:
    """Tasks of the current Slurm job step (srun): 1 outside Slurm, and for a lone process started
    by hand inside an allocation of several tasks (it has no step of its own with peers to wait
    for)."""
    if "SLURM_JOB_ID" not in os.environ:
        return 1
    return int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1)


def _wait_for_coordinator(address: str, timeout_s: float, pid: int, nproc: int) -> None:
    """A non-coordinator process checks that the coordinator's port answers within `timeout_s`
    before joining, so that a coordinator that never started is a clear error, not a runtime
    abort."""
    import socket
    import time

    from emfm.errors import UserError

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"distributed.coordinator_address={address!r}: give HOST:PORT")
    t_end = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=2.0):
                return
        except OSError as e:
            if time.monotonic() >= t_end:
                raise UserError(
                    f"jax.distributed: the coordinator {address} did not answer within "
                    f"distributed.timeout_s={timeout_s} s (process {pid} of {nproc}; {e}): start "
                    "process 0 there, or give every process the same reachable address"
                ) from None
            time.sleep(0.5)


def initialize(cfg) -> None:
    """`cfg`: DistributedConfig (enabled, coordinator_address, num_processes, process_id,
    cpu_devices, timeout_s). Joins `jax.distributed` when enabled, or automatically inside a Slurm
    job step of several tasks; a peer that never comes ends the start-up after `timeout_s` with an
    error that names the coordinator."""
    if cfg.cpu_devices:
        jax.config.update("jax_num_cpu_devices", int(cfg.cpu_devices))
    in_slurm = slurm_step_tasks() > 1
    if not cfg.enabled and not in_slurm:
        return
    # gloo carries cross-process collectives of the CPU backend; accelerators use their own
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    where = cfg.coordinator_address or "the coordinator from Slurm's environment"
    kw = {"initialization_timeout": int(cfg.timeout_s)}
    if cfg.coordinator_address and cfg.process_id != 0:
        _wait_for_coordinator(
            cfg.coordinator_address, cfg.timeout_s, cfg.process_id, cfg.num_processes
        )
    # the runtime ends the process itself (no Python exception) when a peer does not register in
    # time
    log.info(
        "jax.distributed: process %d of %d joining %s (up to %d s for every process; if the run "
        "ends "
        "with 'Terminating process' a peer did not start or cannot reach it)",
        cfg.process_id,
        cfg.num_processes,
        where,
        cfg.timeout_s,
    )
    if cfg.coordinator_address:
        jax.distributed.initialize(
            coordinator_address=cfg.coordinator_address,
            num_processes=cfg.num_processes,
            process_id=cfg.process_id,
            **kw,
        )
    else:
        jax.distributed.initialize(**kw)  # Slurm / cloud TPU auto-detection
    log.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def process() -> tuple[int, int]:
    """(this process's index, number of processes) of the JAX runtime."""
    return jax.process_index(), jax.process_count()


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (a no-op in one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
