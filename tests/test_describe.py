"""train/describe.py: a configured model written down, term by term, and kept in its run."""

from __future__ import annotations

from blayers.latex import render_latex, render_text
from train import describe
from train.model import Columns

COLUMNS = Columns(("price", "age", "t"), ("user", "week"))
MODEL = {
    "link": "logit",
    "terms": [
        {"layer": "InterceptLayer", "name": "bias"},
        {"layer": "AdaptiveLayer", "name": "dense", "inputs": ["price", "age"]},
        {"layer": "RandomEffectsLayer", "name": "user", "inputs": ["user"]},
        {"layer": "RandomWalkLayer", "name": "trend", "inputs": ["week"], "embedding_dim": 1},
        {"layer": "FMLayer", "name": "fm", "inputs": ["user", "week"], "low_rank_dim": 2},
    ],
}


def test_the_linear_predictor_has_one_piece_per_term_in_order():
    statements = describe.describe(MODEL, COLUMNS)
    eta = next(s for s in statements if s.relation == "=")
    pieces = eta.law[1].split(" + ")
    assert len(pieces) == 5
    assert "[price, age]·" in pieces[1]
    assert pieces[2].endswith("[user_i]")
    assert pieces[3].startswith("cumsum(") and pieces[3].endswith("[week_i]")
    assert pieces[4].startswith("FM(") and "[user_i]" in pieces[4] and "[week_i]" in pieces[4]
    # the priors come first and the likelihood last
    assert statements[-1] is not eta and statements.index(eta) == len(statements) - 2
    assert "Bernoulli" in render_text(statements[-1:])


def test_a_model_of_the_users_own_is_described_by_its_draws_alone():
    statements = describe.describe(
        {"_target_": "tests.user_models.random_intercepts", "link": "logit"},
        Columns((), ("user",)),
    )
    assert all(s.relation != "=" for s in statements)
    assert any("mine" in s.text() for s in statements)


def test_the_written_model_is_read_back_from_the_run(tmp_path):
    assert describe.read(tmp_path) == {}
    statements = describe.describe(MODEL, COLUMNS)
    describe.write(tmp_path, statements)
    written = describe.read(tmp_path)
    assert written["text"] == render_text(statements) + "\n"
    assert written["latex"] == str(render_latex(statements)) + "\n"
