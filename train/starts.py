"""A configured model's data-aware start, and the priors and settings that are badly suited
to its data.

The start (:mod:`blayers.start`) puts the first intercept term at the link of the target's
mean and the link's globals at their moment estimates; table rows start at 0 and every guide
scale small. The checks name each term whose prior is far from the scale the target implies,
and each table that one draw per step (``optim.antithetic=false``) puts at risk, with the
fix, before any step runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpyro.distributions as dists

from blayers import guides
from blayers.links import link_start
from blayers.start import FeatureStats, LinkStart, TargetStats

from .guide_plan import conditioned

PRIOR_SDS = 4.0  # an intercept start this many prior sds out is named
SCALE_RATIO = 10.0  # a target sd this many times a term's prior scale is named
# a scaled table is named under one draw per step when at least this share of its observed
# levels have at most SPARSE_ROWS rows: on logit tables of 1,500-4,500 such levels one draw put
# the scale at 0.42-0.58x NUTS's, and from three rows per level on it matched
# (benchmarks/one_draw_vs_nuts.py)
SPARSE_SHARE = 0.5
SPARSE_ROWS = 2


def starting_values(
    terms: Sequence[Any],
    sites: Mapping[str, guides.LatentSite],
    link: str,
    link_kwargs: Mapping[str, Any],
    stats: TargetStats | None,
) -> dict[str, np.ndarray]:
    """Constrained starting values by site: the first intercept term and the link globals."""
    if stats is None or stats.count == 0:
        return {}
    start = link_start(link, stats, link_kwargs)
    out = {k: v for k, v in start.globals.items() if k in sites}
    intercept = _intercept_site(terms, sites)
    if intercept is not None:
        units = sites[intercept].shape[-1]
        if len(start.eta) in (1, units):
            out[intercept] = np.broadcast_to(np.asarray(start.eta, np.float32), (1, units))
    return out


def starting_scales(
    terms: Sequence[Any],
    sites: Mapping[str, guides.LatentSite],
    link: str,
    link_kwargs: Mapping[str, Any],
    stats: TargetStats | None,
    features: FeatureStats | None,
    num_data: int,
    levels: Mapping[str, int],
) -> dict[str, np.ndarray]:
    r"""Unconstrained guide sds to start the global sites at, by site: each global's
    posterior sd were it the only unknown, :math:`(N I\,E[x^2] + \text{prior precision})^{-1/2}`
    with :math:`I` the link's Fisher information per observation at the start. The guide
    caps them at ``optim.guide_init_scale``, so they only ever start smaller: a well-measured
    global then starts near its posterior width instead of shrinking there over thousands of
    steps. A hierarchical scale over :math:`R` coefficients starts at :math:`(2R)^{-1/2}`
    in log space; table rows keep the default."""
    if stats is None or stats.count == 0:
        return {}
    start = link_start(link, stats, link_kwargs)
    out: dict[str, np.ndarray] = {}
    info = start.information
    for t in terms:
        beta = f"{t.layer_name}_{t.name}_beta"
        scale = f"{t.layer_name}_{t.name}_scale"
        if info is not None and t.kind == "intercept" and beta in sites:
            prior = _normal_prior(t.layer)
            precision = 1.0 / prior[1] ** 2 if prior else 1.0
            out[beta] = np.float32(1.0 / np.sqrt(num_data * info + precision))
        elif (
            info is not None
            and t.kind == "dense"
            and beta in sites
            and features is not None
            and len(features.total_sq)
            and t.numeric_idx
            # one coefficient row per input (a layer of the user's own may hold others)
            and sites[beta].unconstrained_shape[:1] == (len(t.numeric_idx),)
        ):
            second = features.mean_sq[list(t.numeric_idx)]
            sd = 1.0 / np.sqrt(num_data * info * second + 1.0)
            shape = sites[beta].unconstrained_shape
            out[beta] = np.broadcast_to(sd.reshape(-1, *(1,) * (len(shape) - 1)), shape)
        if scale in sites and not sites[scale].unconstrained_shape:
            count = levels.get(t.table_site) if t.kind != "dense" else len(t.numeric_idx)
            if count:
                out[scale] = np.float32(1.0 / np.sqrt(2.0 * count))
    if info is not None and "sigma" in sites and "sigma" in start.globals:
        out["sigma"] = np.float32(1.0 / np.sqrt(2.0 * num_data))
    return out


def observation_information(
    link: str, link_kwargs: Mapping[str, Any], stats: TargetStats | None
) -> float | None:
    """The link's Fisher information about the linear predictor per observation at the
    data-aware start, or ``None`` without target statistics or for a link that has none."""
    if stats is None or stats.count == 0:
        return None
    info = link_start(link, stats, link_kwargs).information
    return None if info is None else float(info)


ROW_PRECISION_FLOOR = 1e-2  # a row with no data starts at (nearly) its prior


def row_starts(
    guide: guides.MeanFieldGuide,
    link: str,
    link_kwargs: Mapping[str, Any],
    stats: TargetStats | None,
    counts: Mapping[str, np.ndarray],
    sums: Mapping[str, np.ndarray] | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    r"""Where every conditional table's rows start (:class:`blayers.guides.ConditionalGuide`),
    by site and row field:

    - ``raw_scale`` :math:`= \log\tau_r`: the information the row's :math:`n_r` training
      examples carry about it, :math:`\tau_r = n_r I` with :math:`I` the link's Fisher
      information per observation at the start (1 where it has none), so each row starts
      at the width its count gives it;
    - ``loc``, for one-unit rows (random effects) and links whose score is affine in the
      target: the one-step estimate from the start (:meth:`blayers.start.LinkStart.row_mean`),
      so each row starts at the shrunken mean its own data gives at every scale, instead of
      at 0 (from which tens of thousands of weakly observed rows need many epochs, and pull
      their scale down meanwhile).

    ``counts[site]`` and ``sums[site]``: each row's training count and target sum."""
    conditional = getattr(guide, "conditional", {})
    if not conditional:
        return {}
    start = None
    if stats is not None and stats.count:
        start = link_start(link, stats, link_kwargs)
    info = observation_information(link, link_kwargs, stats) or 1.0
    out: dict[str, dict[str, np.ndarray]] = {}
    for site in conditional:
        if site not in counts:
            continue
        count = np.asarray(counts[site], np.float64)
        tau = count * info + ROW_PRECISION_FLOOR
        out[site] = {"raw_scale": np.log(tau).astype(np.float32)}
        one_unit = guide.sites[site].unconstrained_shape[1:] in ((), (1,))
        if start is not None and sums is not None and site in sums and one_unit:
            out[site]["loc"] = start.row_mean(count, sums[site], tau).astype(np.float32)
    return out


