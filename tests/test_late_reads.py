"""train/late_reads.py: what a failed checkpoint read leaves behind is dropped, and nothing
else is."""

from __future__ import annotations

import logging
import sys
import types
import warnings

from train import late_reads


def test_only_the_three_kinds_of_late_noise_are_dropped(caplog, monkeypatch):
    # the flag makes the CLI skip interpreter shutdown: put it back for the tests after
    monkeypatch.setattr(late_reads, "_failed", False)
    # installed afresh over this test's hook, whatever an earlier restore in this process did
    monkeypatch.setattr(late_reads, "_hooked", False)
    seen = []
    previous = sys.unraisablehook
    sys.unraisablehook = seen.append
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with late_reads.contained() as failed:
                warnings.warn("coroutine 'read' was never awaited", RuntimeWarning, stacklevel=1)
                warnings.warn("something else", RuntimeWarning, stacklevel=1)
                failed()
        assert [str(w.message) for w in caught] == ["something else"]
        closed = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"))
        other = types.SimpleNamespace(exc_value=RuntimeError("a real bug"))
        sys.unraisablehook(closed)
        sys.unraisablehook(other)
        assert seen == [other]
    finally:
        sys.unraisablehook = previous
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        logging.getLogger("asyncio").error("Task exception was never retrieved: orbax read")
        logging.getLogger("asyncio").error("Task exception was never retrieved: user code")
    assert [r.getMessage() for r in caplog.records] == [
        "Task exception was never retrieved: user code"
    ]
    assert late_reads.restore_failed()
