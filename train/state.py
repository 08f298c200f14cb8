"""Train state, born sharded: ``eval_shape`` → shardings from the job's plan
(:class:`train.plan.ShardingPlan`) → ``jit(init)``.

A table trained row-sparse keeps everything a step reads and writes for one row together:
``params[site] = {"row_state": (rows, F, *event)}`` whose fields along axis 1 are ``loc``,
``raw_scale`` and then the row optimizer's moments (:func:`row_state_fields`). A step then gathers
and scatters each touched row once, one or a few cache lines, instead of six arrays at six scattered
places, which made the row update at large tables several times faster. A table whose rows a
structured guide couples to the globals adds ``{"coupling_state": (rows, 1 + moments, *event,
D_r)}``: the rows' :math:`A_r` and their moments (one more gather and scatter per step).
:func:`guide_params` gives the usual ``{site: {"loc", "raw_scale"[, "coupling"]}}`` view.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from blayers import guides

from .config import OptimConfig


class NonFiniteError(FloatingPointError):
    """Training produced inf or NaN; the message names the step, the first bad site and the
    fix. Nothing non-finite is ever checkpointed, so a rerun resumes from the last good step."""


@jax.jit
def _finite_by_site(state: Any) -> dict[str, jax.Array]:
    def finite(tree: Any) -> jax.Array:
        leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
        return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)

    flags = {site: finite(p) for site, p in state.params.items()}
    flags["optimizer state"] = finite(state.opt_state)
    return flags


def non_finite_sites(state: Any) -> list[str]:
    """The guide sites (and ``"optimizer state"``) of ``state`` holding an inf or NaN."""
    flags = jax.device_get(_finite_by_site(state))
    return [site for site, ok in sorted(flags.items()) if not bool(ok)]


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: steps completed
    params: guides.Params
    opt_state: Any
    rng: jax.Array  # uint32[2] base key; step keys are fold_in(rng, step)


ROW_STATE = "row_state"
COUPLING_STATE = "coupling_state"


def row_state_fields(row_optimizer: str) -> tuple[str, ...]:
    """Fields of a row-sparse table's row state, in order along its axis 1."""
    moments = ("m", "v") if row_optimizer == "adam" else ("v",)
    return ("loc", "raw_scale", *(f"{m}_{f}" for f in ("loc", "raw_scale") for m in moments))


def split_row_state(
    rows: jax.Array, coupling_rows: jax.Array | None = None
) -> dict[str, jax.Array]:
    """``{"loc", "raw_scale"[, "coupling"]}`` of row-state rows (the first two of
    :func:`row_state_fields`, whatever the optimizer) and of coupling-state rows (its first
    field)."""
    out = {"loc": rows[:, 0], "raw_scale": rows[:, 1]}
    if coupling_rows is not None:
        out[guides.COUPLING] = coupling_rows[:, 0]
    return out


def guide_params(params: Mapping[str, Any]) -> guides.Params:
    """``{site: {"loc", "raw_scale"[, "coupling"]}}`` for every site; row-sparse tables'
    fields sliced out of their row state (copies: for whole-table consumers, not for a step)."""
    return {site: guide_rows(p) for site, p in params.items()}


def guide_rows(p: Mapping[str, jax.Array], rows: jax.Array | None = None) -> dict[str, jax.Array]:
    """The guide parameters (``loc``, ``raw_scale``, any coupling) of the given table rows
    (all rows by default) of one site, in either layout."""
    if ROW_STATE not in p:
        return dict(p) if rows is None else {f: v[rows] for f, v in p.items()}
    take = (lambda a: a) if rows is None else (lambda a: a[rows])
    coupling = p.get(COUPLING_STATE)
    return split_row_state(take(p[ROW_STATE]), None if coupling is None else take(coupling))


def guide_field(p: Mapping[str, jax.Array], field: str) -> jax.Array:
    """One guide field (``loc``, ``raw_scale``, ``coupling``) of a site, in either layout."""
    if ROW_STATE not in p:
        return p[field]
    return guide_rows(p)[field]


def with_guide_field(p: Mapping[str, jax.Array], field: str, value: jax.Array) -> dict[str, Any]:
    """``p`` with one guide field replaced, in its own layout (row-state moments kept)."""
    if ROW_STATE not in p:
        return {**p, field: value}
    if field == guides.COUPLING:
        return {**p, COUPLING_STATE: jnp.asarray(p[COUPLING_STATE]).at[:, 0].set(value)}
    column = {"loc": 0, "raw_scale": 1}[field]
    return {**p, ROW_STATE: jnp.asarray(p[ROW_STATE]).at[:, column].set(value)}


