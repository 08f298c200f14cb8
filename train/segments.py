"""A run's steps: segments of the trainer with the service's hooks, a rollback to the last
good checkpoint between segments, and the run's end (its last checkpoint, ``run.json``)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from blayers import guides

from . import checkpoint as ckpt
from . import (
    dispatch,
    distributed,
    files,
    hooks,
    nonfinite,
    prior_from,
)
from . import recenter as recenter_lib
from .config import (
    Config,
)
from .convergence import ConvergenceTracker, window_steps
from .cores import CoreSplit
from .pipeline import device_batches
from .run import RunDir
from .setup import Setup, with_lr_scale
from .sparse import (
    row_counts,
)
from .stages import StageClock
from .state import (
    TrainState,
    non_finite_sites,
)
from .step import make_train_step
from .store import Store
from .trainer import Progress, Trainer, WaitClock


@dataclass
class RunContext:
    """What a training run holds fixed from its start to its end."""

    cfg: Config
    run_dir: Path
    store: Store
    checkpointer: ckpt.Checkpointer
    meta: dict[str, Any]  # saved with every checkpoint (rollbacks update it)
    vocab_counts: dict[str, np.ndarray]
    cores: CoreSplit | None
    log: Callable[[str], None]
    sinks: list[Any] = dataclasses.field(default_factory=list)  # TensorBoard, MLflow
    prior: prior_from.RunPrior | None = None  # day 1's posterior as the prior (prior_from)
    clock: StageClock = dataclasses.field(default_factory=StageClock)  # wall time by stage

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"


def train_segments(
    run: RunContext, setup: Setup, state: TrainState, tracker: ConvergenceTracker
) -> tuple[Progress, Setup, ConvergenceTracker, WaitClock]:
    """Steps from ``state`` to the end, a stop request or a divergence; under
    ``train.non_finite.policy=rollback`` a divergence restarts from the last good checkpoint
    at a lower learning rate, as a new segment. Returns where it ended, the setup and tracker
    it ended with, and the last segment's batch clock."""
    cfg = run.cfg
    on_non_finite = cfg.train.non_finite
    skips = nonfinite.SkipCount() if on_non_finite.policy == "skip" else None
    step_fn = make_train_step(setup, run.vocab_counts, skips is not None, run.prior)
    recenter, recenter_every = make_run_recenter(
        setup, run.vocab_counts, cfg.optim.recenter_every, cfg.data.batch_size, run.prior
    )
    first, total = int(state.step), int(cfg.train.steps)
    progress = Progress(first, state)
    with (
        distributed.explain_peer_failure("training"),
        hooks.StopSignal() as stop,
        _metrics(run, skips, first, total) as (bar, metrics),
    ):
        while True:  # once, unless a rollback restarts from an earlier step
            segment = segment_hooks(
                run, setup, tracker, metrics, skips, stop, recenter, recenter_every, first
            )
            # a dispatch never passes a step where a hook acts, and the last step ends one
            per_dispatch = dispatch.group_size(
                cfg.train.steps_per_dispatch, [total, *hooks.periods(segment)]
            )
            batches = WaitClock(
                device_batches(
                    run.store,
                    cfg,
                    step_fn.prepare,
                    step_fn.batch_shardings,
                    progress.step,
                    total,
                    run.cores,
                    per_dispatch,
                    step_fn.stack,
                )
            )
            metrics.clock = batches
            # fake CPU devices can deadlock on un-blocked collective loops (see DESIGN)
            block = jax.default_backend() == "cpu" and setup.plan.mesh.devices.size > 1
            progress = Trainer(step_fn, segment, block).run(progress, batches)
            if progress.diverged is None:
                return progress, setup, tracker, batches
            exhausted = run.meta["rollbacks"] >= on_non_finite.max_rollbacks
            if on_non_finite.policy != "rollback" or exhausted:
                raise nonfinite.stop_error(progress.diverged, cfg.optim.lr * setup.lr_scale)
            setup, state, tracker = roll_back(
                setup, cfg, run.checkpointer, run.ckpt_dir, run.meta, progress.diverged, run.log
            )
            progress = Progress(int(state.step), state, last_loss=progress.last_loss)
            step_fn = make_train_step(setup, run.vocab_counts, skips is not None, run.prior)
            bar.reset(total)
            bar.update(progress.step)


@contextlib.contextmanager
def _metrics(
    run: RunContext, skips: nonfinite.SkipCount | None, first: int, total: int
) -> Iterator[tuple[tqdm, hooks.Metrics]]:
    """The progress bar (process 0, when ``train.progress``) and the metrics hook writing
    to the run's metrics file and sinks."""
    cfg = run.cfg
    with (
        open(run.metrics_path, "a") as metrics_file,
        tqdm(
            total=total,
            initial=first,
            disable=not cfg.train.progress or jax.process_index() != 0,
            unit="step",
            dynamic_ncols=True,
        ) as bar,
    ):
        yield (
            bar,
            hooks.Metrics(
                bar,
                metrics_file,
                cfg.train.log_every,
                total,
                run.store.num_rows,
                cfg.data.batch_size,
                skips,
                writer=jax.process_index() == 0,
                sinks=run.sinks,
            ),
        )


