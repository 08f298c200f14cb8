"""Run a layer with chosen parameter values, to compare against brute-force math."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from numpyro import handlers


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
