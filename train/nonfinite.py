r"""What a run does when its loss or state stops being finite: ``train.non_finite``.

Whatever the policy, a non-finite state is never checkpointed (``segments.save_finite``).

- ``stop`` (the default): stop, naming the step and the first non-finite site and the fix; a
  rerun resumes from the last good checkpoint.
- ``skip``: a step whose loss or any gradient is not finite changes nothing — parameters and
  optimizer moments keep their values, the step counter moves on (so the next step draws
  afresh). The update runs under a ``lax.cond`` (a select per leaf made a cheap step several times
  slower on CPU); row-sparse tables are left alone by moving the step's scatter indices past the
  table, where the scatter drops them. A skipped step's loss is reported as NaN, which is how the
  loop counts skipped steps (on the device, without a sync per step).
  ``max_skipped`` in a row stop the run as ``stop`` would: a run that can no longer take a
  finite step is not training.
- ``rollback``: restore the last good checkpoint (the start, if none was saved) and go on with
  the learning rate times ``lr_factor``, at most ``max_rollbacks`` times. The rate's scale is
  saved with every later checkpoint, so a resumed run keeps it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from .state import NonFiniteError

POLICIES = ("stop", "skip", "rollback")


def all_finite(*trees: Any) -> jax.Array:
    """True where every element of every array in ``trees`` is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for t in trees for x in jax.tree.leaves(t)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def apply_if_finite(
    loss: jax.Array,
    grads: Any,
    update: Callable[[], Any],
    unchanged: Callable[[], Any],
) -> tuple[Any, jax.Array, jax.Array]:
    """``(update() or unchanged(), reported loss, ok)`` for a step under ``skip``: one
    ``lax.cond`` on whether the loss and every gradient are finite (a select per leaf made a
    cheap step several times slower on CPU). A skipped step's loss is NaN, even where only a
    gradient was not finite: that is what :class:`SkipCount` counts."""
    ok = jnp.isfinite(loss) & all_finite(grads)
    return jax.lax.cond(ok, update, unchanged), jnp.where(ok, loss, jnp.nan), ok


def optimizer_step(
    optimizer: optax.GradientTransformation,
    params: Any,
    opt_state: Any,
    grads: Any,
    loss: jax.Array,
    skip_non_finite: bool,
    checked: Any = None,
) -> tuple[tuple[Any, Any], jax.Array, jax.Array | None]:
    """``((params, opt_state), reported loss, ok)`` after one optimizer step on ``grads``.
    Under ``skip_non_finite`` the step is :func:`apply_if_finite` on the loss and ``checked``
    (default: ``grads``; the row-sparse step adds its row gradients); else it is applied
    and ``ok`` is ``None``."""

    def update() -> tuple[Any, Any]:
        updates, new_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_state

    if skip_non_finite:
        guarded = grads if checked is None else checked
        return apply_if_finite(loss, guarded, update, lambda: (params, opt_state))
    return update(), loss, None


@jax.jit
def _tally(counts: jax.Array, losses: jax.Array) -> jax.Array:
    """``counts`` (streak, total) after steps with these losses, in order (one or several
    steps of a dispatch): the streak runs on through a dispatch of skipped steps, and
    otherwise is the skipped steps after its last finite one."""
    skipped = ~jnp.isfinite(jnp.atleast_1d(losses))
    n = skipped.shape[0]
    last_finite = jnp.max(jnp.where(skipped, -1, jnp.arange(n)))
    streak = jnp.where(last_finite < 0, counts[0] + n, n - 1 - last_finite)
    total = counts[1] + jnp.sum(skipped, dtype=counts.dtype)
    return jnp.stack([streak.astype(counts.dtype), total])


class SkipCount:
    """Skipped steps, counted on the device (one tiny dispatch a step, no sync); read at the
    loop's log steps."""

    def __init__(self) -> None:
        self._counts = jnp.zeros(2, jnp.int32)

    def add(self, losses: jax.Array) -> None:
        """Count a dispatch's steps: its loss, or each of its steps' losses in order."""
        self._counts = _tally(self._counts, losses)

    def read(self) -> tuple[int, int]:
        """``(skipped in a row now, skipped in all)``."""
        streak, total = (int(x) for x in jax.device_get(self._counts))
        return streak, total


def stop_error(what: str, lr: float) -> NonFiniteError:
    """The one-line stop for a diverged run: what went non-finite, then the fix."""
    return NonFiniteError(
        f"{what}: lower optim.lr (now {lr:g}) or check the data, and rerun to resume from "
        "there (or set train.non_finite.policy=skip or rollback)"
    )
