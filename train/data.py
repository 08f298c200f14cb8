"""Data stage: Parquet → validated, id-encoded, memory-mapped Arrow → grain batches.

1. ``prepare`` streams the Parquet input twice (vocabulary pass, then validate + encode) and
   writes one Arrow IPC file of float32 features, int32 ids and the target. Arrow IPC maps
   zero-copy, so data larger than RAM trains from the page cache; Parquet would have to be
   decoded into memory on every read. Every check runs before anything is written.
2. ``StepBatches`` makes the batch at step ``s`` a pure function of ``(seed, s)``: position
   ``s·B`` in an endless sequence of per-epoch permutations. Resume is "start at step s"; it
   stays exact when the number of processes changes, since each process takes its contiguous
   share of the same global batch.
3. Rows are gathered in whole batches (sorted numpy takes), never one Python object per row;
   grain's ``MapDataset`` over step numbers prefetches batches on background threads.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import math
import os
import shutil
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import grain
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pyarrow.types as pat

from blayers import links
from blayers.start import CategorySums, FeatureStats, TargetStats

from . import files as files_lib
from . import vocab as vocab_lib
from .cores import CoreSplit, pipeline_threads

CHUNK_ROWS = 1 << 22  # rows per Arrow record batch in the encoded file


class DataError(ValueError):
    """Input data that cannot be used; the message names the column and the fix."""


def parquet_files(path: str) -> list[str]:
    """Files behind ``data.path``: a Parquet file, a directory of them, or a glob."""
    if any(ch in path for ch in "*?["):
        files = sorted(glob.glob(path, recursive=True))
    elif os.path.isdir(path):
        files = sorted(str(p) for p in Path(path).rglob("*.parquet") if not p.name.startswith("."))
    else:
        files = [path] if os.path.exists(path) else []
    if not files:
        raise DataError(
            f"data.path {path!r} matched no Parquet files; give a .parquet file, a directory "
            "of them, or a glob"
        )
    return files


def open_dataset(path: str) -> pads.Dataset:
    files = parquet_files(path)
    try:
        return pads.dataset(files, format="parquet")
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"data.path {path!r}: cannot read as Parquet ({err})") from err


def scan(
    dataset: pads.Dataset, columns: Sequence[str], batch_rows: int = 1 << 18
) -> Iterator[pa.RecordBatch]:
    """Stream ``columns`` one row group at a time. Both the dataset scanner and
    ``ParquetFile.iter_batches`` kept memory proportional to the input (measured: 27 MB of
    Arrow allocations left after 1M rows, 242 MB after 10M); whole row-group reads stay flat."""
    for path in dataset.files:
        with pq.ParquetFile(path) as parquet:
            for group in range(parquet.metadata.num_row_groups):
                table = parquet.read_row_group(group, columns=list(columns))
                yield from table.to_batches(max_chunksize=batch_rows)


def check_columns(
    schema: pa.Schema, numeric: Sequence[str], categorical: Sequence[str], target: str | None
) -> None:
    """Missing columns and wrong dtypes, each a one-line error naming the column."""
    wanted = [*numeric, *categorical, *([target] if target else [])]
    seen = set()
    for col in wanted:
        if col in seen:
            raise DataError(f"column {col!r} is listed twice in data.numeric/categorical/target")
        seen.add(col)
        if col not in schema.names:
            raise DataError(
                f"column {col!r} is missing from the data (has: {', '.join(schema.names)}); "
                "fix data.numeric / data.categorical / data.target"
            )
    for col in [*numeric, *([target] if target else [])]:
        typ = schema.field(col).type
        if not (pat.is_integer(typ) or pat.is_floating(typ) or pat.is_boolean(typ)):
            raise DataError(
                f"column {col!r} has non-numeric type {typ}; numeric features and the target "
                "must be int or float (list a string column under data.categorical)"
            )
    for col in categorical:
        typ = schema.field(col).type
        if not (pat.is_integer(typ) or pat.is_string(typ) or pat.is_large_string(typ)):
            raise DataError(
                f"column {col!r} has type {typ}; categorical columns must hold ints or strings"
            )


def _family(typ: pa.DataType) -> str:
    return "string" if pat.is_string(typ) or pat.is_large_string(typ) else "number"


def check_files(
    files: Sequence[str], numeric: Sequence[str], categorical: Sequence[str], target: str | None
) -> None:
    """:func:`check_columns` on every file's own schema (footers only), and the categorical
    columns of the same kind (ints or strings) in every file, so that parts whose schemas
    drift fail before any pass, naming the file and the column."""
    first: dict[str, str] = {}
    for path in files:
        try:
            schema = pq.read_schema(path)
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(f"{path}: cannot read as Parquet ({err})") from None
        try:
            check_columns(schema, numeric, categorical, target)
        except DataError as err:
            raise DataError(f"{path}: {err}") from None
        for col in categorical:
            kind = _family(schema.field(col).type)
            if first.setdefault(col, kind) != kind:
                raise DataError(
                    f"{path}: column {col!r} holds {kind}s, but {files[0]} holds "
                    f"{first[col]}s; every file must encode a category the same way"
                )


def numeric_block(batch: pa.RecordBatch, columns: Sequence[str]) -> np.ndarray:
    """``(n, d)`` float32 features, refusing NaN / inf with the column named."""
    out = np.empty((batch.num_rows, len(columns)), np.float32)
    for j, col in enumerate(columns):
        arr = batch.column(col)
        if arr.null_count:
            raise DataError(f"column {col!r}: {arr.null_count} null values; impute or drop them")
        values = arr.to_numpy(zero_copy_only=False).astype(np.float32)
        bad = ~np.isfinite(values)
        if bad.any():
            raise DataError(
                f"column {col!r}: {int(bad.sum())} NaN/inf values; impute or drop those rows"
            )
        out[:, j] = values
    return out


# --------------------------------------------------------------------------------------------
# the encoded store
# --------------------------------------------------------------------------------------------


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

    def _empty_batch(self, n: int) -> dict[str, np.ndarray]:
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
        out = self._empty_batch(len(rows))
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

    def take_blocks(self, blocks: np.ndarray, block: int) -> dict[str, np.ndarray]:
        """Rows ``b·block … b·block + block - 1`` of each of ``blocks`` (ascending), in that
        order; a block running past the last row wraps around to the first.

        Blocks lying whole in one stored chunk are copied by a single ``np.take`` over a
        ``(blocks, block, width)`` view of that chunk, with no Python loop over blocks: the
        per-batch cost of the data stage is then mostly the bytes it copies.
        """
        blocks = np.asarray(blocks, np.int64)
        out = self._empty_batch(len(blocks) * block)
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


def _encode_batch(
    batch: pa.RecordBatch,
    numeric: Sequence[str],
    categorical: Sequence[str],
    target: str | None,
    vocabs: dict[str, vocab_lib.Vocab],
    link: str | None,
) -> dict[str, np.ndarray]:
    cols: dict[str, np.ndarray] = {}
    if numeric:
        cols[NUMERIC] = numeric_block(batch, numeric)
    if categorical:
        cols[CATEGORICAL] = np.stack(
            [vocabs[col].encode(batch.column(col)) for col in categorical], axis=1
        )
    if target is not None:
        y = numeric_block(batch, [target])[:, 0]
        if link is not None:
            try:
                links.check_target(link, y, column=target)
            except ValueError as err:
                raise DataError(str(err)) from None
        cols[TARGET] = y
    return cols


def _arrow_block(values: np.ndarray) -> pa.Array:
    if values.ndim == 1:
        return pa.array(values)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), values.shape[1])


def write_store(
    batches: Iterator[pa.RecordBatch],
    path: Path,
    numeric: Sequence[str],
    categorical: Sequence[str],
    target: str | None,
    vocabs: dict[str, vocab_lib.Vocab],
    link: str | None = None,
    stats: TargetStats | None = None,
    features: FeatureStats | None = None,
    sums: CategorySums | None = None,
) -> int:
    """Validate and encode every batch into an Arrow IPC file at ``path`` (atomically),
    folding the target into ``stats``, the features into ``features`` and each category's
    target sum into ``sums`` when given.

    Raises:
        DataError: any bad value; the partial file is removed.
    """
    meta = {
        "numeric": list(numeric),
        "categorical": list(categorical),
        "has_target": target is not None,
    }
    fields = []
    if numeric:
        fields.append(pa.field(NUMERIC, pa.list_(pa.float32(), len(numeric))))
    if categorical:
        fields.append(pa.field(CATEGORICAL, pa.list_(pa.int32(), len(categorical))))
    if target is not None:
        fields.append(pa.field(TARGET, pa.float32()))
    schema = pa.schema(fields, metadata={"blayers": json.dumps(meta)})
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = 0

    def write(tmp: Path) -> None:
        nonlocal rows
        pending: list[dict[str, np.ndarray]] = []
        pending_rows = 0
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:

            def flush() -> None:
                arrays = [
                    _arrow_block(np.concatenate([p[f.name] for p in pending])) for f in fields
                ]
                writer.write_batch(pa.record_batch(arrays, schema=schema))
                pending.clear()

            for batch in batches:
                enc = _encode_batch(batch, numeric, categorical, target, vocabs, link)
                if stats is not None and TARGET in enc:
                    stats.update(enc[TARGET])
                if features is not None and NUMERIC in enc:
                    features.update(enc[NUMERIC])
                if sums is not None and TARGET in enc and CATEGORICAL in enc:
                    sums.update(list(categorical), enc[CATEGORICAL], enc[TARGET])
                pending.append(enc)
                pending_rows += batch.num_rows
                rows += batch.num_rows
                if pending_rows >= CHUNK_ROWS:
                    flush()
                    pending_rows = 0
            if pending:
                flush()
        if rows == 0:
            raise DataError("the dataset is empty (0 rows); check data.path")

    files_lib.atomic_write(path, write)
    return rows


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
                arrays = [_arrow_block(sorted_batch[f.name][inverse]) for f in schema]
                writer.write_batch(pa.record_batch(arrays, schema=schema))

    files_lib.atomic_write(dst, write)


STORE_FORMAT = 3  # bump when the encoded layout changes, so old files are rebuilt


def source_fingerprint(files: Sequence[str], columns: Sequence[str]) -> str:
    h = hashlib.sha256(f"format {STORE_FORMAT}".encode())
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.abspath(f)}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(json.dumps(list(columns)).encode())
    return h.hexdigest()[:16]


def prepare(
    data_cfg: Any,
    run_dir: Path,
    link: str | None,
    read_batch_rows: int = 1 << 18,
    ordered: Collection[str] = (),
    base_vocabs: Mapping[str, vocab_lib.Vocab] | None = None,
) -> tuple[Store, dict[str, vocab_lib.Vocab]]:
    """Vocabulary + encoded store for training, reusing the run's own when the input is unchanged.

    A run keeps its vocabulary for life (ids must mean the same rows after a resume): when
    ``run_dir/vocab`` exists it is loaded, never rebuilt. ``ordered``: columns whose ids
    follow their values' order (:func:`train.model.ordered_columns`). ``base_vocabs``: the
    vocabularies of the run this one continues (:mod:`train.warm_start`), which a new run's
    vocabulary extends (:meth:`train.vocab.Vocab.extended`).
    """
    dataset = open_dataset(data_cfg.path)
    numeric, categorical, target = (
        list(data_cfg.numeric),
        list(data_cfg.categorical),
        data_cfg.target,
    )
    check_files(dataset.files, numeric, categorical, target)
    rows = dataset.count_rows()  # from Parquet footers, no data read
    if rows == 0:
        raise DataError(f"the dataset at data.path {data_cfg.path!r} is empty (0 rows)")
    if data_cfg.batch_size > rows:
        raise DataError(
            f"data.batch_size={data_cfg.batch_size} is larger than the data ({rows:,} rows): "
            f"use a batch of at most {rows:,}"
        )
    columns = [*numeric, *categorical, target]
    files = parquet_files(data_cfg.path)
    fingerprint = source_fingerprint(files, columns)
    store_path = run_dir / "data" / "train.arrow"
    stamp = run_dir / "data" / "source.json"
    vocab_dir = run_dir / "vocab"

    vocabs = _saved_vocab(run_dir, categorical)
    if vocabs is None:
        try:
            batches = scan(dataset, categorical, read_batch_rows)
            vocabs = vocab_lib.build(categorical, batches, by_value=ordered)
            if base_vocabs is not None:
                vocabs = {
                    c: base_vocabs[c].extended(v, ordered=c in ordered) for c, v in vocabs.items()
                }
        except ValueError as err:  # null or unusable categorical values, named by column
            raise DataError(str(err)) from None
    if store_path.exists() and stamp.exists():
        stamped = _read_stamp(stamp)
        if stamped.get("fingerprint") == fingerprint:
            # the store was encoded, and checked, with this vocabulary (rebuilt, if it was
            # lost, from the same input)
            if not vocab_dir.exists():
                vocab_lib.save_all(vocabs, vocab_dir)
            store = Store.open(store_path)
            store.target_stats, store.feature_stats = _stamped_stats(stamped, store)
            store.category_sums = _saved_category_sums(store, vocabs, run_dir)
            return store, vocabs

    batches = scan(dataset, columns, read_batch_rows)
    unshuffled = store_path.with_name(f".{store_path.name}.input-order")
    stats, features = TargetStats(), FeatureStats()
    sums = CategorySums({c: v.size for c, v in vocabs.items()})
    write_store(
        batches, unshuffled, numeric, categorical, target, vocabs, link, stats, features, sums
    )
    try:
        shuffle_store(unshuffled, store_path, seed=0)
    finally:
        unshuffled.unlink(missing_ok=True)
    store = Store.open(store_path)
    ids = store.column(CATEGORICAL) if categorical else np.zeros((0, 0), np.int32)
    unseen = {c: int((ids[:, j] < 0).sum()) for j, c in enumerate(categorical)}
    bad = {c: n for c, n in unseen.items() if n}
    if bad:
        store_path.unlink()
        raise DataError(
            f"categorical values not in the run's vocabulary: {bad}; the run directory was "
            "started on other data: use a new run_dir"
        )
    if not vocab_dir.exists():
        vocab_lib.save_all(vocabs, vocab_dir)
    store.target_stats, store.feature_stats = stats, features
    store.category_sums = sums.sums
    _save_category_sums(sums.sums, run_dir)
    files_lib.write_text(
        stamp,
        json.dumps(
            {
                "fingerprint": fingerprint,
                "files": files,
                "rows": store.num_rows,
                "target_stats": stats.to_dict(),
                "feature_stats": features.to_dict(),
            }
        ),
    )
    return store, vocabs


def _saved_vocab(run_dir: Path, columns: Sequence[str]) -> dict[str, vocab_lib.Vocab] | None:
    """The run's saved vocabulary; ``None`` when there is none, or when a start that never
    reached a checkpoint left it incomplete (it is removed and rebuilt from the data). An
    incomplete vocabulary under existing checkpoints is an error: their rows need those ids."""
    vocab_dir = run_dir / "vocab"
    if not (vocab_dir.exists() or vocab_dir.is_symlink()):
        return None
    try:
        return vocab_lib.load_all(vocab_dir, columns)
    except vocab_lib.IncompleteVocabError as err:
        checkpoints = run_dir / "checkpoints"
        if checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir()):
            raise DataError(
                f"{err}, but {checkpoints} holds steps trained on it: restore {vocab_dir} "
                "from a copy of the run, or train in a new run_dir"
            ) from None
    if vocab_dir.is_symlink() or not vocab_dir.is_dir():
        vocab_dir.unlink()
    else:
        shutil.rmtree(vocab_dir)
    return None


def _read_stamp(stamp: Path) -> dict[str, Any]:
    """The encoded store's stamp; empty (so the store is rebuilt) when it is unreadable."""
    try:
        stamped = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return {}
    return stamped if isinstance(stamped, dict) else {}


