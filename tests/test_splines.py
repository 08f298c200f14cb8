"""B-spline bases against scipy's design matrix, their partition of unity, and a smooth
function recovered through a linear layer over the basis."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
from scipy.interpolate import BSpline

from blayers.layers import AdaptiveLayer, InterceptLayer
from blayers.links import gaussian_link
from blayers.splines import bspline_basis, make_knots


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_basis_matches_scipy(rng, degree):
    x = rng.gamma(2.0, 1.0, 300)
    knots = make_knots(x, num_knots=6, degree=degree)
    assert knots.shape == (6 + 2 * (degree + 1),)
    got = np.asarray(bspline_basis(x, knots, degree))
    assert got.shape == (300, 6 + degree + 1)
    inside = x < x.max()  # scipy leaves the right end to extrapolation
    ref = BSpline.design_matrix(x[inside], np.asarray(knots, np.float64), degree).toarray()
    assert_allclose(got[inside], ref, atol=1e-5)
    end = got[np.argmax(x)]
    assert end[-1] == 1.0 and end[:-1].sum() == 0.0


BASIS = jax.jit(bspline_basis, static_argnums=2)


@settings(max_examples=15, deadline=None)
@given(
    st.lists(st.floats(-50, 50, allow_nan=False), min_size=3, max_size=40, unique=True),
    st.integers(0, 5),
    st.integers(1, 3),
)
# knots 1e-38 apart: a ratio outside its function's support overflowed to inf, times 0 NaN
@example(xs=[0.0, 1.1754943508222875e-38, -4.0], num_knots=1, degree=1)
def test_basis_is_a_partition_of_unity(xs, num_knots, degree):
    x = np.resize(np.asarray(xs), 40)  # one shape, so each (knots, degree) compiles once
    knots = make_knots(x, num_knots, degree)
    basis = np.asarray(BASIS(x, knots, degree))
    assert (basis >= -1e-6).all()
    assert_allclose(basis.sum(1), 1.0, atol=1e-4)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="make_knots: x"):
        make_knots(np.array([1.0, np.nan]), 3)
    with pytest.raises(ValueError, match="num_knots"):
        make_knots(np.arange(5.0), -1)


def test_a_smooth_function_is_recovered_through_the_basis(rng):
    x = rng.uniform(-3, 3, 1500).astype(np.float32)
    f = np.sin(x) + 0.3 * x
    y = (f + rng.normal(0, 0.2, len(x))).astype(np.float32)
    knots = make_knots(x, num_knots=8)
    basis = bspline_basis(x, knots)  # the design matrix, once

    def model(basis, y=None):
        eta = InterceptLayer()("b") + AdaptiveLayer()("f", basis)
        return gaussian_link(eta, y)

    guide = AutoNormal(model)
    optim = optax.adam(optax.cosine_decay_schedule(0.05, 2000, 0.05))
    result = SVI(model, guide, optim, Trace_ELBO()).run(
        jax.random.PRNGKey(0), 2000, basis, y, progress_bar=False
    )
    med = guide.median(result.params)
    grid = np.linspace(-2.8, 2.8, 50).astype(np.float32)
    fit = (
        med["InterceptLayer_b_beta"][0, 0]
        + np.asarray(bspline_basis(grid, knots)) @ np.asarray(med["AdaptiveLayer_f_beta"])[:, 0]
    )
    assert np.abs(fit - (np.sin(grid) + 0.3 * grid)).max() < 0.12
