"""Restore-or-init, then steps, metrics and checkpoints. Everything is validated before the
first step; a failed start writes no checkpoint."""

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
from omegaconf import OmegaConf
from tqdm import tqdm

from blayers import guides
from blayers.latex import Statement, render_text
from blayers.sharding import assert_sharded
from blayers.start import FeatureStats

from . import checkpoint as ckpt
from . import data as data_lib
from . import (
    describe,
    distributed,
    files,
    hooks,
    metric_sinks,
    nonfinite,
    prior_from,
    rundir,
    smooth,
    warm_start,
)
from . import recenter as recenter_lib
from .config import (
    SAVED_DEFAULTS,
    Config,
    ConfigError,
    from_container,
    to_container,
    with_saved_defaults,
)
from .convergence import ConvergenceTracker, window_steps
from .cores import CoreSplit
from .cores import reserve as reserve_cores
from .model import Columns, build_model, configured_link_kwargs, ordered_columns
from .pipeline import device_batches
from .plan import ShardingPlan
from .run import RunDir
from .settings import check_resume_settings, check_settings
from .setup import Setup, fresh_state, make_setup, table_rows_of, with_lr_scale
from .sparse import (
    row_counts,
)
from .stages import StageClock
from .starts import (
    prior_warnings,
)
from .state import (
    TrainState,
    non_finite_sites,
)
from .step import make_train_step
from .store import Store
from .trainer import Progress, Trainer, WaitClock

RESOLVED_CONFIG = "config.yaml"  # the last start's resolved config, in the run dir