OPTIMIZERS = {"adam": optax.adam, "adamw": optax.adamw, "sgd": optax.sgd, "adagrad": optax.adagrad}
SCHEDULES = ("constant", "cosine")


def make_schedule(cfg: OptimConfig, total_steps: int, lr_scale: float = 1.0) -> optax.Schedule:
    """Learning rate by step from ``optim`` config (cosine horizon: decay_steps or the total),
    times ``lr_scale`` (below 1 after a rollback, ``train.nonfinite``)."""
    lr = float(cfg.lr) * lr_scale
    end = lr * float(cfg.end_lr_factor)
    if cfg.schedule == "constant":
        schedule: Any = lr
    elif cfg.schedule == "cosine":
        decay = max(cfg.decay_steps or total_steps, cfg.warmup_steps + 1)
        schedule = optax.warmup_cosine_decay_schedule(
            lr if cfg.warmup_steps == 0 else 0.0, lr, cfg.warmup_steps, decay, end
        )
    else:
        raise ValueError(f"optim.schedule={cfg.schedule!r}: choose constant or cosine")
    return schedule if callable(schedule) else optax.constant_schedule(schedule)


def make_optimizer(
    cfg: OptimConfig,
    total_steps: int,
    lr_scale: float = 1.0,
    global_sites: frozenset[str] = frozenset(),
) -> optax.GradientTransformation:
    r"""Optimizer from ``optim`` config; the schedule spans the run's total steps.

    A structured guide's coupling of the globals (:math:`T` of
    :class:`blayers.guides.StructuredGuide`, the ``coupling`` of ``global_sites``) moves at
    ``optim.coupling_lr_factor`` times the rate of the rest. Its gradient is a single draw's
    :math:`\nabla_z \log p \, \varepsilon^\top`, noise of the size of the posterior's
    precision, and the entropy does not restrain it. At the full rate its steps inflated the
    globals' spread on correlated coefficients far past the exact posterior's; at 0.03 of
    the rate they match it (``benchmarks/coupling_rate.py``; figures in
    ``benchmarks/results/design_measurements.md``)."""
    schedule = make_schedule(cfg, total_steps, lr_scale)
    if cfg.name not in OPTIMIZERS:  # refused before any data pass too (train.settings)
        raise ValueError(f"optim.name={cfg.name!r}: choose one of {sorted(OPTIMIZERS)}")
    chain = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []

    base = optax.chain(*chain, OPTIMIZERS[cfg.name](schedule))
    return _slower_couplings(base, float(cfg.coupling_lr_factor), global_sites)


def _slower_couplings(
    base: optax.GradientTransformation, factor: float, global_sites: frozenset[str]
) -> optax.GradientTransformation:
    """``base`` with the updates of ``global_sites``' couplings times ``factor``. Its state
    is ``base``'s own, so a state saved by any version or factor restores."""

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        updates, state = base.update(updates, state, params)
        scaled = {
            site: {
                f: u * factor if f == guides.COUPLING and site in global_sites else u
                for f, u in fields.items()
            }
            if isinstance(fields, dict)
            else fields
            for site, fields in updates.items()
        }
        return scaled, state

    return optax.GradientTransformation(base.init, update)


def init_fn(
    guide: guides.MeanFieldGuide,
    optimizer: optax.GradientTransformation,
    seed: int,
    init_scale: float,
    sparse_sites: frozenset[str] = frozenset(),
    row_optimizer: str = "adam",
    start: Mapping[str, Any] | None = None,
    scales: Mapping[str, Any] | None = None,
) -> Any:
    """State initializer; sparse tables keep guide parameters and row-wise moments together
    in one row state per table (see the module docstring). ``start``: constrained starting
    values by site (:func:`train.starts.starting_values`)."""
    moments = len(row_state_fields(row_optimizer)) - 2

    def init() -> TrainState:
        params = guide.init_params(init_scale, start=start, scales=scales)
        if not sparse_sites:
            opt_state = optimizer.init(params)
        else:
            dense = {k: v for k, v in params.items() if k not in sparse_sites}
            for s in sparse_sites:
                loc, raw = params[s]["loc"], params[s]["raw_scale"]
                zeros = [jnp.zeros_like(loc)] * moments
                row_state = {ROW_STATE: jnp.stack([loc, raw, *zeros], axis=1)}
                if guides.COUPLING in params[s]:
                    coupling = params[s][guides.COUPLING]
                    stacked = [coupling] + [jnp.zeros_like(coupling)] * (moments // 2)
                    row_state[COUPLING_STATE] = jnp.stack(stacked, axis=1)
                params[s] = row_state
            opt_state = {"dense": optimizer.init(dense)}
        return TrainState(jnp.zeros((), jnp.int32), params, opt_state, jax.random.PRNGKey(seed))

    return init
