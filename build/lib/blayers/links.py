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
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dists
from numpyro.primitives import _PYRO_STACK

__all__ = [
    "LINKS",
    "beta_link",
    "categorical_link",
    "check_target",
    "gaussian_link",
    "get_link",
    "logit_link",
    "lognormal_link",
    "negative_binomial_link",
    "ordinal_link",
    "poisson_link",
    "student_t_link",
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
    mu = _flat(y_hat)
    sigma = _sigma(sigma_dist, sigma_kwargs, scale, untransformed_scale)
    return _observe(dists.Normal(mu, sigma), y, mu.shape[0], num_data)


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
    mu = _flat(y_hat)
    sigma = _sigma(sigma_dist, sigma_kwargs, scale, untransformed_scale)
    return _observe(dists.LogNormal(mu, sigma), y, mu.shape[0], num_data)


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
    mu = _flat(y_hat)
    sigma = _sigma(sigma_dist, sigma_kwargs, scale, untransformed_scale)
    return _observe(dists.StudentT(df, mu, sigma), y, mu.shape[0], num_data)


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

LINKS: dict[str, Link] = {
    "gaussian": gaussian_link,
    "lognormal": lognormal_link,
    "student_t": student_t_link,
    "logit": logit_link,
    "bernoulli": logit_link,
    "categorical": categorical_link,
    "poisson": poisson_link,
    "negative_binomial": negative_binomial_link,
    "ordinal": ordinal_link,
    "zip": zip_link,
    "zero_inflated_poisson": zip_link,
    "beta": beta_link,
}


def get_link(name: str) -> Link:
    """Look up a link by its registry name (``"gaussian"``, ``"logit"``, …)."""
    try:
        return LINKS[name]
    except KeyError:
        raise ValueError(f"unknown link {name!r}; choose one of {sorted(LINKS)}") from None


def _integers(y: np.ndarray) -> bool:
    return bool(np.all(np.equal(np.floor(y), y)))


# name -> (predicate on finite values, description of the support)
_SUPPORT: dict[str, tuple[Callable[[np.ndarray], bool], str]] = {
    "gaussian": (lambda y: True, "any real number"),
    "student_t": (lambda y: True, "any real number"),
    "lognormal": (lambda y: bool(np.all(y > 0)), "positive reals"),
    "logit": (lambda y: bool(np.all((y == 0) | (y == 1))), "0 or 1"),
    "categorical": (lambda y: _integers(y) and bool(np.all(y >= 0)), "integers 0..K-1"),
    "poisson": (lambda y: _integers(y) and bool(np.all(y >= 0)), "non-negative integers"),
    "negative_binomial": (lambda y: _integers(y) and bool(np.all(y >= 0)), "non-negative integers"),
    "ordinal": (lambda y: _integers(y) and bool(np.all(y >= 0)), "integers 0..K-1"),
    "zip": (lambda y: _integers(y) and bool(np.all(y >= 0)), "non-negative integers"),
    "beta": (lambda y: bool(np.all((y > 0) & (y < 1))), "proportions strictly in (0, 1)"),
}
_SUPPORT["bernoulli"] = _SUPPORT["logit"]
_SUPPORT["zero_inflated_poisson"] = _SUPPORT["zip"]


def check_target(link: str, y: Any, column: str = "target") -> None:
    """Raise ``ValueError`` naming ``column`` if ``y`` has NaN/inf or lies outside the support
    of ``link`` (e.g. a 3 for a Bernoulli target)."""
    get_link(link)
    values = np.asarray(y, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        bad = int(np.sum(~np.isfinite(values)))
        raise ValueError(f"column {column!r}: {bad} NaN/inf target values; drop or impute them")
    ok, support = _SUPPORT[link]
    if values.size and not ok(values):
        raise ValueError(
            f"column {column!r}: values outside the support of the {link!r} link ({support}); "
            f"observed range [{values.min():g}, {values.max():g}]. Fix the data or pick another "
            "link"
        )
