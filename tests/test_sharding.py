"""Logical axes → NamedShardings on 8 fake CPU devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal

from blayers import sharding as S
from blayers.layers import (
    AdaptiveLayer,
    CategoricalFMLayer,
    EmbeddingLayer,
    FMLayer,
    InterceptLayer,
    RandomEffectsLayer,
)
from blayers.links import gaussian_link

C, M, B = 64, 4, 16
RULES = {"categories": "model"}


def model(x, ids, pair, y=None):
    mu = (
        InterceptLayer()("bias")
        + AdaptiveLayer()("dense", x)
        + EmbeddingLayer()("user", ids, C, M).sum(axis=1, keepdims=True)
        + RandomEffectsLayer()("item", ids, C)
        + CategoricalFMLayer()("fm", pair, [C, C], 2)
    )
    return gaussian_link(mu, y, num_data=10 * B)


@pytest.fixture
def batch(rng):
    x = rng.normal(size=(B, 3)).astype(np.float32)
    ids = rng.integers(0, C, size=B).astype(np.int32)
    pair = rng.integers(0, C, size=(B, 2)).astype(np.int32)
    return x, ids, pair, rng.normal(size=B).astype(np.float32)


def test_eight_fake_devices():
    assert jax.device_count() == 8


def test_describe_model_reports_shapes_and_axes(batch):
    sites = S.describe_model(model, *batch)
    assert "obs" not in sites
    assert sites["EmbeddingLayer_user_theta"].shape == (C, M)
    assert sites["EmbeddingLayer_user_theta"].logical_axes == ("categories", "embed")
    assert sites["RandomEffectsLayer_item_theta"].logical_axes == ("categories",)
    assert sites["CategoricalFMLayer_fm_theta"].shape == (2 * C, 2, 1)
    assert sites["AdaptiveLayer_dense_beta"].logical_axes == ("features", "units")
    assert sites["AdaptiveLayer_dense_scale"].logical_axes == ()
    assert sites["sigma"].logical_axes is None  # a link's global: no axes, replicated


def test_rules_map_axes_to_specs():
    mesh = S.make_mesh({"data": 2, "model": 4})
    spec = S.logical_to_spec(("categories", "embed"), (C, M), mesh, RULES)
    assert spec == PartitionSpec("model")
    both = S.logical_to_spec(
        ("categories", "embed"), (C, M), mesh, [("categories", "model"), ("embed", "data")]
    )
    assert both == PartitionSpec("model", "data")
    # the first rule whose mesh axes are still free wins
    reuse = S.logical_to_spec(
        ("categories", "embed"),
        (C, 8),
        mesh,
        [("categories", "model"), ("embed", "model"), ("embed", "data")],
    )
    assert reuse == PartitionSpec("model", "data")
    multi = S.logical_to_spec(("categories",), (C,), mesh, {"categories": ("data", "model")})
    assert multi == PartitionSpec(("data", "model"))
    assert S.logical_to_spec(None, (3,), mesh, RULES) == PartitionSpec()


def test_autonormal_params_land_row_sharded_globals_replicated(batch):
    mesh = S.make_mesh({"data": 1, "model": -1})
    guide = AutoNormal(model)
    svi = SVI(model, guide, optax.adam(1e-2), Trace_ELBO())
    state = svi.init(jax.random.PRNGKey(0), *batch)
    params = svi.get_params(state)
    shardings = S.guide_param_shardings(model, batch, mesh, RULES, params)

    for suffix in ("auto_loc", "auto_scale"):
        assert shardings[f"EmbeddingLayer_user_theta_{suffix}"].spec == PartitionSpec("model")
        assert shardings[f"RandomEffectsLayer_item_theta_{suffix}"].spec == PartitionSpec("model")
        assert shardings[f"CategoricalFMLayer_fm_theta_{suffix}"].spec == PartitionSpec("model")
        assert shardings[f"EmbeddingLayer_user_scale_{suffix}"].spec == PartitionSpec()
        assert shardings[f"AdaptiveLayer_dense_beta_{suffix}"].spec == PartitionSpec()
        assert shardings[f"sigma_{suffix}"].spec == PartitionSpec()

    placed = {k: jax.device_put(v, shardings[k]) for k, v in params.items()}
    S.assert_sharded(placed, shardings)
    table = placed["EmbeddingLayer_user_theta_auto_loc"]
    assert {s.data.shape for s in table.addressable_shards} == {(C // 8, M)}
    assert (
        S.bytes_per_device((C, M), np.float32, shardings["EmbeddingLayer_user_theta_auto_loc"])
        == C * M * 4 // 8
    )
    assert placed["sigma_auto_loc"].sharding.is_fully_replicated

    # the sharded params run the model and give the same loss as unsharded ones
    loss = Trace_ELBO().loss
    key = jax.random.PRNGKey(3)
    ref = loss(key, params, model, guide, *batch)
    got = jax.jit(lambda p: loss(key, p, model, guide, *batch))(placed)
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_non_dividing_table_is_an_error_with_the_fix():
    mesh = S.make_mesh({"model": 8})
    with pytest.raises(S.ShardingError, match=r"EmbeddingLayer_u_theta.*size 30.*pad it to 32"):
        S.logical_to_spec(
            ("categories", "embed"), (30, 4), mesh, RULES, what="EmbeddingLayer_u_theta"
        )
    assert S.pad_to_multiple(30, 8) == 32 and S.pad_to_multiple(32, 8) == 32


def test_assert_sharded_is_loud_on_replicated_table():
    mesh = S.make_mesh({"model": 8})
    plan = {"t": NamedSharding(mesh, PartitionSpec("model"))}
    replicated = {"t": jax.device_put(jnp.zeros((C, M)), NamedSharding(mesh, PartitionSpec()))}
    with pytest.raises(S.ShardingError, match=r"t: planned.*fully replicated"):
        S.assert_sharded(replicated, plan)


def test_packed_guide_cannot_follow_site_axes(batch):
    sites = S.describe_model(model, *batch)
    mesh = S.make_mesh({"model": 8})
    with pytest.raises(S.ShardingError, match="per-site mean-field"):
        S.guide_param_specs(sites, {"EmbeddingLayer_user_theta_loc": (C * M,)}, mesh, RULES)


def test_make_mesh_errors():
    with pytest.raises(S.ShardingError, match="needs 6 devices but 8"):
        S.make_mesh({"data": 2, "model": 3})
    with pytest.raises(S.ShardingError, match="at most one axis may be -1"):
        S.make_mesh({"data": -1, "model": -1})
    mesh = S.make_mesh({"data": -1, "model": 2})
    assert dict(mesh.shape) == {"data": 4, "model": 2}


def test_fm_feature_axis_can_be_sharded():
    mesh = S.make_mesh({"model": 8})
    sites = S.describe_model(lambda x: FMLayer()("fm", x, 4), jnp.ones((2, 16)))
    info = sites["FMLayer_fm_theta"]
    assert info.logical_axes == ("features", "rank", "units")
    spec = S.logical_to_spec(info.logical_axes, info.shape, mesh, {"features": "model"})
    assert spec == PartitionSpec("model")
