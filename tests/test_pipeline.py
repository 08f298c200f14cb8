"""train/pipeline.py: a step's batch is a pure function of (seed, step), split among the
processes, covering every row each epoch."""

from __future__ import annotations

import numpy as np
import pytest

from tests import data_fixtures
from train import dedup, dispatch, pipeline
from train import store as store_lib


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return data_fixtures.make_prepared(tmp_path_factory)


@pytest.fixture(scope="module")
def chunked(tmp_path_factory, prepared):
    return data_fixtures.make_chunked(tmp_path_factory, prepared)


@pytest.mark.parametrize("block", [1, 16])
def test_batches_are_a_pure_function_of_seed_and_step(prepared, block):
    _, store, _ = prepared
    a = pipeline.StepBatches(store, 64, seed=3, block=block)
    b = pipeline.StepBatches(store, 64, seed=3, block=block)
    for step in (0, 7, 15, 16, 40):
        np.testing.assert_array_equal(a.rows(step), b.rows(step))
    c = pipeline.StepBatches(store, 64, seed=4, block=block)
    assert not np.array_equal(a.rows(5), c.rows(5))


@pytest.mark.parametrize("block", [1, 16])
def test_process_shares_partition_the_global_batch(prepared, block):
    _, store, _ = prepared
    whole = pipeline.StepBatches(store, 64, seed=1, block=block)
    for step in (0, 3, 20):
        shares = [
            pipeline.StepBatches(store, 64, 1, p, 4, block=block).rows(step) for p in range(4)
        ]
        assert all(len(s) == 16 for s in shares)
        np.testing.assert_array_equal(np.sort(np.concatenate(shares)), np.sort(whole.rows(step)))


def test_an_epoch_covers_every_row(prepared):
    _, store, _ = prepared
    rows = pipeline.StepBatches(store, 50, seed=0, block=1)
    seen = np.concatenate([rows.rows(s) for s in range(data_fixtures.N // 50)])
    assert sorted(seen.tolist()) == list(range(data_fixtures.N))  # row shuffle: exactly once
    blocks = pipeline.StepBatches(store, 64, seed=0, block=16)
    per_epoch = -(-blocks.num_blocks * 16 // 64)
    seen = np.concatenate([blocks.rows(s) for s in range(per_epoch)])
    assert set(seen.tolist()) == set(
        range(data_fixtures.N)
    )  # blocks: every row, the wrapped block twice


def test_batch_contents_match_rows(prepared):
    _, store, _ = prepared
    batches = pipeline.StepBatches(store, 64, seed=2, block=16)
    batch = batches(4)
    rows = batches.rows(4)
    np.testing.assert_array_equal(batch["numeric"], store.column("numeric")[rows])
    np.testing.assert_array_equal(batch["target"], store.column("target")[rows])


@pytest.mark.parametrize("batch_size,block", [(64, 1), (64, 4), (60, 20), (64, 32), (64, 64)])
def test_block_batches_hold_exactly_their_rows_across_chunks_and_the_wrap(
    chunked, batch_size, block
):
    # 300-row chunks: 4 and 20 divide them (whole-block copies), 32 and 64 straddle them; the
    # last block of the 1000 rows wraps around to row 0 unless the block divides 1000
    batches = pipeline.StepBatches(chunked, batch_size, seed=5, block=block)
    assert batches.block == block
    steps_per_epoch = -(-batches.num_blocks * block // batch_size)
    for step in range(2 * steps_per_epoch + 1):
        rows = batches.rows(step)
        batch = batches(step)
        np.testing.assert_array_equal(batch["numeric"], chunked.column("numeric")[rows])
        np.testing.assert_array_equal(batch["categorical"], chunked.column("categorical")[rows])
        np.testing.assert_array_equal(batch["target"], chunked.column("target")[rows])
        assert all(v.ctypes.data % store_lib.ALIGN == 0 for v in batch.values())


_TABLE = dedup.TableRows("t", (0,), (0,), 1 << 12)


def _dedup_and_double(batch):
    """A transform that adds arrays (a table's deduplicated rows) and replaces one."""
    rows = dedup.host_rows(batch["categorical"], [_TABLE])
    return {**batch, **rows, "target": 2 * batch["target"]}


def _pad_and_stack(batches):
    return dispatch.stack(dedup.pad_rows(batches, [_TABLE]))


@pytest.mark.parametrize("transform", [None, _dedup_and_double])
@pytest.mark.parametrize("batch_size,block", [(64, 4), (60, 20), (64, 32)])
def test_a_dispatch_gathered_into_one_buffer_equals_its_steps_stacked(
    chunked, transform, batch_size, block
):
    # straddled chunks and the wrap at the epoch's end take the stray-block path of each step
    batches = pipeline.StepBatches(chunked, batch_size, seed=5, block=block, transform=transform)
    stack = dispatch.stack if transform is None else _pad_and_stack
    steps_per_epoch = -(-batches.num_blocks * block // batch_size)
    for first in (0, steps_per_epoch - 2):
        got = batches.group(first, 5, stack)
        want = stack([batches(s) for s in range(first, first + 5)])
        assert isinstance(got, dispatch.Stacked) and sorted(got) == sorted(want)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
        assert all(v.ctypes.data % store_lib.ALIGN == 0 for v in got.values())
