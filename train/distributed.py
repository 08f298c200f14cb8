"""Multi-process runtime: ``jax.distributed`` when the job spans processes, and global batches.

Single-process jobs never touch the distributed runtime. A job is multi-process when
``distributed.enabled`` is true, or (left unset) when the environment says so: an explicit
``JAX_COORDINATOR_ADDRESS``, or a SLURM step with more than one task.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

_initialized = False


def wants_distributed(cfg: Any, env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    if cfg.enabled is not None:
        return bool(cfg.enabled)
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    return int(env.get("SLURM_NTASKS", "1") or 1) > 1


def maybe_initialize(cfg: Any, env: Mapping[str, str] | None = None) -> bool:
    """Start the distributed runtime if this job spans processes; idempotent.

    Coordinator, process count and id come from config, else from ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` (set by ``launch/local.py`` and the cluster
    recipes), else from JAX's own cluster detection (SLURM, Kubernetes, MPI, Cloud TPU).
    """
    global _initialized
    env = os.environ if env is None else env
    if _initialized or not wants_distributed(cfg, env):
        return _initialized
    jax.distributed.initialize(**initialize_kwargs(cfg, env))
    _initialized = True
    return True


def initialize_kwargs(cfg: Any, env: Mapping[str, str]) -> dict[str, Any]:
    """Arguments for ``jax.distributed.initialize`` from config, then environment."""
    kwargs: dict[str, Any] = {}
    coordinator = cfg.coordinator or env.get("JAX_COORDINATOR_ADDRESS")
    num = cfg.num_processes if cfg.num_processes is not None else env.get("JAX_NUM_PROCESSES")
    pid = cfg.process_id if cfg.process_id is not None else env.get("JAX_PROCESS_ID")
    if coordinator:
        kwargs["coordinator_address"] = coordinator
    if num is not None:
        kwargs["num_processes"] = int(num)
    if pid is not None:
        kwargs["process_id"] = int(pid)
    kwargs["heartbeat_timeout_seconds"] = int(cfg.heartbeat_timeout_s)
    return kwargs


def barrier(name: str) -> None:
    """All processes reach this point before any goes on (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def global_batch(
    local: Mapping[str, np.ndarray], shardings: Mapping[str, NamedSharding]
) -> dict[str, jax.Array]:
    """Assemble this process's rows into global arrays sharded on the ``data`` axis."""
    if jax.process_count() == 1:  # one transfer for the whole batch
        return jax.device_put(
            {k: np.asarray(v) for k, v in local.items() if k in shardings},
            {k: shardings[k] for k in local if k in shardings},
        )
    return {
        k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v))
        for k, v in local.items()
        if k in shardings
    }
