"""The rows' closed-form ties to the intercept (:func:`train.recenter.couple`) against the
exact Gaussian posterior: on a balanced crossed design they are the exact regression of each
row on the intercept; on an unbalanced one they give the intercept nearly all of its exact
marginal variance, which untied rows lose."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from numpy.testing import assert_allclose
from omegaconf import OmegaConf

from blayers import guides
from train import recenter as rc
from train.guide_plan import service_guide
from train.model import Columns, build_model
from train.state import guide_field

SIZES = {"g": 12, "h": 30}
SCALES = {"g": 0.7, "h": 0.3}


def setup(family: str = "conditional"):
    terms = [
        {"layer": "InterceptLayer", "name": "bias"},
        {"layer": "RandomEffectsLayer", "name": "g", "inputs": ["g"]},
        {"layer": "RandomEffectsLayer", "name": "h", "inputs": ["h"]},
    ]
    cfg = OmegaConf.create({"link": "gaussian", "terms": terms})
    model = build_model(cfg, Columns((), ("g", "h")), SIZES)
    batch = {"numeric": np.zeros((4, 0), np.float32), "categorical": np.zeros((4, 2), np.int32)}
    sites = guides.latent_sites(model, batch, num_data=4)
    guide = service_guide(family, model.terms, sites)
    found = rc.plan(model.terms, sites)
    params = guide.init_params(0.1, scales={"InterceptLayer_bias_beta": 0.01})
    for t in found.tables:
        col = t.site.split("_")[1]
        # the scale's guide: log λ at the truth, with a tiny spread
        params[t.scale_site] = {
            **params[t.scale_site],
            "loc": np.float32(np.log(SCALES[col])),
            "raw_scale": np.float32(np.log(np.expm1(1e-3))),
        }
    return found, params, guide, sites


def precision(ids: dict[str, np.ndarray], rows: dict[str, int], info: float):
    """The posterior precision of (intercept, g rows, h rows) of a gaussian crossed model:
    :math:`I X^\\top X + \\mathrm{diag}(p_0, \\lambda_g^{-2}, \\lambda_h^{-2})`."""
    n = len(ids["g"])
    cols = [np.ones((n, 1))]
    prior = [1.0]
    for c in ("g", "h"):
        onehot = np.zeros((n, rows[c]))
        onehot[np.arange(n), ids[c]] = 1.0
        cols.append(onehot)
        prior += [SCALES[c] ** -2] * rows[c]
    x = np.concatenate(cols, 1)
    return info * x.T @ x + np.diag(prior)


def ties(found, params, guide, ids, info):
    counts = {
        t.site: np.bincount(
            ids[t.site.split("_")[1]], minlength=guide.sites[t.site].shape[0]
        ).astype(np.float32)
        for t in found.tables
    }
    # one compiled call (op by op, its few dozen small ops each compile on a busy worker)
    out = jax.jit(lambda p, c: rc.couple(p, c, found, guide, info))(params, counts)
    tied = np.concatenate(
        [
            np.asarray(guide_field(out[t.site], guides.COUPLING))[
                ..., guide.row_column(t.site, found.intercept)
            ].reshape(-1)
            for t in found.tables
        ]
    )
    rows = {t.site.split("_")[1]: guide.sites[t.site].shape[0] for t in found.tables}
    sd = float(np.asarray(guide.marginal(found.intercept, out[found.intercept])[1]).ravel()[0])
    return tied, rows, sd


def intercept_variance(h: np.ndarray, a: np.ndarray) -> float:
    """The intercept's variance under the family's optimum with ties ``a`` (exact for
    ``a = -H_uu^-1 h_ub``): :math:`1 / (h_{bb} + 2 a^\\top h_{ub} + a^\\top H_{uu} a)`."""
    return 1.0 / (h[0, 0] + 2 * a @ h[1:, 0] + a @ h[1:, 1:] @ a)


@pytest.mark.parametrize("family", ["conditional", "structured"])
def test_ties_are_the_exact_regression_on_a_balanced_crossed_design(family):
    found, params, guide, _ = setup(family)
    g, h = np.meshgrid(np.arange(SIZES["g"]), np.arange(SIZES["h"]), indexing="ij")
    ids = {"g": np.tile(g.ravel(), 3), "h": np.tile(h.ravel(), 3)}  # every pair 3 times
    info = 0.5
    got, rows, sd = ties(found, params, guide, ids, info)
    hh = precision(ids, rows, info)
    exact = -np.linalg.solve(hh[1:, 1:], hh[1:, 0])
    # the intercept's own prior (p0 = 1) is what the closed form leaves out: tiny here
    assert_allclose(got, exact, rtol=0.02, atol=1e-4)
    assert np.all(got[: rows["g"]][: SIZES["g"]] < 0)
    exact_var = np.linalg.inv(hh)[0, 0]
    assert_allclose(intercept_variance(hh, got), exact_var, rtol=1e-3)
    # and the intercept's guide sd is raised to it (from the 0.01 it started at)
    assert_allclose(sd, np.sqrt(exact_var), rtol=1e-3)


def test_ties_give_the_intercept_its_variance_on_unbalanced_data(rng):
    found, params, guide, _ = setup()
    n = 3000
    zipf = 1.0 / np.arange(1, SIZES["h"] + 1) ** 1.2
    ids = {
        "g": rng.choice(SIZES["g"] - 2, n),  # two categories never seen
        "h": rng.choice(SIZES["h"], n, p=zipf / zipf.sum()),
    }
    info = 1.0
    got, rows, sd = ties(found, params, guide, ids, info)
    hh = precision(ids, rows, info)
    exact_var = np.linalg.inv(hh)[0, 0]
    assert_allclose(sd, np.sqrt(exact_var), rtol=0.03)
    untied = intercept_variance(hh, np.zeros_like(got))
    tied = intercept_variance(hh, got)
    assert untied < 0.2 * exact_var  # what SGD starts from
    assert tied > 0.95 * exact_var
    assert tied <= exact_var * (1 + 1e-6)  # the exact ties are the family's optimum
    # rows no example reads follow nothing
    g_ties = got[: rows["g"]]
    assert_allclose(g_ties[SIZES["g"] - 2 :], 0.0)


def test_the_intercept_sd_is_only_ever_raised(rng):
    found, params, guide, _ = setup()
    wide = guide.init_params(5.0)
    params = {**params, found.intercept: wide[found.intercept]}
    ids = {"g": rng.choice(SIZES["g"], 500), "h": rng.choice(SIZES["h"], 500)}
    *_, sd = ties(found, params, guide, ids, 1.0)
    before = guide.marginal(found.intercept, params[found.intercept])[1]
    before = float(np.asarray(before).ravel()[0])
    assert_allclose(sd, before, rtol=1e-6)
