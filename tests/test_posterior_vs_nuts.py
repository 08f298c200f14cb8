"""The service's posterior against exact inference: NUTS on the same model and priors, on
simulated crossed random effects with gaussian, logit and poisson likelihoods.

For the structured guide and the conditional one: every scale's posterior mean within 5% of
NUTS's and every global site's posterior sd within 25% of NUTS's (the structured guide misses
the weakly identified logit scale's sd; the conditional guide holds it). The mean-field guide
is checked against the same reference to show what it misses: its intercept sd is several
times too small.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from numpyro.infer import MCMC, NUTS

from blayers.layers import InterceptLayer, RandomEffectsLayer
from blayers.links import get_link
from tests.service_helpers import crossed_config
from train import loop, synth
from train.summary import summarize

LEVELS, SDS = (20, 50, 100), (0.5, 0.7, 0.4)
INTERCEPT = {"gaussian": 2.0, "logit": -0.5, "poisson": 1.0}
ROWS = 4000


def simulate(link: str, path) -> dict[str, np.ndarray]:
    return synth.crossed_effects(
        path,
        ROWS,
        dict(zip("abc", LEVELS, strict=True)),
        dict(zip("abc", SDS, strict=True)),
        link,
        INTERCEPT[link],
        seed=1,
    )


def nuts(link: str, cols: dict[str, np.ndarray]) -> dict[str, tuple[float, float]]:
    link_fn = get_link(link)

    def model(a, b, c, y):
        mu = (
            InterceptLayer()("bias")
            + RandomEffectsLayer()("a", a, LEVELS[0] + 1)  # + the service's OOV row
            + RandomEffectsLayer()("b", b, LEVELS[1] + 1)
            + RandomEffectsLayer()("c", c, LEVELS[2] + 1)
        )
        return link_fn(mu, y)

    # 600 draws: the Monte Carlo error of a mean or sd is a few percent, well inside the
    # tolerances below
    mcmc = MCMC(NUTS(model), num_warmup=300, num_samples=600, progress_bar=False)
    mcmc.run(jax.random.PRNGKey(0), cols["a"], cols["b"], cols["c"], cols["y"])
    draws = mcmc.get_samples()
    return {
        k: (float(np.mean(v)), float(np.std(v)))
        for k, v in draws.items()
        if k.endswith("_scale") or k == "InterceptLayer_bias_beta" or k == "sigma"
    }


def service(link: str, data, tmp_path, guide: str) -> dict[str, tuple[float, float]]:
    cfg = crossed_config(
        data, tmp_path / f"{link}-{guide}", list("abc"), link, **{"optim.guide": guide}
    )
    loop.train(cfg, log=lambda _: None)
    return {r["site"]: (r["mean"], r["std"]) for r in summarize(cfg.run_dir, draws=4000)}


@pytest.fixture(scope="module", params=["gaussian", "logit", "poisson"])
def case(request, tmp_path_factory):
    link = request.param
    tmp = tmp_path_factory.mktemp(link)
    cols = simulate(link, tmp / "data.parquet")
    return link, tmp / "data.parquet", nuts(link, cols), tmp


@pytest.fixture(scope="module")
def structured(case):
    link, data, exact, tmp = case
    return link, service(link, data, tmp, "structured"), exact


@pytest.mark.slow
def test_structured_guide_scale_means_match_nuts(structured):
    _, got, exact = structured
    for site, (mean, _) in exact.items():
        if site.endswith("_scale"):
            assert abs(got[site][0] / mean - 1) < 0.05, (site, got[site], exact[site])


@pytest.mark.slow
def test_structured_guide_global_sds_match_nuts(structured, request):
    link, got, exact = structured
    if link == "logit":
        # measured: the 100-level scale's sd is 0.43x NUTS's (40 binary rows per level: weakly
        # identified rows whose spread follows the scale, which a row mean linear in the
        # globals cannot follow); the mean-field guide gives 0.35x
        request.applymarker(pytest.mark.xfail(strict=True, reason="weakly identified scale"))
    for site, (_, sd) in exact.items():
        assert abs(got[site][1] / sd - 1) < 0.25, (site, got[site], exact[site])


@pytest.fixture(scope="module")
def conditional(case):
    link, data, exact, tmp = case
    return link, service(link, data, tmp, "conditional"), exact


@pytest.mark.slow
def test_conditional_guide_scale_means_match_nuts(conditional):
    _, got, exact = conditional
    for site, (mean, _) in exact.items():
        if site.endswith("_scale"):
            assert abs(got[site][0] / mean - 1) < 0.05, (site, got[site], exact[site])


@pytest.mark.slow
def test_conditional_guide_global_sds_match_nuts(conditional):
    """Every link, the weakly identified logit scale included: its rows' means and spreads
    follow the scale's draw, as the exact posterior's do."""
    _, got, exact = conditional
    for site, (_, sd) in exact.items():
        assert abs(got[site][1] / sd - 1) < 0.25, (site, got[site], exact[site])


@pytest.mark.slow
def test_mean_field_guide_misses_the_intercepts_uncertainty(case):
    link, data, exact, tmp = case
    got = service(link, data, tmp, "mean_field")
    site = "InterceptLayer_bias_beta"
    assert got[site][1] < 0.5 * exact[site][1], (got[site], exact[site])
