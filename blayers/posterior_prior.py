r"""A previous fit's posterior as this fit's prior: day 2 continues from day 1 without day 1's data.

Let :math:`q_1(u)` be the guide fitted on data :math:`y_1`, a density over the unconstrained
point :math:`u` with :math:`z = T(u)`. As a prior on :math:`z` it is the push-forward

.. math:: p_1(z) = q_1(u) \, |\det J_T(u)|^{-1},

so in the ELBO of new data :math:`y_2`, :math:`E_q[\log p(y_2 \mid z) + \log p_1(z) - \log
q(z)]`, each site's prior term :math:`\log p(z)` becomes :math:`\log q_1(u) - \log|\det
J_T(u)|` (the guide's own :math:`\log q(z)` carries the same Jacobian, so it cancels). Where
:math:`q_1` is the exact posterior :math:`p(z \mid y_1)`,

.. math:: -\text{ELBO}_2(q) = -\text{ELBO}_{1+2}(q) + \log p(y_1)

for every :math:`q`: the same objective as fitting both days together, up to a constant.

:math:`q_1` keeps its structure (:meth:`~blayers.guides.MeanFieldGuide.globals_log_density`,
:meth:`~blayers.guides.MeanFieldGuide.rows_log_density`): the globals' joint Normal, and each
table row given the globals. A table row that day 1 never had (a category new on day 2; its
``known`` flag false) keeps the model's prior. Every sd of :math:`q_1` is multiplied by
``widen`` :math:`\ge 1`, a forgetting factor: the older posterior counts for less where the
data drift.

Row by row the prior term is additive, so the row-sparse loss weights it as it weights the
model's (``row_weights``) and stays unbiased.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
from numpyro import handlers

from blayers import guides


@dataclass(frozen=True)
class PosteriorPrior:
    """The previous fit's guide ``guide`` with parameters ``params`` as a prior. ``known``:
    per table site, which of its rows day 1 had (a table left out: all of them); ``widen``:
    the forgetting factor on every sd."""

    guide: guides.MeanFieldGuide
    params: guides.Params
    known: Mapping[str, jax.Array] = field(default_factory=dict)
    widen: float = 1.0

    def __post_init__(self) -> None:
        if not self.widen >= 1.0:
            raise ValueError(f"widen={self.widen}: a forgetting factor is at least 1")

    def _globals_point(self, draws: Mapping[str, guides.SiteDraw]) -> dict[str, jax.Array]:
        """The draw's unconstrained point of each global site."""
        sites = self.guide.sites
        return {n: d.unconstrained for n, d in draws.items() if guides.is_global(sites[n])}

    def globals_term(self, draws: Mapping[str, guides.SiteDraw]) -> jax.Array:
        r""":math:`\log q_1(g) - \sum \log|\det J_T|` over the global sites at the draw."""
        params = jax.lax.stop_gradient(self.params)
        u = self._globals_point(draws)
        log_det = sum((jnp.sum(draws[n].log_det) for n in u), jnp.zeros(()))
        return self.guide.globals_log_density(params, u, self.widen) - log_det

    def rows_term(
        self,
        name: str,
        draws: Mapping[str, guides.SiteDraw],
        rows: Mapping[str, jax.Array] | None = None,
    ) -> jax.Array:
        r""":math:`\log q_1(u_r \mid g) - \log|\det J_T(u_r)|` per row of table ``name`` at the
        draw, ``(rows,)``. ``rows``: day 1's parameters of the drawn rows (gathered rows);
        default, the whole table's."""
        params = jax.lax.stop_gradient(self.params)
        rows = params[name] if rows is None else jax.lax.stop_gradient(rows)
        draw = draws[name]
        u = self._globals_point(draws)
        log_q = self.guide.rows_log_density(name, rows, draw.unconstrained, u, params, self.widen)
        log_det = jnp.broadcast_to(draw.log_det, draw.log_normal.shape)
        return log_q - log_det.reshape(log_det.shape[0], -1).sum(1)


def _per_row_log_prob(site: Mapping[str, Any]) -> jax.Array:
    """A table site's model log prior, summed within each row, ``(rows,)``."""
    fn, value = site["fn"], site["value"]
    base = fn.base_dist if hasattr(fn, "base_dist") else fn
    lp = jnp.broadcast_to(base.log_prob(value), value.shape)
    return lp.reshape(value.shape[0], -1).sum(1)


def log_joint(
    trace: Mapping[str, Any],
    draws: Mapping[str, guides.SiteDraw],
    prior: PosteriorPrior,
    row_weights: Mapping[str, jax.Array] | None = None,
    prior_rows: Mapping[str, Mapping[str, jax.Array]] | None = None,
    known: Mapping[str, jax.Array] | None = None,
) -> jax.Array:
    """:math:`\\log p(y \\mid z) + \\log p_1(z)` of a model trace at the guide's ``draws``: the
    observed sites as the model has them, each latent site's prior replaced by the previous
    posterior's (see the module). ``row_weights``, ``prior_rows``, ``known``: for gathered
    table rows, each row's weight (the row-sparse loss), day 1's parameters and flags of those
    rows; default the whole tables, weight 1, ``prior.known``."""
    weights = row_weights or {}
    known = prior.known if known is None else known
    total = prior.globals_term(draws)
    for name, site in trace.items():
        if site["type"] != "sample":
            continue
        if site["is_observed"] or name not in prior.guide.sites:
            lp = jnp.sum(site["fn"].log_prob(site["value"]))
            scale = site.get("scale")
            total = total + (lp if scale is None else lp * scale)
            continue
        if guides.is_global(prior.guide.sites[name]):
            continue  # in the globals' term
        rows = None if prior_rows is None else prior_rows.get(name)
        per_row = prior.rows_term(name, draws, rows)
        if name in known:
            per_row = jnp.where(known[name], per_row, _per_row_log_prob(site))
        total = total + (per_row @ weights[name] if name in weights else jnp.sum(per_row))
    return total


def elbo_loss(
    key: jax.Array,
    params: guides.Params,
    guide: guides.MeanFieldGuide,
    model: Callable[..., Any],
    prior: PosteriorPrior,
    *args: Any,
    antithetic: bool = False,
    **kwargs: Any,
) -> jax.Array:
    """Negative ELBO estimate under the previous posterior as prior: as
    :func:`blayers.guides.elbo_loss` (same keys, same draws), with :func:`log_joint`."""
    draw_key, model_key = jax.random.split(key)

    def one(noise: Mapping[str, jax.Array]) -> jax.Array:
        draws = guide.draw(draw_key, params, noise)
        log_q = sum((d.total() for d in draws.values()), jnp.zeros(()))
        values = {n: d.value for n, d in draws.items()}
        seeded = handlers.seed(handlers.substitute(model, values), model_key)
        trace = handlers.trace(seeded).get_trace(*args, **kwargs)
        return log_q - log_joint(trace, draws, prior)

    return guides.antithetic_mean(one, guide.noise(draw_key, params), antithetic)
