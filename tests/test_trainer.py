"""The trainer (``train/trainer.py``): steps yielded one by one, hooks after each, in order."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from train import trainer
from train.trainer import Progress, Trainer


def _step(state, batch):
    return state + batch, jnp.asarray(float(batch))


class Record:
    def __init__(self, seen: list) -> None:
        self.seen = seen

    def after_step(self, progress: Progress) -> None:
        self.seen.append(("record", progress.step, progress.state))


class HaltAt:
    def __init__(self, step: int) -> None:
        self.step = step

    def after_step(self, progress: Progress) -> None:
        progress.halt = progress.step >= self.step


class DivergeAt:
    def __init__(self, step: int) -> None:
        self.step = step

    def after_step(self, progress: Progress) -> None:
        if progress.step == self.step:
            progress.diverged = "the loss is not finite"


def test_steps_are_yielded_after_their_hooks_until_a_hook_halts():
    seen: list = []
    trainer = Trainer(_step, [Record(seen), HaltAt(3)])
    yielded = [(p.step, p.state) for p in trainer.steps(Progress(0, 0), [1, 2, 3, 4, 5])]
    assert yielded == [(1, 1), (2, 3), (3, 6)]
    assert seen == [("record", 1, 1), ("record", 2, 3), ("record", 3, 6)]


def test_a_divergence_ends_the_steps_before_later_hooks_see_it():
    seen: list = []
    trainer = Trainer(_step, [DivergeAt(2), Record(seen)])
    last = trainer.run(Progress(0, 0), [1, 1, 1, 1])
    assert last.step == 2 and last.diverged == "the loss is not finite"
    assert seen == [("record", 1, 1)]


def test_a_caller_may_replace_the_state_between_yielded_steps():
    trainer = Trainer(_step, [])
    states = []
    for progress in trainer.steps(Progress(0, 0), [1, 1, 1]):
        states.append(progress.state)
        progress.state = 10 * progress.state
    assert states == [1, 11, 111]
    assert trainer.run(Progress(0, 5), []).state == 5  # no batch: the progress as given


def test_wait_clock_counts_only_the_time_spent_waiting_for_batches(monkeypatch):
    clock = {"now": 0.0}
    monkeypatch.setattr(trainer.time, "perf_counter", lambda: clock["now"])

    def batches():
        for wait in (5.0, 1.0, 1.0, 0.0, 2.0):  # the first: the pipeline starting up
            clock["now"] += wait
            yield wait

    waits = trainer.WaitClock(batches())
    assert next(waits) == 5.0
    clock["now"] += 3.0  # a step, compiling
    assert waits.lap() == 5.0  # first lap: its waits are the start-up, not the run's
    for _ in range(3):
        next(waits)
        clock["now"] += 1.0  # a step
    assert waits.lap() == 2.0
    assert waits.total_fraction() == 2.0 / 5.0
    next(waits)  # waits 2.0
    clock["now"] += 1.0
    assert waits.lap() == 2.0
    assert waits.total_fraction() == 4.0 / 8.0
    with pytest.raises(StopIteration):
        next(waits)
