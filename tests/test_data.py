"""train/data.py, the ingest: discovery, checks, vocabulary and the encoded store."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests import data_fixtures
from train import data as data_lib


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return data_fixtures.make_prepared(tmp_path_factory)


def test_store_holds_every_input_row_once_shuffled(prepared):
    table, store, vocabs = prepared
    rows = store.column("numeric")[:, 0]
    assert sorted(rows.tolist()) == list(range(data_fixtures.N))
    assert rows[:20].tolist() != list(range(20))  # shuffled once, at prepare time
    # features and ids travel with their row
    order = np.argsort(rows)
    np.testing.assert_array_equal(store.column("numeric")[order, 1], table["x"].to_numpy())
    city = vocabs["city"].values.to_pylist()
    decoded = [city[i] for i in store.column("categorical")[order, 0]]
    assert decoded == table["city"].to_pylist()
    assert vocabs["city"].counts.tolist() == [500, 250, 250]  # by frequency: rome first


def test_directory_and_glob_inputs(tmp_path):
    for i in range(3):
        pq.write_table(pa.table({"x": [float(i)], "y": [1.0]}), tmp_path / f"p{i}.parquet")
    assert len(data_lib.parquet_files(str(tmp_path))) == 3
    assert len(data_lib.parquet_files(str(tmp_path / "p[01].parquet"))) == 2
    with pytest.raises(data_lib.DataError, match="matched no Parquet files"):
        data_lib.parquet_files(str(tmp_path / "nope*.parquet"))
