"""The encoded rows the data-stage tests share: 1,000 rows whose numeric column ``row``
names the input row, stored in one chunk (``prepared``) or in chunks of 300 (``chunked``)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from train import data as data_lib
from train import store as store_lib
from train.config import DataConfig

N = 1000


def make_prepared(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    table = pa.table(
        {
            "row": np.arange(N, dtype=np.float32),  # a numeric column that identifies the row
            "x": rng.normal(size=N).astype(np.float32),
            "city": np.array(["oslo", "rome", "lima", "rome"] * (N // 4)),
            "y": rng.integers(0, 2, N),
        }
    )
    store, vocabs = _stored(table, base)
    return table, store, vocabs


def _stored(table: pa.Table, base):
    """``table`` written as Parquet in 300-row groups and prepared as a run's store."""
    pq.write_table(table, base / "a.parquet", row_group_size=300)
    cfg = OmegaConf.structured(
        DataConfig(
            path=str(base / "a.parquet"),
            numeric=["row", "x"],
            categorical=["city"],
            target="y",
            batch_size=64,
        )
    )
    return data_lib.prepare(cfg, base / "run", "logit")


def make_chunked(tmp_path_factory, prepared):
    """The same rows stored in chunks of 300 (the default is 2^22 rows per chunk)."""
    base = tmp_path_factory.mktemp("chunked")
    patch = pytest.MonkeyPatch()
    patch.setattr(store_lib, "CHUNK_ROWS", 300)
    try:
        store, _ = _stored(prepared[0], base)
    finally:
        patch.undo()
    assert store._offsets.tolist() == [0, 300, 600, 900, 1000]
    return store
