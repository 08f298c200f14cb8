"""train/model.py: config terms → a NumPyro model whose linear predictor is the sum of its
terms, checked against the sum written out by hand; tables sized from the vocabulary plus
one out-of-vocabulary row, padded for the mesh, and trained row-sparse from 10^5 rows."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from numpyro import handlers

from train.config import ConfigError
from train.model import LINEAR_PREDICTOR, SPARSE_AUTO_ROWS, Columns, build_model, build_term

COLUMNS = Columns(("a", "b"), ("user", "item"))


def _eta(model, batch, values):
    with handlers.seed(rng_seed=0), handlers.condition(data=values):
        return handlers.trace(model).get_trace(batch)[LINEAR_PREDICTOR]["value"][:, 0]


def test_the_linear_predictor_is_the_sum_of_the_terms_by_hand():
    cfg = {
        "link": "gaussian",
        "terms": [
            {"layer": "InterceptLayer", "name": "bias"},
            {"layer": "AdaptiveLayer", "name": "x", "inputs": ["b", "a"]},
            {"layer": "RandomEffectsLayer", "name": "user", "inputs": ["user"]},
            {"layer": "EmbeddingLayer", "name": "vs", "inputs": ["item"], "slopes": ["a", "b"]},
        ],
    }
    model = build_model(cfg, COLUMNS, {"user": 4, "item": 3})
    rng = np.random.default_rng(0)
    numeric = rng.normal(size=(6, 2)).astype(np.float32)
    categorical = np.stack([rng.integers(0, 4, 6), rng.integers(0, 3, 6)], 1).astype(np.int32)
    user = rng.normal(size=5).astype(np.float32)  # 4 users + the OOV row
    slopes = rng.normal(size=(4, 2)).astype(np.float32)  # 3 items + OOV, one column per slope
    values = {
        "InterceptLayer_bias_beta": jnp.asarray([[0.5]]),
        "AdaptiveLayer_x_beta": jnp.asarray([[2.0], [-1.0]]),  # on (b, a)
        "RandomEffectsLayer_user_theta": jnp.asarray(user),
        "EmbeddingLayer_vs_theta": jnp.asarray(slopes),
        "sigma": 1.0,
    }
    got = _eta(model, {"numeric": numeric, "categorical": categorical}, values)
    a, b = numeric[:, 0], numeric[:, 1]
    want = (
        0.5
        + 2.0 * b
        - 1.0 * a
        + user[categorical[:, 0]]
        + np.sum(slopes[categorical[:, 1]] * numeric, axis=1)
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_tables_hold_the_vocabulary_an_oov_row_and_the_mesh_padding():
    term = build_term(
        {"layer": "RandomEffectsLayer", "name": "u", "inputs": ["user"]},
        COLUMNS,
        {"user": 10, "item": 3},
        pad_multiple=8,
    )
    assert term.num_categories == (16,) and not term.sparse  # 10 + OOV, padded to 8s
    fm = build_term(
        {"layer": "FMLayer", "name": "fm", "inputs": ["user", "item"], "low_rank_dim": 2},
        COLUMNS,
        {"user": 10, "item": 3},
        pad_multiple=8,
    )
    assert fm.kind == "categorical_fm" and fm.num_categories == (11, 5)  # 11 + 4 → 16
    ids = jnp.asarray([[0, 0], [10, 3]], jnp.int32)
    np.testing.assert_array_equal(fm.rows(ids), [[0, 11], [10, 14]])


def test_sparse_auto_starts_at_its_row_count_and_sparse_true_needs_a_table():
    spec = {"layer": "RandomEffectsLayer", "name": "u", "inputs": ["user"]}
    small = build_term(spec, COLUMNS, {"user": SPARSE_AUTO_ROWS - 2, "item": 3})
    large = build_term(spec, COLUMNS, {"user": SPARSE_AUTO_ROWS - 1, "item": 3})
    assert not small.sparse and large.sparse  # the OOV row makes 10^5
    assert build_term({**spec, "sparse": True}, COLUMNS, {"user": 5, "item": 3}).sparse
    with pytest.raises(ConfigError, match=r"model.terms\[x\]: sparse: true needs a table term"):
        build_term(
            {"layer": "AdaptiveLayer", "name": "x", "inputs": ["a"], "sparse": True}, COLUMNS, {}
        )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"layer": "AdaptiveLayer", "name": "x", "inputs": ["c"]}, "numeric column 'c' is not"),
        (
            {"layer": "AdaptiveLayer", "name": "x", "inputs": ["a"], "units": 1, "wat": 2},
            "AdaptiveLayer has no argument 'wat'",
        ),
        ({"layer": "InterceptLayer", "name": "b", "inputs": ["a"]}, "takes no inputs"),
        ({"layer": "EmbeddingLayer", "name": "e", "inputs": ["user"]}, "needs embedding_dim"),
        (
            {"layer": "RandomEffectsLayer", "name": "u", "inputs": ["user"], "slopes": ["a"]},
            "'slopes' applies to EmbeddingLayer and RandomSlopesLayer",
        ),
        ({"layer": "RandomSlopesLayer", "name": "s", "inputs": ["user"]}, "needs the numeric"),
        (
            {"layer": "AR1Layer", "name": "t", "inputs": ["user"], "noncentered": True},
            "drop noncentered",
        ),
        (
            {"layer": "AdaptiveLayer", "name": "x", "inputs": ["a"], "coef_dist": "Gauss"},
            "coef_dist='Gauss' is not a numpyro.distributions class",
        ),
        (
            {
                "layer": "RandomEffectsLayer",
                "name": "u",
                "inputs": ["user"],
                "scale_kwargs": {"scale": -1.0},
            },
            "scale_kwargs=.* are invalid",
        ),
    ],
)
def test_a_bad_term_is_refused_naming_it(spec, message):
    with pytest.raises(ConfigError, match=rf"model.terms\[{spec['name']}\]: .*{message}"):
        build_term(spec, COLUMNS, {"user": 4, "item": 3})


def test_duplicate_terms_and_an_empty_model_are_refused():
    twice = [{"layer": "InterceptLayer", "name": "b"}] * 2
    with pytest.raises(ConfigError, match="duplicate"):
        build_model({"link": "gaussian", "terms": twice}, COLUMNS, {"user": 4, "item": 3})
    with pytest.raises(ConfigError, match=r"model\.terms is empty"):
        build_model({"link": "gaussian", "terms": []}, COLUMNS, {})
