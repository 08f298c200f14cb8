"""Each layer's output against a brute-force reference of its documented math."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from blayers import layers as L
from tests.helpers import random_params, run_with, trace_sites

N, D, D2, RANK, UNITS = 7, 4, 3, 2, 2


@pytest.fixture
def xz(rng):
    return (
        rng.normal(size=(N, D)).astype(np.float32),
        rng.normal(size=(N, D2)).astype(np.float32),
    )


def _layer_out(call, *args):
    params = random_params(call, *args)
    return params, np.asarray(run_with(call, params, *args))


def test_adaptive_layer(xz):
    x, _ = xz
    call = lambda x: L.AdaptiveLayer()("a", x, units=UNITS, activation=jnp.tanh)  # noqa: E731
    p, out = _layer_out(call, x)
    assert set(p) == {"AdaptiveLayer_a_scale", "AdaptiveLayer_a_beta"}
    beta = p["AdaptiveLayer_a_beta"]
    assert beta.shape == (D, UNITS)
    ref = np.tanh(
        [[sum(x[n, j] * beta[j, u] for j in range(D)) for u in range(UNITS)] for n in range(N)]
    )
    assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_fixed_prior_and_intercept(xz):
    x, _ = xz
    p, out = _layer_out(lambda x: L.FixedPriorLayer()("f", x, units=UNITS), x)
    assert_allclose(out, x @ p["FixedPriorLayer_f_beta"], rtol=1e-5)
    p, out = _layer_out(lambda: L.InterceptLayer()("b", units=3))
    assert out.shape == (1, 3)
    assert_allclose(out, p["InterceptLayer_b_beta"])


def test_one_dimensional_input_is_a_column(rng):
    x = rng.normal(size=N).astype(np.float32)
    p, out = _layer_out(lambda x: L.AdaptiveLayer()("a", x), x)
    assert out.shape == (N, 1)
    assert_allclose(out[:, 0], x * p["AdaptiveLayer_a_beta"][0, 0], rtol=1e-5)


def test_fm_matches_explicit_pairs(xz):
    x, _ = xz
    p, out = _layer_out(lambda x: L.FMLayer()("fm", x, RANK, units=UNITS), x)
    theta = p["FMLayer_fm_theta"]
    assert theta.shape == (D, RANK, UNITS)
    ref = np.zeros((N, UNITS))
    for n, u in itertools.product(range(N), range(UNITS)):
        for i, j in itertools.combinations(range(D), 2):
            ref[n, u] += theta[i, :, u] @ theta[j, :, u] * x[n, i] * x[n, j]
    assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_fm3_matches_explicit_triples(xz):
    x, _ = xz
    p, out = _layer_out(lambda x: L.FM3Layer()("fm3", x, RANK, units=UNITS), x)
    theta = p["FM3Layer_fm3_theta"]
    assert out.shape == (N, UNITS)
    ref = np.zeros((N, UNITS))
    for n, u in itertools.product(range(N), range(UNITS)):
        for i, j, k in itertools.combinations(range(D), 3):
            ref[n, u] += (
                np.sum(theta[i, :, u] * theta[j, :, u] * theta[k, :, u])
                * x[n, i]
                * x[n, j]
                * x[n, k]
            )
    assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_low_rank_interaction(xz):
    x, z = xz
    p, out = _layer_out(
        lambda x, z: L.LowRankInteractionLayer()("lr", x, z, RANK, units=UNITS), x, z
    )
    assert {"LowRankInteractionLayer_lr_scale1", "LowRankInteractionLayer_lr_scale2"} <= set(p)
    t1, t2 = p["LowRankInteractionLayer_lr_theta1"], p["LowRankInteractionLayer_lr_theta2"]
    ref = np.stack(
        [np.einsum("ni,ij,nj->n", x, t1[:, :, u] @ t2[:, :, u].T, z) for u in range(UNITS)], axis=1
    )
    assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_pairwise_and_interaction(xz):
    x, z = xz
    pairs = np.asarray(L.pairwise_interactions(x, z))
    assert pairs.shape == (N, D * D2)
    for i, j in itertools.product(range(D), range(D2)):
        assert_allclose(pairs[:, i * D2 + j], x[:, i] * z[:, j], rtol=1e-6)
    p, out = _layer_out(lambda x, z: L.InteractionLayer()("int", x, z, units=UNITS), x, z)
    beta = p["InteractionLayer_int_beta"]
    assert beta.shape == (D * D2, UNITS)
    ref = np.zeros((N, UNITS))
    for n, u, i, j in itertools.product(range(N), range(UNITS), range(D), range(D2)):
        ref[n, u] += x[n, i] * z[n, j] * beta[i * D2 + j, u]
    assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_bilinear_and_low_rank_bilinear(xz):
    x, z = xz
    p, out = _layer_out(lambda x, z: L.BilinearLayer()("bi", x, z, units=UNITS), x, z)
    W = p["BilinearLayer_bi_W"]
    ref = np.stack([[x[n] @ W[:, :, u] @ z[n] for u in range(UNITS)] for n in range(N)])
    assert_allclose(out, ref, rtol=1e-4, atol=1e-5)

    p, out = _layer_out(lambda x, z: L.LowRankBilinearLayer()("lb", x, z, RANK, units=UNITS), x, z)
    assert "LowRankBilinearLayer_lb_scale" in p  # one shared scale
    A, B = p["LowRankBilinearLayer_lb_A"], p["LowRankBilinearLayer_lb_B"]
    ref = np.stack(
        [[x[n] @ A[:, :, u] @ B[:, :, u].T @ z[n] for u in range(UNITS)] for n in range(N)]
    )
    assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_embedding_random_effects_random_walk():
    ids = np.array([0, 3, 3, 1, 4], dtype=np.int32)
    p, out = _layer_out(lambda i: L.EmbeddingLayer()("e", i, 5, 3), ids)
    assert out.shape == (5, 3)
    assert_allclose(out, p["EmbeddingLayer_e_theta"][ids])

    p, out = _layer_out(lambda i: L.RandomEffectsLayer()("r", i, 5), ids[:, None])
    assert p["RandomEffectsLayer_r_theta"].shape == (5,)
    assert out.shape == (5, 1)
    assert_allclose(out[:, 0], p["RandomEffectsLayer_r_theta"][ids])

    p, out = _layer_out(lambda i: L.RandomWalkLayer()("w", i, 5, 2), ids)
    delta = p["RandomWalkLayer_w_theta"]
    ref = np.stack([delta[: i + 1].sum(0) for i in ids])
    assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_horseshoe_plain_and_regularized(xz):
    x, _ = xz
    p, out = _layer_out(lambda x: L.HorseshoeLayer()("h", x, units=UNITS), x)
    assert p["HorseshoeLayer_h_tau"].shape == (UNITS,)
    assert p["HorseshoeLayer_h_scale"].shape == (D, UNITS)
    assert_allclose(out, x @ p["HorseshoeLayer_h_beta"], rtol=1e-5, atol=1e-6)

    layer = L.HorseshoeLayer(slab_scale=2.0)
    trace = trace_sites(lambda x: layer("h", x), x)
    tau, lam, c2 = (
        np.asarray(trace[f"HorseshoeLayer_h_{k}"]["value"]) for k in ("tau", "scale", "c2")
    )
    expected = tau * np.sqrt(c2 * lam**2 / (c2 + tau**2 * lam**2))
    assert_allclose(trace["HorseshoeLayer_h_beta"]["fn"].base_dist.scale, expected, rtol=1e-5)


def test_spike_and_slab(xz):
    x, _ = xz
    p, out = _layer_out(lambda x: L.SpikeAndSlabLayer()("s", x, units=UNITS), x)
    z, b = p["SpikeAndSlabLayer_s_z"], p["SpikeAndSlabLayer_s_beta"]
    assert ((z > 0) & (z < 1)).all()
    assert_allclose(out, x @ (z * b), rtol=1e-5, atol=1e-6)


def test_attention_matches_per_row_reference(xz):
    x, _ = xz
    h, H = 3, 2
    p, out = _layer_out(lambda x: L.AttentionLayer()("att", x, h, H, units=UNITS), x)
    assert out.shape == (N, UNITS)
    g = {k.removeprefix("AttentionLayer_att_"): v for k, v in p.items()}
    for n in range(N):
        tokens = x[n][:, None] * g["embed"] + g["bias"]  # (d, h*H)
        heads = []
        for k in range(H):
            q, kk, v = (tokens @ g[w][k] for w in ("query", "key", "value"))
            logits = q @ kk.T / np.sqrt(h)
            attn = np.exp(logits - logits.max(1, keepdims=True))
            attn /= attn.sum(1, keepdims=True)
            heads.append(attn @ v)
        pooled = np.concatenate(heads, axis=1).mean(0)
        assert_allclose(out[n], pooled @ g["out"], rtol=1e-4, atol=1e-5)


def test_attention_needs_two_features(rng):
    with pytest.raises(ValueError, match="d >= 2"):
        trace_sites(lambda x: L.AttentionLayer()("a", x), rng.normal(size=(4, 1)))


def test_categorical_fm_equals_dense_fm_on_one_hot(rng):
    sizes = [5, 3, 4]
    ids = np.stack([rng.integers(0, c, size=N) for c in sizes], axis=1).astype(np.int32)
    one_hot = np.concatenate(
        [np.eye(c, dtype=np.float32)[ids[:, f]] for f, c in enumerate(sizes)], axis=1
    )
    cat = lambda i: L.CategoricalFMLayer()("fm", i, sizes, RANK, units=UNITS)  # noqa: E731
    p = random_params(cat, ids)
    theta = p["CategoricalFMLayer_fm_theta"]
    assert theta.shape == (sum(sizes), RANK, UNITS)
    out_cat = np.asarray(run_with(cat, p, ids))
    dense = lambda x: L.FMLayer()("fm", x, RANK, units=UNITS)  # noqa: E731
    dense_params = {"FMLayer_fm_theta": theta, "FMLayer_fm_scale": p["CategoricalFMLayer_fm_scale"]}
    out_dense = np.asarray(run_with(dense, dense_params, one_hot))
    assert out_cat.shape == (N, UNITS)
    assert_allclose(out_cat, out_dense, rtol=1e-4, atol=1e-5)


def test_categorical_fm_without_the_unit_axis_is_the_same_function(rng):
    sizes = [5, 3, 4]
    ids = np.stack([rng.integers(0, c, size=N) for c in sizes], axis=1).astype(np.int32)
    kept = lambda i: L.CategoricalFMLayer()("fm", i, sizes, RANK)  # noqa: E731
    dropped = lambda i: L.CategoricalFMLayer()("fm", i, sizes, RANK, unit_axis=False)  # noqa: E731
    p = random_params(kept, ids)
    theta = p["CategoricalFMLayer_fm_theta"]
    assert theta.shape == (sum(sizes), RANK, 1)
    sites = trace_sites(dropped, ids)
    assert sites["CategoricalFMLayer_fm_theta"]["value"].shape == (sum(sizes), RANK)
    flat = {**p, "CategoricalFMLayer_fm_theta": theta.reshape(sum(sizes), RANK)}
    assert_array_equal(np.asarray(run_with(dropped, flat, ids)), np.asarray(run_with(kept, p, ids)))
    # more than one unit keeps its axis either way
    wide = lambda i: L.CategoricalFMLayer()("fm", i, sizes, RANK, units=2, unit_axis=False)  # noqa: E731
    assert trace_sites(wide, ids)["CategoricalFMLayer_fm_theta"]["value"].shape == (12, RANK, 2)


def test_categorical_fm_does_not_build_one_hot():
    sizes = [200_000, 300_000]
    layer = L.CategoricalFMLayer()

    def forward(ids, theta):
        params = {"CategoricalFMLayer_fm_scale": jnp.ones(()), "CategoricalFMLayer_fm_theta": theta}
        return run_with(lambda j: layer("fm", j, sizes, 2), params, ids)

    ids = jax.ShapeDtypeStruct((16, 2), jnp.int32)
    theta = jax.ShapeDtypeStruct((sum(sizes), 2, 1), jnp.float32)
    jaxpr = jax.make_jaxpr(forward)(ids, theta)
    table = jaxpr.jaxpr.invars[1]
    views = [e for e in jaxpr.eqns if e.primitive.name == "reshape" and e.invars[0] is table]
    assert len(views) == 1  # the layer reads the table through one flat view (no copy) ...
    biggest_intermediate = max(
        int(np.prod(v.aval.shape)) for eqn in jaxpr.eqns if eqn not in views for v in eqn.outvars
    )
    assert biggest_intermediate <= 16 * 2 * 2  # ... and holds only gathered rows, never (n, C)


# ------------------------------------------------------------------ errors and conventions


@pytest.mark.parametrize(
    "make",
    [
        lambda: L.AdaptiveLayer(coef_kwargs={"locc": 0.0}),
        lambda: L.AdaptiveLayer(coef_kwargs={"loc": 0.0, "scale": 2.0}),
        lambda: L.AdaptiveLayer(scale_kwargs={"rate": 1.0}),
        lambda: L.FixedPriorLayer(coef_kwargs={"mean": 0.0}),
        lambda: L.InterceptLayer(coef_dist=dist.Gamma, coef_kwargs={"loc": 1.0}),
        lambda: L.EmbeddingLayer(coef_kwargs=[0.0]),
        lambda: L.HorseshoeLayer(coef_kwargs={"sd": 1.0}),
        lambda: L.SpikeAndSlabLayer(coef_kwargs={"loc": 0.0}, coef_dist=dist.Exponential),
    ],
)
def test_bad_prior_kwargs_fail_at_construction(make):
    with pytest.raises(TypeError):
        make()


def test_other_prior_families_are_accepted(xz):
    x, _ = xz
    layer = L.AdaptiveLayer(
        scale_dist=dist.Exponential,
        scale_kwargs={"rate": 2.0},
        coef_dist=dist.StudentT,
        coef_kwargs={"df": 3.0, "loc": 0.0},
    )
    p, out = _layer_out(lambda x: layer("t", x), x)
    assert_allclose(out, x @ p["AdaptiveLayer_t_beta"], rtol=1e-5)


@pytest.mark.parametrize("bad", [[0, 5], [-1, 2]])
def test_out_of_range_ids_are_an_error(bad):
    ids = np.array(bad, dtype=np.int32)
    for call in (
        lambda i: L.EmbeddingLayer()("e", i, 5, 2),
        lambda i: L.RandomEffectsLayer()("user", i, 5),
        lambda i: L.RandomWalkLayer()("w", i, 5, 1),
        lambda i: L.CategoricalFMLayer()("fm", np.stack([i, i], 1), [5, 5], 2),
    ):
        with pytest.raises(ValueError, match=r"outside \[0, 5\)"):
            trace_sites(call, ids)


def test_float_ids_are_an_error():
    with pytest.raises(TypeError, match="integers"):
        trace_sites(lambda i: L.RandomEffectsLayer()("user", i, 5), np.array([0.0, 1.0]))


def test_ids_are_not_checked_under_jit_but_shapes_are():
    def f(i):
        return run_with(
            lambda j: L.RandomEffectsLayer()("r", j, 3),
            {"RandomEffectsLayer_r_scale": 1.0, "RandomEffectsLayer_r_theta": jnp.arange(3.0)},
            i,
        )

    assert_allclose(jax.jit(f)(jnp.array([2, 0])), [[2.0], [0.0]])


def test_duplicate_layer_names_are_an_error(xz):
    x, _ = xz

    def model(x):
        return L.AdaptiveLayer()("price", x) + L.AdaptiveLayer()("price", x)

    with pytest.raises(ValueError, match=r"name clash.*AdaptiveLayer_price_scale"):
        trace_sites(model, x)


def test_one_instance_many_names(xz):
    x, _ = xz
    layer = L.AdaptiveLayer()
    trace = trace_sites(lambda x: layer("a", x) + layer("b", x), x)
    assert {"AdaptiveLayer_a_beta", "AdaptiveLayer_b_beta"} <= set(trace)
    assert not any(k.startswith("_") for k in vars(layer))  # the instance keeps no parameters
