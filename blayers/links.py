r"""Likelihoods ("links") that turn a linear predictor into an observation site.

A layer stack plus a link is a complete model::

    def model(x, user, y=None):
        mu = InterceptLayer()("bias") + AdaptiveLayer()("x", x) + \
             RandomEffectsLayer()("user", user, 1000)
        return gaussian_link(mu, y)

Every link samples its observation ``"obs"`` inside the data plate named ``"data"``. For a
minibatch of ``B`` rows out of ``N``, pass ``num_data=N``: the link opens
``numpyro.plate("data", N, subsample_size=B)`` so the log-likelihood is scaled by ``N / B``,
while its global sites (``sigma``, cutpoints, …) stay outside the plate. A caller may instead
open the ``"data"`` plate itself around links that have no global sites (``logit_link``,
``poisson_link``, ``categorical_link``); a link with global sites called inside a data plate
is an error, because those sites would be scaled and replicated per row. Predictors of shape
``(n, 1)`` are read as ``(n,)``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dists
from numpyro.primitives import _PYRO_STACK

from blayers import start

__all__ = [
    "LINKS",
    "LinkSpec",
    "beta_link",
    "categorical_link",
    "check_target",
    "exponential_link",
    "gamma_link",
    "gaussian_link",
    "get_link",
    "link_spec",
    "link_start",
    "logit_link",
    "lognormal_link",
    "negative_binomial_link",
    "ordinal_link",
    "poisson_link",
    "register_link",
    "student_t_link",
    "zinb_link",
    "zip_link",
]

DATA_PLATE = "data"


def _in_data_plate() -> bool:
    return any(
        isinstance(frame, numpyro.plate) and frame.name == DATA_PLATE for frame in _PYRO_STACK
    )


def _data_plate(n: int, num_data: int | None) -> contextlib.AbstractContextManager[Any]:
    """The caller's ``"data"`` plate if one is active, else ``plate("data", N, subsample_size=n)``
    (``N = num_data``, or ``n`` for full-data batches)."""
    if _in_data_plate():
        if num_data is not None:
            raise ValueError(
                "link: num_data was given but a numpyro.plate('data') is already active; "
                "use one or the other"
            )
        return contextlib.nullcontext()
    if num_data is None or num_data == n:
        return numpyro.plate(DATA_PLATE, n)
    if num_data < n:
        raise ValueError(f"link: num_data={num_data} is smaller than the batch ({n} rows)")
    return numpyro.plate(DATA_PLATE, int(num_data), subsample_size=n)


def _global(name: str, fn: dists.Distribution) -> jax.Array:
    """Sample a global (per-model, not per-row) site of a link, refusing to do so per row."""
    if _in_data_plate():
        raise ValueError(
            f"link: global site {name!r} would be sampled inside numpyro.plate('data'); call the "
            "link outside the data plate and pass num_data=N for minibatches"
        )
    return numpyro.sample(name, fn)


def _flat(y_hat: jax.Array) -> jax.Array:
    y_hat = jnp.asarray(y_hat)
    if y_hat.ndim == 2 and y_hat.shape[1] == 1:
        return y_hat[:, 0]
    if y_hat.ndim != 1:
        raise ValueError(f"link: expected a predictor of shape (n,) or (n, 1), got {y_hat.shape}")
    return y_hat


def _observe(
    fn: dists.Distribution, y: jax.Array | None, n: int, num_data: int | None
) -> jax.Array:
    if y is not None:
        y = jnp.asarray(y)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.shape != (n,):
            raise ValueError(f"link: target y has shape {y.shape}, predictor has {n} rows")
    with _data_plate(n, num_data):
        return numpyro.sample("obs", fn, obs=y)


def _sigma(
    sigma_dist: type[dists.Distribution],
    sigma_kwargs: dict[str, Any] | None,
    scale: float | jax.Array | None,
    untransformed_scale: jax.Array | None,
) -> jax.Array | float:
    if scale is not None and untransformed_scale is not None:
        raise ValueError("link: pass at most one of scale= and untransformed_scale=")
    if untransformed_scale is not None:
        return jax.nn.softplus(_flat(untransformed_scale))
    if scale is not None:
        return scale
    kwargs = {"rate": 1.0} if sigma_kwargs is None else sigma_kwargs
    return _global("sigma", sigma_dist(**kwargs))


def _loc_scale(
    family: Callable[[jax.Array, Any], dists.Distribution],
    y_hat: jax.Array,
    y: jax.Array | None,
    sigma_dist: type[dists.Distribution],
    sigma_kwargs: dict[str, Any] | None,
    scale: float | jax.Array | None,
    untransformed_scale: jax.Array | None,
    num_data: int | None,
) -> jax.Array:
    """The location-scale links' one body: ``family(loc, sigma)`` observed at ``y``."""
    mu = _flat(y_hat)
    sigma = _sigma(sigma_dist, sigma_kwargs, scale, untransformed_scale)
    return _observe(family(mu, sigma), y, mu.shape[0], num_data)


