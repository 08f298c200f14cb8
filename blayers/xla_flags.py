r"""XLA settings applied on ``import blayers``: each one undoes a slowdown of the installed jaxlib
that this library's steps were measured to hit, and each is added only where that jaxlib knows
it (XLA and LLVM end the process on a flag they do not know) and the user has not chosen.
``BLAYERS_KEEP_XLA_FLAGS=1`` leaves ``XLA_FLAGS`` as it is.

**GPU scatter-adds** (``-nvptx-allow-ftz-atomics``, an LLVM option passed through
``--xla_backend_extra_options``, where a CUDA plugin is installed). The gradient of a table
lookup :math:`\theta[\text{ids}]` is a scatter-add, :math:`g_r = \sum_{i: \text{id}_i = r}
d_i`, one atomic add per id on a GPU. Categorical data is heavy-tailed, so thousands of a
batch's adds can go to its hottest rows. The LLVM in jaxlib 0.10.2 and later lowers a float
atomic add to a compare-and-swap retry loop unless the kernel flushes subnormals (PTX's
``atom.add.f32`` on global memory always flushes them), and under that contention a retry
loop grows much faster than the batch (jax issue 38806): a large batch's step became many
times slower than a small one's, hand-written NumPyro's as this project's. The option keeps
the native instruction, at the price of a partial sum below ~1.2e-38 flushed to zero inside
that one add.

**CPU reductions** (``--xla_cpu_experimental_ynn_fusion_type=-reduce``). XLA:CPU hands small
reductions to YNNPACK, where each costs far more than the arithmetic (jax issue 37465): a
dense categorical-FM step at small tables spent most of its time in three of them. The flag
keeps reductions in XLA's own code, which made that step faster and left random-effects and
embedding steps unchanged.

**CPU kernels** (``--xla_cpu_use_fusion_emitters=false``). XLA:CPU's fusion emitters compile
each of a step's several hundred small fusions as its own LLVM module, which made compiling a
training step take most of a small job's start-up. XLA's older loop emitters compile the same
program in about 60% of the time, and its steps run as fast.

The measurements: ``benchmarks/results/design_measurements.md``.
"""

from __future__ import annotations

import mmap
import os
import warnings
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

KEEP = "BLAYERS_KEEP_XLA_FLAGS"
EXTRA_OPTIONS = "--xla_backend_extra_options="
CUDA_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin")


@dataclass(frozen=True)
class Setting:
    """One setting: ``flag`` is an ``XLA_FLAGS`` token, or with ``llvm`` an LLVM option for
    ``--xla_backend_extra_options``; ``name`` is the string a library that accepts it holds;
    ``chosen`` are the ``XLA_FLAGS`` substrings that mean the user has decided it."""

    flag: str
    name: str
    chosen: tuple[str, ...]
    llvm: bool = False
    cuda_only: bool = False


GPU_ATOMICS = Setting(
    flag="-nvptx-allow-ftz-atomics",
    name="nvptx-allow-ftz-atomics",
    chosen=("nvptx-allow-ftz-atomics", "--xla_gpu_ftz="),
    llvm=True,
    cuda_only=True,
)
CPU_REDUCTIONS = Setting(
    flag="--xla_cpu_experimental_ynn_fusion_type=-reduce",
    name="xla_cpu_experimental_ynn_fusion_type",
    chosen=("xla_cpu_experimental_ynn_fusion_type",),
)
CPU_KERNELS = Setting(
    flag="--xla_cpu_use_fusion_emitters=false",
    name="xla_cpu_use_fusion_emitters",
    chosen=("xla_cpu_use_fusion_emitters",),
)
SETTINGS = (GPU_ATOMICS, CPU_REDUCTIONS, CPU_KERNELS)


def with_flag(xla_flags: str, setting: Setting) -> str:
    """``xla_flags`` with ``setting`` added: an LLVM option joins ``--xla_backend_extra_options``
    (created if absent; its options are comma-separated), an XLA flag is appended."""
    tokens = xla_flags.split()
    if not setting.llvm:
        return " ".join([*tokens, setting.flag])
    for i, token in enumerate(tokens):
        if token.startswith(EXTRA_OPTIONS):
            value = token[len(EXTRA_OPTIONS) :]
            tokens[i] = EXTRA_OPTIONS + (f"{value},{setting.flag}" if value else setting.flag)
            return " ".join(tokens)
    return " ".join([*tokens, EXTRA_OPTIONS + setting.flag])


def package_libraries(package: str) -> list[Path]:
    """The shared objects of an installed package (none if it is not installed)."""
    spec = find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return []
    return sorted(
        path for root in spec.submodule_search_locations for path in Path(root).rglob("*.so*")
    )


def mentions(libraries: Iterable[Path], name: str) -> bool:
    """Whether any of ``libraries`` holds ``name``: a compiler that registers a flag or an
    option keeps its name as a string."""
    wanted = name.encode()
    for path in libraries:
        try:
            with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                if m.find(wanted) >= 0:
                    return True
        except (OSError, ValueError):  # unreadable, or empty (mmap of 0 bytes)
            continue
    return False


def _backends_initialized() -> bool:
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - a jax without the module
        return False
    check = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(check and check())


def apply(
    environ: MutableMapping[str, str] = os.environ,
    cuda_libraries: list[Path] | None = None,
    jaxlib_libraries: list[Path] | None = None,
    settings: Iterable[Setting] = SETTINGS,
) -> list[Setting]:
    """Add each of ``settings`` that applies to ``environ["XLA_FLAGS"]`` (see the module's
    docstring) and return those added. The library lists default to the installed CUDA
    plugins' and jaxlib's shared objects; a CUDA-only setting needs its name in both (the
    plugin compiles for the GPU, and jaxlib's compiler reads the same flags)."""
    if environ.get(KEEP, "") not in ("", "0"):
        return []
    flags = environ.get("XLA_FLAGS", "")
    wanted = [s for s in settings if not any(c in flags for c in s.chosen)]
    if any(s.cuda_only for s in wanted) and cuda_libraries is None:
        cuda_libraries = [p for pkg in CUDA_PLUGINS for p in package_libraries(pkg)]
    wanted = [s for s in wanted if not s.cuda_only or mentions(cuda_libraries or [], s.name)]
    if wanted and jaxlib_libraries is None:
        jaxlib_libraries = package_libraries("jaxlib")
    wanted = [s for s in wanted if mentions(jaxlib_libraries or [], s.name)]
    if not wanted:
        return []
    if _backends_initialized():
        warnings.warn(
            "jax's backends started before blayers was imported, so XLA keeps its defaults: "
            f"{' '.join(s.flag for s in wanted)} (see blayers.xla_flags); import blayers "
            "first, or set them in XLA_FLAGS before starting Python",
            RuntimeWarning,
            stacklevel=3,
        )
        return []
    for setting in wanted:
        flags = with_flag(flags, setting)
    environ["XLA_FLAGS"] = flags
    return wanted
