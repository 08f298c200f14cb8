"""train/vocab.py: ids by frequency (or by value for a time column), counts, unseen values,
and a continued run's vocabulary that keeps every known id."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from train import vocab


def _batches(*columns):
    return [pa.record_batch({"c": pa.array(values)}) for values in columns]


def test_ids_follow_descending_frequency_and_counts_are_exact():
    v = vocab.build(["c"], _batches(["b", "a", "b"], ["c", "b", "a", "d"]))["c"]
    assert v.values.to_pylist() == ["b", "a", "c", "d"]  # ties by value
    np.testing.assert_array_equal(v.counts, [3, 2, 1, 1])
    np.testing.assert_array_equal(v.encode(pa.array(["d", "zzz", "b"])), [3, vocab.UNSEEN, 0])


def test_a_time_column_is_numbered_by_value():
    v = vocab.build(["c"], _batches([2024, 2022, 2022], [2023]), by_value={"c"})["c"]
    assert v.values.to_pylist() == [2022, 2023, 2024]


def test_null_values_are_refused_naming_the_column():
    with pytest.raises(ValueError, match="column 'c': 1 null categorical values"):
        vocab.build(["c"], _batches(["a", None]))


def test_a_continued_vocabulary_keeps_known_ids_and_appends_new_ones(tmp_path):
    day1 = vocab.build(["c"], _batches(["a", "a", "b"]))["c"]
    day2 = vocab.build(["c"], _batches(["c", "b", "c", "c"]))["c"]
    both = day1.extended(day2)
    assert both.values.to_pylist() == ["a", "b", "c"] and both.inherited == 2
    np.testing.assert_array_equal(both.counts, [0, 1, 3])  # this run's data
    np.testing.assert_array_equal(both.totals, [2, 2, 3])  # over the lineage
    vocab.save_all({"c": both}, tmp_path / "vocab")
    back = vocab.load_all(tmp_path / "vocab", ["c"])["c"]
    assert back.values.to_pylist() == ["a", "b", "c"] and back.inherited == 2
    np.testing.assert_array_equal(back.totals, both.totals)


def test_an_ordered_vocabulary_only_grows_at_its_end():
    day1 = vocab.build(["c"], _batches([1, 2]), by_value={"c"})["c"]
    later = vocab.build(["c"], _batches([3, 2]), by_value={"c"})["c"]
    assert day1.extended(later, ordered=True).values.to_pylist() == [1, 2, 3]
    earlier = vocab.build(["c"], _batches([0]), by_value={"c"})["c"]
    with pytest.raises(ValueError, match="can only grow at its end"):
        day1.extended(earlier, ordered=True)
