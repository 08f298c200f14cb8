"""A model written down (blayers.latex, train.describe): every prior as the model draws it,
the hierarchy by symbol, and the likelihood of every link. The service's dry run and report
are tested with them (tests/test_loop.py, tests/test_report.py)."""

from __future__ import annotations

import jax.numpy as jnp
import numpyro.distributions as dists
import pytest

from blayers import links
from blayers.latex import LatexStr, model_statements, model_to_latex, model_to_text
from blayers.layers import (
    AdaptiveLayer,
    CategoricalFMLayer,
    FixedPriorLayer,
    HorseshoeLayer,
    InterceptLayer,
    MixtureLayer,
    RandomEffectsLayer,
)

X = jnp.ones((5, 3))
USER = jnp.arange(5)


def hierarchical(x, user, y=None):
    mu = (
        InterceptLayer()("bias")
        + AdaptiveLayer(scale_kwargs={"scale": 2.5})("x", x)
        + RandomEffectsLayer()("user", user, 10)
        + FixedPriorLayer(coef_dist=dists.StudentT, coef_kwargs={"df": 3.0, "loc": 0.5})("t", x)
        + CategoricalFMLayer()("fm", jnp.stack([user, user], 1), [10, 10], 2)
    )
    return links.gaussian_link(mu, y)


def test_each_prior_is_written_as_the_model_draws_it():
    lines = model_to_text(hierarchical, x=X, user=USER).splitlines()
    got = {line.split(" ~ ")[0].strip(): line.split(" ~ ")[1] for line in lines}
    assert got == {
        "β_bias": "Normal(0, 1)",
        "λ_x": "HalfNormal(2.5)",  # the user's own prior scale, not the default
        "β_x": "Normal(0, λ_x)",  # the hierarchy: the scale is the other site's draw
        "λ_user": "HalfNormal(1)",
        "θ_user": "Normal(0, λ_user)",
        "β_t": "StudentT(3, 0.5, 1)",
        "λ_fm": "HalfNormal(1)",
        "θ_fm": "Normal(0, λ_fm)",
        "σ": "Exponential(1)",
        "y_i": "Normal(η_i, σ)",
    }
    # one statement per latent site, in the order the model samples them, then the likelihood
    assert [line.split(" ~ ")[0].strip() for line in lines][:3] == ["β_bias", "λ_x", "β_x"]


def test_a_global_local_scale_is_written_as_the_product_of_its_sites():
    def horseshoe(x, y=None):
        return links.logit_link(HorseshoeLayer()("hs", x), y)

    text = model_to_text(horseshoe, x=X)
    assert "β_hs ~ Normal(0, τ_hs·λ_hs)" in text, text


def test_a_mixture_prior_is_written_with_its_weights_and_components():
    def mixture(x, y=None):
        return links.gaussian_link(MixtureLayer()("m", x), y)

    def fixed(x, y=None):
        return links.gaussian_link(MixtureLayer(weights=[0.3, 0.7])("m", x), y)

    text = model_to_text(mixture, x=X)
    assert "β_m ~ Mixture(softmax(γ_m); Normal(0, 1), Laplace(0, 1))" in text, text
    assert "γ_m ~ Normal(0, 1)" in text
    assert "β_m ~ Mixture((0.3, 0.7); Normal(0, 1), Laplace(0, 1))" in model_to_text(fixed, x=X)


def test_latex_environments_and_notebook_display():
    out = model_to_latex(hierarchical, x=X, user=USER)
    assert isinstance(out, LatexStr)
    assert out.startswith("\\begin{align}") and out.endswith("\\end{align}")
    assert r"\theta_{\mathrm{user}} &\sim \mathrm{Normal}(0, \lambda_{\mathrm{user}})" in out
    assert out._repr_latex_().startswith("$$")
    body = model_to_latex(hierarchical, env="none", x=X, user=USER)
    assert "begin" not in body and body.count("\\\\") == 9  # 10 statements
    assert model_to_latex(hierarchical, env="aligned", x=X, user=USER).startswith(
        "\\begin{aligned}"
    )
    with pytest.raises(ValueError, match="env='table'"):
        model_to_latex(hierarchical, env="table", x=X, user=USER)


def test_a_target_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="without y"):
        model_to_text(hierarchical, x=X, user=USER, y=jnp.zeros(5))


LIKELIHOODS = {
    "gaussian": "Normal(η_i, σ)",
    "lognormal": "LogNormal(η_i, σ)",
    "student_t": "StudentT(4, η_i, σ)",
    "logit": "Bernoulli(logit⁻¹(η_i))",
    "poisson": "Poisson(exp(η_i))",
    "negative_binomial": "NegativeBinomial(mean exp(η_i), φ)",
    "gamma": "Gamma(k, k·exp(−η_i))",
    "exponential": "Exponential(exp(−η_i))",
    "zinb": "ZeroInflated(π, NegativeBinomial(mean exp(η_i), φ))",
    "zip": "ZeroInflated(π, Poisson(exp(η_i)))",
    "ordinal": "OrderedLogistic(η_i, c0 + cumsum(δ))",
    "beta": "Beta(μ_i·φ, (1 − μ_i)·φ), μ_i = logit⁻¹(η_i)",
    "categorical": "Categorical(softmax(η_i))",
}


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_every_link_writes_its_likelihood(name):
    link = links.get_link(name)
    units = 3 if name == "categorical" else 1

    def model():
        eta = jnp.broadcast_to(InterceptLayer()("bias", units=units), (4, units))
        return link(eta, None, **({"num_classes": 4} if name == "ordinal" else {}))

    statements = model_statements(model)
    assert statements[-1].text() == f"y_i ~ {LIKELIHOODS[name]}"
    # every link global appears as its own prior line, before the likelihood
    drawn = [s.symbol[1] for s in statements[:-1]]
    assert len(drawn) == len(set(drawn))
