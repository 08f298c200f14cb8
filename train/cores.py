"""CPU cores for training on the CPU backend (``data.dedicated_cores``): the data
pipeline's threads on cores of their own, XLA's thread pool on the rest.

XLA:CPU runs each step on an intra-op thread pool sized to the cores the creating thread may
use, and by default both it and the pipeline's threads float over every core. How that pays
depends on the step (``benchmarks/train_throughput.py``; figures in
``benchmarks/results/design_measurements.md``):

- a step as cheap as preparing its batch (random effects): split over two threads its few
  hundred small kernels cost twice the CPU and no time, and take the core the pipeline needs.
  Split, both step-only and end to end are faster.
- heavier steps (embedding, FM, the default job) use the second core and are slower split.

So it is off by default. :func:`reserve` creates JAX's backend while the calling thread may
use only the compute cores, so the pool is sized and placed there; the calling thread then gets
all its cores back. :meth:`CoreSplit.pin_data_thread` moves a pipeline thread onto the data
cores. Moving an existing pool's threads afterwards does not do the same: two pool threads
sharing one core made the step slower, not faster.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from dataclasses import dataclass


def pipeline_threads(prefetch: int, cores: int | None = None) -> int:
    """Background threads of the data pipeline: ``prefetch``, leaving at least one core to
    the step (a second pipeline thread on 2 cores slowed end-to-end training by ~15%)."""
    cores = (os.cpu_count() or 2) if cores is None else cores
    return max(1, min(prefetch, cores - 1))


@dataclass(frozen=True)
class CoreSplit:
    compute: frozenset[int]
    data: frozenset[int]

    def pin_data_thread(self) -> None:
        """Restrict the calling thread to the data cores (once per thread; never the main
        thread, which dispatches steps)."""
        if getattr(_pinned, "done", False) or threading.current_thread() is threading.main_thread():
            return
        os.sched_setaffinity(0, self.data)
        _pinned.done = True


_pinned = threading.local()


def split_cores(allowed: set[int] | frozenset[int], prefetch: int) -> CoreSplit | None:
    """The last :func:`pipeline_threads` of the ``allowed`` cores for data, the rest for
    compute; None with fewer than two cores."""
    cores = sorted(allowed)
    if len(cores) < 2:
        return None
    n = pipeline_threads(prefetch, len(cores))
    return CoreSplit(frozenset(cores[:-n]), frozenset(cores[-n:]))


def _backends_exist() -> bool | None:
    """Whether JAX has created its backends (None: this JAX does not say)."""
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - a JAX without the module
        return None
    probe = getattr(xla_bridge, "backends_are_initialized", None)
    return None if probe is None else bool(probe())


def _cpu_devices_requested(num_cpu_devices: int) -> int:
    """CPU devices JAX will create: ``jax_num_cpu_devices`` when set, else XLA's
    ``--xla_force_host_platform_device_count``, else one."""
    if num_cpu_devices > 0:
        return num_cpu_devices
    found = re.findall(
        r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", "")
    )
    return int(found[-1]) if found else 1


def reserve(prefetch: int) -> tuple[CoreSplit | None, str]:
    """Create JAX's backend with the pool on the compute cores; returns the split (None when
    it does not apply) and a line saying what was done. Call it before anything else uses
    JAX: once the backend exists its pool cannot be moved, so this then does nothing."""
    if not hasattr(os, "sched_setaffinity"):
        return None, "data cores: not set (this platform has no CPU affinity)"
    if _backends_exist() is not False:
        return None, "data cores: not set (JAX's backend was created before training started)"
    import jax  # here: the data stage imports this module and needs no JAX

    devices = _cpu_devices_requested(getattr(jax.config, "jax_num_cpu_devices", -1))
    if devices > 1:
        # several CPU devices (a sharded CPU run, fake devices in tests) share the pool for
        # all their computations; the split is made and measured for one device
        return None, f"data cores: not set ({devices} CPU devices)"
    allowed = os.sched_getaffinity(0)
    split = split_cores(allowed, prefetch)
    if split is None:
        return None, "data cores: not set (one core)"

    os.sched_setaffinity(0, split.compute)
    try:
        backend = jax.default_backend()
    finally:
        os.sched_setaffinity(0, allowed)
    if backend != "cpu":
        # an accelerator's host threads were created on the compute cores: give them all back
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError):  # a thread that has exited since the listing
                os.sched_setaffinity(int(tid), allowed)
        return None, f"data cores: not set (backend {backend})"
    return split, (
        f"data cores: pipeline threads on {sorted(split.data)}, XLA's pool on "
        f"{sorted(split.compute)}"
    )
