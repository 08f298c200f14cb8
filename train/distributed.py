"""Multi-process runtime: ``jax.distributed`` when the job spans processes, and global batches.

Single-process jobs never touch the distributed runtime. Where a multi-process job learns its
place, field by field (the first source that has the field wins):

1. config: ``distributed.coordinator`` / ``num_processes`` / ``process_id``;
2. ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` (``launch/local.py``,
   the Kubernetes manifest);
3. a SLURM job step (``srun``): ``SLURM_STEP_NUM_TASKS``, ``SLURM_PROCID`` and the first host of
   ``SLURM_STEP_NODELIST`` on a port derived from ``SLURM_JOB_ID``;
4. a Kubernetes Indexed Job: ``JOB_COMPLETION_INDEX`` as the process id;
5. whatever is still unset is left to JAX's own cluster detection (Cloud TPU, MPI, ...), which
   is only reached with ``distributed.enabled=true``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from .config import DistributedConfig

_initialized = False
# Far from common service ports; + SLURM_JOB_ID % span keeps jobs sharing a node apart.
SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 20000


@dataclass(frozen=True)
class Placement:
    """This process's place in the job, and where each field came from."""

    coordinator: str | None
    num_processes: int | None
    process_id: int | None
    sources: tuple[str, ...]

    @property
    def multi_process(self) -> bool:
        if self.num_processes is not None:
            return self.num_processes > 1
        return self.coordinator is not None


def expand_hostlist(nodelist: str) -> list[str]:
    """SLURM's compressed host list (``gpu[01-03,07],cpu5``) as host names, in order."""
    hosts: list[str] = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", nodelist):
        expanded = [""]
        for literal, ranges in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", item):
            choices = [literal]
            if ranges:
                choices = [literal + r for r in _expand_ranges(ranges, nodelist)]
            expanded = [e + c for e in expanded for c in choices]
        hosts.extend(h for h in expanded if h)
    if not hosts:
        raise ValueError(f"empty SLURM node list {nodelist!r}")
    return hosts


def _expand_ranges(ranges: str, nodelist: str) -> list[str]:
    out: list[str] = []
    for part in ranges.split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"cannot read SLURM node list {nodelist!r} (range {part!r})")
        width = len(lo)
        out.extend(str(i).zfill(width) for i in range(int(lo), int(hi or lo) + 1))
    return out


def _int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _slurm(env: Mapping[str, str]) -> dict[str, Any]:
    """Placement from a SLURM job step. Only inside ``srun`` (``SLURM_STEP_NUM_TASKS``): the
    batch script itself also sees ``SLURM_NTASKS`` but is a single process."""
    tasks = _int(env, "SLURM_STEP_NUM_TASKS")
    if tasks is None or tasks <= 1:
        return {}
    found: dict[str, Any] = {"num_processes": tasks, "process_id": _int(env, "SLURM_PROCID")}
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if nodes:
        port = _int(env, "BLAYERS_COORDINATOR_PORT")
        if port is None:
            port = SLURM_PORT_BASE + (_int(env, "SLURM_JOB_ID") or 0) % SLURM_PORT_SPAN
        found["coordinator"] = f"{expand_hostlist(nodes)[0]}:{port}"
    return found


def _kubernetes(env: Mapping[str, str]) -> dict[str, Any]:
    index = _int(env, "JOB_COMPLETION_INDEX")
    return {} if index is None else {"process_id": index}


def resolve_placement(cfg: DistributedConfig, env: Mapping[str, str] | None = None) -> Placement:
    """Merge config and environment into this process's placement (see the module doc)."""
    env = os.environ if env is None else env
    layers = [
        (
            "config",
            {
                "coordinator": cfg.coordinator,
                "num_processes": cfg.num_processes,
                "process_id": cfg.process_id,
            },
        ),
        (
            "JAX_* environment",
            {
                "coordinator": env.get("JAX_COORDINATOR_ADDRESS") or None,
                "num_processes": _int(env, "JAX_NUM_PROCESSES"),
                "process_id": _int(env, "JAX_PROCESS_ID"),
            },
        ),
        ("SLURM", _slurm(env)),
        ("Kubernetes Indexed Job", _kubernetes(env)),
    ]
    chosen: dict[str, Any] = {}
    sources: list[str] = []
    for field_name in ("coordinator", "num_processes", "process_id"):
        for source, values in layers:
            if values.get(field_name) is not None:
                chosen[field_name] = values[field_name]
                sources.append(f"{field_name} from {source}")
                break
    placement = Placement(
        chosen.get("coordinator"),
        chosen.get("num_processes"),
        chosen.get("process_id"),
        tuple(sources),
    )
    _check(placement)
    return placement


