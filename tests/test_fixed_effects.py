"""FixedEffectsLayer (upstream 0.3.7's name, signature and site): output and density against
brute force, recovery of known effects under SVI and NUTS, and the service's dense and
row-sparse paths, through the command lines."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from numpy.testing import assert_allclose
from numpyro import handlers
from numpyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
from numpyro.infer.util import log_density
from scipy import stats

from blayers.layers import FixedEffectsLayer
from blayers.links import gaussian_link
from tests.service_helpers import load_params, run_cli, small_config
from train import setup as train_setup
from train.plan import ShardingPlan

EFFECTS = np.array([-1.0, -0.5, 0.0, 0.5, 1.0, 1.5])
SITE = "FixedEffectsLayer_g_theta"


def test_output_and_density_match_brute_force(rng):
    theta = rng.normal(size=(6, 1)).astype(np.float32)
    ids = np.array([0, 3, 3, 5, 1])

    def model():
        return FixedEffectsLayer(coef_kwargs={"loc": 0.5, "scale": 2.0})("g", jnp.asarray(ids), 6)

    out = handlers.substitute(handlers.seed(model, 0), {SITE: theta})()
    assert out.shape == (5, 1)
    assert_allclose(out, theta[ids])
    ll, _ = log_density(model, (), {}, {SITE: theta})
    assert_allclose(ll, stats.norm(0.5, 2.0).logpdf(theta).sum(), rtol=1e-5)
    with pytest.raises(ValueError, match="FixedEffectsLayer_g_x"):
        handlers.seed(lambda: FixedEffectsLayer()("g", jnp.array([0, 6]), 6), 0)()


def simulate(rng, n=1800):
    g = rng.integers(0, len(EFFECTS), n)
    y = EFFECTS[g] + rng.normal(0, 0.5, n)
    return g, y.astype(np.float32)


def model(g, y=None):
    return gaussian_link(FixedEffectsLayer()("g", g, len(EFFECTS)), y)


def assert_recovered(draws):
    theta = np.asarray(draws[SITE])[:, :, 0]
    mean, sd = theta.mean(0), theta.std(0)
    assert np.all(np.abs(mean - EFFECTS) < 3.5 * sd), (mean, sd)
    assert np.all(sd < 0.05)  # 300 rows per group at noise 0.5: sd ≈ 0.03
    sigma = np.asarray(draws["sigma"])
    assert abs(sigma.mean() - 0.5) < 0.03


def test_recovery_under_nuts(rng):
    g, y = simulate(rng)
    mcmc = MCMC(NUTS(model), num_warmup=300, num_samples=400, progress_bar=False)
    mcmc.run(jax.random.PRNGKey(0), g, y)
    assert_recovered(mcmc.get_samples())


def test_recovery_under_svi(rng):
    g, y = simulate(rng)
    guide = AutoNormal(model)
    optim = optax.adam(optax.cosine_decay_schedule(0.05, 3000, 0.05))
    result = SVI(model, guide, optim, Trace_ELBO()).run(
        jax.random.PRNGKey(0), 3000, g, y, progress_bar=False
    )
    draws = guide.sample_posterior(jax.random.PRNGKey(1), result.params, sample_shape=(2000,))
    assert_recovered(draws)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    rng = np.random.default_rng(5)
    g, y = simulate(rng, 2400)
    path = tmp_path_factory.mktemp("fe") / "train.parquet"
    pq.write_table(pa.table({"g": g, "x1": rng.normal(size=len(g)), "y": y}), path)
    return path


TERMS = "[{layer: FixedEffectsLayer, name: g, inputs: [g], sparse: %s}]"


def test_dense_and_row_sparse_reach_the_same_posterior_through_the_cli(dataset, tmp_path):
    runs = {}
    for sparse in ("false", "true"):
        run = tmp_path / sparse
        proc = run_cli(
            "train",
            f"run_dir={run}",
            f"data.path={dataset}",
            "data.numeric=[]",
            "data.categorical=[g]",
            "data.batch_size=240",
            "model.link=gaussian",
            f"model.terms={TERMS % sparse}",
            "train.steps=1500",
            "checkpoint.every=1500",
            "train.progress=false",
            "optim.lr=0.05",
            "mesh.data=1",
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[sparse] = load_params(run)
    # rows follow the vocabulary's order; the scores below map raw ids to effects
    dense, sparse = (runs[k][f"{SITE}.loc"][: len(EFFECTS), 0] for k in ("false", "true"))
    assert_allclose(np.sort(dense), EFFECTS, atol=0.06)
    assert_allclose(sparse, dense, atol=0.05)
    summary = run_cli("summary", f"run_dir={tmp_path / 'true'}")
    assert summary.returncode == 0 and "sigma" in summary.stdout, summary.stderr[-2000:]
    scores = tmp_path / "scores"
    proc = run_cli(
        "score", f"run_dir={tmp_path / 'true'}", f"data.path={dataset}", f"output={scores}"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pq.read_table(sorted(scores.glob("part-*.parquet"))[0])
    g = pq.read_table(dataset)["g"].to_numpy()[: table.num_rows]
    assert_allclose(table["mean"].to_numpy(), EFFECTS[g], atol=0.08)


@pytest.mark.parametrize("sparse", [False, True])
def test_the_table_shards_over_the_model_axis(dataset, tmp_path, sparse):
    cfg = small_config(
        dataset,
        tmp_path / "run",
        **{
            "data.numeric": [],
            "data.categorical": ["g"],
            "data.batch_size": 64,
            "model.link": "gaussian",
            "model.terms": [
                {"layer": "FixedEffectsLayer", "name": "g", "inputs": ["g"], "sparse": sparse}
            ],
            "mesh.data": 4,
            "mesh.model": 2,
        },
    )
    setup = train_setup.make_setup(cfg, {"g": len(EFFECTS)}, 2400, ShardingPlan.from_config(cfg))
    assert (SITE in setup.sparse) == sparse  # the row-sparse step trains it when asked
    for leaf in jax.tree.leaves(setup.shardings.params[SITE]):
        assert leaf.spec[0] == "model", leaf.spec
    # the table is padded to the model axis: its rows split evenly
    assert setup.sites[SITE].shape[0] % 2 == 0
