"""What a training run does between steps, one hook each (:class:`train.trainer.Trainer`).

In the order the service runs them after every step: :class:`Recentering`,
:class:`ConvergenceChecks`, :class:`NonFiniteGuard`, :class:`Metrics` (the progress bar and
``metrics.jsonl``), :class:`Checkpoints` and :class:`StopRequests`. The order matters where a
hook reads what an earlier one did: the guard decides a logged step's fate before it is
logged, and a checkpoint is written before a stop request ends the segment.

Each hook names its ``periods``: it acts only after steps that are multiples of one of them
(a period of 0 never acts). A dispatch of several steps (:mod:`train.dispatch`) must not pass
such a step, so the run's steps per dispatch divide them all (:func:`periods`). A hook that
acts at any dispatch's end (a stop request) names none.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Callable, Sequence
from typing import IO, Any

import numpy as np

from . import nonfinite
from .convergence import ConvergenceTracker
from .metric_sinks import Sink
from .stages import StageClock
from .trainer import Progress, WaitClock


def periods(segment: Sequence[Any]) -> list[int]:
    """Every step period at which a hook of ``segment`` acts."""
    return [p for hook in segment for p in hook.periods]


def logs_at(step: int, log_every: int, total: int) -> bool:
    """Whether ``step`` is a logged step: every ``log_every`` and the last."""
    return step % log_every == 0 or step == total


class StopSignal:
    """SIGTERM/SIGINT → finish the current step, checkpoint, exit cleanly. Hooks set
    ``requested`` too (``train.stop_after``, ``train.until: converged``)."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # signals only install on the main thread
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class Recentering:
    """The exact moves of table means into the intercept (:mod:`train.recenter`), every
    ``every`` steps."""

    def __init__(self, move: Callable[[Any], Any] | None, every: int) -> None:
        self.move, self.every = move, every
        self.periods = (every,) if move is not None else ()

    def after_step(self, progress: Progress) -> None:
        if self.move is not None and progress.step % self.every == 0:
            progress.state = self.move(progress.state)


class ConvergenceChecks:
    """Every ``every`` steps, the minibatch ELBO and the global sites' guide into the
    tracker; under ``train.until: converged`` a settled run asks to stop."""

    def __init__(
        self,
        tracker: ConvergenceTracker,
        every: int,
        num_rows: int,
        schedule: Callable[[int], Any],
        read_globals: Callable[[Any], tuple[dict[str, np.ndarray], dict[str, np.ndarray]]],
        stop: StopSignal,
        until_converged: bool,
    ) -> None:
        self.tracker, self.every, self.num_rows = tracker, every, num_rows
        self.schedule, self.read_globals = schedule, read_globals
        self.stop, self.until_converged = stop, until_converged
        self.periods = (every,)

    def after_step(self, progress: Progress) -> None:
        if progress.step % self.every:
            return
        elbo_row = -float(progress.loss) / self.num_rows
        if np.isfinite(elbo_row):  # a skipped step's loss is NaN
            lr = float(self.schedule(progress.step - 1))
            self.tracker.sample(progress.step, elbo_row, lr, *self.read_globals(progress.state))
        if self.until_converged and self.tracker.converged:
            self.stop.requested = True


class NonFiniteGuard:
    """``train.non_finite``: counts skipped steps (``skip``) and, at logged steps, stops a run
    that skipped ``max_skipped`` in a row or reports a non-finite loss as a divergence."""

    def __init__(
        self,
        skips: nonfinite.SkipCount | None,
        max_skipped: int,
        log_every: int,
        total: int,
        last_saved: Callable[[], int | None],
        lr: float,
    ) -> None:
        self.skips, self.max_skipped = skips, max_skipped
        self.log_every, self.total = log_every, total
        self.last_saved, self.lr = last_saved, lr
        self.periods = (log_every, total)  # logs_at

    def after_step(self, progress: Progress) -> None:
        if self.skips is not None:
            self.skips.add(progress.losses)
        if not logs_at(progress.step, self.log_every, self.total):
            return
        progress.last_loss = float(progress.loss)
        in_a_row = self.skips.read()[0] if self.skips is not None else 0
        if in_a_row >= self.max_skipped:
            raise nonfinite.stop_error(
                f"the last {in_a_row} steps up to step {progress.step} had a non-finite loss "
                f"or gradient and were skipped (train.non_finite.max_skipped="
                f"{self.max_skipped}); nothing was saved past step {self.last_saved()}",
                self.lr,
            )
        if not np.isfinite(progress.last_loss) and self.skips is None:
            progress.diverged = (
                f"the loss became {progress.last_loss} at step {progress.step}; nothing was "
                f"saved past step {self.last_saved()}"
            )


