"""The jitted SVI update: one compile, shardings from the plan, state donated."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec

from blayers import guides, posterior_prior
from blayers.posterior_prior import PosteriorPrior

from .nonfinite import apply_if_finite
from .state import TrainState


def loss_fn(
    model: Callable[..., Any],
    guide: guides.MeanFieldGuide,
    num_data: int,
    widen: float | None = None,
) -> Callable[..., jax.Array]:
    """Negative ELBO of one minibatch; the model's data plate scales it to ``num_data`` rows.
    Called with a ``prior`` (:meth:`train.prior_from.RunPrior.arrays`), day 1's posterior
    is the prior, its sds times ``widen`` (:mod:`blayers.posterior_prior`)."""

    def loss(
        params: guides.Params,
        key: jax.Array,
        batch: Mapping[str, jax.Array],
        prior: Mapping[str, Any] | None = None,
    ) -> jax.Array:
        if prior is None:
            return guides.elbo_loss(key, params, guide, model, batch, num_data=num_data)
        as_prior = PosteriorPrior(guide, prior["params"], prior["known"], float(widen or 1.0))
        return posterior_prior.elbo_loss(
            key, params, guide, model, as_prior, batch, num_data=num_data
        )

    return loss


def make_step(
    model: Callable[..., Any],
    guide: guides.MeanFieldGuide,
    optimizer: optax.GradientTransformation,
    num_data: int,
    state_shardings: TrainState,
    batch_shardings: Mapping[str, NamedSharding],
    skip_non_finite: bool = False,
    prior_shardings: Any = None,
    widen: float | None = None,
) -> Callable[..., tuple[TrainState, jax.Array]]:
    """``step(state, batch) -> (state, loss)``. The step key is ``fold_in(rng, step)``, so a
    resumed run draws exactly what an uninterrupted one would. ``skip_non_finite``: a step
    whose loss or gradient is not finite leaves the parameters and optimizer state as they
    were and reports a NaN loss (``train.nonfinite``). With ``prior_shardings`` (those of
    :meth:`train.prior_from.RunPrior.arrays`) the step is ``step(state, batch, prior)``."""
    loss = loss_fn(model, guide, num_data, widen)
    replicated = NamedSharding(state_shardings.step.mesh, PartitionSpec())

    def step(
        state: TrainState, batch: Mapping[str, jax.Array], prior: Any = None
    ) -> tuple[TrainState, jax.Array]:
        key = jax.random.fold_in(state.rng, state.step)
        value, grads = jax.value_and_grad(loss)(state.params, key, batch, prior)

        def update() -> tuple[guides.Params, Any]:
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            return optax.apply_updates(state.params, updates), opt_state

        if skip_non_finite:
            (params, opt_state), value, _ = apply_if_finite(
                value, grads, update, lambda: (state.params, state.opt_state)
            )
        else:
            params, opt_state = update()
        return TrainState(state.step + 1, params, opt_state, state.rng), value

    in_shardings: tuple[Any, ...] = (state_shardings, dict(batch_shardings))
    if prior_shardings is not None:
        in_shardings = (*in_shardings, prior_shardings)
    return jax.jit(
        step,
        in_shardings=in_shardings,
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )
