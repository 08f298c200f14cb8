"""Run a layer with chosen parameter values, to compare against brute-force math; and fit a
model with NUTS or NumPyro's own SVI, to check recovery of known truth."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from numpyro import handlers
from numpyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal


def trace_sites(fn: Callable[..., Any], *args: Any, seed: int = 0, **kwargs: Any) -> dict:
    """The NumPyro trace of ``fn`` under a fixed seed."""
    return handlers.trace(handlers.seed(fn, seed)).get_trace(*args, **kwargs)


def random_params(fn: Callable[..., Any], *args: Any, seed: int = 1) -> dict[str, np.ndarray]:
    """Draw each latent site of ``fn`` from its prior (as numpy), via a seeded trace."""
    trace = trace_sites(fn, *args, seed=seed)
    return {
        k: np.asarray(v["value"])
        for k, v in trace.items()
        if v["type"] == "sample" and not v["is_observed"]
    }


def run_with(fn: Callable[..., Any], params: dict[str, Any], *args: Any) -> jax.Array:
    """Output of ``fn(*args)`` with latent sites fixed to ``params``."""
    return handlers.substitute(handlers.seed(fn, 0), data=params)(*args)


def svi_draws(model: Callable[..., Any], args: tuple, steps: int = 3000, lr: float = 0.03) -> dict:
    """Posterior draws of ``model(*args)`` from NumPyro's ``AutoNormal`` after ``steps`` of
    Adam on a cosine schedule."""
    guide = AutoNormal(model)
    optim = optax.adam(optax.cosine_decay_schedule(lr, steps, 0.05))
    result = SVI(model, guide, optim, Trace_ELBO()).run(
        jax.random.PRNGKey(0), steps, *args, progress_bar=False
    )
    return guide.sample_posterior(jax.random.PRNGKey(1), result.params, sample_shape=(2000,))


def nuts_draws(
    model: Callable[..., Any], args: tuple, warmup: int = 400, samples: int = 500
) -> dict:
    """``samples`` NUTS draws of ``model(*args)`` after ``warmup``."""
    mcmc = MCMC(NUTS(model), num_warmup=warmup, num_samples=samples, progress_bar=False)
    with warnings.catch_warnings():
        # warmup's long trajectories reach unconstrained values where float32's sigmoid is
        # exactly 1, i.e. a bounded site on the edge of its open support; those are rejected
        warnings.filterwarnings("ignore", "Out-of-support values", UserWarning)
        mcmc.run(jax.random.PRNGKey(0), *args)
    return mcmc.get_samples()
