r"""Recentering: move each table's row mean into the intercept, exactly.

The slow direction of SVI on a mixed model is the intercept :math:`b` moving against a table's
mean row. An example reads exactly one row :math:`r(i)` of a random-effects table, so for any
shift :math:`\delta`

.. math:: \eta_i = b + \theta_{r(i)} + \dots = (b + \delta) + (\theta_{r(i)} - \delta) + \dots

and the shift changes no draw of any :math:`\eta_i`, under the mean-field guide too (the guide
locs move, the noise does not). The expected log-likelihood is unchanged to the last bit of
real arithmetic; only the prior terms of the ELBO depend on :math:`\delta`. For rows seen in
training (:math:`w_r = 1`; the only rows any example reads), a Normal row prior
:math:`\theta_r \sim N(0, \lambda)` with :math:`\lambda = e^u`, :math:`u \sim N(\mu, s)` under
the guide, and an intercept prior :math:`N(\mu_0, \sigma_0)`:

.. math::
    -\mathrm{ELBO}(\delta) = \tfrac{a}{2} \sum_r w_r \lVert m_r - \delta \rVert^2
    + \tfrac{p_0}{2} \big(m_b - \mu_0 + \textstyle\sum_j \delta_j\big)^2 + \text{const},
    \quad a = E_q[\lambda^{-2}] = e^{-2\mu + 2s^2},\; p_0 = \sigma_0^{-2}

a quadratic in :math:`\delta \in \mathbb{R}^m` (one per embedding dimension, whose sum moves
into :math:`b`). Its minimiser, with :math:`S_j = \sum_r w_r m_{rj}`, :math:`c = \sum_r w_r`,
:math:`e = m_b - \mu_0`:

.. math::
    D = \sum_j \delta_j = \frac{a S - m\,p_0 e}{a c + m\,p_0}, \qquad
    \delta_j = \frac{S_j - p_0 (e + D) / a}{c}

:math:`\delta = 0` is a candidate, so the move never lowers the ELBO; it is applied to each
table in turn (a Gauss–Seidel sweep) every ``optim.recenter_every`` steps (at most once per
``rows / batch_size`` steps, see :func:`train.segments.make_run_recenter`), on dense and row-sparse
tables alike. It is a deterministic function of the state, so resume stays exact,
and it is not part of the stochastic gradient, so the row-sparse ELBO estimate stays
unbiased. Its cost is one pass over each table's locs.

Tables it applies to: ``RandomEffectsLayer`` and slope-free ``EmbeddingLayer`` terms with the
default ``Normal(0, λ)`` row prior, beside an ``InterceptLayer`` with a Normal prior and one
unit. Other terms (FM factors, varying slopes, other priors) have no such exact direction.

Under the conditional guide (:class:`blayers.guides.ConditionalGuide`) a row's mean
:math:`m_r(\lambda)` depends on the scale, so the quadratic's :math:`m_r` is the
:math:`\lambda^{-2}`-weighted mean :math:`E[\lambda^{-2} m_r(\lambda)] / E[\lambda^{-2}]`
(Gauss–Hermite quadrature), and the shift moves the table's anchor :math:`a`, which moves
every row's mean by :math:`-\delta` at every :math:`\lambda`: the linear predictor is again
unchanged draw by draw. The anchor also moves a dense table's rows with no training data (its
unseen-category and padding rows); they are weighted out of the quadratic as the row-sparse
estimator weights them out of the ELBO (their prior terms are the only ones they touch, and
scoring draws them from the prior), which keeps the move independent of the table's padding.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dists

from blayers import guides

from .guide_plan import normal_table
from .plan import row_sharding
from .state import TrainState, guide_field, guide_rows, with_guide_field


@dataclass(frozen=True)
class ShiftedTable:
    site: str  # the rows' site
    scale_site: str  # its hierarchical λ


@dataclass(frozen=True)
class RecenterPlan:
    intercept: str
    prior_loc: float
    prior_scale: float
    tables: tuple[ShiftedTable, ...]


def _normal_intercept(
    term: Any, sites: Mapping[str, guides.LatentSite]
) -> tuple[str, float, float] | None:
    site = f"{term.layer_name}_{term.name}_beta"
    kw = term.layer.coef_kwargs
    if term.layer.coef_dist is not dists.Normal or set(kw) - {"loc", "scale"}:
        return None
    if site not in sites or sites[site].shape != (1, 1):
        return None
    return site, float(kw.get("loc", 0.0)), float(kw.get("scale", 1.0))


def _shiftable(term: Any, sites: Mapping[str, guides.LatentSite]) -> ShiftedTable | None:
    found = normal_table(term, sites)
    return None if found is None else ShiftedTable(*found)


def plan(terms: Sequence[Any], sites: Mapping[str, guides.LatentSite]) -> RecenterPlan | None:
    """What recentering moves in this model, or ``None`` when nothing qualifies."""
    intercept = next(
        (found for t in terms if t.kind == "intercept" and (found := _normal_intercept(t, sites))),
        None,
    )
    tables = tuple(found for t in terms if (found := _shiftable(t, sites)))
    if intercept is None or not tables:
        return None
    return RecenterPlan(*intercept, tables)


def shift(
    params: Mapping[str, Any],
    seen: Mapping[str, jax.Array],
    recenter: RecenterPlan,
    guide: guides.MeanFieldGuide,
    spread: bool = True,
) -> dict[str, Any]:
    """The ELBO-optimal shift of each table's seen rows into the intercept (module docstring).
    ``seen[site]``: 1.0 for rows seen in training, else 0.0. ``spread``: also the structured
    guide's variance move (:func:`_spread`), for ties that :func:`couple` does not set."""
    out = dict(params)
    p0 = 1.0 / recenter.prior_scale**2
    for table in recenter.tables:
        mu, s = guide.marginal(table.scale_site, out[table.scale_site])
        a = jnp.exp(-2.0 * mu + 2.0 * s**2)
        loc = guide_field(out[table.site], "loc")
        conditional = table.site in getattr(guide, "conditional", {})
        w = seen[table.site]
        if conditional:
            # rows' means depend on λ: the quadratic sees their λ⁻²-weighted means, and the
            # anchor moves every row at once (module docstring)
            loc = guide.weighted_row_mean(table.site, guide_rows(out[table.site]), out)
        rows = loc.reshape(loc.shape[0], -1)
        m = rows.shape[1]
        c = jnp.sum(w)
        sums = w @ rows
        b = out[recenter.intercept]["loc"]
        e = b[0, 0] - recenter.prior_loc
        total = (a * jnp.sum(sums) - m * p0 * e) / (a * c + m * p0)
        delta = jnp.where(c > 0, (sums - p0 * (e + total) / a) / jnp.maximum(c, 1.0), 0.0)
        total = jnp.where(c > 0, total, 0.0)
        if conditional:
            scale = dict(out[table.scale_site])
            anchor = scale[guides.ANCHOR]
            scale[guides.ANCHOR] = anchor - delta.reshape(anchor.shape)
            out[table.scale_site] = scale
        else:
            rows = rows - w[:, None] * delta[None, :]
            out[table.site] = with_guide_field(out[table.site], "loc", rows.reshape(loc.shape))
        out[recenter.intercept] = {**out[recenter.intercept], "loc": b + total}
        if (
            spread
            and isinstance(guide, guides.StructuredGuide)
            and table.site in guide.coupled
            and m == 1
            and guide.row_column(table.site, recenter.intercept) is not None
        ):
            out = _spread(out, table.site, w, a, p0, recenter.intercept, guide)
    return out


