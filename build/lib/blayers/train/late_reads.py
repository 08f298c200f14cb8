"""Containing what a failed checkpoint read leaves behind.

When one array of a checkpoint fails to read, Orbax raises at once while TensorStore's other
reads are still in flight on their own threads. What is left then surfaces on its own time,
often after (or even before) the one-line error the user gets:

- a finished read wakes an event loop Orbax has closed: ``RuntimeError: Event loop is
  closed`` through ``sys.unraisablehook``;
- the tasks whose result nobody took: asyncio's "Task exception was never retrieved";
- coroutines created but never started: ``RuntimeWarning: coroutine ... was never awaited``.

Each is noise about a failure that is already reported. :func:`contained` is wrapped around
every restore; only those three kinds are dropped (the asyncio ones only where they name
Orbax).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

_hooked = False
_failed = False


def _late_loop_callback(args: Any) -> bool:
    return isinstance(args.exc_value, RuntimeError) and "Event loop is closed" in str(
        args.exc_value
    )


class _UnretrievedReadFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Task exception was never retrieved") and "orbax" in message)


def _install() -> None:
    """Installed once, before the first restore: a late callback can fire before the failed
    restore has even returned."""
    global _hooked
    if _hooked:
        return
    _hooked = True
    previous = sys.unraisablehook

    def hook(args: Any) -> None:
        if not _late_loop_callback(args):
            previous(args)

    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_UnretrievedReadFilter())


@contextlib.contextmanager
def contained() -> Iterator[Callable[[], None]]:
    """Run a restore inside; it yields ``failed``, to be called once the restore's exception
    has been handled and let go, so that what it left behind is collected here, with the
    warning filter still in place, and nothing of it prints later."""
    _install()
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning
        )
        yield _failed_now


def _failed_now() -> None:
    global _failed
    _failed = True
    gc.collect()


def restore_failed() -> bool:
    """Whether a restore failed in this process (TensorStore may still finish reads late)."""
    return _failed
