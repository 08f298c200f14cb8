"""The training loop: steps over batches, and hooks that act after each step.

The loop owns only the step: it runs the compiled step on each batch and hands the
:class:`Progress` to its hooks in order. Everything else a run does between steps is a hook
(:mod:`train.hooks`): recentering, convergence checks, the non-finite guard, metrics and the
progress bar, checkpoints, and stop requests (SIGTERM, ``train.stop_after``, convergence).
A hook may replace the state, ask the loop to stop after this step (``halt``), or report that
the run diverged (``diverged``), which ends the segment at once, before any later hook sees
the step; the caller then stops or rolls back (``train.non_finite``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .state import TrainState


@dataclass
class Progress:
    """Where a run is: the step just taken, its state and loss, and what the hooks decided."""

    step: int
    state: TrainState
    loss: Any = None  # this step's loss, on the device
    losses: Any = None  # the loss of each step of the last dispatch (``taken`` of them)
    taken: int = 1  # steps the last dispatch took (train.dispatch)
    last_loss: float = math.nan  # the loss at the last logged step, on the host
    halt: bool = False  # end the segment after this step (a stop request)
    diverged: str | None = None  # what went wrong; the segment ends before later hooks


class Hook(Protocol):
    def after_step(self, progress: Progress) -> None:
        """Act on the step just taken; may set ``progress.state``, ``halt`` or ``diverged``."""


class Trainer:
    """Runs ``step(state, batch) -> (state, loss)`` over batches, hooks after each step. A
    batch may hold several steps' batches (:class:`train.dispatch.Stacked`); the step then
    returns each step's loss, and the hooks run once, after its last step (the dispatch
    plan ends a dispatch wherever a hook acts, :mod:`train.dispatch`).
    ``block_every_step``: wait for each dispatch to finish (fake CPU devices can deadlock on
    un-blocked collective loops, see DESIGN)."""

    def __init__(
        self,
        step: Callable[[TrainState, Any], tuple[TrainState, Any]],
        hooks: Sequence[Hook],
        block_every_step: bool = False,
    ) -> None:
        self.step = step
        self.hooks = list(hooks)
        self.block_every_step = block_every_step

    def steps(self, progress: Progress, batches: Iterable[Any]) -> Iterator[Progress]:
        """Yields the :class:`Progress` after each step and its hooks, until the batches run
        out, a hook halts, or one reports a divergence (yielded before any later hook sees
        the step). A caller may read or replace ``progress.state`` between steps."""
        for batch in batches:
            progress.state, progress.losses = self.step(progress.state, batch)
            progress.taken = int(np.size(progress.losses))
            progress.loss = progress.losses[-1] if np.ndim(progress.losses) else progress.losses
            progress.step += progress.taken
            if self.block_every_step:
                progress.loss.block_until_ready()
            for hook in self.hooks:
                hook.after_step(progress)
                if progress.diverged is not None:
                    break
            yield progress
            if progress.diverged is not None or progress.halt:
                return

    def run(self, progress: Progress, batches: Iterable[Any]) -> Progress:
        """:meth:`steps` to the end; ``progress``, updated in place, as the last step left it."""
        for _ in self.steps(progress, batches):
            pass
        return progress


class WaitClock:
    """An iterator of batches that keeps the time the training loop spent waiting for them:
    the share of wall time the data pipeline, not the step, held training up. The run's share
    counts from the first :meth:`lap` on, past the pipeline's start and the step's compile."""

    def __init__(self, batches: Iterator[Any]) -> None:
        self._batches = batches
        self._lap = 0.0
        self._total = 0.0
        self._steady_since: float | None = None

    def __iter__(self) -> WaitClock:
        return self

    def __next__(self) -> Any:
        t = time.perf_counter()
        try:
            return next(self._batches)
        finally:
            self._lap += time.perf_counter() - t

    def lap(self) -> float:
        """Seconds waited since the last lap."""
        lap, self._lap = self._lap, 0.0
        if self._steady_since is None:
            self._steady_since = time.perf_counter()
        else:
            self._total += lap
        return lap

    def total_fraction(self) -> float:
        """Share of the wall time from the first lap to the last spent waiting for batches
        (0 before a second lap)."""
        if self._steady_since is None:
            return 0.0
        return self._total / max(time.perf_counter() - self._steady_since, 1e-9)