def _spread(
    params: dict[str, Any],
    site: str,
    w: jax.Array,
    a: jax.Array,
    p0: float,
    intercept: str,
    guide: guides.StructuredGuide,
) -> dict[str, Any]:
    r"""The structured guide's variance move: the intercept's deviation :math:`z_b` scaled by
    :math:`x`, each seen row of ``site`` given :math:`-(x-1) z_b` (so every predictor draw is
    unchanged), every other coupled row's weight on :math:`z_b` divided by :math:`x` (so its
    draws are unchanged). With :math:`v = \mathrm{Var}\,z_b`, :math:`\kappa_r =
    \mathrm{Cov}(\theta_r, z_b)`, :math:`K = a\sum_r w_r \kappa_r`, :math:`V = a v \sum_r w_r`,
    the ELBO changes by :math:`\log x - \tfrac{p_0 v}{2}(x^2 - 1) + K(x-1) - \tfrac V2 (x-1)^2`,
    maximised at the positive root of :math:`(p_0 v + V)x^2 - (K + V)x - 1 = 0`; :math:`x = 1`
    is a candidate, so the ELBO never falls."""
    k = guide.offsets[intercept]
    L = guide.global_factor(params)
    cov_b = L @ L[k]
    v = cov_b[k]
    coupling = guide_field(params[site], guides.COUPLING).reshape(w.shape[0], -1)
    K = a * (w @ (coupling @ cov_b[guide.row_index[site]]))
    V = a * v * jnp.sum(w)
    quad = p0 * v + V
    x = ((K + V) + jnp.sqrt((K + V) ** 2 + 4.0 * quad)) / (2.0 * quad)

    def seen_rows_follow(table: str, tie: jax.Array) -> jax.Array:
        return tie - (w * (x - 1.0) / x).reshape(tie.shape) if table == site else tie

    return _rescale_intercept(params, intercept, guide, x, seen_rows_follow)


