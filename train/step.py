"""The jitted SVI update: one compile, shardings from the plan, state donated."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding

from blayers import guides, posterior_prior
from blayers.posterior_prior import PosteriorPrior

from . import (
    dispatch,
    prior_from,
)
from .dedup import host_rows, pad_rows
from .dispatch import Stacked, StepPrograms, jit_steps
from .nonfinite import optimizer_step
from .plan import row_sharding
from .setup import Setup
from .sparse import (
    COUNT,
    LOCAL,
    UNIQ,
    make_sparse_step,
    row_counts,
    table_rows,
)
from .state import (
    TrainState,
)


def loss_fn(
    model: Callable[..., Any],
    guide: guides.MeanFieldGuide,
    num_data: int,
    widen: float | None = None,
    antithetic: bool = False,
) -> Callable[..., jax.Array]:
    """Negative ELBO of one minibatch; the model's data plate scales it to ``num_data`` rows.
    ``antithetic``: at a pair of mirrored draws (:func:`blayers.guides.antithetic_mean`).
    Called with a ``prior`` (:meth:`train.prior_from.RunPrior.arrays`), day 1's posterior
    is the prior, its sds times ``widen`` (:mod:`blayers.posterior_prior`)."""

    def loss(
        params: guides.Params,
        key: jax.Array,
        batch: Mapping[str, jax.Array],
        prior: Mapping[str, Any] | None = None,
    ) -> jax.Array:
        if prior is None:
            return guides.elbo_loss(
                key, params, guide, model, batch, num_data=num_data, antithetic=antithetic
            )
        as_prior = PosteriorPrior(guide, prior["params"], prior["known"], float(widen or 1.0))
        return posterior_prior.elbo_loss(
            key, params, guide, model, as_prior, batch, num_data=num_data, antithetic=antithetic
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
    antithetic: bool = False,
) -> StepPrograms:
    """``step(state, batch) -> (state, loss)``, alone and scanned (:mod:`train.dispatch`).
    The step key is ``fold_in(rng, step)``, so a resumed run draws exactly what an
    uninterrupted one would. ``skip_non_finite``: a step
    whose loss or gradient is not finite leaves the parameters and optimizer state as they
    were and reports a NaN loss (``train.nonfinite``). With ``prior_shardings`` (those of
    :meth:`train.prior_from.RunPrior.arrays`) the step is ``step(state, batch, prior)``."""
    loss = loss_fn(model, guide, num_data, widen, antithetic)

    def step(
        state: TrainState, batch: Mapping[str, jax.Array], prior: Any = None
    ) -> tuple[TrainState, jax.Array]:
        key = jax.random.fold_in(state.rng, state.step)
        value, grads = jax.value_and_grad(loss)(state.params, key, batch, prior)

        (params, opt_state), value, _ = optimizer_step(
            optimizer, state.params, state.opt_state, grads, value, skip_non_finite
        )
        return TrainState(state.step + 1, params, opt_state, state.rng), value

    rest = () if prior_shardings is None else (prior_shardings,)
    return jit_steps(step, state_shardings, batch_shardings, rest)


@dataclass
class TrainStep:
    """A compiled step plus what feeds it: host-side batch preparation, how prepared batches
    stack into one dispatch of several steps (:mod:`train.dispatch`), and batch shardings.
    Called with a :class:`train.dispatch.Stacked` batch it takes all its steps and returns
    each one's loss."""

    step: Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, jax.Array]]
    prepare: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
    batch_shardings: dict[str, NamedSharding]
    stack: Callable[[Sequence[dict[str, np.ndarray]]], Stacked] = dispatch.stack

    def __call__(self, state: TrainState, batch: Mapping[str, jax.Array]) -> Any:
        return self.step(state, batch)


def make_train_step(
    setup: Setup,
    vocab_counts: Mapping[str, np.ndarray],
    skip_non_finite: bool = False,
    prior: prior_from.RunPrior | None = None,
) -> TrainStep:
    """The dense step, or the row-sparse one when any table term is sparse. With one process
    the sparse tables' rows are deduplicated on the host, in the data pipeline's threads; with
    several, each process holds only part of the batch, so the step deduplicates on device.
    ``skip_non_finite``: see :mod:`train.nonfinite`. ``prior``: day 1's posterior as the
    prior (:mod:`train.prior_from`), an argument of every step."""
    batch_sh = setup.plan.batch_shardings()
    prior_sh = widen = None
    extra: tuple[Any, ...] = ()
    if prior is not None:
        prior_sh = prior_from.shardings_of(prior, setup.shardings)
        widen, extra = prior.widen, (prior.arrays(),)
    if not setup.sparse:
        step = make_step(
            setup.model,
            setup.guide,
            setup.optimizer,
            setup.num_data,
            setup.shardings,
            batch_sh,
            skip_non_finite,
            prior_sh,
            widen,
            setup.antithetic,
        )
        return TrainStep(lambda state, batch: step(state, batch, *extra), lambda b: b, batch_sh)
    host_dedup = jax.process_count() == 1
    if host_dedup:
        replicated = setup.plan.replicated
        rows = batch_sh["categorical"]
        for site in setup.sparse:
            batch_sh[UNIQ + site] = replicated
            batch_sh[COUNT + site] = replicated
            batch_sh[LOCAL + site] = rows
    counts_sh = {s: row_sharding(setup.shardings, s) for s in setup.sparse}
    counts = {
        s: jax.device_put(row_counts(t.term, vocab_counts, setup.columns), counts_sh[s])
        for s, t in setup.sparse.items()
    }
    step = make_sparse_step(
        setup.model,
        setup.guide,
        setup.sparse,
        setup.optimizer,
        setup.schedule,
        setup.optimizer_name,
        setup.num_data,
        setup.shardings,
        batch_sh,
        counts_sh,
        skip_non_finite,
        prior_sh,
        widen,
        setup.antithetic,
    )

    tables = table_rows(setup.sparse)  # once, not per batch

    def prepare(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {**batch, **host_rows(batch["categorical"], tables)} if host_dedup else batch

    def stack(batches: Sequence[dict[str, np.ndarray]]) -> Stacked:
        return dispatch.stack(pad_rows(batches, tables) if host_dedup else batches)

    return TrainStep(
        lambda state, batch: step(state, batch, counts, *extra), prepare, batch_sh, stack
    )
