r"""B-spline bases: non-linear effects of a numeric input as a linear layer over a basis.

With a clamped knot vector :math:`t_0 = \dots = t_p < t_{p+1} \le \dots < t_{K} = \dots =
t_{K+p}` of degree :math:`p`, the basis functions follow the Cox–de Boor recursion

.. math::
    B_{i,0}(x) = [t_i \le x < t_{i+1}], \qquad
    B_{i,p}(x) = \frac{x - t_i}{t_{i+p} - t_i} B_{i,p-1}(x)
        + \frac{t_{i+p+1} - x}{t_{i+p+1} - t_{i+1}} B_{i+1,p-1}(x)

(a term with a zero denominator is 0). On :math:`[t_0, t_{K+p}]` they are non-negative and
sum to 1; the right end belongs to the last function. Typical use::

    knots = make_knots(x_train, num_knots=10)

    def model(x, y=None):
        return gaussian_link(AdaptiveLayer()("f", bspline_basis(x, knots)), y)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["bspline_basis", "even_knots", "make_knots"]


def make_knots(x: Any, num_knots: int, degree: int = 3) -> jax.Array:
    """A clamped knot vector for ``x``: ``degree + 1`` copies of each end of its range and
    ``num_knots`` interior knots at evenly spaced quantiles, ``num_knots + 2 (degree + 1)``
    knots in all, for ``num_knots + degree + 1`` basis functions. Call it once on the
    training data, outside any traced function, and reuse the knots at prediction.

    Raises:
        ValueError: ``x`` is empty or not finite, ``num_knots < 0`` or ``degree < 0``.
    """
    values = np.asarray(x, np.float64).ravel()
    if values.size == 0 or not np.all(np.isfinite(values)):
        raise ValueError("make_knots: x must be non-empty and finite")
    if num_knots < 0 or degree < 0:
        raise ValueError(
            f"make_knots: num_knots and degree must be >= 0, got {num_knots} and {degree}"
        )
    interior = np.quantile(values, np.linspace(0.0, 1.0, num_knots + 2)[1:-1])
    return _clamped(values.min(), interior, values.max(), degree)


def even_knots(low: float, high: float, num_knots: int, degree: int = 3) -> jax.Array:
    """A clamped knot vector on ``[low, high]`` with ``num_knots`` evenly spaced interior
    knots: the spacing a P-spline's difference penalty assumes, and the one to use when the
    range is known but the data's quantiles are not (a streaming service, a fixed scale).

    Raises:
        ValueError: ``low >= high``, either not finite, ``num_knots < 0`` or ``degree < 0``.
    """
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise ValueError(f"even_knots: need finite low < high, got [{low}, {high}]")
    if num_knots < 0 or degree < 0:
        raise ValueError(
            f"even_knots: num_knots and degree must be >= 0, got {num_knots} and {degree}"
        )
    return _clamped(low, np.linspace(low, high, num_knots + 2)[1:-1], high, degree)


def _clamped(low: float, interior: np.ndarray, high: float, degree: int) -> jax.Array:
    """``degree + 1`` copies of each end around the interior knots."""
    ends = [np.full(degree + 1, low), np.full(degree + 1, high)]
    return jnp.asarray(np.concatenate([ends[0], interior, ends[1]]), jnp.float32)


def bspline_basis(x: jax.Array, knots: jax.Array, degree: int = 3) -> jax.Array:
    """The ``(n, len(knots) - degree - 1)`` B-spline design matrix of ``x`` (``(n,)``) on a
    clamped knot vector (module docstring). Traceable under ``jit``; values outside the
    knots' range get an all-zero row."""
    x = jnp.asarray(x).reshape(-1)[:, None]
    knots = jnp.asarray(knots, x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32)
    basis = ((x >= knots[:-1]) & (x < knots[1:])).astype(knots.dtype)
    for p in range(1, degree + 1):
        m = knots.shape[0] - p - 1
        left, right = knots[:m], knots[p : m + p]
        left2, right2 = knots[1 : m + 1], knots[p + 1 : m + p + 1]
        a = _ratio(x - left, right - left)
        b = _ratio(right2 - x, right2 - left2)
        basis = a * basis[:, :m] + b * basis[:, 1 : m + 1]
    # the half-open intervals leave the right end out; it belongs to the last function
    at_end = x[:, 0] == knots[-1]
    last = jnp.zeros_like(basis).at[:, -1].set(1.0)
    return jnp.where(at_end[:, None], last, basis)


def _ratio(num: jax.Array, den: jax.Array) -> jax.Array:
    """``num / den`` clipped to ``[0, 1]``, 0 where ``den`` is 0 (a repeated knot). Where the
    lower-degree function it weights is nonzero the ratio already lies in ``[0, 1]``; outside
    it can overflow (knots 1e-38 apart: 4 / 1e-38 is inf in float32), and inf times that
    function's 0 would be NaN."""
    safe = jnp.where(den > 0, den, 1.0)
    return jnp.where(den > 0, jnp.clip(num / safe, 0.0, 1.0), 0.0)