def _stamped_stats(stamped: dict[str, Any], store: Store) -> tuple[TargetStats, FeatureStats]:
    """The target's and features' moments saved with the store; a store encoded before they
    were saved (or before the features' ranges were) has them computed once from its columns."""
    if "target_stats" in stamped and "low" in stamped.get("feature_stats", {}):
        return (
            TargetStats.from_dict(stamped["target_stats"]),
            FeatureStats.from_dict(stamped["feature_stats"]),
        )
    stats, features = TargetStats(), FeatureStats()
    if store.has_target:
        stats.update(store.column(TARGET))
    if store.numeric_columns:
        features.update(store.column(NUMERIC))
    return stats, features


CATEGORY_SUMS = "category_sums.npz"  # beside the encoded store: each category's target sum


def _save_category_sums(sums: dict[str, np.ndarray], run_dir: Path) -> None:
    """Saved by position (a column name is never a file key), atomically."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, *(sums[c] for c in sorted(sums)))

    files_lib.atomic_write(run_dir / "data" / CATEGORY_SUMS, write)


def _saved_category_sums(
    store: Store, vocabs: dict[str, vocab_lib.Vocab], run_dir: Path
) -> dict[str, np.ndarray] | None:
    """The category sums saved with the store; a store encoded before they were saved (or
    whose file is unreadable or of other sizes) has them computed once from its columns."""
    if not store.has_target or not store.categorical_columns:
        return None
    columns = sorted(store.categorical_columns)
    try:
        with np.load(run_dir / "data" / CATEGORY_SUMS) as saved:
            sums = {c: saved[f"arr_{i}"] for i, c in enumerate(columns)}
        if all(len(sums[c]) == vocabs[c].size for c in columns):
            return sums
    except (OSError, ValueError, KeyError):
        pass
    found = CategorySums({c: vocabs[c].size for c in store.categorical_columns})
    for ids, y in zip(store._chunks[CATEGORICAL], store._chunks[TARGET], strict=True):
        found.update(list(store.categorical_columns), ids, y)  # a chunk at a time
    _save_category_sums(found.sums, run_dir)
    return found.sums


# --------------------------------------------------------------------------------------------
# batches as a pure function of the step
# --------------------------------------------------------------------------------------------


class StepBatches:
    """The local share of the global batch at step ``s``, a pure function of ``(seed, s)``.

    The encoded store is shuffled once when it is written, so contiguous blocks of it are
    random samples. Each epoch permutes the ``ceil(N / block)`` blocks (the last wraps around to
    the start); step ``s`` takes the next ``B / block`` blocks. Reads are sequential within a
    block, which is what makes batches cheap to gather from a memory-mapped file; ``block=1``
    is a plain per-row shuffle.
    """

    def __init__(
        self,
        store: Store,
        global_batch: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        transform: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
        block: int = 1,
    ) -> None:
        """``transform`` runs on each local batch in the pipeline's threads (e.g. the sparse
        tables' host-side deduplication)."""
        if global_batch % process_count:
            raise DataError(
                f"data.batch_size={global_batch} does not divide over {process_count} processes"
            )
        self.local = global_batch // process_count
        # the block depends on the global batch only, so the batch at step s is the same for
        # any number of processes (resume stays exact when the process count changes)
        block = max(1, min(int(block), global_batch, store.num_rows))
        while global_batch % block:
            block -= 1
        if self.local % block:
            raise DataError(
                f"data.shuffle_block={block} does not divide the {self.local} rows each of "
                f"{process_count} processes reads; set data.shuffle_block to a divisor of "
                f"{self.local}"
            )
        self.store = store
        self.global_batch = global_batch
        self.seed = seed
        self.block = block
        self.num_blocks = -(-store.num_rows // block)
        self.start = process_index * self.local
        self.transform = transform

    @lru_cache(maxsize=2)  # noqa: B019 - two epochs live at an epoch boundary; bounded
    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_blocks)

    def blocks(self, step: int) -> np.ndarray:
        """This process's share of step ``step``'s blocks, ascending."""
        per_step = self.global_batch // self.block
        first = step * per_step + self.start // self.block
        positions = np.arange(first, first + self.local // self.block, dtype=np.int64)
        epochs, within = np.divmod(positions, self.num_blocks)
        if epochs[0] == epochs[-1]:  # the common case: one epoch
            blocks = self._permutation(int(epochs[0]))[within]
        else:
            blocks = np.empty(len(positions), np.int64)
            for e in np.unique(epochs):
                sel = epochs == e
                blocks[sel] = self._permutation(int(e))[within[sel]]
        blocks.sort()
        return blocks

    def rows(self, step: int) -> np.ndarray:
        """Global row indices of this process's share of step ``step``'s batch, in batch order
        (ascending, except the rows of a block that wraps around past the last row)."""
        blocks = self.blocks(step)
        rows = (blocks[:, None] * self.block + np.arange(self.block)).ravel()
        return rows % self.store.num_rows if rows[-1] >= self.store.num_rows else rows

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        batch = self.store.take_blocks(self.blocks(step), self.block)
        return self.transform(batch) if self.transform is not None else batch


STEPS_PER_ELEMENT = 4  # steps per grain element: its per-element cost (~0.1 ms) is shared


def iterate(
    batches: StepBatches,
    start: int,
    stop: int,
    prefetch: int,
    cores: CoreSplit | None = None,
) -> Iterator[Any]:
    """Batches for steps ``start..stop-1`` through grain, prefetched on background threads
    (on ``cores.data`` when given, see :mod:`train.cores`).

    Each grain element holds the batches of a few consecutive steps, so grain's own work per
    element (futures, statistics, the hand-off between threads) is paid once per group.
    """
    if stop <= start:
        return iter(())

    def group(first: int) -> list[Any]:
        if cores is not None:
            cores.pin_data_thread()
        return [batches(s) for s in range(first, min(first + STEPS_PER_ELEMENT, stop))]

    ds = grain.MapDataset.range(start, stop, STEPS_PER_ELEMENT).map(group)
    threads = pipeline_threads(prefetch)
    options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(prefetch, 1))
    return itertools.chain.from_iterable(ds.to_iter_dataset(read_options=options))
