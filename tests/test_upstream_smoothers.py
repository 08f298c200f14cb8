"""PSplineLayer and HSGPLayer (upstream 0.3.7's names, signatures and sites): bases, outputs
and densities against brute force (scipy's B-splines; the squared-exponential kernel the
Hilbert-space basis approximates), and recovery of a smooth curve under SVI and NUTS."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from numpy.testing import assert_allclose
from numpyro import handlers
from numpyro.infer.util import log_density
from scipy import stats

from blayers.layers import HSGPLayer, InterceptLayer, PSplineLayer, hsgp_L
from blayers.links import gaussian_link
from blayers.splines import make_knots
from tests.helpers import nuts_draws, svi_draws

# ---------------------------------------------------------------------------- P-splines


def test_pspline_matches_brute_force(rng):
    from scipy.interpolate import BSpline

    x = np.linspace(-3.0, 3.0, 41).astype(np.float32)
    knots = np.asarray(make_knots(x, 5), np.float64)  # 9 basis functions of degree 3
    k = knots.size - 4
    delta = rng.normal(size=(k - 2, 1)).astype(np.float32)
    sites = {
        "PSplineLayer_s_scale": np.array([0.7], np.float32),
        "PSplineLayer_s_differences": delta,
        "PSplineLayer_s_trend": np.array([0.4], np.float32),
    }

    def model(xs):
        return PSplineLayer(trend_scale=2.0)("s", xs, knots, reference=0.5)

    wide = np.concatenate([x, [-5.0, 5.0]]).astype(np.float32)  # and two points outside
    out = np.asarray(handlers.substitute(handlers.seed(model, 0), sites)(wide))[:, 0]
    # the coefficients: second differences equal delta, plus the unpenalized linear trend
    d2 = np.diff(np.eye(k), n=2, axis=0)
    beta = np.linalg.lstsq(d2, delta[:, 0].astype(np.float64), rcond=None)[0]
    beta = beta + 0.4 * np.linspace(-1, 1, k)
    basis = BSpline.design_matrix(np.clip(wide, -3.0, 3.0), knots, 3).toarray()
    anchor = BSpline.design_matrix(np.array([0.5]), knots, 3).toarray()
    assert_allclose(out, (basis - anchor) @ beta, atol=2e-5)
    assert out[-2] == pytest.approx(out[0], abs=1e-6) and out[-1] == pytest.approx(out[40])
    ll, _ = log_density(lambda: model(x), (), {}, sites)
    ref = (
        stats.halfnorm.logpdf(0.7)
        + stats.norm(0, 0.7).logpdf(delta).sum()
        + stats.norm(0, 2.0).logpdf(0.4)
    )
    assert_allclose(ll, ref, rtol=1e-5)


def test_pspline_rejects_bad_input():
    x = np.linspace(0.0, 1.0, 10)
    knots = make_knots(x, 3)
    with pytest.raises(ValueError, match="degree"):
        PSplineLayer(degree=0)
    with pytest.raises(ValueError, match="clamped"):
        handlers.seed(lambda: PSplineLayer()("s", x, np.sort(np.random.rand(9))), 0)()
    with pytest.raises(ValueError, match="reference"):
        handlers.seed(lambda: PSplineLayer()("s", x, knots, reference=2.0), 0)()
    with pytest.raises(ValueError, match="PSplineLayer_s_x: x must be finite"):
        handlers.seed(lambda: PSplineLayer()("s", np.array([0.1, np.nan]), knots), 0)()


def pspline_curve(x, knots):
    return InterceptLayer()("b") + PSplineLayer()("s", x, knots)


def pspline_model(x, knots, y=None):
    return gaussian_link(pspline_curve(x, knots), y)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["nuts", "svi"])
def test_pspline_recovers_a_smooth_curve(rng, method):
    x = rng.uniform(-3, 3, 200).astype(np.float32)
    y = (np.sin(x) + rng.normal(0, 0.3, x.size)).astype(np.float32)
    knots = make_knots(x, 8)
    if method == "nuts":
        draws = nuts_draws(lambda x, y: pspline_model(x, knots, y), (x, y), 250, 250)
    else:
        draws = svi_draws(lambda x, y: pspline_model(x, knots, y), (x, y), steps=4000)
    grid = np.linspace(-2.8, 2.8, 30).astype(np.float32)
    curves = jax.vmap(
        lambda d: handlers.substitute(handlers.seed(pspline_curve, 0), d)(grid, knots)
    )({k: v for k, v in draws.items() if k != "sigma"})
    curves = np.asarray(curves)[:, :, 0]
    lo, hi = np.quantile(curves, [0.05, 0.95], axis=0)
    assert np.sqrt(np.mean((curves.mean(0) - np.sin(grid)) ** 2)) < 0.1
    assert np.mean((lo <= np.sin(grid)) & (np.sin(grid) <= hi)) >= 0.8


# ------------------------------------------------------------ Hilbert-space Gaussian process


@pytest.mark.parametrize(("c", "m", "ell"), [(2.0, 40, 0.3), (4.0, 80, 1.0)])
def test_hsgp_covariance_is_the_squared_exponential_kernel(c, m, ell):
    x = np.linspace(-1.0, 1.0, 9).astype(np.float32)
    phi, root = HSGPLayer.basis(x, hsgp_L(x, c), m)
    density = 1.3**2 * np.sqrt(2 * np.pi) * ell * np.exp(-0.5 * (ell * np.asarray(root)) ** 2)
    approx = np.asarray(phi) @ np.diag(density) @ np.asarray(phi).T
    exact = 1.3**2 * np.exp(-(np.subtract.outer(x, x) ** 2) / (2 * ell**2))
    assert np.abs(approx - exact).max() < 1e-4


def test_hsgp_output_and_density_match_brute_force(rng):
    import numpyro.distributions as dist

    x = np.linspace(-2.0, 2.0, 7).astype(np.float32)
    L, m = 3.0, 6
    beta = rng.normal(size=(m, 1)).astype(np.float32)
    sites = {
        "HSGPLayer_g_lengthscale": np.float32(0.8),
        "HSGPLayer_g_sigma": np.float32(1.5),
        "HSGPLayer_g_beta": beta,
    }

    def model():
        return HSGPLayer()("g", x, L, m)

    out = np.asarray(handlers.substitute(handlers.seed(model, 0), sites)())[:, 0]
    expected = np.zeros_like(x, dtype=np.float64)
    for j in range(1, m + 1):
        root = j * np.pi / (2 * L)
        spd = 1.5**2 * np.sqrt(2 * np.pi) * 0.8 * np.exp(-0.5 * (0.8 * root) ** 2)
        expected += np.sin(root * (x + L)) / np.sqrt(L) * np.sqrt(spd) * beta[j - 1, 0]
    assert_allclose(out, expected, rtol=1e-4, atol=1e-6)
    ll, _ = log_density(model, (), {}, sites)
    ref = (
        stats.invgamma(5.0, scale=5.0).logpdf(0.8)
        + stats.halfnorm.logpdf(1.5)
        + stats.norm.logpdf(beta).sum()
    )
    assert_allclose(ll, ref, rtol=1e-5)
    with pytest.raises(ValueError, match=r"HSGPLayer_g_x: x reaches outside \[-L, L\]"):
        handlers.seed(lambda: HSGPLayer()("g", x, 1.0, m), 0)()
    with pytest.raises(ValueError, match="positive scalar"):
        HSGPLayer(sigma_dist=dist.Normal, sigma_kwargs={"loc": 0.0, "scale": 1.0})
    with pytest.raises(ValueError, match="c must be > 1"):
        hsgp_L(x, 1.0)


def hsgp_curve(x, L):
    return InterceptLayer()("b") + HSGPLayer()("g", x, L, 24)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["nuts", "svi"])
def test_hsgp_recovers_a_smooth_curve(rng, method):
    x = rng.uniform(-3, 3, 200).astype(np.float32)
    y = (np.sin(x) + rng.normal(0, 0.3, x.size)).astype(np.float32)
    L = hsgp_L(x)

    def model(x, y=None):
        return gaussian_link(hsgp_curve(x, L), y)

    if method == "nuts":
        draws = nuts_draws(model, (x, y), 250, 250)
    else:  # AutoNormal starts the lengthscale anywhere in e^[-2, 2]: 3,000 steps at 0.03
        draws = svi_draws(model, (x, y), steps=4000, lr=0.05)  # left it at 4 (truth ~1.7)
    grid = np.linspace(-2.8, 2.8, 30).astype(np.float32)
    curves = jax.vmap(lambda d: handlers.substitute(handlers.seed(hsgp_curve, 0), d)(grid, L))(
        {k: v for k, v in draws.items() if k != "sigma"}
    )
    curves = np.asarray(curves)[:, :, 0]
    lo, hi = np.quantile(curves, [0.05, 0.95], axis=0)
    assert np.sqrt(np.mean((curves.mean(0) - np.sin(grid)) ** 2)) < 0.1
    assert np.mean((lo <= np.sin(grid)) & (np.sin(grid) <= hi)) >= 0.8
