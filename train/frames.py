"""User tables in and out of the Python API: Arrow inside, pandas at the edges where it is
installed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .config import ConfigError


def as_arrow(data: Any) -> pa.Table:
    """A Parquet path (file, directory or glob), an Arrow table or a pandas DataFrame, as
    an Arrow table."""
    if isinstance(data, (str, Path)):
        from .data import parquet_files

        return pa.concat_tables([pq.read_table(p) for p in parquet_files(str(data))])
    if isinstance(data, pa.Table):
        return data
    if hasattr(data, "to_parquet") and hasattr(data, "columns"):  # a pandas DataFrame
        return pa.Table.from_pandas(data, preserve_index=False)
    raise ConfigError(
        f"data: give a Parquet path, an Arrow table or a pandas DataFrame, not {type(data)}"
    )


def as_frame(table: pa.Table) -> Any:
    """A DataFrame where pandas is installed, else the Arrow table itself."""
    try:
        import pandas  # noqa: F401
    except ImportError:
        return table
    return table.to_pandas()
