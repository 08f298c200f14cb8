"""``jax.jit`` for programs a process runs once: the whole-table draw of a scoring job.

On XLA:CPU most of such a program's cold cost is LLVM optimizing its kernels, not running
them. At LLVM's level 1 instead of XLA's default, the default job's 100-draw table draw
compiled in 0.9-1.0 s instead of 2.1-2.2 s and ran as fast (0.35 against 0.31 s), with the
same bits (``benchmarks/results/score_memory.txt``). Level 0 compiled faster still but ran
4× slower. Other backends keep their defaults: nothing there was measured.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

CPU_OPTIONS = {"xla_backend_optimization_level": 1}


def jit_once(fun: Callable[..., Any], **jit_kwargs: Any) -> Callable[..., Any]:
    """``jax.jit(fun, **jit_kwargs)``, compiled with :data:`CPU_OPTIONS` where the default
    backend is the CPU. It reads the backend, so call it once JAX's backends exist (as
    the scorer is made, after the restore), never at import: ``blayers.xla_flags`` sets
    flags before they start."""
    options = CPU_OPTIONS if jax.default_backend() == "cpu" else None
    return jax.jit(fun, compiler_options=options, **jit_kwargs)
