"""Property tests of the data stage and the config loader (hypothesis): whatever the input,
random dtypes, nulls, NaN and inf, out-of-support targets, dropped columns, empty files, huge
ids, mistyped keys and wrongly typed values, each case ends either in success or in one
line naming what is wrong, and a refused case writes nothing."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from train import config as config_lib
from train import data as data_lib
from train import store as store_lib
from train.config import Config, ConfigError, DataConfig
from train.settings import check_settings

CASES = 150
NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.integers(-(2**62), 2**62).map(float),
)
TYPES = {
    "float32": pa.float32(),
    "float64": pa.float64(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "bool": pa.bool_(),
    "string": pa.string(),
}


@st.composite
def column(draw, rows: int, kind: str) -> pa.Array:
    """A column of ``rows`` values of a random type, with nulls now and then."""
    typ = draw(st.sampled_from(sorted(TYPES)))
    nulls = draw(st.booleans()) and draw(st.integers(0, 3))
    if kind == "categorical" and draw(st.booleans()):
        values = draw(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=rows, max_size=rows))
        typ = "int64"  # huge ids
    elif typ == "string":
        values = draw(st.lists(st.text(max_size=4), min_size=rows, max_size=rows))
    elif typ == "bool":
        values = draw(st.lists(st.booleans(), min_size=rows, max_size=rows))
    elif typ.startswith("int"):
        bound = 2**31 - 1 if typ == "int32" else 2**63 - 1
        values = draw(st.lists(st.integers(-bound, bound), min_size=rows, max_size=rows))
    else:
        values = draw(st.lists(NUMBERS, min_size=rows, max_size=rows))
    values = [None if i < nulls else v for i, v in enumerate(values)]
    return pa.array(values, type=TYPES[typ])


@st.composite
def dataset(draw) -> tuple[pa.Table, str]:
    rows = draw(st.integers(0, 40))
    link = draw(st.sampled_from(["gaussian", "logit", "poisson", "beta", "lognormal"]))
    cols = {
        "x": draw(column(rows, "numeric")),
        "user": draw(column(rows, "categorical")),
        "y": draw(column(rows, "numeric")),
    }
    if link == "logit" and draw(st.booleans()):  # often a valid target, to reach success
        cols["y"] = pa.array(draw(st.lists(st.sampled_from([0, 1]), min_size=rows, max_size=rows)))
    dropped = draw(st.sampled_from([None, "x", "user", "y"]))
    return pa.table({k: v for k, v in cols.items() if k != dropped}), link


def _written(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())


@settings(
    max_examples=CASES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(dataset())
def test_the_data_stage_succeeds_or_refuses_in_one_line_writing_nothing(case):
    table, link = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "in.parquet"
        pq.write_table(table, path)
        cfg = OmegaConf.structured(DataConfig)
        cfg.path, cfg.numeric, cfg.categorical, cfg.target = str(path), ["x"], ["user"], "y"
        cfg.batch_size = 1
        run_dir = Path(tmp) / "run"
        try:
            store, vocabs = data_lib.prepare(cfg, run_dir, link)
        except data_lib.DataError as err:
            event("refused")
            assert "\n" not in str(err) and str(err)
            assert not run_dir.exists() or _written(run_dir) == [], _written(run_dir)
            return
        event("accepted")
        assert store.num_rows == table.num_rows > 0
        ids = store.column(store_lib.CATEGORICAL)[:, 0]
        assert ids.min() >= 0 and ids.max() < vocabs["user"].size
        assert int(vocabs["user"].counts.sum()) == table.num_rows
        y = store.column(store_lib.TARGET)
        assert np.all(np.isfinite(y))


KEYS = {
    "train.steps": st.one_of(st.integers(-5, 10), st.text(max_size=3), st.floats(0, 2)),
    "optim.lr": st.one_of(st.floats(-1, 1), st.text(max_size=3)),
    "data.batch_size": st.one_of(st.integers(-4, 64), st.lists(st.integers(), max_size=2)),
    "model.link": st.one_of(st.text(max_size=6), st.integers()),
    "checkpoint.every": st.one_of(st.integers(-2, 5), st.none()),
    "mesh.model": st.one_of(st.integers(-2, 4), st.text(max_size=2)),
}
TYPOS = ["train.stpes", "optim.learning_rate", "data.batchsize", "modle.link", "checkpoint.evry"]


@st.composite
def overrides(draw) -> dict:
    chosen = draw(st.lists(st.sampled_from(sorted(KEYS)), unique=True, max_size=3))
    out = {k: draw(KEYS[k]) for k in chosen}
    if draw(st.booleans()):
        out[draw(st.sampled_from(TYPOS))] = 1
    return out


def _nested(flat: dict) -> dict:
    out: dict = {}
    for key, value in flat.items():
        group, name = key.split(".")
        out.setdefault(group, {})[name] = value
    return out


@settings(max_examples=CASES, deadline=None)
@given(overrides())
def test_the_config_loader_accepts_or_names_the_key_in_one_line(changes):
    base = OmegaConf.to_container(OmegaConf.structured(Config))
    for group, values in _nested(changes).items():
        base.setdefault(group, {}).update(values)
    try:
        cfg = config_lib.from_container(base)
        check_settings(cfg)  # the values a type cannot rule out
    except ConfigError as err:
        event("refused")
        message = str(err)
        assert "\n" not in message
        assert any(k.split(".")[-1] in message or k.split(".")[0] in message for k in changes)
        return
    event("accepted")
    for key, value in changes.items():  # accepted: typed as the schema says
        group, name = key.split(".")
        got = cfg[group][name]
        if isinstance(value, float) and isinstance(got, float) and math.isnan(value):
            continue
        assert got == value or float(got) == float(value)
