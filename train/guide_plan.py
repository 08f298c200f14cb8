"""Which sites the service's guide ties together, read off the model's terms.

A structured guide (:class:`blayers.guides.StructuredGuide`) couples random-effect and
embedding rows to the intercept, dense and row-sparse tables alike: the intercept is the
tie that carries the realized group means' uncertainty (the recentering variance move works
on it), at one float per row (3 with a sparse row's optimizer moments). FM factors get no
tie: their effect is a product.

Rows were also tied to every dense coefficient once (a row's conditional mean is linear in
them for a gaussian likelihood). Against NUTS on the default job's data
(``benchmarks/main_job_vs_nuts.py``) that made the coefficients' posterior sds far narrower
than NUTS's, where tying to the intercept only keeps them near it, with the scales
unchanged; and it cost a sparse table one more float per row per coefficient.

Measured against NUTS and not adopted (``tests/test_posterior_vs_nuts.py``'s data): rows also
following their own table's scale, linearly, narrowed the scales' posterior sds further
below NUTS's; a row spread that follows the scale's draw multiplicatively (non-centred rows)
helped the weakly identified logit scale a little and moved the others; both together were
worse on every target.

Categorical-FM factors are, by default (``optim.fm_rows: free``), a Normal of their own, not
conditioned on the FM's scale as random-effect rows are (``site``). Conditioned on the scale,
the factors follow it down instead of pulling it up to the interaction they carry, and the
other globals move with it (``benchmarks/fm_scale_vs_nuts.py``: the FM scale at a quarter of
NUTS's where the data identifies an interaction). Free factors find an interaction the data
identifies; with none, or a weakly identified one, every guide tried is far from NUTS
(hand-written NumPyro's ``AutoNormal`` too), and the run's convergence check says the scale
is still moving.

The measurements: ``benchmarks/results/design_measurements.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpyro.distributions as dists
from numpyro.distributions import biject_to
from numpyro.distributions.transforms import ExpTransform

from blayers import guides

TableKind = Callable[[type], bool]


def shiftable(layer: type) -> bool:
    """Tables whose rows add to the predictor linearly: a table mean trades with the
    intercept (:attr:`blayers.layers.BLayer.rows_additive`)."""
    return bool(getattr(layer, "rows_additive", False))


def conditioned(layer: type) -> bool:
    """Tables whose rows a conditional guide conditions on their scale: the linear ones and
    the categorical FM's factors (:attr:`blayers.layers.BLayer.rows_scaled`)."""
    return bool(getattr(layer, "rows_scaled", False))


def fm_factors(layer: type) -> bool:
    """Scaled tables whose rows enter as a product (never shifted): FM factors."""
    return conditioned(layer) and not shiftable(layer)


FM_ROWS = ("free", "site")  # optim.fm_rows


def normal_table(
    term: Any, sites: Mapping[str, guides.LatentSite], layers: TableKind = shiftable
) -> tuple[str, str] | None:
    """``(rows' site, scale site)`` of a table term of one of ``layers`` whose rows have the
    default ``Normal(0, λ)`` prior under a log-scale λ (random effects, slope-free
    embeddings, categorical FM factors), else ``None``. With the default ``layers``: the
    tables that recentering moves; with ``conditioned``: those a conditional guide
    conditions."""
    if term.kind not in ("table", "categorical_fm") or not layers(type(term.layer)):
        return None
    if term.slopes_idx:
        return None
    layer = term.layer
    if layer.coef_dist is not dists.Normal or layer.coef_kwargs != {"loc": 0.0}:
        return None
    scale = f"{term.layer_name}_{term.name}_scale"
    if scale not in sites or not isinstance(biject_to(sites[scale].support), ExpTransform):
        return None
    return term.table_site, scale


def service_guide(
    family: str,
    terms: Sequence[Any],
    sites: Mapping[str, guides.LatentSite],
    fm_rows: str = "free",
) -> guides.MeanFieldGuide:
    """The guide ``family`` over ``sites`` with the service's couplings (module docstring);
    ``fm_rows``: how a conditional guide draws categorical-FM factors (:data:`FM_ROWS`)."""
    tables = [t for t in terms if t.kind == "table"]
    intercept = [f"{t.layer_name}_{t.name}_beta" for t in terms if t.kind == "intercept"]
    follows = {t.table_site: intercept for t in tables} if intercept else {}
    fm = {found[0] for t in terms if (found := normal_table(t, sites, fm_factors))}
    conditional = dict(found for t in terms if (found := normal_table(t, sites, conditioned)))
    if fm_rows == "free":
        conditional = {k: v for k, v in conditional.items() if k not in fm}
    return guides.make_guide(family, sites, list(follows), follows, conditional)


def fm_rows_in_effect(
    family: str, terms: Sequence[Any], sites: Mapping[str, guides.LatentSite], fm_rows: str
) -> str:
    """``fm_rows`` where it changes anything (a conditional guide over a model with a
    categorical FM), else ``site``: what a checkpoint's fingerprint records."""
    has_fm = any(normal_table(t, sites, fm_factors) for t in terms)
    return fm_rows if family == "conditional" and has_fm else "site"
