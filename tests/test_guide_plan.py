"""train/guide_plan.py: which sites the service's guide ties together, read off the terms."""

from __future__ import annotations

import pytest

from blayers import guides
from train.guide_plan import (
    conditioned,
    fm_rows_in_effect,
    normal_table,
    service_guide,
)
from train.model import Columns, build_model
from train.setup import abstract_batch

COLUMNS = Columns(("x",), ("user", "item"))
TERMS = [
    {"layer": "InterceptLayer", "name": "bias"},
    {"layer": "AdaptiveLayer", "name": "w", "inputs": ["x"]},
    {"layer": "RandomEffectsLayer", "name": "user", "inputs": ["user"]},
    {
        "layer": "RandomEffectsLayer",
        "name": "heavy",
        "inputs": ["item"],
        "coef_dist": "StudentT",
        "coef_kwargs": {"df": 3.0, "loc": 0.0},
    },
    {"layer": "EmbeddingLayer", "name": "vs", "inputs": ["item"], "slopes": ["x"]},
    {"layer": "FMLayer", "name": "fm", "inputs": ["user", "item"], "low_rank_dim": 2},
]


@pytest.fixture(scope="module")
def model_and_sites():
    model = build_model({"link": "logit", "terms": TERMS}, COLUMNS, {"user": 5, "item": 4})
    sites = guides.latent_sites(model, abstract_batch(8, COLUMNS), num_data=100)
    return model.terms, sites


def test_only_tables_of_normal_rows_under_a_log_scale_are_shiftable(model_and_sites):
    terms, sites = model_and_sites
    found = {t.name: normal_table(t, sites) for t in terms}
    assert found["user"] == ("RandomEffectsLayer_user_theta", "RandomEffectsLayer_user_scale")
    assert found["heavy"] is None  # a StudentT prior: its mean does not trade with the intercept
    assert found["vs"] is None  # slopes: rows times x, not added to the predictor
    assert found["fm"] is None and found["bias"] is None and found["w"] is None
    fm = next(t for t in terms if t.name == "fm")
    assert normal_table(fm, sites, conditioned) == (
        "CategoricalFMLayer_fm_theta",
        "CategoricalFMLayer_fm_scale",
    )


def test_tables_are_tied_to_the_intercept_and_fm_factors_are_free_by_default(model_and_sites):
    terms, sites = model_and_sites
    guide = service_guide("conditional", terms, sites)
    assert isinstance(guide, guides.ConditionalGuide)
    tables = {
        "RandomEffectsLayer_user_theta",
        "RandomEffectsLayer_heavy_theta",
        "EmbeddingLayer_vs_theta",
    }
    assert set(guide.coupled) == tables
    assert set(guide.conditional) == {"RandomEffectsLayer_user_theta"}
    site = service_guide("conditional", terms, sites, fm_rows="site")
    assert set(site.conditional) == {"RandomEffectsLayer_user_theta", "CategoricalFMLayer_fm_theta"}
    assert type(service_guide("mean_field", terms, sites)) is guides.MeanFieldGuide
    assert fm_rows_in_effect("conditional", terms, sites, "free") == "free"
    assert fm_rows_in_effect("structured", terms, sites, "free") == "site"  # changes nothing
