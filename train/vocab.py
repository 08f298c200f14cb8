"""Vocabulary pass: raw categorical values → contiguous ids, with per-category counts.

Ids are ordered by descending training frequency (ties by value), so id 0 is the most common
category; a column that an ordered table reads (a time index under ``RandomWalkLayer``) orders
them by value instead. Counts feed the row-sparse objective (each row's
prior term is spread over the ``count`` examples that contain it). Values absent from the
vocabulary encode to ``-1`` and are handled explicitly by the caller (an error in training, the
prior at scoring).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import files

UNSEEN = -1


@dataclass(frozen=True)
class Vocab:
    """One categorical column's vocabulary. ``counts`` are this run's training counts (the
    row-sparse objective spreads each row's prior over them); a run started from another
    (:mod:`train.warm_start`) also carries ``totals``, the counts over every run of its
    lineage, and ``inherited``, how many leading ids it took over unchanged."""

    column: str
    values: pa.Array  # id -> raw value
    counts: np.ndarray  # id -> training count in this run's data
    totals: np.ndarray | None = None  # id -> count over this run and those it continues
    inherited: int = 0  # ids 0..inherited-1 are the continued run's, with the same values

    @property
    def size(self) -> int:
        return len(self.values)

    def encode(self, raw: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Ids (int32) for raw values; ``UNSEEN`` (-1) where a value is not in the vocabulary."""
        raw = raw.cast(self.values.type) if raw.type != self.values.type else raw
        ids = pc.index_in(raw, value_set=self.values)
        return pc.fill_null(ids, UNSEEN).to_numpy(zero_copy_only=False).astype(np.int32)

    @property
    def lineage_counts(self) -> np.ndarray:
        """Counts over the run's lineage (this run's alone for a run started fresh)."""
        return self.counts if self.totals is None else self.totals

    def write(self, path: Path) -> None:
        columns = {"value": self.values, "count": pa.array(self.counts, pa.int64())}
        if self.totals is not None:
            columns["total"] = pa.array(self.totals, pa.int64())
        table = pa.table(columns).replace_schema_metadata(
            {b"inherited": str(self.inherited).encode()}
        )
        pq.write_table(table, path)

    @classmethod
    def read(cls, path: Path, column: str) -> Vocab:
        table = pq.read_table(path)
        totals = table["total"].to_numpy() if "total" in table.column_names else None
        inherited = int((table.schema.metadata or {}).get(b"inherited", b"0"))
        return cls(
            column, table["value"].combine_chunks(), table["count"].to_numpy(), totals, inherited
        )

    def extended(self, new: Vocab, ordered: bool = False) -> Vocab:
        """This (an earlier run's) vocabulary continued by ``new``, the vocabulary of the next
        run's data: every known value keeps its id, values new in ``new`` are appended in its
        order, ``counts`` are ``new``'s (0 for a known value absent from it) and ``totals``
        the sum over both. ``ordered``: the ids follow the values' order (a time index), so
        new values must all come after the known ones.

        Raises:
            ValueError: ``ordered`` and a new value sorts before a known one.
        """
        try:
            new_values = new.values.cast(self.values.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise ValueError(
                f"column {self.column!r} holds {new.values.type} values, but the run it "
                f"continues holds {self.values.type}; encode the category the same way"
            ) from None
        ids = pc.fill_null(pc.index_in(new_values, value_set=self.values), UNSEEN).to_numpy(
            zero_copy_only=False
        )
        fresh = np.flatnonzero(ids == UNSEEN)
        values = self.values
        if fresh.size:
            added = new_values.take(pa.array(fresh))
            if ordered and pc.min(added).as_py() < pc.max(self.values).as_py():
                raise ValueError(
                    f"column {self.column!r} orders its ids by value, and the new data has "
                    f"values before the last known one ({pc.max(self.values).as_py()!r}); an "
                    "ordered table can only grow at its end"
                )
            values = pa.concat_arrays([self.values, added])
        counts = np.zeros(len(values), np.int64)
        known = ids != UNSEEN
        counts[ids[known]] = new.counts[known]
        counts[self.size :] = new.counts[fresh]
        totals = counts.copy()
        totals[: self.size] += self.lineage_counts
        return Vocab(self.column, values, counts, totals, self.size)


class VocabBuilder:
    """Streams batches of a column and accumulates value counts with bounded memory."""

    def __init__(self, column: str, merge_every: int = 32, by_value: bool = False) -> None:
        self.column = column
        self.by_value = by_value
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
        keys = [("count", "descending"), ("value", "ascending")]
        order = pc.sort_indices(self._merged, sort_keys=keys[1:] if self.by_value else keys)
        table = self._merged.take(order)
        return Vocab(self.column, table["value"].combine_chunks(), table["count"].to_numpy().copy())


def build(
    columns: Iterable[str], batches: Iterable[pa.RecordBatch], by_value: Collection[str] = ()
) -> dict[str, Vocab]:
    """Vocabularies for ``columns`` from a stream of record batches; those in ``by_value``
    number their values in ascending order, the others by descending frequency."""
    builders = {c: VocabBuilder(c, by_value=c in by_value) for c in columns}
    for batch in batches:
        for name, builder in builders.items():
            builder.add(batch.column(name))
    return {name: b.finish() for name, b in builders.items()}


MANIFEST = "manifest.json"


class IncompleteVocabError(FileNotFoundError):
    """A vocabulary directory that is not a whole, readable unit; the message says what."""


def save_all(vocabs: dict[str, Vocab], directory: Path) -> None:
    """Write every column's vocabulary as one unit: all of it appears at ``directory`` at
    once, or none of it. Files are named by position, never by column name (a column named
    ``../x`` is not a path); ``manifest.json`` maps columns to files."""
    with files.atomic_directory(directory) as tmp:
        names = {}
        for i, (column, v) in enumerate(vocabs.items()):
            names[column] = f"{i:04d}.parquet"
            v.write(tmp / names[column])
        (tmp / MANIFEST).write_text(json.dumps({"columns": names}, indent=2))


def column_file(directory: Path, column: str) -> Path:
    """The file that holds ``column``'s vocabulary in a directory :func:`save_all` wrote (or
    the earlier one-file-per-column layout); :class:`IncompleteVocabError` naming what is
    missing or unreadable otherwise."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if files.is_regular_file(manifest):
        try:
            names = json.loads(manifest.read_text())["columns"]
        except (ValueError, KeyError, TypeError):
            raise IncompleteVocabError(f"{manifest} is unreadable") from None
    else:  # the earlier layout: one file per column, named by the column
        plain = "/" not in column and not column.startswith(".")
        names = {column: f"{column}.parquet"} if plain else {}
    name = names.get(column)
    path = directory / name if isinstance(name, str) and "/" not in name else None
    if path is None or not files.is_regular_file(path):
        raise IncompleteVocabError(f"no vocabulary for column {column!r} in {directory}")
    return path


def load_all(directory: Path, columns: Iterable[str]) -> dict[str, Vocab]:
    """Every requested column's vocabulary (see :func:`column_file`)."""
    out = {}
    for column in columns:
        path = column_file(directory, column)
        try:
            out[column] = Vocab.read(path, column)
        except (OSError, pa.ArrowException, KeyError):
            raise IncompleteVocabError(
                f"the vocabulary of column {column!r} ({path}) is unreadable"
            ) from None
    return out


def stream(directory: Path, column: str, chunk_rows: int) -> Iterator[tuple[pa.Array, np.ndarray]]:
    """``column``'s vocabulary in id order, ``chunk_rows`` ids at a time as ``(values,
    counts)``, so a 10⁷-category vocabulary is read in bounded memory."""
    path = column_file(directory, column)
    try:
        reader = pq.ParquetFile(path)
        for batch in reader.iter_batches(batch_size=chunk_rows, columns=["value", "count"]):
            yield batch.column(0), batch.column(1).to_numpy()
    except (OSError, pa.ArrowException, KeyError):
        raise IncompleteVocabError(
            f"the vocabulary of column {column!r} ({path}) is unreadable"
        ) from None
