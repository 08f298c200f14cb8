"""Layers describe how the service feeds them (``BLayer.input_kind`` and its flags), and the
service dispatches on that declaration: a new layer is one class, with no edit to
``train/model.py``."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from numpyro import handlers

from train.config import ConfigError
from train.model import Columns, build_model, service_layers

USER_LAYER = "tests.user_models.ScaledSumLayer"


def test_a_layer_declared_outside_the_package_is_a_service_term():
    cfg = {
        "link": "gaussian",
        "terms": [{"layer": USER_LAYER, "name": "s", "inputs": ["a", "b"], "prior_scale": 2.0}],
    }
    model = build_model(cfg, Columns(("a", "b"), ()), {})
    (term,) = model.terms
    assert term.kind == "dense" and term.layer.prior_scale == 2.0
    batch = {
        "numeric": jnp.asarray([[1.0, 2.0], [3.0, 4.0]]),
        "categorical": jnp.zeros((2, 0), jnp.int32),
    }
    with (
        handlers.seed(rng_seed=0),
        handlers.condition(data={"ScaledSumLayer_s_beta": jnp.asarray([0.5]), "sigma": 1.0}),
    ):
        trace = handlers.trace(model).get_trace(batch)
    np.testing.assert_allclose(trace["linear_predictor"]["value"][:, 0], [1.5, 3.5])


def test_the_declarations_cover_every_service_layer_and_nothing_else():
    layers = service_layers()
    kinds = {n: c.input_kind for n, c in layers.items()}
    assert set(kinds.values()) == {
        "intercept",
        "dense",
        "pair",
        "table",
        "categorical_fm",
        "smooth",
    }
    assert {n for n, c in layers.items() if c.gatherable} == {
        "CategoricalFMLayer",
        "EmbeddingLayer",
        "FixedEffectsLayer",
        "RandomEffectsLayer",
        "RandomSlopesLayer",
    }
    assert {n for n, c in layers.items() if c.ordered} == {"AR1Layer", "RandomWalkLayer"}
    assert "BLayer" not in layers and "_HierarchicalLayer" not in layers
    with pytest.raises(ConfigError, match="unknown layer '_HierarchicalLayer'"):
        build_model(
            {"link": "gaussian", "terms": [{"layer": "_HierarchicalLayer", "name": "h"}]},
            Columns(("a",), ()),
            {},
        )


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        ("tests.user_models.NoSuchLayer", "cannot import layer 'tests.user_models.NoSuchLayer'"),
        ("tests.user_models.random_intercepts", "must be a blayers.layers.BLayer subclass"),
        ("blayers.layers.PSplineLayer", "a smooth term's domain is fixed per layer"),
        ("ScaledSumLayer", "unknown layer 'ScaledSumLayer'.*import path"),
    ],
)
def test_a_user_layer_that_cannot_be_a_term_is_refused_naming_the_term(layer, message):
    cfg = {"link": "gaussian", "terms": [{"layer": layer, "name": "s", "inputs": ["a"]}]}
    with pytest.raises(ConfigError, match=rf"model.terms\[s\]: .*{message}"):
        build_model(cfg, Columns(("a",), ()), {})
