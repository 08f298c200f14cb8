"""One draw of the model under the posterior, on the table rows a batch touches.

Scoring, the ArviZ export and anything else that runs the model on data under posterior
draws share this: the batch's rows of each gatherable table are found once (``unique``), the
guide draws those rows and every global jointly, rows unseen in training (OOV and padding)
are replaced by a draw from the layer's prior given the drawn scale, and the model runs in
gathered mode under the substituted values. Its trace holds the observation distribution
(``obs``) and, where the model records it, the linear predictor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from numpyro.distributions import Normal

from blayers import guides

from .model import GatheredRows
from .sparse import row_counts
from .state import guide_rows


class Gathered(NamedTuple):
    """A batch's table rows: ``uniq[site]`` the distinct rows (padded with row 0),
    ``local[term]`` each example's index into them (with the table's length where it is
    not the batch's ``n * F``), ``unseen[site]`` which had no data,
    ``picked[site]`` where the rows asked for by :func:`gather`'s ``extra`` are."""

    uniq: dict[str, jax.Array]
    local: dict[str, jax.Array]
    unseen: dict[str, jax.Array]
    picked: dict[str, jax.Array]


def table_terms(setup: Any) -> dict[str, Any]:
    """The model's gatherable table terms, by name."""
    return {t.name: t for t in setup.model.terms if t.gatherable}


def seen_rows(setup: Any, vocabs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Per gatherable table, which rows had training data (the others, OOV and padding,
    are drawn from the prior)."""
    counts = {c: v.counts for c, v in vocabs.items()}
    return {
        t.table_site: row_counts(t, counts, setup.columns) > 0 for t in table_terms(setup).values()
    }


def gather(
    terms: Mapping[str, Any],
    categorical: jax.Array,
    seen: Mapping[str, jax.Array],
    extra: Mapping[str, jax.Array] | None = None,
) -> Gathered:
    """The rows ``categorical`` reads in each table, each once; ``extra[site]``: more rows
    of a table to draw with them (each still once: a row asked for and read is one draw)."""
    uniq, local, unseen, picked = {}, {}, {}, {}
    for name, term in terms.items():
        rows = term.rows(categorical)
        site = term.table_site
        wanted = jnp.asarray(extra[site], rows.dtype) if extra and site in extra else None
        every = rows.ravel() if wanted is None else jnp.concatenate([wanted, rows.ravel()])
        u, inv = jnp.unique(every, size=every.size, fill_value=0, return_inverse=True)
        inv = inv.reshape(-1).astype(jnp.int32)
        skip = 0 if wanted is None else wanted.size
        uniq[site], local[name] = u, inv[skip:].reshape(rows.shape)
        if wanted is not None:  # the gathered table is longer than the batch's n * F rows
            picked[site] = inv[:skip]
            local[name] = GatheredRows(local[name], int(u.size))
        unseen[site] = ~seen[site][u]
    return Gathered(uniq, local, unseen, picked)


def prior_draw(fn: Any, noise: jax.Array, key: jax.Array) -> jax.Array:
    """A draw of a table site from its prior, for the rows unseen in training.

    A Normal prior reuses ``noise``, the standard normal draws the guide took for the same
    rows: for an unseen row the guide's value is discarded, so its noise is independent of
    everything kept. That halves the random numbers a batch needs (on CPU, drawing them is most
    of scoring's time). Other priors are sampled with ``key``."""
    base = fn
    while hasattr(base, "base_dist"):
        base = base.base_dist
    if isinstance(base, Normal) and tuple(noise.shape) == tuple(fn.shape()):
        return fn.mean + jnp.sqrt(fn.variance) * noise
    return fn.sample(key)


def draw_trace(
    setup: Any,
    key: jax.Array,
    params: guides.Params,
    rows: Gathered,
    batch: Mapping[str, jax.Array],
) -> tuple[dict[str, Any], dict[str, jax.Array]]:
    """The model's trace on ``batch`` under one posterior draw (key ``key``), and the drawn
    value of every site (table sites: of the gathered rows)."""
    table_index = {site: i for i, site in enumerate(sorted(rows.uniq))}
    model_key, prior_key, draw_key = jax.random.split(key, 3)
    view = {
        name: guide_rows(params[name], rows.uniq[name]) if name in rows.uniq else params[name]
        for name in setup.sites
    }
    draws = setup.guide.draw(draw_key, view)
    values = {name: d.value for name, d in draws.items()}
    noise = {name: d.noise for name, d in draws.items()}

    def draw(msg: dict[str, Any]) -> jax.Array | None:
        name = msg["name"]
        if name not in rows.unseen:
            return values.get(name)
        prior = prior_draw(msg["fn"], noise[name], jax.random.fold_in(prior_key, table_index[name]))
        mask = rows.unseen[name].reshape((-1,) + (1,) * (prior.ndim - 1))
        values[name] = jnp.where(mask, prior, values[name])
        return values[name]

    seeded = handlers.seed(handlers.substitute(setup.model, substitute_fn=draw), model_key)
    trace = handlers.trace(seeded).get_trace(batch, None, rows.local)
    return trace, values


def whole_tables(setup: Any, seen: Mapping[str, jax.Array]) -> Gathered:
    """Every row of every gatherable table, as :func:`gather` would give them for a batch
    that read them all (for a one-row batch: its ids point at row 0)."""
    uniq, local, unseen = {}, {}, {}
    for name, term in table_terms(setup).items():
        rows = int(sum(term.num_categories))
        site = term.table_site
        uniq[site] = jnp.arange(rows, dtype=jnp.int32)
        local[name] = GatheredRows(jnp.zeros((1, len(term.categorical_idx)), jnp.int32), rows)
        unseen[site] = ~seen[site]
    return Gathered(uniq, local, unseen, {})


def draw_tables(
    setup: Any,
    key: jax.Array,
    params: guides.Params,
    seen: Mapping[str, jax.Array],
    draws: int,
) -> dict[str, jax.Array]:
    """``draws`` posterior draws of every site, whole tables included (rows unseen in
    training from the prior given the drawn scale, as :func:`draw_trace` draws them), each
    ``(draws, *shape)``. A row's draws are then a function of its id alone: the same in every
    batch, part and process, drawn once instead of once per batch that reads it."""
    tables = whole_tables(setup, seen)
    dummy = {
        "numeric": jnp.zeros((1, len(setup.columns.numeric)), jnp.float32),
        "categorical": jnp.zeros((1, len(setup.columns.categorical)), jnp.int32),
    }

    def one(k: jax.Array) -> dict[str, jax.Array]:
        return draw_trace(setup, k, params, tables, dummy)[1]

    return jax.vmap(one)(jax.random.split(key, draws))


def table_bytes(setup: Any, draws: int) -> int:
    """The bytes :func:`draw_tables` holds: every latent site's values for every draw."""
    return 4 * draws * sum(int(np.prod(site.shape)) for site in setup.sites.values())
