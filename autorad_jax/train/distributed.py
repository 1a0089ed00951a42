"""Multi-host start-up: `jax.distributed.initialize` from flags or the environment."""

from __future__ import annotations

import os

import jax
from absl import logging


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False) -> None:
    """Joins the processes of a multi-host run; a no-op for a single process.

    Explicit arguments win; otherwise JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID from the
    environment; `auto` lets JAX detect the cluster (Cloud TPU pod slice, SLURM, Open MPI, Kubernetes).
    Call it before anything touches a JAX device.
    """
    address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        num = num_processes if num_processes is not None else int(os.environ["JAX_NUM_PROCESSES"])
        pid = process_id if process_id is not None else int(os.environ["JAX_PROCESS_ID"])
        jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)
    elif auto:
        jax.distributed.initialize()
    else:
        return
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
