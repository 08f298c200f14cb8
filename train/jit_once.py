"""``jax.jit`` for programs a process runs once: the whole-table draw of a scoring job.

On XLA:CPU most of such a program's cold cost is LLVM optimizing its kernels, not running
them. At LLVM's level 1 instead of XLA's default, the default job's 100-draw table draw
compiled in 0.9-1.0 s instead of 2.1-2.2 s and ran as fast (0.35 against 0.31 s), with the
same bits (``benchmarks/results/score_memory.txt``). Level 0 compiled faster still but ran
4× slower. Other backends keep their defaults: nothing there was measured.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax

CPU_OPTIONS = {"xla_backend_optimization_level": 1}


def jit_once(fun: Callable[..., Any], **jit_kwargs: Any) -> Callable[..., Any]:
    """``jax.jit(fun, **jit_kwargs)``, compiled with :data:`CPU_OPTIONS` where the default
    backend is the CPU. The backend is read at the first call, not at import: importing
    must not start JAX's backends (``blayers.xla_flags`` sets flags before they start)."""
    by_backend: dict[str, Callable[..., Any]] = {}

    @functools.wraps(fun)
    def call(*args: Any, **kwargs: Any) -> Any:
        backend = jax.default_backend()
        if backend not in by_backend:
            options = CPU_OPTIONS if backend == "cpu" else None
            by_backend[backend] = jax.jit(fun, compiler_options=options, **jit_kwargs)
        return by_backend[backend](*args, **kwargs)

    return call
