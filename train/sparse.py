r"""Row-sparse SVI: a step whose cost does not grow with the number of table rows.

For each sparse table, a step touches only the ``K ≤ B·F`` rows present in the batch:

1. ``unique`` the batch's table rows (duplicates combined: their gradients sum once);
2. gather those rows' guide parameters and draw them; the model runs in gathered mode;
3. the prior and guide terms of row ``r`` are weighted by :math:`w_r = c_r N / (B n_r)`, with
   :math:`c_r` its occurrences in the batch and :math:`n_r` in the training data (vocabulary
   counts). Each example carries :math:`KL_r / n_r` of each row it contains, so over uniform
   batches :math:`E[\sum_r w_r KL_r] = \sum_r KL_r`: an unbiased estimate of the full ELBO, whose
   optimum is the dense one's;
4. the gradient w.r.t. the gathered rows feeds a lazy row-wise Adam (or Adagrad) whose moments
   live in the same row state as the guide parameters (``train.state``), so a row is gathered
   once and scattered once, into the donated buffer; fill ids (``unique`` padding) point past
   the table and are dropped.

Rows never seen in training are never touched; scoring draws them from the prior given the
posterior scale. Global (non-table) sites take the ordinary dense optax update.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from numpyro import handlers

from blayers import guides, posterior_prior

from . import prior_from
from .dedup import COUNT, LOCAL, UNIQ, TableRows
from .dispatch import StepPrograms, jit_steps
from .model import GatheredRows
from .nonfinite import optimizer_step
from .state import (
    COUPLING_STATE,
    ROW_STATE,
    TrainState,
    row_state_fields,
    split_row_state,
)

B1, B2, EPS = 0.9, 0.999, 1e-8
ROW_OPTIMIZERS = ("adam", "adagrad")


@dataclass(frozen=True)
class SparseTable:
    site: str
    term: Any  # train.model.Term
    rows: int


def split_params(
    params: guides.Params, sparse: Mapping[str, SparseTable]
) -> tuple[guides.Params, guides.Params]:
    dense = {k: v for k, v in params.items() if k not in sparse}
    tables = {k: v for k, v in params.items() if k in sparse}
    return dense, tables


def _gather(x: jax.Array, idx: jax.Array, distinct: bool = False) -> jax.Array:
    return x.at[idx].get(
        mode="fill", fill_value=0, indices_are_sorted=distinct, unique_indices=distinct
    )


def _scatter(x: jax.Array, idx: jax.Array, values: jax.Array, distinct: bool = False) -> jax.Array:
    return x.at[idx].set(values, mode="drop", indices_are_sorted=distinct, unique_indices=distinct)


def weighted_log_joint(trace: Mapping[str, Any], row_weights: Mapping[str, jax.Array]) -> jax.Array:
    """Log joint of a gathered-mode trace; table sites' rows weighted by ``row_weights``."""
    total = jnp.zeros(())
    for name, site in trace.items():
        if site["type"] != "sample":
            continue
        fn, value = site["fn"], site["value"]
        if name in row_weights:
            base = fn.base_dist if hasattr(fn, "base_dist") else fn
            lp = base.log_prob(value)
            lp = jnp.broadcast_to(lp, value.shape).reshape(value.shape[0], -1).sum(1)
            total = total + lp @ row_weights[name]
        else:
            lp = jnp.sum(fn.log_prob(value))
            scale = site.get("scale")
            total = total + (lp if scale is None else lp * scale)
    return total


def make_sparse_loss(
    model: Callable[..., Any],
    guide: guides.MeanFieldGuide,
    sparse: Mapping[str, SparseTable],
    num_data: int,
    widen: float | None = None,
    antithetic: bool = False,
) -> Callable[..., jax.Array]:
    """``loss(dense, gathered, key, batch, local, weights[, prior]) -> -ELBO estimate``;
    ``prior``: ``(day 1's dense parameters, its gathered rows, each table's known flags)``
    (:mod:`train.prior_from`), whose sds are widened by ``widen``. ``antithetic``: at a pair
    of mirrored draws (:func:`blayers.guides.antithetic_mean`)."""

    def loss(
        dense: guides.Params,
        gathered: guides.Params,
        key: jax.Array,
        batch: Mapping[str, jax.Array],
        local: Mapping[str, jax.Array],
        weights: Mapping[str, jax.Array],
        prior: tuple[Any, Any, Any] | None = None,
    ) -> jax.Array:
        model_key, draw_key = jax.random.split(key)

        params = {**dense, **gathered}

        def one(noise: Mapping[str, jax.Array]) -> jax.Array:
            draws = guide.draw(draw_key, params, noise)
            log_q = jnp.zeros(())
            for name, d in draws.items():
                log_q = log_q + (d.per_row() @ weights[name] if name in sparse else d.total())
            values = {name: d.value for name, d in draws.items()}
            seeded = handlers.seed(handlers.substitute(model, values), model_key)
            trace = handlers.trace(seeded).get_trace(batch, num_data, local)
            if prior is None:
                return log_q - weighted_log_joint(trace, weights)
            prior_dense, prior_rows, known = prior
            as_prior = prior_from.posterior_prior(guide, prior_dense, known, float(widen or 1.0))
            joint = posterior_prior.log_joint(trace, draws, as_prior, weights, prior_rows, known)
            return log_q - joint

        return guides.antithetic_mean(one, guide.noise(draw_key, params), antithetic)

    return loss