def gaussian_link(
    y_hat: jax.Array,
    y: jax.Array | None = None,
    sigma_dist: type[dists.Distribution] = dists.Exponential,
    sigma_kwargs: dict[str, Any] | None = None,
    scale: float | jax.Array | None = None,
    untransformed_scale: jax.Array | None = None,
    *,
    num_data: int | None = None,
) -> jax.Array:
    r"""Gaussian likelihood :math:`y \sim Normal(\hat y, \sigma)`.

    :math:`\sigma \sim` ``sigma_dist(**sigma_kwargs)`` (default ``Exponential(1)``, site
    ``"sigma"``), or a known ``scale``, or ``softplus(untransformed_scale)`` per row.
    """
    return _loc_scale(
        dists.Normal, y_hat, y, sigma_dist, sigma_kwargs, scale, untransformed_scale, num_data
    )


def lognormal_link(
    y_hat: jax.Array,
    y: jax.Array | None = None,
    sigma_dist: type[dists.Distribution] = dists.Exponential,
    sigma_kwargs: dict[str, Any] | None = None,
    scale: float | jax.Array | None = None,
    untransformed_scale: jax.Array | None = None,
    *,
    num_data: int | None = None,
) -> jax.Array:
    r"""Log-normal likelihood :math:`\log y \sim Normal(\hat y, \sigma)`, for positive ``y``."""
    return _loc_scale(
        dists.LogNormal, y_hat, y, sigma_dist, sigma_kwargs, scale, untransformed_scale, num_data
    )


def student_t_link(
    y_hat: jax.Array,
    y: jax.Array | None = None,
    df: float = 4.0,
    sigma_dist: type[dists.Distribution] = dists.Exponential,
    sigma_kwargs: dict[str, Any] | None = None,
    scale: float | jax.Array | None = None,
    untransformed_scale: jax.Array | None = None,
    *,
    num_data: int | None = None,
) -> jax.Array:
    r"""Robust regression :math:`y \sim StudentT(\nu, \hat y, \sigma)`, default :math:`\nu=4`."""
    student_t = functools.partial(dists.StudentT, df)
    return _loc_scale(
        student_t, y_hat, y, sigma_dist, sigma_kwargs, scale, untransformed_scale, num_data
    )


def logit_link(
    y_hat: jax.Array, y: jax.Array | None = None, *, num_data: int | None = None
) -> jax.Array:
    r"""Bernoulli likelihood with logit link: :math:`y \sim Bernoulli(\sigma(\hat y))`."""
    logits = _flat(y_hat)
    return _observe(dists.Bernoulli(logits=logits), y, logits.shape[0], num_data)


bernoulli_link = logit_link