def train(cfg: Config, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the training job described by ``cfg``; returns a result summary.
    The run directory is locked for the whole job (:mod:`train.rundir`): a second trainer on
    it is refused before it reads or writes anything."""
    multi_process = distributed.maybe_initialize(cfg.distributed)
    with contextlib.ExitStack() as held:
        return _train(cfg, log, multi_process, held)


def prepare_data(
    cfg: Config, run_dir: Path, base: warm_start.Base | None = None
) -> tuple[Store, dict[str, Any]]:
    """The run's encoded store and vocabularies (:func:`train.data.prepare`): process 0
    writes them, the others read them after it. ``base``: the run this one continues."""
    link_check = None if cfg.model.get("_target_") else str(cfg.model.link)
    ordered = ordered_columns(cfg.model)
    base_vocabs = base.vocabs if base is not None else None
    if jax.process_index() == 0:  # one writer for the run's vocabulary and encoded store
        store, vocabs = data_lib.prepare(
            cfg.data, run_dir, link_check, ordered=ordered, base_vocabs=base_vocabs
        )
    distributed.barrier("blayers-data-prepared")
    if jax.process_index() != 0:
        store, vocabs = data_lib.prepare(
            cfg.data, run_dir, link_check, ordered=ordered, base_vocabs=base_vocabs
        )
    return store, vocabs


def warm_state(
    base: warm_start.Base,
    setup: Setup,
    vocab_counts: Mapping[str, np.ndarray],
    log: Callable[[str], None],
    widen: float | None = None,
) -> tuple[TrainState, prior_from.RunPrior | None]:
    """A warm start's first state (:mod:`train.warm_start`): the base run restored onto this
    run's mesh, its known rows and globals copied into a fresh, sharded state (a
    conditional-guide row that the new data observes keeps its fresh, data-aware start:
    :func:`train.warm_start.restarted_rows`). With ``widen`` (``prior_from``), also the base
    run's posterior as this run's prior (:mod:`train.prior_from`): the same copy with no row
    restarted, and a flag per row for the rows it fills."""
    try:
        base_setup = make_setup(
            base.cfg, base.table_sizes, int(base.meta["num_data"]), setup.plan, base.pad_multiple
        )
    except ConfigError as err:
        raise ConfigError(f"{base.key}={base.run_dir}: {err}") from None
    step, _, restored = RunDir(base.run_dir).restore(base_setup, base.step, True, log)
    known = {c: v.size for c, v in base.vocabs.items()}
    blocks = warm_start.row_blocks(
        base_setup.model.terms,
        setup.model.terms,
        known,
        setup.columns.categorical,
    )
    by_site = {t.table_site: t for t in setup.model.terms if t.categorical_idx}
    counts = {s: row_counts(by_site[s], vocab_counts, setup.columns) for s in setup.row_start or {}}
    restart = warm_start.restarted_rows(counts)
    log(f"continuing {base.run_dir} from its step {step}")
    prior = None
    if widen is not None:
        day1 = warm_start.carry_over(
            restored, fresh_state(setup), blocks, base_setup.shardings, setup.shardings
        )
        known = prior_from.known_rows(blocks, table_rows_of(setup))
        prior = prior_from.placed(day1.params, known, widen, setup.shardings)
        log(f"prior: the posterior of {base.run_dir} at its step {step}, sds × {widen:g}")
    state = warm_start.carry_over(
        restored, fresh_state(setup), blocks, base_setup.shardings, setup.shardings, restart
    )
    return state, prior


def restore_or_init(
    cfg: Config, setup: Setup, run: RunDir, latest: int | None, log: Callable[[str], None]
) -> tuple[Setup, TrainState, Mapping[str, Any] | None]:
    """The newest good checkpoint at or before ``latest`` (newer steps set aside, the
    learning rate's rollback factor restored), or a fresh state; with its metadata."""
    strict = cfg.checkpoint.strict or cfg.train.resume_step is not None
    restored, saved, state = run.restore_or_init(setup, latest, strict, log)
    if restored is None:
        return setup, state, saved
    ckpt_dir = run.checkpoints
    # every process lists the steps (Orbax's managers synchronize them); one moves them
    set_aside_after(ckpt_dir, restored, log, move=jax.process_index() == 0)
    distributed.barrier("blayers-checkpoints-set-aside")
    log(f"resumed from step {restored} in {ckpt_dir}")
    setup = with_lr_scale(setup, cfg, float(saved.get("lr_scale", 1.0)))
    if setup.lr_scale != 1.0:
        log(f"the learning rate is optim.lr × {setup.lr_scale:g}, after rollbacks")
    return setup, state, saved


def _train(
    cfg: Config, log: Callable[[str], None], multi_process: bool, held: contextlib.ExitStack
) -> dict[str, Any]:
    cores = None
    if cfg.data.dedicated_cores and not multi_process:  # before anything creates the backend
        cores, placed = reserve_cores(cfg.data.prefetch)
        log(placed)
    run_dir = Path(cfg.run_dir)
    plan = ShardingPlan.from_config(cfg)
    plan.check_batch_size(cfg.data.batch_size)
    check_settings(cfg)
    check_terms(cfg)
    if jax.process_index() == 0:  # one lock per run, from before its first write
        held.enter_context(rundir.locked(run_dir))
    clock = StageClock()
    clock.mark("start-up")  # imports, the backend and the mesh, the checks
    cfg, base = _continued_run(cfg, log)
    store, vocabs = prepare_data(cfg, run_dir, base)
    clock.mark("data")  # discovery, checks, vocabulary, encoded store (cached on a rerun)
    cfg = with_smooth_domains(cfg, store.feature_stats, log)
    sizes = {c: v.size for c, v in vocabs.items()}
    latest, saved = RunDir(run_dir).resume_point(cfg.train.resume_step, cfg.checkpoint.strict, log)
    if saved is not None:
        cfg = keep_saved_settings(cfg, saved, log)
        check_resume_settings(saved.get("config", {}), cfg)
    counts = {c: v.counts for c, v in vocabs.items()}
    pad_multiple = saved.get("table_pad_multiple") if saved else None
    setup = make_setup(
        cfg,
        sizes,
        store.num_rows,
        plan,
        pad_multiple,
        store.target_stats,
        store.feature_stats,
        counts,
        store.category_sums,
    )
    if latest is None and jax.process_index() == 0:
        link_kwargs = configured_link_kwargs(cfg.model)
        for line in prior_warnings(
            setup.model.terms, str(cfg.model.link), link_kwargs, store.target_stats
        ):
            log(f"warning: {line}")
    statements = describe.describe(cfg.model, setup.columns)
    if cfg.dry_run:
        return _dry_run(plan, setup, statements, log)

    clock.mark("setup")
    setup, state, saved, prior = _first_state(cfg, setup, base, counts, latest, saved, log)
    clock.mark("warm start" if base is not None else "restore" if latest is not None else "init")
    if jax.process_index() == 0:  # the resolved config this start runs under, beside the run
        files.write_text(run_dir / RESOLVED_CONFIG, OmegaConf.to_yaml(to_container(cfg)))
        describe.write(run_dir, statements)
    assert_sharded(_flat_params(state.params), _flat_params(setup.shardings.params))

    checkpointer = ckpt.Checkpointer(
        run_dir / "checkpoints", cfg.checkpoint.max_to_keep, cfg.checkpoint.async_save
    )
    meta = checkpoint_meta(cfg, setup, sizes, store.num_rows, saved)
    meta.update(_lineage(meta, base, saved, prior))
    tracker = make_tracker(cfg, setup, saved if latest is not None else None)
    writes = jax.process_index() == 0
    sinks = metric_sinks.open_sinks(cfg, run_dir, meta["config"]) if writes else []
    run = RunContext(
        cfg, run_dir, store, checkpointer, meta, counts, cores, log, sinks, prior, clock
    )
    progress, setup, tracker, batches = train_segments(run, setup, state, tracker)
    clock.mark("steps")
    return finish(run, progress, setup, tracker, batches)


def _continued_run(
    cfg: Config, log: Callable[[str], None]
) -> tuple[Config, warm_start.Base | None]:
    """The run this one continues (``prior_from`` or ``init_from``), read once, when the
    run starts (a resume already holds what it took over), with ``cfg`` taking its smooth
    terms' domains."""
    continued, key = (cfg.prior_from, "prior_from") if cfg.prior_from else (cfg.init_from, "")
    if not continued or ckpt.steps(Path(cfg.run_dir) / "checkpoints"):
        return cfg, None
    base = warm_start.Base.open(Path(continued), cfg, log, key or "init_from")
    return warm_start.with_domains_of(cfg, base.cfg), base


def _dry_run(
    plan: ShardingPlan, setup: Setup, statements: list[Statement], log: Callable[[str], None]
) -> dict[str, Any]:
    """What a run would place where, and the model it would fit; nothing is written."""
    placed = plan.describe(setup.abstract, setup.shardings, setup.guide)
    log(plan.format(placed, setup.abstract, setup.shardings))
    text = render_text(statements)
    log("model:\n" + text)
    return {"dry_run": True, "plan": placed, "model": text}


def _first_state(
    cfg: Config,
    setup: Setup,
    base: warm_start.Base | None,
    counts: Mapping[str, np.ndarray],
    latest: int | None,
    saved: Mapping[str, Any] | None,
    log: Callable[[str], None],
) -> tuple[Setup, TrainState, Mapping[str, Any] | None, Any]:
    """The state the run's steps start from, and its day-1 prior (``prior_from``; else
    ``None``): the continued run's state carried over (``base``), else the run's own latest
    checkpoint, else a fresh start."""
    run_dir = Path(cfg.run_dir)
    if base is not None:
        widen = float(cfg.prior_widen) if cfg.prior_from else None
        state, prior = warm_state(base, setup, counts, log, widen)
        if prior is not None:
            prior_from.save(run_dir, prior, base.lineage())
        return setup, state, saved, prior
    setup, state, saved = restore_or_init(cfg, setup, RunDir(run_dir), latest, log)
    prior = None
    if saved and saved.get("prior_from"):
        prior = prior_from.load(
            run_dir, setup.abstract.params, setup.shardings, table_rows_of(setup)
        )
    return setup, state, saved, prior


def _lineage(
    meta: Mapping[str, Any],
    base: warm_start.Base | None,
    saved: Mapping[str, Any] | None,
    prior: Any,
) -> dict[str, Any]:
    """The run a continued run came from (``init_from``) and, where its posterior is the
    prior, with what widening (``prior_from``; resumes read the prior back from
    ``<run_dir>/prior``)."""
    out: dict[str, Any] = {}
    if base is not None or (saved and saved.get("init_from")):
        out["init_from"] = base.lineage() if base is not None else saved["init_from"]
    if prior is not None:
        out["prior_from"] = {
            **out.get("init_from", meta.get("init_from", {})),
            "widen": prior.widen,
        }
    return out


def checkpoint_meta(
    cfg: Config,
    setup: Setup,
    sizes: Mapping[str, int],
    num_rows: int,
    saved: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """What every checkpoint of this run records beside its arrays: enough to restore it
    from its directory alone (config, table sizes and padding, columns) and to refuse
    another model's (fingerprint, structure)."""
    return {
        "fingerprint": setup.fingerprint,
        "structure": ckpt.structure(setup.sites),
        "config": to_container(cfg),
        "table_sizes": dict(sizes),
        "table_pad_multiple": setup.pad_multiple,
        "num_data": num_rows,
        "columns": {
            "numeric": list(setup.columns.numeric),
            "categorical": list(setup.columns.categorical),
        },
        "lr_scale": setup.lr_scale,
        "rollbacks": int(saved.get("rollbacks", 0)) if saved else 0,
    }


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
            batches = WaitClock(
                device_batches(
                    run.store,
                    cfg,
                    step_fn.prepare,
                    step_fn.batch_shardings,
                    progress.step,
                    total,
                    run.cores,
                )
            )
            metrics.clock = batches
            segment = segment_hooks(
                run, setup, tracker, metrics, skips, stop, recenter, recenter_every, first
            )
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


def keep_saved_settings(
    cfg: Config, saved: Mapping[str, Any], log: Callable[[str], None]
) -> Config:
    """A run resumes with the guide family it was trained with, and with the value it ran
    under of every setting whose default changed after it was saved (:data:`SAVED_DEFAULTS`:
    one saved before the family was a setting ran mean-field, before the coupling had its
    own rate ran it at the full rate), whatever today's defaults are."""
    saved_config = saved.get("config", {})
    ran = with_saved_defaults(saved_config)
    keep = [("optim", "guide")] + [
        (group, key)
        for group, key in SAVED_DEFAULTS
        if key not in saved_config.get(group, {}) and (group, key) != ("optim", "guide")
    ]
    data = to_container(cfg)
    for group, key in keep:
        value = ran.get(group, {}).get(key)
        if value is None or value == data[group][key]:
            continue
        log(f"resuming with {group}.{key}={value}, the setting this run was trained with")
        data[group][key] = value
    return from_container(data) if data != to_container(cfg) else cfg


def with_smooth_domains(
    cfg: Config, stats: FeatureStats | None, log: Callable[[str], None]
) -> Config:
    """``cfg`` with its smooth terms' domains set from the training data (:mod:`train.smooth`),
    so that the resolved config, the checkpoints' and scoring carry the same knots and L."""
    if cfg.model.get("_target_") or not cfg.model.terms:
        return cfg
    data = to_container(cfg)
    data["model"]["terms"] = smooth.with_domains(
        data["model"]["terms"], tuple(cfg.data.numeric), stats, log
    )
    return from_container(data)


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
    cadence = max(every, -(-rows // batch_size))
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


def check_terms(cfg: Config) -> None:
    """The configured terms built once against the configured columns, before the data is
    read: an unknown layer, argument, input column or prior value fails here, naming the
    term (table sizes are not known yet and do not matter to these checks)."""
    if cfg.model.get("_target_"):
        return
    columns = Columns(tuple(cfg.data.numeric), tuple(cfg.data.categorical))
    model_cfg = dict(to_container(cfg)["model"])
    model_cfg["terms"] = smooth.with_domains(model_cfg.get("terms") or [], columns.numeric, None)
    build_model(model_cfg, columns, dict.fromkeys(columns.categorical, 1))


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


def _flat_params(params: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    return {f"{site}.{f}": v for site, fields in params.items() for f, v in fields.items()}