def _intercept_site(terms: Sequence[Any], sites: Mapping[str, guides.LatentSite]) -> str | None:
    for t in terms:
        if t.kind == "intercept":
            name = f"{t.layer_name}_{t.name}_beta"
            if name in sites:
                return name
    return None


def _normal_prior(layer: Any) -> tuple[float, float] | None:
    """``(loc, scale)`` of a fixed Normal coefficient prior, else ``None``."""
    if getattr(layer, "coef_dist", None) is not dists.Normal:
        return None
    kw = getattr(layer, "coef_kwargs", {})
    if "scale" not in kw:
        return None
    return float(kw.get("loc", 0.0)), float(kw["scale"])


def _prior_scale(layer: Any) -> float | None:
    """The scale a term's coefficients are drawn at a priori: a fixed prior's ``scale``, or a
    hierarchical prior's ``scale_kwargs['scale']`` (λ's own scale)."""
    fixed = _normal_prior(layer)
    if fixed is not None:
        return fixed[1]
    kw = getattr(layer, "scale_kwargs", None)
    if kw and "scale" in kw:
        return float(kw["scale"])
    return None


def prior_warnings(
    terms: Sequence[Any],
    link: str,
    link_kwargs: Mapping[str, Any],
    stats: TargetStats | None,
) -> list[str]:
    """One line per prior that is badly scaled for this target, naming the term and the fix."""
    if stats is None or stats.count == 0:
        return []
    start: LinkStart = link_start(link, stats, link_kwargs)
    eta = float(np.mean(start.eta))
    lines = []
    has_intercept = False
    for t in terms:
        where = f"model.terms[{t.name}]"
        if t.kind == "intercept":
            has_intercept = True
            prior = _normal_prior(t.layer)
            if prior is not None and abs(eta - prior[0]) > PRIOR_SDS * prior[1]:
                lines.append(
                    f"{where}: the target's mean is {eta:.4g} on the link scale, "
                    f"{abs(eta - prior[0]) / prior[1]:.0f} prior sds from the intercept's prior "
                    f"Normal({prior[0]:g}, {prior[1]:g}); the guide starts there but the prior "
                    f"pulls it back: set coef_kwargs: {{loc: {eta:.3g}, scale: "
                    f"{max(abs(eta), 1.0):.3g}}} or center the target"
                )
            continue
        scale = _prior_scale(t.layer)
        sd = start.outcome_sd
        if scale is not None and sd is not None and sd > SCALE_RATIO * scale:
            key = "coef_kwargs" if _normal_prior(t.layer) else "scale_kwargs"
            lines.append(
                f"{where}: the target's sd is {sd:.4g}, {sd / scale:.0f}x this term's prior "
                f"scale ({scale:g}); standardize the target or set {key}: {{scale: {sd:.3g}}}"
            )
    if not has_intercept and abs(eta) > PRIOR_SDS:
        lines.append(
            f"model.terms: the target's mean is {eta:.4g} on the link scale and no "
            "InterceptLayer term can carry it; add {layer: InterceptLayer, name: bias}"
        )
    sd = start.outcome_sd
    sigma_kw = dict(link_kwargs.get("sigma_kwargs") or {})
    has_sigma = "scale" not in link_kwargs and "sigma" in start.globals
    if has_sigma and sd is not None and link_kwargs.get("sigma_dist") in (None, dists.Exponential):
        rate = float(sigma_kw.get("rate", 1.0))
        if sd > SCALE_RATIO / rate:
            lines.append(
                f"model.link_kwargs: sigma's prior Exponential(rate={rate:g}) has mean "
                f"{1 / rate:g}, far below the target's sd {sd:.4g}; set sigma_kwargs: "
                f"{{rate: {1 / sd:.3g}}} or standardize the target"
            )
    return lines


