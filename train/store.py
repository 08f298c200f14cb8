"""The encoded store: one memory-mapped Arrow IPC file of float32 features, int32 ids and
the target, written once per run and read zero-copy (data larger than RAM trains from the
page cache; Parquet would have to be decoded into memory on every read).

:func:`write_store` encodes validated batches into it, :func:`shuffle_store` permutes its
rows once in blocks, and :class:`Store` reads any rows of it back as aligned numpy arrays.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from blayers.start import FeatureStats, TargetStats

from . import files as files_lib


class DataError(ValueError):
    """Input data that cannot be used; the message names the column and the fix."""


CHUNK_ROWS = 1 << 22  # rows per Arrow record batch in the encoded file


@dataclass
class Store:
    """Memory-mapped encoded rows: ``numeric (N, d)``, ``categorical (N, F)``, ``target (N,)``.

    Features are stored row-major (one fixed-size list per row and kind), so a batch is two
    row gathers, whatever the number of feature columns.
    """

    numeric_columns: list[str]
    categorical_columns: list[str]
    num_rows: int
    _chunks: dict[str, list[np.ndarray]]
    _offsets: np.ndarray
    has_target: bool
    # moments of the target, accumulated by the encode pass (data-aware starts)
    target_stats: TargetStats | None = field(default=None, repr=False)
    feature_stats: FeatureStats | None = field(default=None, repr=False)
    # each categorical column's target sum per id, from the same pass (row starts)
    category_sums: dict[str, np.ndarray] | None = field(default=None, repr=False)
    # (block, chunk) -> each kind's (blocks, block, width) view of that chunk, made on first use
    _views: dict[tuple[int, int], dict[str, np.ndarray]] = field(
        default_factory=dict, init=False, repr=False
    )

    @classmethod
    def open(cls, path: Path) -> Store:
        source = pa.memory_map(str(path), "r")
        table = pa.ipc.open_file(source).read_all()
        meta = json.loads(table.schema.metadata[b"blayers"])
        widths = {NUMERIC: len(meta["numeric"]), CATEGORICAL: len(meta["categorical"])}
        chunks = {}
        for name in table.column_names:
            parts = []
            for chunk in table.column(name).chunks:
                if name in widths:  # fixed-size list: zero-copy (rows, width) view
                    flat = chunk.flatten().to_numpy(zero_copy_only=True)
                    parts.append(flat.reshape(len(chunk), widths[name]))
                else:
                    parts.append(chunk.to_numpy(zero_copy_only=True))
            chunks[name] = parts
        lengths = [len(c) for c in next(iter(chunks.values()))] if chunks else [0]
        return cls(
            meta["numeric"],
            meta["categorical"],
            table.num_rows,
            chunks,
            np.concatenate([[0], np.cumsum(lengths)]),
            meta["has_target"],
        )

    def column(self, name: str) -> np.ndarray:
        """A whole stored block (``numeric``, ``categorical`` or ``target``), concatenated."""
        return np.concatenate(self._chunks[name])

    def _widths(self) -> dict[str, int | None]:
        widths: dict[str, int | None] = {
            NUMERIC: len(self.numeric_columns),
            CATEGORICAL: len(self.categorical_columns),
        }
        if self.has_target:
            widths[TARGET] = None
        return widths

    def empty_batch(self, n: int) -> dict[str, np.ndarray]:
        """Aligned arrays for an ``n``-row batch; kinds the store lacks (no numeric columns)
        are zero-width and filled here, so gathers only visit stored kinds."""
        shapes = {k: (n,) if w is None else (n, w) for k, w in self._widths().items()}
        arrays = aligned_arrays([(s, DTYPES[k]) for k, s in shapes.items()])
        out = dict(zip(shapes, arrays, strict=True))
        for name, values in out.items():
            if name not in self._chunks:
                values[:] = 0
        return out

    def take(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Gather ``rows`` (sorted for locality) into one batch of numpy arrays."""
        rows = np.asarray(rows, np.int64)
        out = self.empty_batch(len(rows))
        if not len(rows):
            return out
        chunk_of = np.searchsorted(self._offsets, rows, side="right") - 1
        local = rows - self._offsets[chunk_of]
        single = chunk_of[0] == chunk_of[-1]
        # runs of consecutive rows within one chunk are copied as slices, several times
        # cheaper than a row gather when runs are long
        breaks = np.flatnonzero((np.diff(rows) != 1) | (np.diff(chunk_of) != 0)) + 1
        runs = (
            list(zip(np.r_[0, breaks].tolist(), np.r_[breaks, len(rows)].tolist(), strict=True))
            if len(breaks) < len(rows) // MIN_RUN
            else None
        )
        for name, dst in out.items():
            if name not in self._chunks:
                continue
            parts = self._chunks[name]
            if runs is not None:
                for lo, hi in runs:
                    first = int(local[lo])
                    dst[lo:hi] = parts[int(chunk_of[lo])][first : first + hi - lo]
            elif single:
                # mode="clip": with the default "raise" numpy gathers into a temporary first
                np.take(parts[int(chunk_of[0])], local, axis=0, out=dst, mode="clip")
            else:
                for c in np.unique(chunk_of):
                    sel = chunk_of == c
                    dst[sel] = parts[c][local[sel]]
        return out

    def take_blocks(
        self, blocks: np.ndarray, block: int, out: dict[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        """Rows ``b·block … b·block + block - 1`` of each of ``blocks`` (ascending), in that
        order; a block running past the last row wraps around to the first. Written into
        ``out`` where given (arrays of :meth:`empty_batch`'s shapes, e.g. one step's slice of a
        dispatch's buffer), else into a new batch.

        Blocks lying whole in one stored chunk are copied by a single ``np.take`` over a
        ``(blocks, block, width)`` view of that chunk, with no Python loop over blocks: the
        per-batch cost of the data stage is then mostly the bytes it copies.
        """
        blocks = np.asarray(blocks, np.int64)
        if out is None:
            out = self.empty_batch(len(blocks) * block)
        if not len(blocks):
            return out
        starts = blocks * block
        chunk = np.searchsorted(self._offsets, starts, side="right") - 1
        whole = (starts + block <= self._offsets[chunk + 1]) & (self._offsets[chunk] % block == 0)
        if chunk[0] == chunk[-1] and whole.all():  # the usual batch: one take per kind
            groups = [(0, len(blocks))]
        else:
            key = np.where(whole, chunk, -1 - np.arange(len(blocks)))  # a group per stray block
            cuts = (np.flatnonzero(np.diff(key)) + 1).tolist()
            groups = list(zip([0, *cuts], [*cuts, len(blocks)], strict=True))
        for lo, hi in groups:
            if not whole[lo]:
                rows = (starts[lo] + np.arange(block)) % self.num_rows
                for name, values in self.take(rows).items():
                    out[name][lo * block : hi * block] = values
                continue
            c = int(chunk[lo])
            ids = (starts[lo:hi] - self._offsets[c]) // block
            for name, view in self._block_views(block, c).items():
                target = out[name][lo * block : hi * block].reshape(hi - lo, *view.shape[1:])
                np.take(view, ids, axis=0, out=target, mode="clip")
        return out

    def _block_views(self, block: int, chunk: int) -> dict[str, np.ndarray]:
        """``(blocks, block, width)`` views of a stored chunk's whole blocks, made once."""
        views = self._views.get((block, chunk))
        if views is None:
            views = {}
            for name, parts in self._chunks.items():
                part = parts[chunk]
                views[name] = part[: len(part) // block * block].reshape(-1, block, *part.shape[1:])
            self._views[(block, chunk)] = views
        return views


NUMERIC, CATEGORICAL, TARGET = "numeric", "categorical", "target"


DTYPES = {NUMERIC: np.float32, CATEGORICAL: np.int32, TARGET: np.float32}


ALIGN = 64


def aligned_arrays(specs: Sequence[tuple[tuple[int, ...], Any]]) -> list[np.ndarray]:
    """Empty arrays of the given ``(shape, dtype)``, each on a 64-byte boundary, carved from one
    allocation. XLA:CPU then uses the host buffers in place instead of copying them at
    ``device_put`` (a third of the data stage's time per batch), which is safe because every
    batch gets fresh buffers that nothing writes after the transfer."""
    sizes = [math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in specs]
    padded = [-(-n // ALIGN) * ALIGN for n in sizes]
    raw = np.empty(sum(padded) + ALIGN, np.uint8)
    at = (-raw.__array_interface__["data"][0]) % ALIGN
    out = []
    for (shape, dtype), n, step in zip(specs, sizes, padded, strict=True):
        out.append(raw[at : at + n].view(dtype).reshape(shape))
        at += step
    return out


MIN_RUN = 16  # mean run length from which slices beat a row gather


def arrow_column(values: np.ndarray) -> pa.Array:
    if values.ndim == 1:
        return pa.array(values)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), values.shape[1])


def shuffle_store(src: Path, dst: Path, seed: int) -> None:
    """Rewrite the encoded rows of ``src`` into ``dst`` in one global random order, a chunk of
    output at a time (random reads from the memory-mapped source; atomic rename)."""
    store = Store.open(src)
    schema = pa.ipc.open_file(pa.memory_map(str(src), "r")).schema
    perm = np.random.default_rng(seed).permutation(store.num_rows)

    def write(tmp: Path) -> None:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for lo in range(0, store.num_rows, CHUNK_ROWS):
                rows = perm[lo : lo + CHUNK_ROWS]
                order = np.argsort(rows)
                sorted_batch = store.take(rows[order])  # sequential-ish reads
                inverse = np.empty_like(order)
                inverse[order] = np.arange(len(order))
                arrays = [arrow_column(sorted_batch[f.name][inverse]) for f in schema]
                writer.write_batch(pa.record_batch(arrays, schema=schema))

    files_lib.atomic_write(dst, write)
