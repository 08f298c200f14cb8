"""A job's setup: everything derived from its config, vocabulary sizes and sharding plan.

Training, scoring and the summary build the same :class:`Setup` (:func:`make_setup`): the
model and its latent sites, the guide family, the optimizer and schedule, the train state's
abstract shape and shardings, and the row-sparse tables. :func:`fresh_state` makes the
starting state from it, born sharded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from blayers import guides
from blayers.sharding import ShardingError
from blayers.start import FeatureStats, TargetStats

from . import checkpoint as ckpt
from .config import (
    Config,
    ConfigError,
)
from .guide_plan import fm_rows_in_effect, service_guide
from .model import Columns, Term, build_model, configured_link_kwargs
from .plan import ShardingPlan, row_sharding
from .settings import check_posterior_settings
from .sparse import (
    SparseTable,
    row_counts,
)
from .starts import (
    observation_information,
    row_starts,
    starting_scales,
    starting_values,
)
from .state import (
    TrainState,
    guide_field,
    init_fn,
    make_optimizer,
    make_schedule,
    with_guide_field,
)


@dataclass
class Setup:
    """Everything derived from config + vocabulary sizes + sharding plan, shared by train and
    score."""

    plan: ShardingPlan
    columns: Columns
    model: Callable[..., Any]
    sites: dict[str, guides.LatentSite]
    abstract: TrainState
    shardings: TrainState
    optimizer: Any
    fingerprint: str
    num_data: int
    pad_multiple: int
    sparse: dict[str, SparseTable]
    schedule: Any
    optimizer_name: str
    init: Callable[[], TrainState]  # builds the state; jit it with out_shardings=shardings
    guide: guides.MeanFieldGuide  # the posterior family: every read of the posterior
    # every step's ELBO at an antithetic pair of draws (optim.antithetic)
    antithetic: bool = False
    lr_scale: float = 1.0  # the learning rate's factor after rollbacks (train.nonfinite)
    # conditional rows' starting guide fields by site (``raw_scale``: log τ; ``loc``)
    row_start: dict[str, dict[str, np.ndarray]] | None = None
    # the link's Fisher information per observation at the start (None: no target statistics)
    information: float | None = None


def fresh_state(setup: Setup) -> TrainState:
    """The run's starting state, born sharded; a conditional guide's rows then get their
    starting precisions and means (``setup.row_start``), placed as the table's rows are."""
    state = jax.jit(setup.init, out_shardings=setup.shardings)()
    if not setup.row_start:
        return state
    placed = {s: row_sharding(setup.shardings, s) for s in setup.row_start}
    values = {
        s: {f: jax.device_put(v, placed[s]) for f, v in fields.items()}
        for s, fields in setup.row_start.items()
    }

    def apply(state: TrainState, values: Mapping[str, Mapping[str, jax.Array]]) -> TrainState:
        params = dict(state.params)
        for site, fields in values.items():
            for name, v in fields.items():
                old = guide_field(params[site], name)
                v = jnp.broadcast_to(v.reshape(v.shape + (1,) * (old.ndim - 1)), old.shape)
                params[site] = with_guide_field(params[site], name, v.astype(old.dtype))
        return state._replace(params=params)

    return jax.jit(
        apply,
        in_shardings=(setup.shardings, placed),
        out_shardings=setup.shardings,
        donate_argnums=0,
    )(state, values)


def abstract_batch(batch_size: int, columns: Columns, has_target: bool = True) -> dict[str, Any]:
    out = {
        "numeric": jax.ShapeDtypeStruct((batch_size, len(columns.numeric)), jnp.float32),
        "categorical": jax.ShapeDtypeStruct((batch_size, len(columns.categorical)), jnp.int32),
    }
    if has_target:
        out["target"] = jax.ShapeDtypeStruct((batch_size,), jnp.float32)
    return out


def sparse_tables(terms: Sequence[Term]) -> dict[str, SparseTable]:
    """The terms whose tables train row-sparse, by table site."""
    return {
        t.table_site: SparseTable(t.table_site, t, int(sum(t.num_categories)))
        for t in terms
        if t.sparse
    }


def make_setup(
    cfg: Config,
    table_sizes: Mapping[str, int],
    num_data: int,
    plan: ShardingPlan,
    pad_multiple: int | None = None,
    target_stats: TargetStats | None = None,
    feature_stats: FeatureStats | None = None,
    vocab_counts: Mapping[str, np.ndarray] | None = None,
    category_sums: Mapping[str, np.ndarray] | None = None,
) -> Setup:
    """Model, sites, optimizer and state shardings. ``pad_multiple`` is the run's table padding
    (fixed when the run starts, so it restores on other meshes); None: from this plan.
    ``target_stats``: the target's moments, for a data-aware start (``optim.start: data``);
    ``vocab_counts`` and ``category_sums``: each column's category counts and target sums,
    for a conditional guide's row start."""
    columns = Columns(tuple(cfg.data.numeric), tuple(cfg.data.categorical))
    pad = table_padding(plan, pad_multiple)
    model = build_model(cfg.model, columns, table_sizes, pad)
    sites = guides.latent_sites(
        model, abstract_batch(cfg.data.batch_size, columns), num_data=num_data
    )
    optimizer = make_optimizer(cfg.optim, cfg.train.steps, global_sites=global_site_names(sites))
    terms = model.terms
    sparse = sparse_tables(terms)
    check_posterior_settings(cfg)
    stats = target_stats if cfg.optim.start == "data" else None
    start, scales = starting_point(
        cfg, terms, sites, columns, table_sizes, num_data, stats, feature_stats
    )
    guide = service_guide(str(cfg.optim.guide), terms, sites, str(cfg.optim.fm_rows))
    init = _state_init(cfg, guide, optimizer, frozenset(sparse), start, scales)
    abstract = jax.eval_shape(init)
    row_start = None
    if vocab_counts is not None:
        row_start = conditional_row_start(
            cfg, guide, terms, columns, stats, vocab_counts, category_sums
        )
    try:
        shardings = plan.state_shardings(abstract, guide, optimizer)
    except ShardingError as err:
        raise ConfigError(f"sharding.rules: {err}") from None
    return Setup(
        plan,
        columns,
        model,
        sites,
        abstract,
        shardings,
        optimizer,
        model_fingerprint(cfg, sites, sparse, guide, terms),
        num_data,
        pad,
        sparse,
        make_schedule(cfg.optim, cfg.train.steps),
        str(cfg.optim.name),
        init,
        guide,
        row_start=row_start,
        information=observation_information(
            str(cfg.model.link), configured_link_kwargs(cfg.model), stats
        ),
        antithetic=bool(cfg.optim.antithetic),
    )


