"""Wall time of each stage of a job, for its log and its record (``run.json``, the scoring
manifest): where a small job's seconds go (start-up, data, restore, compilation, steps).

Start-up is counted from the import of the service's package (``train``): Python's own
start-up before it is not in any stage.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # this module is the package's first import


class StageClock:
    """Marks the end of each stage; a stage marked again (a second segment) adds up."""

    def __init__(self, since: float = STARTED) -> None:
        self._last = since
        self.seconds: dict[str, float] = {}

    def mark(self, stage: str) -> float:
        """End ``stage`` now; returns its seconds this time."""
        now = time.perf_counter()
        spent = now - self._last
        self.seconds[stage] = self.seconds.get(stage, 0.0) + spent
        self._last = now
        return spent

    def record(self) -> dict[str, float]:
        """Seconds by stage, in the order they ran (milliseconds kept)."""
        return {stage: round(s, 3) for stage, s in self.seconds.items()}

    def line(self) -> str:
        """``stages: start-up 1.9 s, data 0.8 s, … (total 14.1 s)``."""
        parts = ", ".join(f"{stage} {s:.1f} s" for stage, s in self.seconds.items())
        return f"stages: {parts} (total {sum(self.seconds.values()):.1f} s)"
