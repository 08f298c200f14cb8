"""JAX's persistent compilation cache, on by default for the service's commands.

Each command (train, summary, score, effects) is its own process, and without a disk cache
each compiles its programs again: on a small job that is most of its wall time. The cache
lives in ``$BLAYERS_COMPILATION_CACHE`` if set (``off`` turns it off), else
``$XDG_CACHE_HOME/blayers/jax``, else ``~/.cache/blayers/jax``; a cache directory set
through JAX's own ``JAX_COMPILATION_CACHE_DIR`` wins over all of these.

It is safe across versions and machines: JAX keys each entry by the program, the JAX and
jaxlib versions, the backend and device kinds and the compile options, so an upgrade or
another accelerator only misses. The directory is the user's own (created ``0700``): JAX
treats what it reads there as trusted code. Every program is kept, however quick to compile
(:data:`MIN_COMPILE_SECONDS`): a job compiles many small ones (the model's description
alone compiles dozens), and keeping them all cut the default job's setup from the cache by
more than half for about twice the entries' bytes (``benchmarks/results/
design_measurements.md``). The cache is
capped at :data:`MAX_BYTES` (the least recently used entries go first). A cache that cannot
be created is skipped with one line, never an error.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

ENV = "BLAYERS_COMPILATION_CACHE"
MIN_COMPILE_SECONDS = 0.0
MAX_BYTES = 2 * 1024**3

_enabled: list[Path] = []


def cache_dir() -> Path | None:
    """Where the cache goes, or ``None`` when it is turned off."""
    chosen = os.environ.get(ENV, "").strip()
    if chosen.lower() in ("off", "0", "false", "none"):
        return None
    if chosen:
        return Path(chosen).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "blayers" / "jax"


def enable(log: Callable[[str], None] = print) -> Path | None:
    """Turn the cache on (once per process, before the first compilation); returns its
    directory, or ``None`` when off, unavailable or set through JAX's own setting."""
    import jax

    if _enabled:
        return _enabled[0]
    if jax.config.jax_compilation_cache_dir:  # the user's own JAX setting
        return None
    where = cache_dir()
    if where is None:
        return None
    try:
        where.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as err:
        log(f"note: no compilation cache ({where}: {err.strerror}); set {ENV}=off to hide this")
        return None
    jax.config.update("jax_compilation_cache_dir", str(where))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    _enabled.append(where)
    return where
