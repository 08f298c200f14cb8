"""The data stage: encoded store, vocabulary, batches as a pure function of (seed, step)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from train import data as data_lib
from train import pipeline
from train import store as store_lib
from train.config import DataConfig

N = 1000


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
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
    store, vocabs = data_lib.prepare(cfg, base / "run", "logit")
    return table, store, vocabs


def test_store_holds_every_input_row_once_shuffled(prepared):
    table, store, vocabs = prepared
    rows = store.column("numeric")[:, 0]
    assert sorted(rows.tolist()) == list(range(N))
    assert rows[:20].tolist() != list(range(20))  # shuffled once, at prepare time
    # features and ids travel with their row
    order = np.argsort(rows)
    np.testing.assert_array_equal(store.column("numeric")[order, 1], table["x"].to_numpy())
    city = vocabs["city"].values.to_pylist()
    decoded = [city[i] for i in store.column("categorical")[order, 0]]
    assert decoded == table["city"].to_pylist()
    assert vocabs["city"].counts.tolist() == [500, 250, 250]  # by frequency: rome first


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
    seen = np.concatenate([rows.rows(s) for s in range(N // 50)])
    assert sorted(seen.tolist()) == list(range(N))  # row shuffle: exactly once
    blocks = pipeline.StepBatches(store, 64, seed=0, block=16)
    per_epoch = -(-blocks.num_blocks * 16 // 64)
    seen = np.concatenate([blocks.rows(s) for s in range(per_epoch)])
    assert set(seen.tolist()) == set(range(N))  # blocks: every row, the wrapped block twice


def test_batch_contents_match_rows(prepared):
    _, store, _ = prepared
    batches = pipeline.StepBatches(store, 64, seed=2, block=16)
    batch = batches(4)
    rows = batches.rows(4)
    np.testing.assert_array_equal(batch["numeric"], store.column("numeric")[rows])
    np.testing.assert_array_equal(batch["target"], store.column("target")[rows])


def test_directory_and_glob_inputs(tmp_path):
    for i in range(3):
        pq.write_table(pa.table({"x": [float(i)], "y": [1.0]}), tmp_path / f"p{i}.parquet")
    assert len(data_lib.parquet_files(str(tmp_path))) == 3
    assert len(data_lib.parquet_files(str(tmp_path / "p[01].parquet"))) == 2
    with pytest.raises(data_lib.DataError, match="matched no Parquet files"):
        data_lib.parquet_files(str(tmp_path / "nope*.parquet"))


@pytest.fixture(scope="module")
def chunked(tmp_path_factory, prepared):
    """The same rows stored in chunks of 300 (the default is 2^22 rows per chunk)."""
    base = tmp_path_factory.mktemp("chunked")
    patch = pytest.MonkeyPatch()
    patch.setattr(store_lib, "CHUNK_ROWS", 300)
    try:
        table = prepared[0]
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
        store, _ = data_lib.prepare(cfg, base / "run", "logit")
    finally:
        patch.undo()
    assert store._offsets.tolist() == [0, 300, 600, 900, 1000]
    return store


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
