"""train/dedup.py: a batch's distinct rows of each row-sparse table, against numpy's
``unique`` as the brute-force reference."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from train.dedup import MIN_CAPACITY, TableRows, host_rows, row_capacity


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 5_000),
    batch=st.integers(1, 300),
    fields=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_host_rows_match_numpy_unique(rows, batch, fields, seed):
    rng = np.random.default_rng(seed)
    per_field = [max(1, rows // fields)] * fields
    offsets = np.concatenate([[0], np.cumsum(per_field)[:-1]]).astype(np.int32)
    size = int(sum(per_field))
    # Zipf-like ids: heavy repeats, as categorical data has
    ids = np.stack([np.minimum(rng.zipf(1.3, batch) - 1, n - 1) for n in per_field], axis=1).astype(
        np.int32
    )
    table = TableRows("t", tuple(range(fields)), tuple(int(o) for o in offsets), size)
    out = host_rows(ids, [table])
    uniq, count, local = out["uniq:t"], out["count:t"], out["local:t"]

    global_rows = (ids + offsets[None, :]).ravel()
    want, want_counts = np.unique(global_rows, return_counts=True)
    k = len(want)
    np.testing.assert_array_equal(uniq[:k], want)
    np.testing.assert_array_equal(count[:k], want_counts)
    assert np.all(count[k:] == 0)
    # fills: distinct ids past the table, so the row arrays stay sorted and unique
    np.testing.assert_array_equal(uniq[k:], np.arange(size, size + len(uniq) - k))
    assert np.all(np.diff(uniq) > 0)
    np.testing.assert_array_equal(uniq[local.ravel()], global_rows)
    assert len(uniq) == row_capacity(k, min(global_rows.size, size))


def test_row_capacity_holds_what_was_found_in_few_static_lengths():
    lengths = {row_capacity(found, 1 << 20) for found in range(1, 100_000, 7)}
    assert min(lengths) == MIN_CAPACITY
    for found in (1, 63, 64, 65, 97, 1_400, 99_999):
        k = row_capacity(found, 1 << 20)
        assert found <= k < max(2 * found, MIN_CAPACITY + 1)
    # at most about two lengths (so compilations) per doubling
    assert len(lengths) <= 2 * int(np.ceil(np.log2(100_000 / MIN_CAPACITY))) + 1
    assert row_capacity(400, 300) == 400 and row_capacity(100, 80) == 100
    assert row_capacity(70, 90) == 90  # capped by the table, never below what was found