def categorical_link(
    logits: jax.Array, y: jax.Array | None = None, *, num_data: int | None = None
) -> jax.Array:
    r"""Multiclass softmax likelihood; ``logits`` is ``(n, K)`` (e.g. a layer with ``units=K``)."""
    logits = jnp.asarray(logits)
    if logits.ndim != 2:
        raise ValueError(f"categorical_link: logits must be (n, K), got {logits.shape}")
    return _observe(dists.Categorical(logits=logits), y, logits.shape[0], num_data)


def poisson_link(
    y_hat: jax.Array, y: jax.Array | None = None, *, num_data: int | None = None
) -> jax.Array:
    r"""Poisson counts with log link: :math:`y \sim Poisson(e^{\hat y})`."""
    log_rate = _flat(y_hat)
    return _observe(dists.Poisson(jnp.exp(log_rate)), y, log_rate.shape[0], num_data)


def negative_binomial_link(
    y_hat: jax.Array,
    y: jax.Array | None = None,
    rate: float = 1.0,
    *,
    num_data: int | None = None,
) -> jax.Array:
    r"""Overdispersed counts with log link.

    .. math:: \phi \sim Exponential(\text{rate}), \quad
        y \sim NegBinomial2(\text{mean}=e^{\hat y}, \text{concentration}=\phi)

    Site ``"concentration"`` holds :math:`\phi`; variance is :math:`\mu + \mu^2/\phi`.
    """
    log_mean = _flat(y_hat)
    phi = _global("concentration", dists.Exponential(rate))
    return _observe(dists.NegativeBinomial2(jnp.exp(log_mean), phi), y, log_mean.shape[0], num_data)


def gamma_link(
    y_hat: jax.Array,
    y: jax.Array | None = None,
    rate: float = 1.0,
    *,
    num_data: int | None = None,
) -> jax.Array:
    r"""Gamma likelihood with log link, for positive continuous targets.

    .. math:: \mu = e^{\hat y}, \quad k \sim Exponential(\text{rate}), \quad
        y \sim Gamma(k, k/\mu)

    (shape :math:`k`, rate :math:`k/\mu`), so :math:`E[y] = \mu` and :math:`\mathrm{Var}\,y =
    \mu^2/k`. Site ``"gamma_shape"`` holds :math:`k`.
    """
    log_mean = _flat(y_hat)
    k = _global("gamma_shape", dists.Exponential(rate))
    fn = dists.Gamma(k, k * jnp.exp(-log_mean))
    return _observe(fn, y, log_mean.shape[0], num_data)


def exponential_link(
    y_hat: jax.Array, y: jax.Array | None = None, *, num_data: int | None = None
) -> jax.Array:
    r"""Exponential likelihood with log link, for positive continuous or waiting-time targets:
    :math:`y \sim Exponential(e^{-\hat y})`, so :math:`E[y] = e^{\hat y}` and
    :math:`\mathrm{Var}\,y = E[y]^2` (the gamma link with its shape fixed at 1)."""
    log_mean = _flat(y_hat)
    return _observe(dists.Exponential(jnp.exp(-log_mean)), y, log_mean.shape[0], num_data)


def zinb_link(
    mu: jax.Array,
    y: jax.Array | None = None,
    rate: float = 1.0,
    *,
    num_data: int | None = None,
) -> jax.Array:
    r"""Zero-inflated negative binomial, for overdispersed counts with excess zeros.

    .. math:: \pi \sim Beta(1, 10), \quad \phi \sim Exponential(\text{rate}), \quad
        y \sim \pi\,\delta_0 + (1 - \pi)\, NegBinomial2(e^{\mu}, \phi)

    so :math:`P(y = 0) = \pi + (1-\pi)(\phi/(\phi + e^\mu))^\phi` and :math:`E[y] =
    (1-\pi) e^\mu`. Sites ``"zinb_gate"`` (:math:`\pi`) and ``"zinb_concentration"``
    (:math:`\phi`).
    """
    log_mean = _flat(mu)
    concentration = _global("zinb_concentration", dists.Exponential(rate))
    gate = _global("zinb_gate", dists.Beta(1.0, 10.0))
    base = dists.NegativeBinomial2(jnp.exp(log_mean), concentration)
    fn = dists.ZeroInflatedDistribution(base, gate=gate)
    return _observe(fn, y, log_mean.shape[0], num_data)


