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


def initialize(cfg) -> None:
    """`cfg`: DistributedConfig (enabled, coordinator_address, num_processes, process_id, cpu_devices)."""
    if cfg.cpu_devices:
        jax.config.update("jax_num_cpu_devices", int(cfg.cpu_devices))
    in_slurm = "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1
    if not cfg.enabled and not in_slurm:
        return
    # gloo carries cross-process collectives of the CPU backend; accelerators use their own
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if cfg.coordinator_address:
        jax.distributed.initialize(coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
                                   process_id=cfg.process_id)
    else:
        jax.distributed.initialize()  # Slurm / cloud TPU auto-detection
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
