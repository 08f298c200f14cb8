"""train/state.py: the schedule and optimizer from config, the row-state layout of a sparse
table and the views of it, and the non-finite check."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from omegaconf import OmegaConf

from blayers import guides
from train.config import OptimConfig
from train.state import (
    COUPLING_STATE,
    ROW_STATE,
    TrainState,
    guide_field,
    guide_rows,
    make_optimizer,
    make_schedule,
    non_finite_sites,
    row_state_fields,
    with_guide_field,
)


def _optim(**values):
    cfg = OmegaConf.structured(OptimConfig)
    for key, value in values.items():
        cfg[key] = value
    return cfg


def test_a_constant_rate_and_a_warmed_up_cosine_to_its_end_factor():
    constant = make_schedule(_optim(lr=0.02, schedule="constant"), 100, lr_scale=0.5)
    assert float(constant(0)) == pytest.approx(0.01) and float(constant(99)) == pytest.approx(0.01)
    cosine = make_schedule(
        _optim(lr=0.1, schedule="cosine", warmup_steps=10, end_lr_factor=0.1), 110
    )
    assert float(cosine(0)) == 0.0 and float(cosine(10)) == pytest.approx(0.1)
    assert float(cosine(60)) == pytest.approx(0.1 * (0.1 + 0.9 * 0.5), rel=1e-5)  # halfway
    assert float(cosine(110)) == pytest.approx(0.01)


def test_the_coupling_of_the_globals_moves_at_its_factor_and_nothing_else_does():
    params = {
        "g": {"loc": jnp.zeros(2), "raw_scale": jnp.zeros(2), guides.COUPLING: jnp.zeros((2, 2))},
        "rows": {"loc": jnp.zeros(3), "raw_scale": jnp.zeros(3), guides.COUPLING: jnp.zeros(3)},
    }
    grads = {s: {f: jnp.ones_like(v) for f, v in p.items()} for s, p in params.items()}
    sgd = make_optimizer(
        _optim(name="sgd", lr=1.0, coupling_lr_factor=0.25), 10, global_sites=frozenset({"g"})
    )
    updates, _ = sgd.update(grads, sgd.init(params), params)
    assert np.all(updates["g"][guides.COUPLING] == -0.25)
    assert np.all(updates["g"]["loc"] == -1.0) and np.all(updates["rows"][guides.COUPLING] == -1.0)
    with pytest.raises(ValueError, match=r"optim\.name='lbfgs'"):
        make_optimizer(_optim(name="lbfgs"), 10)


def test_a_row_state_holds_each_rows_fields_together_and_its_views_read_them():
    fields = row_state_fields("adam")
    assert fields == ("loc", "raw_scale", "m_loc", "v_loc", "m_raw_scale", "v_raw_scale")
    assert row_state_fields("adagrad") == ("loc", "raw_scale", "v_loc", "v_raw_scale")
    state = jnp.arange(4 * 6, dtype=jnp.float32).reshape(4, 6)
    coupling = jnp.arange(4 * 3, dtype=jnp.float32).reshape(4, 3) + 100
    p = {ROW_STATE: state, COUPLING_STATE: coupling}
    rows = guide_rows(p, jnp.asarray([2, 0]))
    np.testing.assert_array_equal(rows["loc"], state[[2, 0], 0])
    np.testing.assert_array_equal(rows["raw_scale"], state[[2, 0], 1])
    np.testing.assert_array_equal(rows[guides.COUPLING], coupling[[2, 0], 0])
    np.testing.assert_array_equal(guide_field(p, "raw_scale"), state[:, 1])
    moved = with_guide_field(p, "loc", jnp.full(4, -1.0))
    np.testing.assert_array_equal(moved[ROW_STATE][:, 0], -1.0)
    np.testing.assert_array_equal(moved[ROW_STATE][:, 1:], state[:, 1:])  # moments kept
    dense = {"loc": jnp.zeros(2), "raw_scale": jnp.ones(2)}
    assert with_guide_field(dense, "loc", jnp.ones(2))["loc"].tolist() == [1.0, 1.0]


def test_non_finite_sites_names_each_bad_site_and_the_optimizer_state():
    params = {"a": {"loc": jnp.zeros(2)}, "b": {"loc": jnp.asarray([0.0, jnp.nan])}}
    opt = optax.adam(0.1).init(params)
    state = TrainState(jnp.zeros((), jnp.int32), params, opt, jnp.zeros(2, jnp.uint32))
    assert non_finite_sites(state) == ["b"]
    bad_opt = jax.tree.map(lambda x: x * jnp.nan, opt)
    assert non_finite_sites(state._replace(opt_state=bad_opt)) == ["b", "optimizer state"]