def _rescale_intercept(
    params: Mapping[str, Any],
    intercept: str,
    guide: guides.StructuredGuide,
    x: jax.Array,
    then: Callable[[str, jax.Array], jax.Array],
) -> dict[str, Any]:
    """The intercept's deviation :math:`z_b` scaled by ``x`` (its sd and its row of
    :math:`T`), every coupled table's tie to it divided by ``x`` so that the table's draws
    are unchanged, and then ``then(table, tie)``: the calling move's own change to a table's
    ties."""
    out = dict(params)
    s_b = guide.loc_scale(params[intercept])[1]
    out[intercept] = {
        **params[intercept],
        "raw_scale": jnp.log(jnp.expm1(x * s_b)).astype(s_b.dtype),  # softplus^-1
        guides.COUPLING: params[intercept][guides.COUPLING] * x,
    }
    for table in guide.coupled:
        k = guide.row_column(table, intercept)
        if k is None:
            continue
        coupling = jnp.asarray(guide_field(out[table], guides.COUPLING))
        tie = then(table, coupling[..., k] / x)
        out[table] = with_guide_field(
            out[table], guides.COUPLING, coupling.at[..., k].set(tie.astype(coupling.dtype))
        )
    return out


def couple(
    params: Mapping[str, Any],
    counts: Mapping[str, jax.Array],
    recenter: RecenterPlan,
    guide: guides.MeanFieldGuide,
    information: float,
    new_rows: Mapping[str, jax.Array] | None = None,
) -> dict[str, Any]:
    r"""Set each shifted table's rows' tie to the intercept to the regression of the row on
    the intercept under the posterior's Gaussian approximation.

    The structured family holds the intercept's exact marginal variance (the Schur
    complement :math:`(h_{bb} - h_{ub}^\top H_{uu}^{-1} h_{ub})^{-1}` of the posterior
    precision) when every row's tie is :math:`A = -H_{uu}^{-1} h_{ub}`; SGD reaches it only
    over many epochs, since each row's tie gets a gradient in proportion to the intercept's
    variance, which grows only as the ties do. With :math:`I` the link's Fisher information
    per observation, a row seen :math:`n_r` times in table :math:`t` has
    :math:`h_{rb} = n_r I` and :math:`h_{rr} = n_r I + a_t`, :math:`a_t = E_q[\lambda_t^{-2}]`,
    so alone it would follow the intercept by :math:`-\kappa_r`, :math:`\kappa_r = n_r I /
    (n_r I + a_t)`. Crossed tables share that: with the tie :math:`-c_t \kappa_r` and the
    rows of different tables met by an example taken as independent (the off-diagonal
    block :math:`\kappa_s^\top H_{st} \kappa_t \approx N I \bar k_s \bar k_t`, with
    :math:`\bar k_t = \sum_r n_r \kappa_r / N` the mean shrinkage an example meets), the
    normal equations for :math:`c` solve in closed form:

    .. math:: c_t = \frac{1}{(1 + Q)(1 - \bar k_t)}, \qquad
        Q = \sum_s \frac{\bar k_s}{1 - \bar k_s}

    On the default job's data these ties give the intercept nearly its exact sd, where no
    ties give well under half of it (``benchmarks/results/design_measurements.md``).

    The intercept's deviation is then scaled up to the variance these ties give it,
    :math:`v = (N I / (1 + Q) + p_0)^{-1}` under the same approximation, where it is below
    that (SGD would otherwise grow its sd from the untied :math:`(NI + p_0)^{-1/2}` over
    many steps). Only up: :math:`I` is the information at the target's mean, which for a
    logit link is above the average over examples whose predictors spread (:math:`p(1-p)` is
    concave), so :math:`v` is a floor there, and SGD takes the sd on from it. A coupled table
    not set here has its tie divided by the same factor, so its draws are unchanged.

    Unlike the shift, this is not an exact ascent of the ELBO: it puts the intercept's
    block at the Gaussian approximation's optimum, from which SGD goes on.
    ``counts[site]``: each row's count in the training data.

    ``new_rows[site]`` (1.0 or 0.0 per row): under a previous posterior as prior
    (:mod:`train.prior_from`) the plan's intercept prior is that posterior's marginal, which
    already holds what the known groups say of the intercept; the floor then counts only
    the groups new since (a known row's examples sharpen its own effect, not the intercept's
    group-level information). The ties use every row the data observes; a row it does not
    keeps the tie it came with (day 1's)."""
    tables = [
        t
        for t in recenter.tables
        if isinstance(guide, guides.StructuredGuide)
        and t.site in guide.coupled
        and guide.row_column(t.site, recenter.intercept) is not None
    ]
    if not tables:
        return dict(params)
    kappa, mean_kappa = {}, {}
    for table in tables:
        mu, s = guide.marginal(table.scale_site, params[table.scale_site])
        a = jnp.exp(-2.0 * mu + 2.0 * s**2)
        n = counts[table.site]
        h = n * information
        kappa[table.site] = h / (h + a)
        mean_kappa[table.site] = jnp.sum(n * kappa[table.site]) / jnp.maximum(jnp.sum(n), 1.0)
    q = sum((k / (1.0 - k) for k in mean_kappa.values()), jnp.zeros(()))
    examples = jnp.max(jnp.stack([jnp.sum(counts[t.site]) for t in tables]))
    if new_rows is not None:  # the floor from the new groups only (docstring)
        floor_q, examples = jnp.zeros(()), jnp.zeros(())
        for table in tables:
            n = counts[table.site] * new_rows[table.site]
            k = jnp.sum(n * kappa[table.site]) / jnp.maximum(jnp.sum(n), 1.0)
            floor_q = floor_q + k / (1.0 - k)
            examples = jnp.maximum(examples, jnp.sum(n))
    else:
        floor_q = q
    # the intercept's deviation is rescaled to its variance under these ties; every other
    # table tied to it keeps its draws
    b = recenter.intercept
    variance = 1.0 / (examples * information / (1.0 + floor_q) + recenter.prior_scale**-2)
    x = jnp.maximum(jnp.sqrt(variance) / guide.marginal(b, params[b])[1].reshape(()), 1.0)

    def closed_form_ties(table: str, tie: jax.Array) -> jax.Array:
        if table not in kappa:
            return tie
        c = 1.0 / ((1.0 + q) * (1.0 - mean_kappa[table]))
        per_row = (-c * kappa[table]).reshape((-1,) + (1,) * (tie.ndim - 1))
        ties = jnp.broadcast_to(per_row, tie.shape)
        if new_rows is None:
            return ties
        # a known row this data never observes keeps the tie its day-1 posterior gave it
        observed = (counts[table] > 0).reshape(per_row.shape)
        return jnp.where(observed, ties, tie)

    return _rescale_intercept(params, b, guide, x, closed_form_ties)


