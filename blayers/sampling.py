r"""Prior predictive draws: what a model says before it sees the data.

For a model :math:`p(\theta)\,p(y \mid \theta, x)` and inputs :math:`x`, each draw is
:math:`\theta^{(s)} \sim p(\theta)` and then :math:`y^{(s)} \sim p(y \mid \theta^{(s)}, x)`,
so the ``"obs"`` draws are the prior predictive distribution of the target at those inputs:
check them against the target's range before fitting (a prior that puts a click rate at 0.5
± 0.49, or a price at ±10⁶, shows here).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from numpyro.infer import Predictive

__all__ = ["sample_prior"]


def sample_prior(
    model: Callable[..., Any],
    *args: Any,
    num_samples: int = 100,
    seed: int = 0,
    **kwargs: Any,
) -> dict[str, jax.Array]:
    """``num_samples`` joint draws from the prior of every site of ``model(*args,
    **kwargs)``, the observation ``"obs"`` included, each with a leading axis of
    ``num_samples``. Leave the target out of ``args``/``kwargs`` (``y=None``): a passed target
    would be observed, not drawn.

    Raises:
        ValueError: ``num_samples < 1``.
    """
    if num_samples < 1:
        raise ValueError(f"sample_prior: num_samples must be >= 1, got {num_samples}")
    predictive = Predictive(model, num_samples=int(num_samples))
    return predictive(jax.random.PRNGKey(seed), *args, **kwargs)
