"""One posterior draw of the model on a batch's rows (train.posterior): the prior for rows
unseen in training, and rows asked for beside the batch's drawn once."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from numpy.testing import assert_allclose, assert_array_equal

from train import posterior


def test_a_normal_prior_reuses_the_guide_noise_and_others_sample():
    import numpyro.distributions as dist

    noise = jax.random.normal(jax.random.PRNGKey(1), (500, 3))
    key = jax.random.PRNGKey(2)
    normal = dist.Normal(0.5, 2.0).expand([500, 3]).to_event(2)
    assert_allclose(posterior.prior_draw(normal, noise, key), 0.5 + 2.0 * noise, rtol=1e-6)
    laplace = dist.Laplace(0.0, 2.0).expand([500, 3]).to_event(2)
    assert_allclose(posterior.prior_draw(laplace, noise, key), laplace.sample(key))


class _Term:
    table_site = "T_theta"

    def rows(self, categorical):
        return categorical[:, :1] + 10


def test_rows_asked_for_beside_the_batch_are_drawn_once_and_found():
    categorical = jnp.asarray([[3], [1], [3], [0]])
    seen = {"T_theta": jnp.asarray(np.arange(20) < 12)}
    plain = posterior.gather({"t": _Term()}, categorical, seen)
    got = posterior.gather({"t": _Term()}, categorical, seen, {"T_theta": [13, 11, 19]})
    u = np.asarray(got.uniq["T_theta"])
    # each example still reads its own row; each row asked for is where picked says
    local = got.local["t"]  # with the gathered table's length: longer than the batch's rows
    assert local.rows == u.size
    assert_array_equal(u[np.asarray(local.local)][:, 0], [13, 11, 13, 10])
    assert_array_equal(u[np.asarray(got.picked["T_theta"])], [13, 11, 19])
    distinct = u[: len(set(u.tolist()))]
    assert len(distinct) == len(set(distinct.tolist()))  # one draw per row
    assert_array_equal(np.asarray(got.unseen["T_theta"])[u == 19], [True])
    assert plain.picked == {}
    assert_array_equal(np.asarray(plain.uniq["T_theta"])[:3], [10, 11, 13])


def test_normal_from_bits_is_jax_random_normal_on_the_same_bits():
    key = jax.random.PRNGKey(5)
    bits = jax.random.bits(key, (20_000,), dtype=jnp.uint32)
    assert_array_equal(posterior._normal_from_bits(bits), jax.random.normal(key, (20_000,)))


def test_a_rows_noise_depends_on_its_id_alone_and_is_standard_normal():
    key = jax.random.PRNGKey(3)
    whole = np.asarray(posterior.row_noise(key, jnp.arange(60), (4, 1), 7))
    assert whole.shape == (7, 60, 4, 1)
    picked = jnp.asarray([59, 3, 3, 0, 17])  # any order, repeats, a different length
    assert_array_equal(posterior.row_noise(key, picked, (4, 1), 7), whole[:, np.asarray(picked)])
    assert_array_equal(posterior.row_noise(key, picked, (4, 1), 5), whole[:5, np.asarray(picked)])
    other = np.asarray(posterior.row_noise(jax.random.PRNGKey(4), jnp.arange(60), (4, 1), 7))
    assert np.abs(other - whole).min() > 0

    from scipy import stats

    x = np.asarray(posterior.row_noise(key, jnp.arange(30_000), (3,), 11))  # 990,000 draws
    assert stats.kstest(x.ravel(), "norm").pvalue > 1e-3
    # no dependence between neighbouring draws, rows or elements (each |r| ~ 1e-3 if none)
    for a, b in ((x[:-1], x[1:]), (x[:, :-1], x[:, 1:]), (x[..., :-1], x[..., 1:])):
        assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.01
