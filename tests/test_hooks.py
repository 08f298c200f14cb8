"""train/hooks.py: each hook alone, on a trainer whose step adds its batch to the state."""

from __future__ import annotations

import io
import json
import math
import os
import signal

import jax.numpy as jnp
import pytest

from train import hooks, nonfinite
from train.convergence import ConvergenceTracker
from train.trainer import Progress, Trainer


def _step(state, batch):
    return state + batch, jnp.asarray(float(batch))


def _tracker() -> ConvergenceTracker:
    return ConvergenceTracker(10, 10.0, 0.01, 0.1, 1e-3, 2)


class _Bar:
    def __init__(self) -> None:
        self.updates, self.postfix = 0, {}

    def update(self, n: int) -> None:
        self.updates += n

    def set_postfix(self, **kw: str) -> None:
        self.postfix = kw


def test_logged_steps_are_every_log_every_and_the_last():
    assert [s for s in range(1, 12) if hooks.logs_at(s, 5, 11)] == [5, 10, 11]


def test_sigterm_becomes_a_stop_request_and_the_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    with hooks.StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
    assert signal.getsignal(signal.SIGTERM) is before


def test_checkpoints_every_k_steps_but_not_the_last_and_a_failed_save_is_a_divergence():
    saved = []

    def save(step, state):
        saved.append((step, float(state)))
        return "state not finite" if step == 6 else None

    seen = []

    class After:
        def after_step(self, progress):
            seen.append(progress.step)

    progress = Trainer(_step, [hooks.Checkpoints(3, 9, save), After()]).run(
        Progress(0, jnp.asarray(0.0)), [1.0] * 9
    )
    assert saved == [(3, 3.0), (6, 6.0)]
    assert progress.diverged == "state not finite" and progress.step == 6
    assert seen == [1, 2, 3, 4, 5]  # the diverged step reaches no later hook


def test_stop_after_halts_the_segment_and_says_how_to_continue():
    said = []
    with hooks.StopSignal() as stop:
        hook = hooks.StopRequests(stop, 4, 10, 100, _tracker(), False, said.append)
        progress = Trainer(_step, [hook]).run(Progress(10, jnp.asarray(0.0)), [1.0] * 50)
    assert progress.step == 14 and progress.halt
    assert said == ["stopping at step 14 of 100: checkpointing; rerun to continue"]


def test_a_non_finite_loss_is_a_divergence_without_skip_and_a_stop_after_max_skipped():
    guard = hooks.NonFiniteGuard(None, 3, 2, 10, lambda: 4, 0.01)
    progress = Trainer(_step, [guard]).run(Progress(0, jnp.asarray(0.0)), [1.0, math.nan, 1.0])
    assert progress.step == 2 and "the loss became nan at step 2" in progress.diverged
    assert "nothing was saved past step 4" in progress.diverged

    skips = nonfinite.SkipCount()
    guard = hooks.NonFiniteGuard(skips, 3, 1, 10, lambda: 4, 0.01)
    with pytest.raises(nonfinite.NonFiniteError, match="the last 3 steps up to step 4"):
        Trainer(_step, [guard]).run(Progress(0, jnp.asarray(0.0)), [1.0] + [math.nan] * 5)


def test_metrics_write_logged_steps_and_move_the_bar_every_step():
    out, bar = io.StringIO(), _Bar()
    metrics = hooks.Metrics(bar, out, 2, 5, num_rows=100, batch_size=8, skips=None, writer=True)
    guard = hooks.NonFiniteGuard(None, 3, 2, 5, lambda: None, 0.01)
    Trainer(_step, [guard, metrics]).run(Progress(0, jnp.asarray(0.0)), [1.0, 2.0, 3.0, 4.0, 5.0])
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 5]
    assert [r["elbo_per_row"] for r in records] == [-0.02, -0.04, -0.05]  # -loss / rows
    assert all(r["examples_per_s"] > 0 for r in records) and bar.updates == 5