def _check(p: Placement) -> None:
    where = "; ".join(p.sources)
    if p.num_processes is not None and p.num_processes < 1:
        raise ValueError(f"num_processes={p.num_processes} must be >= 1 ({where})")
    pid, num = p.process_id, p.num_processes
    if pid is not None and num is not None and not 0 <= pid < num:
        raise ValueError(
            f"process_id={pid} is outside [0, {num}) ({where}); check JAX_PROCESS_ID / "
            "SLURM_PROCID / JOB_COMPLETION_INDEX against the process count"
        )
    if p.coordinator is not None and not re.fullmatch(r"\[?[^\s\[\]]+\]?:\d+", p.coordinator):
        raise ValueError(
            f"coordinator address {p.coordinator!r} must be host:port ({where}), "
            "e.g. JAX_COORDINATOR_ADDRESS=node001:20001"
        )


def wants_distributed(cfg: DistributedConfig, env: Mapping[str, str] | None = None) -> bool:
    """Multi-process when config says so, or (unset) when the environment places this process
    in a job of more than one process."""
    if cfg.enabled is not None:
        return bool(cfg.enabled)
    return resolve_placement(cfg, env).multi_process


def maybe_initialize(cfg: DistributedConfig, env: Mapping[str, str] | None = None) -> bool:
    """Start the distributed runtime if this job spans processes; idempotent."""
    global _initialized
    env = os.environ if env is None else env
    if _initialized or not wants_distributed(cfg, env):
        return _initialized
    jax.distributed.initialize(**initialize_kwargs(cfg, env))
    _initialized = True
    return True


def initialize_kwargs(cfg: DistributedConfig, env: Mapping[str, str]) -> dict[str, Any]:
    """Arguments for ``jax.distributed.initialize``; unset fields are left to JAX's detection."""
    for key in ("heartbeat_timeout_s", "init_timeout_s"):
        if int(cfg[key]) < 1:
            raise ValueError(f"distributed.{key}={cfg[key]} must be at least 1 second")
    placement = resolve_placement(cfg, env)
    kwargs: dict[str, Any] = {
        "heartbeat_timeout_seconds": int(cfg.heartbeat_timeout_s),
        "initialization_timeout": int(cfg.init_timeout_s),
    }
    if placement.coordinator is not None:
        kwargs["coordinator_address"] = placement.coordinator
    if placement.num_processes is not None:
        kwargs["num_processes"] = placement.num_processes
    if placement.process_id is not None:
        kwargs["process_id"] = placement.process_id
    return kwargs


@contextmanager
def explain_peer_failure(what: str) -> Iterator[None]:
    """Turn a broken cross-process collective into a message that says what to do."""
    try:
        yield
    except jax.errors.JaxRuntimeError as err:
        if jax.process_count() == 1:
            raise
        first_line = str(err).strip().splitlines()[0]
        raise RuntimeError(
            f"{what} stopped on process {jax.process_index()} of {jax.process_count()}: a "
            f"collective with another process failed ({first_line}). Another process most "
            "likely died; its log has the cause. The remaining processes exit within "
            "distributed.heartbeat_timeout_s. Rerun the same command on every process to resume "
            "from the last complete checkpoint."
        ) from err


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


def step_inputs(
    local: Mapping[str, np.ndarray], shardings: Mapping[str, NamedSharding]
) -> dict[str, jax.Array | np.ndarray]:
    """A batch for a step jitted with ``in_shardings``. With one process the rows already are
    the global batch and stay numpy arrays: the step's C++ argument path places them by its
    ``in_shardings`` at a fraction of a separate ``device_put``'s cost per array. Every batch
    has fresh buffers, never written after."""
    if jax.process_count() == 1:
        return {k: np.asarray(v) for k, v in local.items() if k in shardings}
    return global_batch(local, shardings)
