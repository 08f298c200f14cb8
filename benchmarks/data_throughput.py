"""Data-stage throughput: Parquet → vocabulary + encode (once per run), then grain batches.

    python benchmarks/data_throughput.py [--rows 2000000] [--batch 4096]

Prints rows/s of the one-off prepare pass and of batch production from the memory-mapped
Arrow file at 1 and 2 prefetch threads: per-row shuffle (``shuffle_block=1``), the default
shuffle blocks, and the default blocks plus the host-side deduplication a row-sparse
random-effects table over ``g`` adds. Compare the batch rate with a training step's
examples/s (benchmarks/train_throughput.py) to see whether the data stage keeps up.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import OmegaConf

from train import data as data_lib
from train import pipeline
from train.config import DataConfig

CACHE = Path(__file__).resolve().parent / ".cache" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--batches", type=int, default=400)
    args = parser.parse_args()

    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"rows_{args.rows}.parquet"
    numeric = [f"x{j}" for j in range(32)]
    if not path.exists():
        rng = np.random.default_rng(0)
        cols = {c: rng.normal(size=args.rows).astype(np.float32) for c in numeric}
        cols["g"] = (rng.zipf(1.2, args.rows) % 1_000_000).astype(np.int64)
        cols["h"] = rng.integers(0, 1000, args.rows)
        cols["y"] = rng.normal(size=args.rows).astype(np.float32)
        pq.write_table(pa.table(cols), path, row_group_size=1 << 18)
    cfg = OmegaConf.structured(
        DataConfig(path=str(path), numeric=numeric, categorical=["g", "h"], target="y")
    )
    run = CACHE / "run"
    shutil.rmtree(run, ignore_errors=True)
    t = time.perf_counter()
    store, vocabs = data_lib.prepare(cfg, run, "gaussian")
    prep = time.perf_counter() - t
    print(f"{'stage':<42}{'rows/s':>14}")
    print("-" * 56)
    print(
        f"{'prepare (vocab + validate + encode)':<42}{args.rows / prep:>14,.0f}"
        f"   ({prep:.1f} s, vocab g={vocabs['g'].size:,})"
    )
    block = DataConfig.shuffle_block
    dedup = sparse_dedup(vocabs["g"].size)
    for label, blocks, transform in (
        ("row shuffle", 1, None),
        (f"blocks of {block}", block, None),
        (f"blocks of {block} + sparse dedup", block, dedup),
    ):
        batches = pipeline.StepBatches(store, args.batch, 0, block=blocks, transform=transform)
        for threads in (1, 2):
            it = pipeline.iterate(batches, 0, args.batches + 8, threads)
            for _ in range(8):
                next(it)
            t = time.perf_counter()
            for _ in range(args.batches):
                next(it)
            rate = args.batches * args.batch / (time.perf_counter() - t)
            print(f"{f'{label}, {threads} thread(s)':<42}{rate:>14,.0f}")


def sparse_dedup(g_size: int):
    """The host-side preparation of a row-sparse RandomEffectsLayer over ``g``."""
    from train.dedup import host_rows
    from train.model import Columns, build_model
    from train.sparse import SparseTable, table_rows

    term = {"layer": "RandomEffectsLayer", "name": "g", "inputs": ["g"], "sparse": True}
    columns = Columns((), ("g", "h"))
    model = build_model({"link": "gaussian", "terms": [term]}, columns, {"g": g_size})
    t = model.terms[0]
    tables = table_rows({t.table_site: SparseTable(t.table_site, t, int(sum(t.num_categories)))})
    return lambda batch: {**batch, **host_rows(batch["categorical"], tables)}


if __name__ == "__main__":
    main()