def finish(
    run: RunContext,
    progress: Progress,
    setup: Setup,
    tracker: ConvergenceTracker,
    batches: WaitClock,
) -> dict[str, Any]:
    """The last checkpoint (of a finite state only), the input-bound hint, the verdict, and
    ``run.json``; the run's result."""
    step, total = progress.step, int(run.cfg.train.steps)
    diverged = save_finite(run.checkpointer, step, progress.state, run.meta, tracker)
    if diverged:
        raise nonfinite.stop_error(diverged, run.cfg.optim.lr * setup.lr_scale)
    input_wait = batches.total_fraction()
    run.checkpointer.close()
    run.clock.mark("final checkpoint")
    hint = input_bound_hint(input_wait, run.cores is not None)
    if hint:
        run.log(hint)
    result = {
        "run_dir": str(run.run_dir),
        "step": step,
        "loss": progress.last_loss,
        "checkpoint": str(run.ckpt_dir / str(step)),
        "metrics": str(run.metrics_path),
        "stopped_early": step < total and not tracker.converged,
        "input_wait": input_wait,
        "convergence": tracker.status(),
        "converged_at": tracker.converged_at,
        "convergence_check": tracker.last,
        "stages": run.clock.record(),
    }
    run.log(tracker.status())
    run.log(run.clock.line())
    if jax.process_index() == 0:
        files.write_text(run.run_dir / "run.json", json.dumps(result, indent=2))
    for sink in run.sinks:
        sink.close(run.run_dir)
    return result


INPUT_BOUND = 0.2  # share of time waiting for batches from which a run is told so


def input_bound_hint(fraction: float, dedicated: bool) -> str | None:
    """A line for a run whose steps waited for the data pipeline much of the time."""
    if fraction < INPUT_BOUND:
        return None
    line = f"the data pipeline held training up {fraction:.0%} of the time"
    one_cpu_device = jax.default_backend() == "cpu" and jax.device_count() == 1
    if one_cpu_device and jax.process_count() == 1 and not dedicated:
        line += (
            "; on a CPU host with a cheap step, data.dedicated_cores=true may help (README, Data)"
        )
    return line


def segment_hooks(
    run: RunContext,
    setup: Setup,
    tracker: ConvergenceTracker,
    metrics: hooks.Metrics,
    skips: nonfinite.SkipCount | None,
    stop: hooks.StopSignal,
    recenter: Callable[[TrainState], TrainState] | None,
    recenter_every: int,
    first: int,
) -> list[Any]:
    """The hooks of one training segment (a rollback starts another, with its own setup and
    tracker), in the order :mod:`train.hooks` gives."""
    cfg, checkpointer, meta, log = run.cfg, run.checkpointer, run.meta, run.log
    num_rows = run.store.num_rows
    total, until_converged = int(cfg.train.steps), cfg.train.until == "converged"
    global_sites = sorted(n for n, site in setup.sites.items() if guides.is_global(site))
    return [
        hooks.FirstStep(run.clock),
        hooks.Recentering(recenter, recenter_every),
        hooks.ConvergenceChecks(
            tracker,
            cfg.train.convergence.sample_every,
            num_rows,
            setup.schedule,
            lambda state: globals_now(state, global_sites, setup.guide),
            stop,
            until_converged,
        ),
        hooks.NonFiniteGuard(
            skips,
            cfg.train.non_finite.max_skipped,
            cfg.train.log_every,
            total,
            checkpointer.latest_step,
            cfg.optim.lr * setup.lr_scale,
        ),
        metrics,
        hooks.Checkpoints(
            cfg.checkpoint.every,
            total,
            lambda step, state: save_finite(checkpointer, step, state, meta, tracker),
        ),
        hooks.StopRequests(stop, cfg.train.stop_after, first, total, tracker, until_converged, log),
    ]


def save_finite(
    checkpointer: ckpt.Checkpointer,
    step: int,
    state: TrainState,
    meta: dict[str, Any],
    tracker: ConvergenceTracker,
) -> str | None:
    """Checkpoint ``state`` at ``step`` if every array in it is finite; otherwise save
    nothing and return what is wrong (the step, the first non-finite site, the last good
    checkpoint)."""
    bad = non_finite_sites(state)
    if bad:
        return (
            f"the state is not finite at step {step} (first: {bad[0]}); it was not saved, the "
            f"last good checkpoint is step {checkpointer.latest_step()}"
        )
    checkpointer.save(step, state, {**meta, **tracker_meta(tracker), "step": step})
    return None


