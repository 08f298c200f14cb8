"""Input checks shared by the layers: shapes, integer ids, prior kwargs.

Checks on values (id ranges) run only when the values are concrete; under ``jit`` the
service validates ids once in its data stage instead of on every step.
"""

from __future__ import annotations

import inspect
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def as_2d(x: Any, what: str) -> jax.Array:
    """Read ``x`` as ``(n, d)``: a 1-D ``(n,)`` input becomes ``(n, 1)``."""
    x = jnp.asarray(x)
    if x.ndim == 1:
        return x[:, None]
    if x.ndim != 2:
        raise ValueError(f"{what}: expected an input of shape (n, d) or (n,), got {x.shape}")
    return x


def is_concrete(x: Any) -> bool:
    """True when ``x`` holds values (not a tracer inside ``jit``/``grad``)."""
    return not isinstance(x, jax.core.Tracer)


def check_ids(x: Any, num_categories: int, what: str) -> jax.Array:
    """Validate integer category ids and return them as a flat ``(n,)`` int32 array.

    Accepts ``(n,)`` or ``(n, 1)``. Raises ``TypeError`` for non-integer dtypes (always, dtypes
    are static) and ``ValueError`` for ids outside ``[0, num_categories)`` when ``x`` is concrete.
    """
    x = jnp.asarray(x) if not isinstance(x, np.ndarray) else x
    if x.ndim == 2 and x.shape[1] == 1:
        x = x.reshape(-1)
    if x.ndim != 1:
        raise ValueError(f"{what}: category ids must have shape (n,) or (n, 1), got {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(
            f"{what}: category ids must be integers, got dtype {x.dtype}; "
            "map raw values to ids with a vocabulary first"
        )
    if int(num_categories) < 1:
        raise ValueError(f"{what}: num_categories must be >= 1, got {num_categories}")
    check_id_range(x, num_categories, what)
    return jnp.asarray(x, dtype=jnp.int32)


def check_id_range(x: Any, num_categories: int | np.ndarray, what: str) -> None:
    """Raise ``ValueError`` naming ``what`` if concrete ids fall outside ``[0, num_categories)``.

    ``num_categories`` may be an array broadcasting against ``x`` (one bound per field).
    """
    if not is_concrete(x) or np.size(x) == 0:
        return
    ids = np.asarray(x)
    bound = np.asarray(num_categories)
    bad = (ids < 0) | (ids >= bound)
    if bad.any():
        first = np.argwhere(bad)[0]
        raise ValueError(
            f"{what}: category id {ids[tuple(first)]} at index {tuple(int(i) for i in first)} is "
            f"outside [0, {np.broadcast_to(bound, ids.shape)[tuple(first)]}); ids must be "
            "vocabulary ids below num_categories (map unseen values to a reserved id)"
        )


def check_kwargs(
    dist_cls: Any, kwargs: dict[str, Any], role: str, provided: tuple[str, ...] = ()
) -> None:
    """Raise ``TypeError`` at construction if ``dist_cls`` cannot take ``kwargs``.

    ``provided`` names arguments the layer itself passes at call time (e.g. ``scale`` for an
    adaptive coefficient prior), so a user-supplied duplicate is caught now, not mid-training.
    """
    if not isinstance(kwargs, dict):
        raise TypeError(f"{role}_kwargs must be a dict, got {type(kwargs).__name__}")
    clash = sorted(set(kwargs) & set(provided))
    if clash:
        raise TypeError(
            f"{role}_kwargs must not set {clash}: the layer supplies them "
            f"(the hierarchical scale); remove them from {role}_kwargs"
        )
    try:
        signature = inspect.signature(dist_cls)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(**{**dict.fromkeys(provided, 1.0), **kwargs})
    except TypeError as err:
        name = getattr(dist_cls, "__name__", repr(dist_cls))
        raise TypeError(
            f"{role}_dist={name} does not accept {role}_kwargs={kwargs}: {err}"
        ) from err
