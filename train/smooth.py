"""The domains of the service's smooth terms, fixed at training and reused at scoring.

A :class:`~blayers.layers.PSplineLayer` term needs knots, and an
:class:`~blayers.layers.HSGPLayer` term a centre :math:`c` and half-width :math:`L`. Where
the config leaves them out they come from the training data's range :math:`[a, b]` of the
term's column, which the encode pass records (:class:`blayers.start.FeatureStats`). They
are written into the run's resolved config, so that resuming and scoring read the very
values training used:

- ``PSplineLayer``: ``range: [a, b]`` and ``num_knots`` (default 20) evenly spaced
  interior knots (:func:`blayers.splines.even_knots`; a P-spline's difference penalty
  assumes even spacing). Outside the range the curve holds its boundary value.
- ``HSGPLayer``: ``center`` :math:`c = (a + b) / 2` and ``L`` :math:`= 1.5\\,(b - a) / 2`;
  the layer reads :math:`\\mathrm{clip}(x - c, -L, L)`, so a value past the domain at
  scoring gets the boundary's value instead of the basis' periodic continuation.

A domain the config gives that does not cover the training data is refused for an HSGP
(the approximation is wrong outside :math:`[-L, L]`) and reported for a P-spline (holding
the boundary value may be what the user wants, to tame outliers).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp

from blayers import layers
from blayers.splines import even_knots
from blayers.start import FeatureStats

from .config import ConfigError

# the config keys of each kind of domain (:attr:`blayers.layers.BLayer.domain`)
DOMAIN_KEYS = {"knots": frozenset({"range", "num_knots"}), "boundary": frozenset({"center"})}
# by layer name, from the layers' own declarations
SMOOTH_KEYS = {
    name: DOMAIN_KEYS[cls.domain]
    for name, cls in vars(layers).items()
    if inspect.isclass(cls) and issubclass(cls, layers.BLayer) and cls.domain in DOMAIN_KEYS
}
SMOOTH = frozenset(SMOOTH_KEYS)  # the layers whose input_kind is "smooth" (tested)


def _knots(spec: Mapping[str, Any]) -> bool:
    """Whether a smooth term's domain is a spline's knots (else a centre and half-width)."""
    return getattr(getattr(layers, str(spec.get("layer")), None), "domain", None) == "knots"


DEFAULT_NUM_KNOTS = 20
BOUNDARY_FACTOR = 1.5  # L as a multiple of the data's half range (upstream's hsgp_L default)
PLACEHOLDER = (0.0, 1.0)  # the range a check before the data is read builds with


def with_domains(
    terms: Sequence[Mapping[str, Any]],
    numeric: Sequence[str],
    stats: FeatureStats | None,
    log: Callable[[str], None] = lambda _: None,
) -> list[dict[str, Any]]:
    """``terms`` with every smooth term's missing domain set from its column's range in
    ``stats`` (None: :data:`PLACEHOLDER`, for checks before the data is read). A term whose
    input is not one numeric column is left as it is, for :func:`train.model.build_term` to
    refuse with its own message."""
    out = []
    for spec in terms:
        spec = dict(spec)
        inputs = list(spec.get("inputs") or [])
        if spec.get("layer") in SMOOTH and len(inputs) == 1 and inputs[0] in numeric:
            span = PLACEHOLDER
            if stats is not None and stats.low:
                j = list(numeric).index(inputs[0])
                span = (float(stats.low[j]), float(stats.high[j]))
            _fill(spec, inputs[0], span, checking=stats is None, log=log)
        out.append(spec)
    return out


def _fill(
    spec: dict[str, Any],
    column: str,
    span: tuple[float, float],
    checking: bool,
    log: Callable[[str], None],
) -> None:
    where = f"model.terms[{spec.get('name')}]"
    low, high = span
    if not checking and not low < high:
        raise ConfigError(
            f"{where}: column {column!r} is constant ({low:g}) in the training data; a smooth "
            "term needs an input that varies"
        )
    if _knots(spec):
        if "knots" in spec:
            return
        if "range" not in spec:
            spec["range"] = [low, high]
            if not checking:
                log(f"{where}: knots on {column!r}'s range [{low:.6g}, {high:.6g}]")
        elif not checking:
            lo, hi = _pair(spec["range"], where)
            if lo > low or hi < high:
                log(
                    f"warning: {where}: range [{lo:g}, {hi:g}] does not cover {column!r}'s "
                    f"[{low:.6g}, {high:.6g}]; the curve holds its boundary value outside it"
                )
        spec.setdefault("num_knots", DEFAULT_NUM_KNOTS)
        return
    half = (high - low) / 2
    if "center" not in spec:
        spec["center"] = low + half
    if "L" not in spec:
        spec["L"] = BOUNDARY_FACTOR * half if half > 0 else 1.0
        if not checking:
            log(f"{where}: center={spec['center']:.6g}, L={spec['L']:.6g} from {column!r}")
    elif not checking:
        center, bound = float(spec["center"]), float(spec["L"])
        if low < center - bound or high > center + bound:
            raise ConfigError(
                f"{where}: {column!r} spans [{low:.6g}, {high:.6g}], outside center ± L = "
                f"[{center - bound:g}, {center + bound:g}]; raise L to at least "
                f"{BOUNDARY_FACTOR * max(abs(low - center), abs(high - center)):.6g} or drop L "
                "to set it from the data"
            )


def _pair(value: Any, where: str) -> tuple[float, float]:
    """``range`` as two finite floats, low < high."""
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: range must be [low, high], got {value!r}") from None
    if not lo < hi:
        raise ConfigError(f"{where}: range must be [low, high] with low < high, got {value!r}")
    return lo, hi


def domain(spec: Mapping[str, Any], degree: int) -> dict[str, Any]:
    """The call arguments a resolved smooth term adds: ``knots`` for a P-spline (unless the
    config gives them), and the HSGP's ``L``; ``center`` is the term's own."""
    where = f"model.terms[{spec.get('name')}]"
    if _knots(spec):
        if "knots" in spec:
            return {"knots": jnp.asarray(spec["knots"], jnp.float32)}
        if "range" not in spec:
            raise ConfigError(f"{where}: PSplineLayer needs range: [low, high] or knots")
        lo, hi = _pair(spec["range"], where)
        num = spec.get("num_knots", DEFAULT_NUM_KNOTS)
        if isinstance(num, bool) or not isinstance(num, int) or num < 1:
            raise ConfigError(f"{where}: num_knots must be an integer >= 1, got {num!r}")
        return {"knots": even_knots(lo, hi, num, degree)}
    if "L" not in spec:
        raise ConfigError(f"{where}: HSGPLayer needs L (or no L, to set it from the data)")
    if not float(spec["L"]) > 0:
        raise ConfigError(f"{where}: L must be > 0, got {spec['L']!r}")
    return {}