def roll_back(
    setup: Setup,
    cfg: Config,
    checkpointer: ckpt.Checkpointer,
    ckpt_dir: Path,
    meta: dict[str, Any],
    diverged: str,
    log: Callable[[str], None],
) -> tuple[Setup, TrainState, ConvergenceTracker]:
    """``train.non_finite.policy=rollback``: the newest good checkpoint (the start, if none was
    saved) under a lower learning rate; ``meta`` records the new scale and count, so later
    checkpoints carry them."""
    checkpointer.wait()
    scale = setup.lr_scale * float(cfg.train.non_finite.lr_factor)
    setup = with_lr_scale(setup, cfg, scale)
    _, saved, state = RunDir(ckpt_dir.parent).restore_or_init(
        setup, checkpointer.latest_step(), False, log
    )
    meta["lr_scale"] = scale
    meta["rollbacks"] += 1
    log(
        f"warning: {diverged}; rolled back to step {int(state.step)} with the learning rate "
        f"optim.lr × {scale:g} (rollback {meta['rollbacks']} of "
        f"{cfg.train.non_finite.max_rollbacks})"
    )
    return setup, state, make_tracker(cfg, setup, saved)


def make_tracker(cfg: Config, setup: Setup, saved: Mapping[str, Any] | None) -> ConvergenceTracker:
    """The run's convergence tracker: restored from the checkpoint being resumed, else new."""
    conv = cfg.train.convergence
    if saved is not None and saved.get("convergence"):
        return ConvergenceTracker.from_json(saved["convergence"])
    epoch = setup.num_data / cfg.data.batch_size
    return ConvergenceTracker(
        window=window_steps(epoch, conv.sample_every, conv.window),
        epoch_steps=epoch,
        base_lr=float(cfg.optim.lr),
        drift_tol=float(conv.drift_tol),
        elbo_tol=float(conv.elbo_tol),
        patience=int(conv.patience),
    )


def tracker_meta(tracker: ConvergenceTracker) -> dict[str, Any]:
    return {"convergence": tracker.to_json()}


def globals_now(
    state: TrainState, sites: list[str], guide: guides.MeanFieldGuide
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Guide locs and sds of the global sites, read from this process's replica."""
    locs, sds = {}, {}
    for site in sites:
        p = {f: v.addressable_data(0) for f, v in state.params[site].items()}
        loc, sd = guide.marginal(site, p)
        locs[site], sds[site] = np.asarray(loc), np.asarray(sd)
    return locs, sds


def make_run_recenter(
    setup: Setup,
    vocab_counts: Mapping[str, np.ndarray],
    every: int,
    batch_size: int,
    prior: prior_from.RunPrior | None = None,
) -> tuple[Callable[[TrainState], TrainState] | None, int]:
    """The run's recentering move (:mod:`train.recenter`) and its cadence in steps, or
    ``(None, 0)`` when off or when no term qualifies. The move reads every row of the
    tables it shifts, so it runs at most once per ``rows / batch_size`` steps: its cost
    spread over the steps stays within one batch's worth of rows, whatever the table size."""
    terms = setup.model.terms
    found = recenter_lib.plan(terms, setup.sites) if every else None
    if found is None:
        return None, 0
    by_site = {t.table_site: t for t in terms}
    counts = {
        t.site: row_counts(by_site[t.site], vocab_counts, setup.columns) for t in found.tables
    }
    rows = sum(len(c) for c in counts.values())
    # a multiple of ``every``, so the run's other cadences and its steps per dispatch
    # (train.dispatch) still divide it
    cadence = -(-max(every, -(-rows // batch_size)) // every) * every
    new_rows = None
    if prior is not None:  # the intercept's prior is day 1's posterior marginal
        if setup.information is None:
            return None, 0
        loc, sd = setup.guide.marginal(found.intercept, prior.params[found.intercept])
        found = dataclasses.replace(
            found, prior_loc=float(np.ravel(loc)[0]), prior_scale=float(np.ravel(sd)[0])
        )
        new_rows = {t.site: ~np.asarray(prior.known[t.site]) for t in found.tables}
    move = recenter_lib.make_recenter(
        found, setup.guide, setup.shardings, counts, setup.information, new_rows
    )
    return move, cadence


def set_aside_after(
    ckpt_dir: Path, step: int, log: Callable[[str], None], move: bool = True
) -> None:
    """Move every checkpoint newer than ``step`` (corrupt ones passed over, or those after a
    ``train.resume_step``) to ``run_dir/set_aside/``, so that the run saves those steps
    anew instead of keeping the old ones; nothing is deleted."""
    newer = [s for s in ckpt.steps(ckpt_dir) if s > step]
    if not newer or not move:
        return
    aside = ckpt_dir.parent / "set_aside"
    aside.mkdir(exist_ok=True)
    for s in newer:
        target = aside / f"{s}-{time.strftime('%Y%m%dT%H%M%S')}"
        os.rename(ckpt_dir / str(s), target)
    log(f"set aside checkpoint step(s) {sorted(newer)} in {aside}; training continues from {step}")