def table_rows(sparse: Mapping[str, SparseTable]) -> tuple[TableRows, ...]:
    """The host-side description of each sparse table (see :mod:`train.dedup`)."""
    return tuple(
        TableRows(
            site,
            tuple(int(i) for i in t.term.categorical_idx),
            tuple(int(o) for o in np.asarray(t.term.row_offsets).ravel()),
            int(t.rows),
        )
        for site, t in sparse.items()
    )


def batch_rows(
    batch: Mapping[str, jax.Array],
    sparse: Mapping[str, SparseTable],
    counts: Mapping[str, jax.Array],
    num_data: int,
) -> tuple[dict[str, jax.Array], dict[str, jax.Array], dict[str, jax.Array]]:
    """Per sparse table: unique rows (fill = table size), local ids, and row weights — from the
    host's deduplication when the batch carries it, else by ``unique`` on device."""
    uniq, local, weights = {}, {}, {}
    categorical = batch["categorical"]
    b = categorical.shape[0]
    for site, table in sparse.items():
        if UNIQ + site in batch:
            u, c = batch[UNIQ + site], batch[COUNT + site]
            inv = batch[LOCAL + site]
        else:
            rows = table.term.rows(categorical)
            u, inv, c = jnp.unique(
                rows.ravel(),
                size=rows.size,
                fill_value=table.rows,
                return_inverse=True,
                return_counts=True,
            )
            inv = inv.reshape(rows.shape)
        n_r = _gather(counts[site], u)
        uniq[site] = u
        local[table.term.name] = GatheredRows(inv.astype(jnp.int32), int(u.shape[0]))
        weights[site] = jnp.where(n_r > 0, c * (num_data / b) / jnp.maximum(n_r, 1.0), 0.0)
    return uniq, local, weights


