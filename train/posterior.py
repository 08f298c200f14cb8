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
from jax.extend.random import threefry2x32_p
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
    sizes: Mapping[str, int] | None = None,
) -> Gathered:
    """The rows ``categorical`` reads in each table, each once; ``extra[site]``: more rows
    of a table to draw with them (each still once: a row asked for and read is one draw).
    ``sizes[site]``: the length of ``uniq[site]``, at least the distinct rows read (the
    default, every id's slot, always is)."""
    uniq, local, unseen, picked = {}, {}, {}, {}
    for name, term in terms.items():
        rows = term.rows(categorical)
        site = term.table_site
        wanted = jnp.asarray(extra[site], rows.dtype) if extra and site in extra else None
        every = rows.ravel() if wanted is None else jnp.concatenate([wanted, rows.ravel()])
        size = sizes[site] if sizes and site in sizes else every.size
        u, inv = jnp.unique(every, size=size, fill_value=0, return_inverse=True)
        inv = inv.reshape(-1).astype(jnp.int32)
        skip = 0 if wanted is None else wanted.size
        uniq[site], local[name] = u, inv[skip:].reshape(rows.shape)
        if wanted is not None:
            picked[site] = inv[:skip]
        if u.size != rows.size:  # the gathered table is not the batch's n * F rows long
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
    noise: Mapping[str, jax.Array] | None = None,
) -> tuple[dict[str, Any], dict[str, jax.Array]]:
    """The model's trace on ``batch`` under one posterior draw (key ``key``), and the drawn
    value of every site (table sites: of the gathered rows). ``noise[site]``: the standard
    normal noise of a site's guide draw (:func:`row_noise`), else drawn from ``key``."""
    table_index = {site: i for i, site in enumerate(sorted(rows.uniq))}
    model_key, prior_key, draw_key = jax.random.split(key, 3)
    view = {
        name: guide_rows(params[name], rows.uniq[name]) if name in rows.uniq else params[name]
        for name in setup.sites
    }
    draws = setup.guide.draw(draw_key, view, noise=noise)
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


ROW_NOISE_STREAM = 0x524F57  # folded into a job's table key for the rows' noise
# How a seed becomes draws; a scoring part records it, and one made under another scheme
# is redone, so that one output never mixes two random streams. 2: rows' noise by
# :func:`row_noise` (1: each table's noise drawn by position, from a key per draw).
DRAW_SCHEME = 2
_LOWEST = np.nextafter(np.float32(-1.0), np.float32(0.0))


def _normal_from_bits(bits: jax.Array) -> jax.Array:
    r"""Standard normal float32 from uniform uint32 bits, as ``jax.random.normal`` makes them:
    a uniform on :math:`(-1, 1)` from the top 23 bits, then :math:`\sqrt2\,
    \mathrm{erf}^{-1}(u)`."""
    one = jnp.uint32(0x3F800000)  # the bits of 1.0f: the exponent that puts these in [1, 2)
    unit = jax.lax.bitcast_convert_type((bits >> 9) | one, jnp.float32) - 1.0
    uniform = jnp.maximum(_LOWEST, unit * (1.0 - _LOWEST) + _LOWEST)
    return np.float32(np.sqrt(2.0)) * jax.lax.erf_inv(uniform)


def row_noise(
    key: jax.Array, rows: jax.Array, event_shape: tuple[int, ...], draws: int
) -> jax.Array:
    """Standard normal noise ``(draws, len(rows), *event_shape)`` whose entry ``[s, k, j]``
    is a function of ``(key, rows[k], s, j)`` alone: the same for a row whichever other rows
    are drawn with it, in whatever order or padding.

    Each pair of draws ``(2q, 2q + 1)`` of a row's element ``j`` is the two words of one
    Threefry-2x32 block of ``key`` at counter ``(row, q·width + j)`` (``width`` the event's
    size), so the noise costs what ``jax.random.normal`` costs: half a block per number.
    Rows must be below :math:`2^{32}` and ``⌈draws / 2⌉ · width`` at most :math:`2^{32}`."""
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    width = int(np.prod(event_shape, dtype=np.int64))
    pairs = -(-draws // 2)
    shape = (rows.shape[0], pairs * width)
    row = jnp.broadcast_to(rows.astype(jnp.uint32)[:, None], shape)
    counter = jnp.broadcast_to(jnp.arange(pairs * width, dtype=jnp.uint32)[None, :], shape)
    even, odd = threefry2x32_p.bind(data[0], data[1], row, counter)
    bits = jnp.stack([even, odd], axis=1).reshape(rows.shape[0], 2, pairs, width)
    bits = bits.transpose(2, 1, 0, 3).reshape(2 * pairs, rows.shape[0], *event_shape)[:draws]
    return _normal_from_bits(bits)


def rows_noise(
    setup: Any, key: jax.Array, uniq: Mapping[str, jax.Array], draws: int
) -> dict[str, jax.Array]:
    """:func:`row_noise` of each table site's rows ``uniq[site]``, from a key of its own."""
    key = jax.random.fold_in(key, ROW_NOISE_STREAM)
    return {
        site: row_noise(
            jax.random.fold_in(key, i),
            uniq[site],
            tuple(setup.sites[site].unconstrained_shape[1:]),
            draws,
        )
        for i, site in enumerate(sorted(uniq))
    }


def draw_rows(
    setup: Any,
    key: jax.Array,
    params: guides.Params,
    rows: Gathered,
    batch: Mapping[str, jax.Array],
    draws: int,
) -> dict[str, jax.Array]:
    """``draws`` posterior draws of every site, table sites at the rows ``rows.uniq``, each
    ``(draws, *shape)``. The globals' draws come from ``key`` and each table row's noise
    from :func:`rows_noise`, so a row's draws are a function of ``key``, its table and its
    id alone: the same in every batch, part and process, whichever rows are drawn with it
    (rows unseen in training are drawn from the prior given the drawn scale; a Normal prior
    reuses the row's noise, other priors are drawn by position)."""
    noise = rows_noise(setup, key, rows.uniq, draws)

    def one(k: jax.Array, eps: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        return draw_trace(setup, k, params, rows, batch, eps)[1]

    return jax.vmap(one)(jax.random.split(key, draws), noise)


def draw_tables(
    setup: Any,
    key: jax.Array,
    params: guides.Params,
    seen: Mapping[str, jax.Array],
    draws: int,
) -> dict[str, jax.Array]:
    """:func:`draw_rows` of whole tables: every row of every table, drawn once instead of
    once per batch that reads it."""
    dummy = {
        "numeric": jnp.zeros((1, len(setup.columns.numeric)), jnp.float32),
        "categorical": jnp.zeros((1, len(setup.columns.categorical)), jnp.int32),
    }
    return draw_rows(setup, key, params, whole_tables(setup, seen), dummy, draws)


def table_bytes(setup: Any, draws: int) -> int:
    """The bytes :func:`draw_tables` holds: every latent site's values for every draw."""
    return 4 * draws * sum(int(np.prod(site.shape)) for site in setup.sites.values())
