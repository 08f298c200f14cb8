"""Bad input is refused in one line naming the column or key and the fix, before any step,
and leaves nothing behind: targets outside the link's support, unknown or unusable links,
null categories, parts whose schemas drift, a batch larger than the data, invalid prior
values and a sharding rule naming no mesh axis."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.service_helpers import small_config, small_dataset
from train import loop
from train.config import ConfigError
from train.data import DataError


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    return pq.read_table(small_dataset(tmp_path_factory.mktemp("bad_input") / "data"))


def _with(table: pa.Table, column: str, values) -> pa.Table:
    return table.set_column(table.schema.names.index(column), column, pa.array(values))


def _write(path, table):
    pq.write_table(table, path)
    return path


def _ordinal(t: pa.Table) -> pa.Table:
    return _with(t, "y", np.random.default_rng(0).integers(0, 3, t.num_rows).astype(np.float32))


STUDENT_T_TERMS = [
    {"layer": "InterceptLayer", "name": "bias"},
    {
        "layer": "AdaptiveLayer",
        "name": "d",
        "inputs": ["x1"],
        "coef_dist": "StudentT",
        "coef_kwargs": {"df": -1.0, "loc": 0.0},
    },
]

CASES = {
    "poisson target < 0": (
        lambda t: _with(t, "y", -np.ones(t.num_rows)),
        {"model.link": "poisson"},
        DataError,
        r"column 'y'.*support of the 'poisson' link",
    ),
    "logit target 2": (
        lambda t: _with(t, "y", np.full(t.num_rows, 2.0)),
        {},
        DataError,
        r"column 'y'.*'logit' link \(0 or 1\)",
    ),
    "beta target 1.5": (
        lambda t: _with(t, "y", np.full(t.num_rows, 1.5)),
        {"model.link": "beta"},
        DataError,
        r"column 'y'.*'beta' link",
    ),
    "lognormal target 0": (
        lambda t: _with(t, "y", np.zeros(t.num_rows)),
        {"model.link": "lognormal"},
        DataError,
        r"column 'y'.*'lognormal' link",
    ),
    "unknown link": (None, {"model.link": "logitt"}, ConfigError, r"model\.link: unknown link"),
    "categorical link": (None, {"model.link": "categorical"}, ConfigError, "per class"),
    "ordinal without classes": (
        _ordinal,
        {"model.link": "ordinal"},
        ConfigError,
        r"model\.link_kwargs\.num_classes",
    ),
    "null category": (
        lambda t: _with(t, "user", [None, *t["user"].to_pylist()[1:]]),
        {},
        DataError,
        r"column 'user': 1 null",
    ),
    "batch larger than data": (
        None,
        {"data.batch_size": 8192},
        DataError,
        r"data\.batch_size=8192 is larger than the data \(4,000 rows\)",
    ),
    "StudentT df < 0": (
        None,
        {"model.terms": STUDENT_T_TERMS},
        ConfigError,
        r"model\.terms\[d\]: coef_kwargs=.*StudentT",
    ),
    "learning rate NaN": (None, {"optim.lr": float("nan")}, ConfigError, r"optim\.lr=nan"),
    "unknown mesh axis": (
        None,
        {"sharding.rules": [["categories", "modle"]]},
        ConfigError,
        r"sharding\.rules: .*'modle'",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_refused_naming_it_and_nothing_is_left(table, tmp_path, case):
    change, settings, error, message = CASES[case]
    data = _write(tmp_path / "in.parquet", table if change is None else change(table))
    run = tmp_path / "run"
    with pytest.raises(error, match=message) as caught:
        loop.train(small_config(data, run, **settings), log=lambda _: None)
    assert "\n" not in str(caught.value)
    assert not (run / "checkpoints").exists() and not (run / "vocab").exists()


@pytest.mark.parametrize(
    ("drift", "message"),
    [
        (lambda t: t.drop_columns(["x2"]), r"b\.parquet: column 'x2' is missing"),
        (lambda t: _with(t, "x1", ["abc"] * t.num_rows), r"b\.parquet: column 'x1' has non-num"),
        (
            lambda t: _with(t, "user", [f"u{v}" for v in t["user"].to_pylist()]),
            r"b\.parquet: column 'user' holds strings, but .*a\.parquet holds numbers",
        ),
    ],
)
def test_parts_whose_schemas_drift_are_refused_naming_the_file(table, tmp_path, drift, message):
    parts = tmp_path / "parts"
    parts.mkdir()
    _write(parts / "a.parquet", table.slice(0, 2000))
    _write(parts / "b.parquet", drift(table.slice(2000)))
    with pytest.raises(DataError, match=message):
        loop.train(small_config(parts, tmp_path / "run"), log=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_an_ordinal_target_stored_as_floats_trains(table, tmp_path):
    data = _write(tmp_path / "in.parquet", _ordinal(table))
    settings = {"model.link": "ordinal", "model.link_kwargs": {"num_classes": 3}}
    result = loop.train(small_config(data, tmp_path / "run", **settings), log=lambda _: None)
    assert result["step"] == 20 and np.isfinite(result["loss"])
