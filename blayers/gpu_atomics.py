"""Native float atomics for scatter-adds on NVIDIA GPUs.

The gradient of a table lookup ``theta[ids]`` is a scatter-add, ``g_r = sum_{i: ids_i = r} d_i``,
and on a GPU XLA emits it as one atomic add per id. Categorical data is heavy-tailed: at batch
65,536 with Zipf ids the hottest row takes thousands of those adds. The LLVM that XLA builds
with from jaxlib 0.10.2 on lowers a float atomic add to a compare-and-swap retry loop unless the
kernel flushes subnormals (PTX's ``atom.add.f32`` on global memory always flushes them), and a
retry loop under that contention grows much faster than the batch (jax issue 38806). On one
H200 with jaxlib 0.11.2 a random-effects step at 10^7 categories took 20-21 ms at batch 65,536
against 0.5-0.6 ms at 4,096, for hand-written NumPyro as for this project's step.

LLVM's ``-nvptx-allow-ftz-atomics`` keeps the native instruction, at the price of a partial sum
below ~1.2e-38 being flushed to zero inside that one add. This module passes the option to XLA
(``--xla_backend_extra_options``) when a CUDA plugin is installed and both its compiler and
jaxlib's know the option: an option LLVM does not know ends the process. It runs on
``import blayers``, before any backend reads ``XLA_FLAGS``. ``BLAYERS_GPU_CAS_ATOMICS=1``
keeps XLA's default; a user's own choice in ``XLA_FLAGS`` is left alone.
"""

from __future__ import annotations

import mmap
import os
import warnings
from collections.abc import Iterable, MutableMapping
from importlib.util import find_spec
from pathlib import Path

OPTION = "-nvptx-allow-ftz-atomics"
EXTRA_OPTIONS = "--xla_backend_extra_options="
OPT_OUT = "BLAYERS_GPU_CAS_ATOMICS"
CUDA_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin")


def with_option(xla_flags: str, option: str = OPTION) -> str:
    """``xla_flags`` with ``option`` added to its ``--xla_backend_extra_options`` (created if
    absent; the options in it are comma-separated)."""
    tokens = xla_flags.split()
    for i, token in enumerate(tokens):
        if token.startswith(EXTRA_OPTIONS):
            value = token[len(EXTRA_OPTIONS) :]
            tokens[i] = EXTRA_OPTIONS + (f"{value},{option}" if value else option)
            return " ".join(tokens)
    return " ".join([*tokens, EXTRA_OPTIONS + option])


def _package_libraries(package: str) -> list[Path]:
    spec = find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return []
    return sorted(
        path for root in spec.submodule_search_locations for path in Path(root).rglob("*.so*")
    )


def mentions(libraries: Iterable[Path], option: str = OPTION) -> bool:
    """Whether any of ``libraries`` holds the option's name: an LLVM that registers a
    command-line option keeps its name as a string."""
    name = option.lstrip("-").encode()
    for path in libraries:
        try:
            with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                if m.find(name) >= 0:
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


def use_native_atomics(
    environ: MutableMapping[str, str] = os.environ,
    plugin_libraries: list[Path] | None = None,
    jaxlib_libraries: list[Path] | None = None,
) -> bool:
    """Add :data:`OPTION` to ``environ["XLA_FLAGS"]`` where it applies (see the module's
    docstring); returns whether it did. The library lists default to the installed CUDA
    plugins' and jaxlib's shared objects."""
    if environ.get(OPT_OUT, "") not in ("", "0"):
        return False
    flags = environ.get("XLA_FLAGS", "")
    if OPTION in flags or "--xla_gpu_ftz=" in flags:
        return False  # the user has chosen
    if plugin_libraries is None:
        plugin_libraries = [p for pkg in CUDA_PLUGINS for p in _package_libraries(pkg)]
    if not plugin_libraries or not mentions(plugin_libraries):
        return False
    if jaxlib_libraries is None:
        jaxlib_libraries = _package_libraries("jaxlib")
    if not mentions(jaxlib_libraries):
        return False
    if _backends_initialized():
        warnings.warn(
            "jax's backends started before blayers was imported, so GPU scatter-adds keep "
            f"compare-and-swap atomics (slow on repeated ids); import blayers first, or set "
            f"XLA_FLAGS='{EXTRA_OPTIONS}{OPTION}' before starting Python",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    environ["XLA_FLAGS"] = with_option(flags)
    return True