def make_recenter(
    recenter: RecenterPlan,
    guide: guides.MeanFieldGuide,
    shardings: TrainState,
    row_counts: Mapping[str, np.ndarray],
    information: float | None = None,
    new_rows: Mapping[str, np.ndarray] | None = None,
) -> Callable[[TrainState], TrainState]:
    """``recenter(state) -> state``, jitted with the state's shardings and donated.
    ``row_counts[site]``: each row's count in the training data. ``information``: the link's
    Fisher information per observation at the start; given, the rows' ties to the intercept
    are set by :func:`couple` before the shift. ``new_rows[site]`` (under a previous posterior
    as prior, :mod:`train.prior_from`): the rows new since; :func:`couple` counts only them
    for the intercept's floor, and the shift, whose closed form assumes the model's own row
    prior, does not run."""
    counts_sh = {t.site: row_sharding(shardings, t.site) for t in recenter.tables}
    counts = {
        t.site: jax.device_put(np.asarray(row_counts[t.site], np.float32), counts_sh[t.site])
        for t in recenter.tables
    }

    fresh = None
    if new_rows is not None:
        fresh = {
            t.site: jax.device_put(np.asarray(new_rows[t.site], np.float32), counts_sh[t.site])
            for t in recenter.tables
        }

    def apply(
        state: TrainState,
        counts: Mapping[str, jax.Array],
        fresh: Mapping[str, jax.Array] | None,
    ) -> TrainState:
        params = state.params
        if information is not None:
            params = couple(params, counts, recenter, guide, information, fresh)
        if fresh is not None:  # the shift's closed form assumes the model's own row prior
            return state._replace(params=params)
        seen = {s: (n > 0).astype(jnp.float32) for s, n in counts.items()}
        # set ties make the variance move redundant, and its uniform tie on a table's seen
        # rows undoes their shrinkage-weighted shape
        spread = information is None
        return state._replace(params=shift(params, seen, recenter, guide, spread))

    jitted = jax.jit(
        apply,
        in_shardings=(shardings, counts_sh, None if fresh is None else counts_sh),
        out_shardings=shardings,
        donate_argnums=0,
    )
    return lambda state: jitted(state, counts, fresh)