def one_draw_warnings(
    terms: Sequence[Any],
    categorical: Sequence[str],
    vocab_counts: Mapping[str, np.ndarray],
    antithetic: bool,
) -> list[str]:
    """Under one draw per step (``antithetic`` false), one line per table with a learned scale
    (random effects, embeddings, FM factors) whose input column has at least
    :data:`SPARSE_SHARE` of its observed levels at :data:`SPARSE_ROWS` rows or fewer. The
    gradient of such a table's scale sums one noisy term per level, and one draw can drag the
    scale far under its posterior; the antithetic pair cancels that noise
    (:func:`blayers.guides.antithetic_mean`). Fewer such levels do not make one draw safe:
    where it fails is not predictable from counts alone."""
    if antithetic:
        return []
    lines = []
    for t in terms:
        if not t.categorical_idx or not conditioned(type(t.layer)):
            continue
        for idx in t.categorical_idx:
            column = categorical[idx]
            counts = np.asarray(vocab_counts[column])
            seen = counts[counts > 0]
            if not len(seen):
                continue
            share = float(np.mean(seen <= SPARSE_ROWS))
            if share >= SPARSE_SHARE:
                lines.append(
                    f"model.terms[{t.name}]: {share:.0%} of the {len(seen):,} levels of "
                    f"column {column!r} have at most {SPARSE_ROWS} rows, and "
                    "optim.antithetic=false draws once per step, which can drag this table's "
                    "scale far under its posterior; set optim.antithetic=true"
                )
    return lines
