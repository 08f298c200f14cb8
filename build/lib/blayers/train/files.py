"""Writing the service's own files: whole or not at all, and never through a planted link.

Every file the service writes (a run's vocabulary, data stamp, ``run.json``, summaries, score
parts and manifests, the report) is written to a fresh temporary file beside its destination,
created exclusively (``mkstemp``: ``O_CREAT | O_EXCL``, so a link planted under a guessable
temporary name is never opened), then renamed over the destination. A rename replaces a
symlink at the destination instead of writing through it, and a reader sees either the old
file or the new one, never a torn write; a kill in between leaves only a hidden temporary,
which the next write of that path removes.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)  # read once, at import: ``mkstemp`` files are 0600, ours follow the umask


def remove_temporaries(path: Path) -> None:
    """Remove what a killed writer of ``path`` left: its hidden temporaries. A path has one
    writer at a time (the run directory's lock; one process per score part)."""
    path = Path(path)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*tmp"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Create ``path`` by ``write(tmp)`` on a fresh temporary beside it, then rename."""
    path = Path(path)
    remove_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: Path, text: str) -> None:
    """``path.write_text(text)``, atomically (module docstring)."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


@contextlib.contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """A fresh hidden directory beside ``path`` to fill; renamed to ``path`` when the block
    ends without error, removed otherwise. ``path`` must not exist: a directory appears
    whole or not at all."""
    path = Path(path)
    remove_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)
        yield tmp
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_regular_file(path: Path) -> bool:
    """A regular file of our own at ``path``: not a symlink (a planted link is never read as
    one of our outputs)."""
    return Path(path).is_file() and not Path(path).is_symlink()
