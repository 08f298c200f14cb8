"""train/store.py: the memory-mapped store returns exactly the rows asked for, in aligned
buffers, across its chunks."""

from __future__ import annotations

import numpy as np
import pytest

from tests import data_fixtures
from train import store as store_lib


@pytest.fixture(scope="module")
def chunked(tmp_path_factory):
    return data_fixtures.make_chunked(
        tmp_path_factory, data_fixtures.make_prepared(tmp_path_factory)
    )


@pytest.mark.parametrize(
    "rows",
    [
        np.arange(280, 340),  # one run across a chunk boundary
        np.r_[np.arange(0, 40), np.arange(100, 140), np.arange(970, 1000)],  # runs: slices
        np.r_[np.arange(0, 40), np.arange(100, 140), np.arange(970, 1000)][::3],  # gathers
        np.array([5, 5, 5, 6, 7, 7]),  # repeated rows (the wrapped block)
    ],
)
def test_take_returns_exactly_the_rows_in_aligned_buffers(chunked, rows):
    store = chunked
    batch = store.take(rows)
    np.testing.assert_array_equal(batch["numeric"], store.column("numeric")[rows])
    np.testing.assert_array_equal(batch["categorical"], store.column("categorical")[rows])
    np.testing.assert_array_equal(batch["target"], store.column("target")[rows])
    # 64-byte aligned: XLA:CPU takes such buffers without a copy
    assert all(v.ctypes.data % store_lib.ALIGN == 0 for v in batch.values())
