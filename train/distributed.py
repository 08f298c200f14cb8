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


def maybe_initialize(cfg: Any) -> bool:
    """Start the distributed runtime if this job spans processes; idempotent."""
    global _initialized
    if _initialized or not wants_distributed(cfg):
        return _initialized
    kwargs: dict[str, Any] = {}
    if cfg.coordinator:
        kwargs["coordinator_address"] = cfg.coordinator
    if cfg.num_processes is not None:
        kwargs["num_processes"] = cfg.num_processes
    if cfg.process_id is not None:
        kwargs["process_id"] = cfg.process_id
    kwargs["heartbeat_timeout_seconds"] = cfg.heartbeat_timeout_s
    jax.distributed.initialize(**kwargs)
    _initialized = True
    return True


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
