"""One trainer per run directory: an exclusive lock that a crashed holder cannot leave stale.

The lock is ``flock(2)`` on ``run_dir/.lock``. The kernel drops it when the holding process
exits, however it exits (``kill -9`` included), so a crash never leaves a stale lock; the file
itself only records who holds it, for the refusal message, and is removed when the holder
finishes (with the run directory, when the run created it and wrote nothing there). Locks on
network filesystems follow that filesystem's ``flock`` semantics.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = ".lock"


class RunDirBusyError(RuntimeError):
    """Another process holds the run directory; the message names it."""


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
    return f"PID {info.get('pid')} on host {info.get('host')} (since {since})"


@contextlib.contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the block; :class:`RunDirBusyError` at once if it is held."""
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    held = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirBusyError(
                f"run_dir {str(run_dir)!r} is in use by {_holder(fd)}: wait for it to "
                "finish, or use another run_dir"
            ) from None
        held = True
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        yield
    finally:
        if held:  # the record goes with the holder; a run refused before it wrote leaves none
            path.unlink(missing_ok=True)
            if created:
                with contextlib.suppress(OSError):
                    run_dir.rmdir()  # only if empty
        os.close(fd)  # releases the lock
