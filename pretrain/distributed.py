"""Several processes (TPU pods, SLURM): starting jax.distributed, and host values summed over
processes."""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging
from ml_collections import ConfigDict

DISTRIBUTED_MODES = ("auto", "on", "off")


def launched_on_several_hosts() -> bool:
    """Whether the usual multi-host launchers set this process up (SLURM with several tasks, a
    coordinator address in the environment, a multi-host TPU slice)."""
    return (
        int(os.environ.get("SLURM_NTASKS", "1")) > 1
        or "JAX_COORDINATOR_ADDRESS" in os.environ
        or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
        or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ
    )


def maybe_initialize_distributed(config: ConfigDict) -> None:
    """Start jax.distributed when launched on several hosts (before any other JAX call).

    ``config.distributed``: "auto" detects the launchers (:func:`launched_on_several_hosts`),
    "on" always, "off" never.
    """
    mode = config.get("distributed", "auto")
    if mode not in DISTRIBUTED_MODES:
        raise ValueError(f"config.distributed={mode!r}; use 'auto', 'on' or 'off'")
    if mode == "off":
        return
    if mode == "on" or launched_on_several_hosts():
        jax.distributed.initialize()
        logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def sum_over_processes(local_count: int) -> float:
    """The sum of a host-side counter over all processes (every process gets it)."""
    if jax.process_count() == 1:
        return float(local_count)
    from jax.experimental import multihost_utils

    return float(np.sum(multihost_utils.process_allgather(np.asarray(local_count))))