def ordinal_link(
    mu: jax.Array, y: jax.Array | None = None, *, num_classes: int, num_data: int | None = None
) -> jax.Array:
    r"""Cumulative-logit (proportional odds) likelihood for ``y`` in ``{0, …, K-1}``.

    .. math:: P(y \le k) = \sigma(c_k - \mu), \quad c_0 \sim Normal(0, 2),
        \quad c_{k} = c_0 + \textstyle\sum_{j \le k} g_j,\; g_j \sim Exponential(1)

    Sites ``"ordinal_c0"`` and (for ``K > 2``) ``"ordinal_gaps"``.
    """
    if num_classes < 2:
        raise ValueError(f"ordinal_link: num_classes must be >= 2, got {num_classes}")
    mu = _flat(mu)
    c0 = jnp.asarray(_global("ordinal_c0", dists.Normal(0.0, 2.0)))
    cutpoints = c0[None]
    if num_classes > 2:
        gaps = _global("ordinal_gaps", dists.Exponential(1.0).expand([num_classes - 2]).to_event(1))
        cutpoints = jnp.concatenate([c0[None], c0 + jnp.cumsum(gaps)])
    y = None if y is None else jnp.asarray(y).astype(jnp.int32)  # class indices, any dtype
    return _observe(dists.OrderedLogistic(mu, cutpoints), y, mu.shape[0], num_data)


def zip_link(
    mu: jax.Array, y: jax.Array | None = None, *, num_data: int | None = None
) -> jax.Array:
    r"""Zero-inflated Poisson: with probability :math:`\pi` a structural zero, else
    :math:`Poisson(e^{\mu})`. :math:`\pi \sim Beta(1, 10)` (site ``"zip_gate"``)."""
    log_rate = _flat(mu)
    gate = _global("zip_gate", dists.Beta(1.0, 10.0))
    fn = dists.ZeroInflatedPoisson(gate=gate, rate=jnp.exp(log_rate))
    return _observe(fn, y, log_rate.shape[0], num_data)


def beta_link(
    mu: jax.Array, y: jax.Array | None = None, *, num_data: int | None = None
) -> jax.Array:
    r"""Beta regression for proportions in ``(0, 1)``.

    .. math:: \bar\mu = \sigma(\mu), \quad \phi \sim Exponential(1), \quad
        y \sim Beta(\bar\mu\phi, (1-\bar\mu)\phi)

    Site ``"beta_phi"`` holds the precision :math:`\phi`.
    """
    mean = jax.nn.sigmoid(_flat(mu))
    phi = _global("beta_phi", dists.Exponential(1.0))
    return _observe(dists.Beta(mean * phi, (1.0 - mean) * phi), y, mean.shape[0], num_data)


Link = Callable[..., jax.Array]
StartFn = Callable[[start.TargetStats, Mapping[str, Any]], start.LinkStart]


def _integers(y: np.ndarray) -> bool:
    return bool(np.all(np.equal(np.floor(y), y)))


def _any(y: np.ndarray) -> bool:
    return True


def _positive(y: np.ndarray) -> bool:
    return bool(np.all(y > 0))


def _binary(y: np.ndarray) -> bool:
    return bool(np.all((y == 0) | (y == 1)))


def _counts(y: np.ndarray) -> bool:
    return _integers(y) and bool(np.all(y >= 0))


def _proportions(y: np.ndarray) -> bool:
    return bool(np.all((y > 0) & (y < 1)))


