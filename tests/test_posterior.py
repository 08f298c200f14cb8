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