def _state_init(
    cfg: Config,
    guide: guides.MeanFieldGuide,
    optimizer: Any,
    sparse: frozenset[str],
    start: Mapping[str, Any],
    scales: Mapping[str, Any],
) -> Callable[[], TrainState]:
    """The state initializer (:func:`train.state.init_fn`) from the run's settings."""
    return init_fn(
        guide,
        optimizer,
        cfg.train.seed,
        cfg.optim.guide_init_scale,
        sparse,
        cfg.optim.name,
        start,
        scales,
    )


def starting_point(
    cfg: Config,
    terms: Any,
    sites: Mapping[str, guides.LatentSite],
    columns: Columns,
    table_sizes: Mapping[str, int],
    num_data: int,
    stats: TargetStats | None,
    feature_stats: FeatureStats | None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The guide's starting values and sds of the global sites (:mod:`train.starts`)."""
    link, link_kwargs = str(cfg.model.link), configured_link_kwargs(cfg.model)
    start = starting_values(terms, sites, link, link_kwargs, stats)
    levels = {
        t.table_site: sum(table_sizes[columns.categorical[i]] for i in t.categorical_idx)
        for t in terms
        if t.categorical_idx
    }
    scales = starting_scales(
        terms, sites, link, link_kwargs, stats, feature_stats, num_data, levels
    )
    return start, scales


def model_fingerprint(
    cfg: Config,
    sites: Mapping[str, guides.LatentSite],
    sparse: Mapping[str, Any],
    guide: guides.MeanFieldGuide,
    terms: Any,
) -> str:
    """What a checkpoint must match to restore into this setup
    (:func:`train.checkpoint.fingerprint`)."""
    fm_rows = fm_rows_in_effect(guide.name, terms, sites, str(cfg.optim.fm_rows))
    return ckpt.fingerprint(sites, str(cfg.model.link), sorted(sparse), guide.name, fm_rows)


def table_padding(plan: ShardingPlan, pad_multiple: int | None) -> int:
    """The run's table padding: fixed when it starts (``pad_multiple``), else this plan's
    table split; a plan that cannot split the run's padding is refused.

    Raises:
        ConfigError: naming the padding and the split.
    """
    split = plan.table_multiple
    pad = split if pad_multiple is None else int(pad_multiple)
    if pad % split:
        raise ConfigError(
            f"mesh: this run's tables are padded to multiples of {pad} rows, which cannot be "
            f"split {split} ways; use a mesh whose table axes divide {pad}"
        )
    return pad


def conditional_row_start(
    cfg: Config,
    guide: guides.MeanFieldGuide,
    terms: Any,
    columns: Columns,
    stats: TargetStats | None,
    vocab_counts: Mapping[str, np.ndarray],
    category_sums: Mapping[str, np.ndarray] | None,
) -> dict[str, dict[str, np.ndarray]]:
    """Where a conditional guide's table rows start (:func:`train.starts.row_starts`), from
    each column's category counts and target sums."""
    by_site = {t.table_site: t for t in terms if t.kind == "table"}
    conditional = [s for s in getattr(guide, "conditional", {}) if s in by_site]
    counts = {s: row_counts(by_site[s], vocab_counts, columns) for s in conditional}
    sums = None
    if category_sums is not None:
        sums = {s: row_counts(by_site[s], category_sums, columns) for s in conditional}
    link_kwargs = configured_link_kwargs(cfg.model)
    return row_starts(guide, str(cfg.model.link), link_kwargs, stats, counts, sums)


def table_rows_of(setup: Setup) -> dict[str, int]:
    """Rows of every table site (dense and row-sparse), from the state's shapes."""
    params = setup.abstract.params
    return {
        t.table_site: int(jax.tree.leaves(params[t.table_site])[0].shape[0])
        for t in setup.model.terms
        if t.categorical_idx and t.table_site in params
    }


def global_site_names(sites: Mapping[str, guides.LatentSite]) -> frozenset[str]:
    return frozenset(n for n, site in sites.items() if guides.is_global(site))


def with_lr_scale(setup: Setup, cfg: Config, scale: float) -> Setup:
    """``setup`` with its optimizer and schedule at ``optim.lr × scale`` (the optimizer
    state's structure is the same, so a restored state fits)."""
    if scale == setup.lr_scale:
        return setup
    return dataclasses.replace(
        setup,
        optimizer=make_optimizer(cfg.optim, cfg.train.steps, scale, global_site_names(setup.sites)),
        schedule=make_schedule(cfg.optim, cfg.train.steps, scale),
        lr_scale=scale,
    )
