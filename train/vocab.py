"""Vocabulary pass: raw categorical values → contiguous ids, with per-category counts.

Ids are ordered by descending training frequency (ties by value), so id 0 is the most common
category. Counts feed the row-sparse objective (each row's prior term is spread over the
``count`` examples that contain it). Values absent from the vocabulary encode to ``-1`` and are
handled explicitly by the caller (an error in training, the prior at scoring).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

UNSEEN = -1


@dataclass(frozen=True)
class Vocab:
    """One categorical column's vocabulary."""

    column: str
    values: pa.Array  # id -> raw value
    counts: np.ndarray  # id -> training count

    @property
    def size(self) -> int:
        return len(self.values)

    def encode(self, raw: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Ids (int32) for raw values; ``UNSEEN`` (-1) where a value is not in the vocabulary."""
        raw = raw.cast(self.values.type) if raw.type != self.values.type else raw
        ids = pc.index_in(raw, value_set=self.values)
        return pc.fill_null(ids, UNSEEN).to_numpy(zero_copy_only=False).astype(np.int32)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        table = pa.table({"value": self.values, "count": pa.array(self.counts, pa.int64())})
        tmp = directory / f".{self.column}.parquet.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, directory / f"{self.column}.parquet")

    @classmethod
    def load(cls, directory: Path, column: str) -> Vocab:
        path = directory / f"{column}.parquet"
        if not path.exists():
            raise FileNotFoundError(f"no vocabulary for column {column!r} at {path}")
        table = pq.read_table(path)
        return cls(column, table["value"].combine_chunks(), table["count"].to_numpy())


class VocabBuilder:
    """Streams batches of a column and accumulates value counts with bounded memory."""

    def __init__(self, column: str, merge_every: int = 32) -> None:
        self.column = column
        self._pending: list[pa.Table] = []
        self._merged: pa.Table | None = None
        self._merge_every = merge_every

    def add(self, values: pa.Array | pa.ChunkedArray) -> None:
        if values.null_count:
            raise ValueError(
                f"column {self.column!r}: {values.null_count} null categorical values; fill them "
                "with an explicit value (e.g. 'missing') before training"
            )
        counts = pc.value_counts(values)
        self._pending.append(
            pa.table({"value": counts.field("values"), "count": counts.field("counts")})
        )
        if len(self._pending) >= self._merge_every:
            self._merge()

    def _merge(self) -> None:
        parts = self._pending + ([self._merged] if self._merged is not None else [])
        if not parts:
            return
        table = pa.concat_tables(parts, promote_options="permissive")
        self._merged = (
            table.group_by("value").aggregate([("count", "sum")]).rename_columns(["value", "count"])
        )
        self._pending = []

    def finish(self) -> Vocab:
        self._merge()
        if self._merged is None or self._merged.num_rows == 0:
            raise ValueError(f"column {self.column!r}: no values to build a vocabulary from")
        order = pc.sort_indices(
            self._merged, sort_keys=[("count", "descending"), ("value", "ascending")]
        )
        table = self._merged.take(order)
        return Vocab(self.column, table["value"].combine_chunks(), table["count"].to_numpy().copy())


def build(columns: Iterable[str], batches: Iterable[pa.RecordBatch]) -> dict[str, Vocab]:
    """Vocabularies for ``columns`` from a stream of record batches."""
    builders = {c: VocabBuilder(c) for c in columns}
    for batch in batches:
        for name, builder in builders.items():
            builder.add(batch.column(name))
    return {name: b.finish() for name, b in builders.items()}


def save_all(vocabs: dict[str, Vocab], directory: Path) -> None:
    for v in vocabs.values():
        v.save(directory)


def load_all(directory: Path, columns: Iterable[str]) -> dict[str, Vocab]:
    return {c: Vocab.load(directory, c) for c in columns}