@dataclass(frozen=True)
class LinkSpec:
    """Everything the library and the service know about one link, in one record: the
    likelihood itself, the target values it accepts (checked before any work is done), and
    where a data-aware start puts its linear predictor and globals (``None``: at 0, the
    guide's defaults). The response mean that scoring reports is the observation
    distribution's own ``mean`` (the expected class for ordinal and categorical), so it
    needs no entry here."""

    fn: Link
    supports: Callable[[np.ndarray], bool]
    support: str  # the accepted values, in words
    start: StartFn | None = None


LINKS: dict[str, LinkSpec] = {}


def register_link(name: str, spec: LinkSpec) -> None:
    """Add a link under ``name`` (or replace it): the service's ``model.link: <name>`` then
    trains, scores and checks targets with it."""
    if not isinstance(spec, LinkSpec):
        raise TypeError(f"register_link({name!r}, ...): expected a LinkSpec, got {type(spec)}")
    LINKS[name] = spec


for _name, _spec in {
    "gaussian": LinkSpec(gaussian_link, _any, "any real number", start.gaussian_start),
    "lognormal": LinkSpec(lognormal_link, _positive, "positive reals", start.lognormal_start),
    "student_t": LinkSpec(student_t_link, _any, "any real number", start.student_t_start),
    "logit": LinkSpec(logit_link, _binary, "0 or 1", start.logit_start),
    "categorical": LinkSpec(categorical_link, _counts, "integers 0..K-1", start.categorical_start),
    "poisson": LinkSpec(poisson_link, _counts, "non-negative integers", start.poisson_start),
    "negative_binomial": LinkSpec(
        negative_binomial_link, _counts, "non-negative integers", start.negative_binomial_start
    ),
    "gamma": LinkSpec(gamma_link, _positive, "positive reals", start.gamma_start),
    "exponential": LinkSpec(exponential_link, _positive, "positive reals", start.exponential_start),
    "zinb": LinkSpec(zinb_link, _counts, "non-negative integers", start.zinb_start),
    "ordinal": LinkSpec(ordinal_link, _counts, "integers 0..K-1", start.ordinal_start),
    "zip": LinkSpec(zip_link, _counts, "non-negative integers", start.zip_start),
    "beta": LinkSpec(beta_link, _proportions, "proportions strictly in (0, 1)", start.beta_start),
}.items():
    register_link(_name, _spec)
register_link("bernoulli", LINKS["logit"])
register_link("zero_inflated_poisson", LINKS["zip"])


def link_spec(name: str) -> LinkSpec:
    """The record of the link registered as ``name``."""
    try:
        return LINKS[name]
    except KeyError:
        raise ValueError(f"unknown link {name!r}; choose one of {sorted(LINKS)}") from None


def get_link(name: str) -> Link:
    """Look up a link by its registry name (``"gaussian"``, ``"logit"``, …)."""
    return link_spec(name).fn


def link_start(
    name: str, stats: start.TargetStats, link_kwargs: Mapping[str, Any] | None = None
) -> start.LinkStart:
    """Starting linear predictor and link globals for link ``name`` on a target with
    ``stats`` (:mod:`blayers.start`)."""
    spec = link_spec(name)
    if stats.count == 0 or spec.start is None:
        return start.LinkStart((0.0,), {}, None)
    return spec.start(stats, dict(link_kwargs or {}))


def check_target(link: str, y: Any, column: str = "target") -> None:
    """Raise ``ValueError`` naming ``column`` if ``y`` has NaN/inf or lies outside the support
    of ``link`` (e.g. a 3 for a Bernoulli target)."""
    spec = link_spec(link)
    values = np.asarray(y, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        bad = int(np.sum(~np.isfinite(values)))
        raise ValueError(f"column {column!r}: {bad} NaN/inf target values; drop or impute them")
    if values.size and not spec.supports(values):
        raise ValueError(
            f"column {column!r}: values outside the support of the {link!r} link "
            f"({spec.support}); observed range [{values.min():g}, {values.max():g}]. Fix the "
            "data or pick another link"
        )
