"""A training run's start: the checks, the data stage, the setup and restore-or-init, then its
steps (:mod:`train.segments`). Everything is validated before the first step; a failed start
writes no checkpoint."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from omegaconf import OmegaConf

from blayers.latex import Statement, render_text
from blayers.sharding import assert_sharded
from blayers.start import FeatureStats

from . import checkpoint as ckpt
from . import data as data_lib
from . import (
    describe,
    distributed,
    files,
    metric_sinks,
    prior_from,
    rundir,
    smooth,
    warm_start,
)
from . import vocab as vocab_lib
from .config import (
    SAVED_DEFAULTS,
    Config,
    ConfigError,
    from_container,
    to_container,
    with_saved_defaults,
)
from .cores import reserve as reserve_cores
from .model import Columns, build_model, configured_link_kwargs, ordered_columns
from .plan import ShardingPlan
from .run import RunDir
from .segments import RunContext, finish, make_tracker, set_aside_after, train_segments
from .settings import check_resume_settings, check_settings
from .setup import Setup, fresh_state, make_setup, table_rows_of, with_lr_scale
from .sparse import (
    row_counts,
)
from .stages import StageClock
from .starts import one_draw_warnings, prior_warnings
from .state import (
    TrainState,
)
from .store import Store

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
    setup = _job_setup(cfg, plan, store, vocabs, saved)
    if latest is None and jax.process_index() == 0:
        _warn_before_any_step(cfg, setup, store, counts, log)
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


def _job_setup(
    cfg: Config,
    plan: ShardingPlan,
    store: Store,
    vocabs: Mapping[str, vocab_lib.Vocab],
    saved: Mapping[str, Any] | None,
) -> Setup:
    """The job's setup from the store's statistics and the vocabularies, with the table
    padding the run started with (``saved``) where it is resumed."""
    return make_setup(
        cfg,
        {c: v.size for c, v in vocabs.items()},
        store.num_rows,
        plan,
        saved.get("table_pad_multiple") if saved else None,
        store.target_stats,
        store.feature_stats,
        {c: v.counts for c, v in vocabs.items()},
        store.category_sums,
    )


def _warn_before_any_step(
    cfg: Config,
    setup: Setup,
    store: Store,
    counts: Mapping[str, np.ndarray],
    log: Callable[[str], None],
) -> None:
    """One line per prior that is badly scaled for the target (:func:`prior_warnings`) and
    per table that one draw per step puts at risk (:func:`one_draw_warnings`)."""
    link_kwargs = configured_link_kwargs(cfg.model)
    terms = setup.model.terms
    lines = prior_warnings(terms, str(cfg.model.link), link_kwargs, store.target_stats)
    lines += one_draw_warnings(terms, setup.columns.categorical, counts, bool(cfg.optim.antithetic))
    for line in lines:
        log(f"warning: {line}")


def _continued_run(
    cfg: Config, log: Callable[[str], None]
) -> tuple[Config, warm_start.Base | None]:
    """The run this one continues (``prior_from`` or ``init_from``), read once, when the
    run starts (a resume already holds what it took over), with ``cfg`` taking its smooth
    terms' domains and its layout of FM factors."""
    continued, key = (cfg.prior_from, "prior_from") if cfg.prior_from else (cfg.init_from, "")
    if not continued or ckpt.steps(Path(cfg.run_dir) / "checkpoints"):
        return cfg, None
    base = warm_start.Base.open(Path(continued), cfg, log, key or "init_from")
    return warm_start.with_base_settings(cfg, base.cfg), base


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


def keep_saved_settings(
    cfg: Config, saved: Mapping[str, Any], log: Callable[[str], None]
) -> Config:
    """A run resumes with the guide family and the layout of FM factors it was trained with,
    and with the value it ran under of every setting whose default changed after it was
    saved (:data:`SAVED_DEFAULTS`: one saved before the family was a setting ran mean-field,
    before the coupling had its own rate ran it at the full rate), whatever today's defaults
    are."""
    saved_config = saved.get("config", {})
    ran = with_saved_defaults(saved_config)
    always = [("optim", "guide"), ("model", "fm_unit_axis")]
    keep = always + [
        (group, key)
        for group, key in SAVED_DEFAULTS
        if key not in saved_config.get(group, {}) and (group, key) not in always
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


def _flat_params(params: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    return {f"{site}.{f}": v for site, fields in params.items() for f, v in fields.items()}
