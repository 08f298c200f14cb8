"""train/frames.py: the Python API's tables in and out."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from train.config import ConfigError
from train.frames import as_arrow, as_frame


def test_a_path_a_table_and_a_dataframe_are_the_same_arrow_table(tmp_path):
    table = pa.table({"user": ["a", "b", "a"], "x": [1.0, 2.0, 3.0]})
    for i in range(2):
        pq.write_table(table, tmp_path / f"part-{i}.parquet")
    from_dir = as_arrow(tmp_path)
    assert from_dir.num_rows == 6 and from_dir.column_names == ["user", "x"]
    assert as_arrow(str(tmp_path / "part-0.parquet")).equals(table)
    assert as_arrow(table) is table
    frame = as_arrow(pd.DataFrame({"user": ["a", "b", "a"], "x": [1.0, 2.0, 3.0]}))
    assert frame.to_pylist() == table.to_pylist()  # pandas may give large_string


def test_anything_else_is_refused_naming_what_to_give():
    with pytest.raises(ConfigError, match="give a Parquet path, an Arrow table or a pandas"):
        as_arrow([1, 2, 3])


def test_results_come_back_as_a_dataframe():
    frame = as_frame(pa.table({"mean": [0.25, 0.75]}))
    assert isinstance(frame, pd.DataFrame) and frame["mean"].tolist() == [0.25, 0.75]
