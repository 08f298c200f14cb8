r"""A per-site mean-field Normal guide whose parameters are a plain, shardable pytree.

For each latent site :math:`z` with support :math:`S` and bijection :math:`T: \mathbb{R}^k \to S`:

.. math::
    u \sim Normal(\text{loc}, \text{softplus}(\rho)), \quad z = T(u), \quad
    \log q(z) = \log Normal(u; \text{loc}, \text{softplus}(\rho)) - \log|\det J_T(u)|

The ELBO is :math:`E_q[\log p(y, z) - \log q(z)]`, estimated with one reparameterised draw —
the same estimator as NumPyro's ``AutoNormal`` with ``Trace_ELBO``. Parameters live in
``{site: {"loc": array, "raw_scale": array}}`` so that each table keeps its own (sharded)
parameters, state can be created already sharded (shapes come from ``jax.eval_shape``, no
prototype draw of the tables), and a row-sparse update can gather rows of any site.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from numpyro.distributions import biject_to, constraints
from numpyro.infer.util import log_density

from blayers import axes as ax

Params = dict[str, dict[str, jax.Array]]


@dataclass(frozen=True)
class LatentSite:
    """What the guide needs to know about one latent site."""

    name: str
    shape: tuple[int, ...]  # constrained value shape
    unconstrained_shape: tuple[int, ...]
    support: constraints.Constraint
    logical_axes: ax.LogicalAxes | None


def is_global(site: LatentSite) -> bool:
    """A site without a table axis: intercept, coefficients, scales, link globals."""
    return ax.CATEGORIES not in (site.logical_axes or ())


def latent_sites(model: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, LatentSite]:
    """Latent sites of ``model`` found by an abstract trace: no parameter value is ever built.

    ``args`` may be arrays or ``jax.ShapeDtypeStruct``s; ``kwargs`` are static (e.g. sizes).
    """
    found: dict[str, LatentSite] = {}

    def probe(*a: Any) -> int:
        trace = handlers.trace(handlers.seed(model, 0)).get_trace(*a, **kwargs)
        for name, site in trace.items():
            if site["type"] != "sample" or site["is_observed"]:
                continue
            support = site["fn"].support
            shape = tuple(jnp.shape(site["value"]))
            unconstrained = tuple(biject_to(support).inverse_shape(shape))
            found[name] = LatentSite(name, shape, unconstrained, support, ax.site_axes(site))
        return 0

    jax.eval_shape(probe, *args)
    return found


def init_params(
    sites: Mapping[str, LatentSite],
    init_scale: float = 0.1,
    dtype: Any = jnp.float32,
    start: Mapping[str, Any] | None = None,
) -> Params:
    """Guide parameters: ``loc = 0`` in unconstrained space (the prior median for the layers'
    zero-centred priors) unless ``start`` gives a site's constrained starting value, and
    ``scale = init_scale``. Cheap to trace under ``jit`` with ``out_shardings`` so large
    tables are born sharded."""
    raw = float(np.log(np.expm1(init_scale)))  # softplus^-1
    start = start or {}

    def loc(site: LatentSite) -> jax.Array:
        if site.name not in start:
            return jnp.zeros(site.unconstrained_shape, dtype)
        value = jnp.broadcast_to(jnp.asarray(start[site.name], dtype), site.shape)
        return biject_to(site.support).inv(value).astype(dtype)

    return {
        name: {
            "loc": loc(site),
            "raw_scale": jnp.full(site.unconstrained_shape, raw, dtype),
        }
        for name, site in sites.items()
    }


def param_logical_axes(sites: Mapping[str, LatentSite]) -> dict[str, dict[str, Any]]:
    """Logical axes per guide parameter (same as its site's when shapes agree)."""
    out = {}
    for name, site in sites.items():
        axes = site.logical_axes if site.unconstrained_shape == site.shape else None
        out[name] = {"loc": axes, "raw_scale": axes}
    return out


def scales(params: Params) -> dict[str, jax.Array]:
    return {k: jax.nn.softplus(v["raw_scale"]) for k, v in params.items()}


def sample_latents(
    key: jax.Array, params: Params, sites: Mapping[str, LatentSite]
) -> tuple[dict[str, jax.Array], jax.Array]:
    """One reparameterised draw of every latent (constrained) and its guide log-density."""
    keys = jax.random.split(key, max(len(params), 1))
    values: dict[str, jax.Array] = {}
    log_q = jnp.zeros(())
    for k, name in zip(keys, sorted(params), strict=False):
        loc = params[name]["loc"]
        scale = jax.nn.softplus(params[name]["raw_scale"])
        eps = jax.random.normal(k, loc.shape, loc.dtype)
        u = loc + scale * eps
        transform = biject_to(sites[name].support)
        values[name] = transform(u)
        log_q = log_q + jnp.sum(-0.5 * eps**2 - jnp.log(scale) - 0.5 * jnp.log(2 * jnp.pi))
        log_q = log_q - jnp.sum(transform.log_abs_det_jacobian(u, values[name]))
    return values, log_q


def median(params: Params, sites: Mapping[str, LatentSite]) -> dict[str, jax.Array]:
    """Posterior medians (the transformed ``loc``) per site."""
    return {k: biject_to(sites[k].support)(v["loc"]) for k, v in params.items()}


def elbo_loss(
    key: jax.Array,
    params: Params,
    sites: Mapping[str, LatentSite],
    model: Callable[..., Any],
    *args: Any,
    **kwargs: Any,
) -> jax.Array:
    """Negative single-draw ELBO estimate: :math:`\\log q(z) - \\log p(y, z)`."""
    draw_key, model_key = jax.random.split(key)
    values, log_q = sample_latents(draw_key, params, sites)
    log_p, _ = log_density(handlers.seed(model, model_key), args, kwargs, values)
    return log_q - log_p