def _gather_tables(
    tables: Mapping[str, Any], uniq: Mapping[str, jax.Array], distinct: bool
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """The batch's rows of each table's row state and, where rows are coupled, of its
    coupling: one gather per array, since each row's guide parameters and moments sit
    together."""
    rows = {s: _gather(t[ROW_STATE], uniq[s], distinct) for s, t in tables.items()}
    coupling = {
        s: _gather(t[COUPLING_STATE], uniq[s], distinct)
        for s, t in tables.items()
        if COUPLING_STATE in t
    }
    return rows, coupling


def _day1_rows(
    prior: Mapping[str, Any],
    sparse: Mapping[str, SparseTable],
    uniq: Mapping[str, jax.Array],
    distinct: bool,
) -> tuple[Any, Any, dict[str, jax.Array]]:
    """The day-1 posterior (:mod:`train.prior_from`) at the batch's rows: its dense sites,
    its gathered table rows and which rows it knows (a fill row reads False: it has no
    day-1 posterior and no weight)."""
    prior_dense, prior_tables = split_params(prior["params"], sparse)
    day1_rows = prior_from.gathered_rows(prior_tables, uniq, lambda x, i: _gather(x, i, distinct))
    known = {
        s: _gather(k, uniq[s], distinct) if s in sparse else k for s, k in prior["known"].items()
    }
    return prior_dense, day1_rows, known


class RowUpdate(NamedTuple):
    """A lazy row-wise optimizer step (Adam or Adagrad) at learning rate ``lr``, for the
    ``t``-th update (Adam's bias correction counts the run's steps, not the row's)."""

    optimizer: str
    lr: jax.Array
    t: jax.Array

    def __call__(
        self, value: jax.Array, g: jax.Array, moments: list[jax.Array]
    ) -> tuple[jax.Array, list[jax.Array]]:
        """One field's new value and moments (``[m, v]`` or ``[v]``)."""
        if self.optimizer == "adam":
            m = B1 * moments[0] + (1 - B1) * g
            v = B2 * moments[1] + (1 - B2) * g**2
            delta = (m / (1 - B1**self.t)) / (jnp.sqrt(v / (1 - B2**self.t)) + EPS)
            return value - self.lr * delta, [m, v]
        v = moments[0] + g**2  # adagrad
        return value - self.lr * g / (jnp.sqrt(v) + 1e-7), [v]


def _updated_tables(
    update: RowUpdate,
    tables: Mapping[str, Any],
    rows: Mapping[str, jax.Array],
    coupling: Mapping[str, jax.Array],
    g_rows: Mapping[str, Any],
    into: Mapping[str, jax.Array],
    distinct: bool,
) -> dict[str, Any]:
    """Each table with the batch's rows (and their coupling) updated and scattered back to
    rows ``into`` (a skipped step's indices lie past the table, where the scatter drops
    them: still sorted and distinct)."""
    fields = row_state_fields(update.optimizer)
    column = {f: i for i, f in enumerate(fields)}
    per_field = len(fields) // 2 - 1  # moments per field
    new_tables = {}
    for s, r in rows.items():
        new = {}
        for f in ("loc", "raw_scale"):
            names = [f"{m}_{f}" for m in ("m", "v")[-per_field:]]
            new[f], moments = update(
                r[:, column[f]], g_rows[s][f], [r[:, column[n]] for n in names]
            )
            new.update(zip(names, moments, strict=True))
        updated = jnp.stack([new[f] for f in fields], axis=1)
        new_tables[s] = {ROW_STATE: _scatter(tables[s][ROW_STATE], into[s], updated, distinct)}
        if s in coupling:
            c = coupling[s]
            value_c, moments_c = update(
                c[:, 0], g_rows[s][guides.COUPLING], [c[:, i + 1] for i in range(per_field)]
            )
            stacked = jnp.stack([value_c, *moments_c], axis=1)
            new_tables[s][COUPLING_STATE] = _scatter(
                tables[s][COUPLING_STATE], into[s], stacked, distinct
            )
    return new_tables


def make_sparse_step(
    model: Callable[..., Any],
    guide: guides.MeanFieldGuide,
    sparse: Mapping[str, SparseTable],
    dense_optimizer: optax.GradientTransformation,
    schedule: Callable[[jax.Array], jax.Array],
    row_optimizer: str,
    num_data: int,
    state_shardings: TrainState,
    batch_shardings: Mapping[str, NamedSharding],
    counts_shardings: Mapping[str, NamedSharding],
    skip_non_finite: bool = False,
    prior_shardings: Any = None,
    widen: float | None = None,
    antithetic: bool = False,
) -> StepPrograms:
    """``step(state, batch, counts) -> (state, loss)``, alone and scanned
    (:mod:`train.dispatch`); the state is donated and tables are
    updated in place, row by row. ``skip_non_finite``: as in :func:`train.step.make_step`;
    a skipped step scatters its rows nowhere, so it costs no pass over the tables. With
    ``prior_shardings`` (:mod:`train.prior_from`) the step is ``step(state, batch, counts,
    prior)`` and gathers the batch's rows of the prior beside their state."""
    if row_optimizer not in ROW_OPTIMIZERS:
        raise ValueError(
            f"optim.name={row_optimizer!r}: the row-sparse path supports "
            f"{ROW_OPTIMIZERS}; use one, or set sparse: false on the table terms"
        )
    loss_fn = make_sparse_loss(model, guide, sparse, num_data, widen, antithetic)

    def step(
        state: TrainState,
        batch: Mapping[str, jax.Array],
        counts: Mapping[str, jax.Array],
        prior: Mapping[str, Any] | None = None,
    ) -> tuple[TrainState, jax.Array]:
        key = jax.random.fold_in(state.rng, state.step)
        dense, tables = split_params(state.params, sparse)
        uniq, local, weights = batch_rows(batch, sparse, counts, num_data)
        # the host's row arrays are sorted and distinct (fills included); the device's
        # ``unique`` repeats its fill id
        distinct = all(UNIQ + s in batch for s in sparse)
        rows, coupling = _gather_tables(tables, uniq, distinct)
        gathered = {s: split_row_state(r, coupling.get(s)) for s, r in rows.items()}
        day1 = None if prior is None else _day1_rows(prior, sparse, uniq, distinct)
        value, (g_dense, g_rows) = jax.value_and_grad(loss_fn, argnums=(0, 1))(
            dense, gathered, key, batch, local, weights, day1
        )

        (new_dense, dense_opt), value, ok = optimizer_step(
            dense_optimizer,
            dense,
            state.opt_state["dense"],
            g_dense,
            value,
            skip_non_finite,
            checked=(g_dense, g_rows),
        )

        new_tables = _updated_tables(
            RowUpdate(row_optimizer, schedule(state.step), (state.step + 1).astype(jnp.float32)),
            tables,
            rows,
            coupling,
            g_rows,
            uniq if ok is None else {s: uniq[s] + jnp.where(ok, 0, sparse[s].rows) for s in uniq},
            distinct,
        )
        params = {**new_dense, **new_tables}
        opt_state = {"dense": dense_opt}
        return TrainState(state.step + 1, params, opt_state, state.rng), value

    rest = (dict(counts_shardings),) + (() if prior_shardings is None else (prior_shardings,))
    return jit_steps(step, state_shardings, batch_shardings, rest)


def row_counts(term: Any, vocab_counts: Mapping[str, np.ndarray], columns: Any) -> np.ndarray:
    """Training count of every row of a term's table (OOV and padding rows: 0); given
    another per-category value by column (a target sum), that value by row."""
    out = np.zeros(int(sum(term.num_categories)), np.float32)
    offset = 0
    for idx, size in zip(term.categorical_idx, term.num_categories, strict=True):
        counts = vocab_counts[columns.categorical[idx]]
        out[offset : offset + len(counts)] = counts
        offset += size
    return out