class Metrics:
    """The progress bar, ``metrics.jsonl`` and any other sinks: at logged steps the ELBO per
    row, examples/s and the share of time spent waiting for batches since the last log (and
    skipped steps under ``skip``). Its timing runs on across segments; :attr:`clock` is each
    segment's."""

    def __init__(
        self,
        bar: Any,
        out: IO[str],
        log_every: int,
        total: int,
        num_rows: int,
        batch_size: int,
        skips: nonfinite.SkipCount | None,
        writer: bool,
        sinks: Sequence[Sink] = (),
    ) -> None:
        self.bar, self.out, self.log_every, self.total = bar, out, log_every, total
        self.num_rows, self.batch_size, self.skips = num_rows, batch_size, skips
        self.writer = writer  # one process writes the file
        self.sinks = list(sinks)  # TensorBoard, MLflow (train.metric_sinks)
        self.clock: WaitClock | None = None
        self.t_log, self.rows_since = time.perf_counter(), 0
        self.periods = (log_every, total)  # logs_at

    def after_step(self, progress: Progress) -> None:
        self.rows_since += self.batch_size * progress.taken
        if logs_at(progress.step, self.log_every, self.total):
            now = time.perf_counter()
            rate = self.rows_since / max(now - self.t_log, 1e-9)
            waited = self.clock.lap() if self.clock is not None else 0.0
            input_wait = waited / max(now - self.t_log, 1e-9)
            self.t_log, self.rows_since = now, 0
            elbo_row = -progress.last_loss / self.num_rows
            self.bar.set_postfix(elbo_per_row=f"{elbo_row:.4f}", ex_per_s=f"{rate:,.0f}")
            if self.writer:
                record = {
                    "step": progress.step,
                    "loss": progress.last_loss,
                    "elbo_per_row": elbo_row,
                    "examples_per_s": rate,
                    "input_wait": input_wait,
                    "time": time.time(),
                }
                if self.skips is not None:
                    record["skipped"] = self.skips.read()[1]
                self.out.write(json.dumps(record) + "\n")
                self.out.flush()
                for sink in self.sinks:
                    sink.write(progress.step, record)
        self.bar.update(progress.taken)


class Checkpoints:
    """Every ``every`` steps before the last, a checkpoint of a finite state (the last step's
    is the caller's); a state that is not finite is a divergence instead."""

    def __init__(self, every: int, total: int, save: Callable[[int, Any], str | None]) -> None:
        self.every, self.total, self.save = every, total, save
        self.periods = (every,)  # the last step's checkpoint is the caller's

    def after_step(self, progress: Progress) -> None:
        if progress.step % self.every == 0 and progress.step != self.total:
            progress.diverged = self.save(progress.step, progress.state)


class StopRequests:
    """Ends the segment after a stop request: a signal, ``train.stop_after`` steps since the
    start, or convergence (the caller then checkpoints)."""

    def __init__(
        self,
        stop: StopSignal,
        stop_after: int | None,
        first: int,
        total: int,
        tracker: ConvergenceTracker,
        until_converged: bool,
        log: Callable[[str], None],
    ) -> None:
        self.stop, self.stop_after, self.first, self.total = stop, stop_after, first, total
        self.tracker, self.until_converged, self.log = tracker, until_converged, log
        self.periods = ()  # at the end of whichever dispatch a request falls in

    def after_step(self, progress: Progress) -> None:
        if self.stop_after is not None and progress.step - self.first >= self.stop_after:
            self.stop.requested = True
        if self.stop.requested and progress.step != self.total:
            if self.tracker.converged and self.until_converged:
                self.log(f"{self.tracker.status()}: checkpointing and stopping")
            else:
                self.log(
                    f"stopping at step {progress.step} of {self.total}: checkpointing; "
                    "rerun to continue"
                )
            progress.halt = True


class FirstStep:
    """Marks the end of the first step of a job (its compilation, unless the compilation
    cache held it, and its first batch) on the job's stage clock (:mod:`train.stages`);
    it waits for that one step, and never again."""

    def __init__(self, clock: StageClock) -> None:
        self.clock = clock
        self.periods = ()

    def after_step(self, progress: Progress) -> None:
        if "first step" not in self.clock.seconds:
            progress.loss.block_until_ready()
            self.clock.mark("first step")
