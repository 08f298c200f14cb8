"""train/step.py: the jitted step is one ELBO gradient step written out by hand, with the
step key ``fold_in(rng, step)``; the row-sparse step is chosen by the terms and fed by the
host's deduplication; a non-finite step changes nothing under ``skip``."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from blayers import guides
from tests.service_helpers import quiet_config
from train.plan import ShardingPlan
from train.setup import fresh_state, make_setup
from train.step import make_train_step

TERMS = [
    {"layer": "InterceptLayer", "name": "bias"},
    {"layer": "AdaptiveLayer", "name": "w", "inputs": ["x"]},
    {"layer": "RandomEffectsLayer", "name": "user", "inputs": ["user"]},
]
B, USERS = 64, 20


def _setup(tmp_path, sparse: bool, guide: str = "mean_field"):
    terms = [dict(t) for t in TERMS]
    terms[2]["sparse"] = sparse
    cfg = quiet_config(
        tmp_path / "none.parquet",
        tmp_path / "run",
        {
            "data.numeric": ["x"],
            "data.categorical": ["user"],
            "data.batch_size": B,
            "model.link": "gaussian",
            "model.terms": terms,
            "optim.guide": guide,
            "mesh.data": 1,
        },
    )
    return make_setup(cfg, {"user": USERS}, 1_000, ShardingPlan.from_config(cfg))


def _batch(seed: int = 0, target_nan: bool = False):
    rng = np.random.default_rng(seed)
    y = rng.normal(size=B).astype(np.float32)
    if target_nan:
        y[3] = np.nan
    return {
        "numeric": rng.normal(size=(B, 1)).astype(np.float32),
        "categorical": rng.integers(0, USERS, (B, 1)).astype(np.int32),
        "target": y,
    }


def test_the_dense_step_is_one_elbo_gradient_step_by_hand(tmp_path):
    setup = _setup(tmp_path, sparse=False)
    step = make_train_step(setup, {"user": np.ones(USERS, np.int64)})
    assert not setup.sparse and step.prepare(_batch()) is not None
    start = fresh_state(setup)
    params = jax.device_get(start.params)
    opt_state = jax.device_get(start.opt_state)
    rng, k = jax.device_get(start.rng), int(start.step)
    batch = _batch()

    def loss(p):
        key = jax.random.fold_in(rng, k)
        return guides.elbo_loss(
            key, p, setup.guide, setup.model, batch, num_data=1_000, antithetic=setup.antithetic
        )

    value, grads = jax.value_and_grad(loss)(params)
    updates, _ = setup.optimizer.update(grads, opt_state, params)
    want = optax.apply_updates(params, updates)

    state, got = step(start, step.prepare(batch))
    assert int(state.step) == k + 1
    np.testing.assert_allclose(float(got), float(value), rtol=1e-5)
    for site, fields in want.items():
        for name, v in fields.items():
            np.testing.assert_allclose(state.params[site][name], v, rtol=1e-5, atol=1e-6)


def test_a_sparse_table_picks_the_row_sparse_step_fed_by_host_deduplication(tmp_path):
    setup = _setup(tmp_path, sparse=True)
    assert set(setup.sparse) == {"RandomEffectsLayer_user_theta"}
    step = make_train_step(setup, {"user": np.ones(USERS, np.int64)})
    batch = step.prepare(_batch())
    site = "RandomEffectsLayer_user_theta"
    assert {"uniq:" + site, "count:" + site, "local:" + site} <= set(batch)
    state, loss = step(fresh_state(setup), batch)
    assert int(state.step) == 1 and np.isfinite(float(loss))


@pytest.mark.parametrize("sparse", [False, True])
def test_a_non_finite_step_changes_nothing_under_skip(tmp_path, sparse):
    setup = _setup(tmp_path, sparse=sparse)
    step = make_train_step(setup, {"user": np.ones(USERS, np.int64)}, skip_non_finite=True)
    start = fresh_state(setup)
    before = jax.device_get((start.params, start.opt_state))
    state, loss = step(start, step.prepare(_batch(target_nan=True)))
    assert np.isnan(float(loss)) and int(state.step) == 1
    after = jax.device_get((state.params, state.opt_state))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(a, b)
