"""Host-side deduplication of a row-sparse table's rows, in the data pipeline's threads (numpy
only: nothing here needs jax or the model).

For each sparse table a batch gets ``uniq:{site}`` (its distinct table rows, sorted, padded to a
static length with distinct fill ids past the table), ``count:{site}`` (occurrences of each)
and ``local:{site}`` (each id's position in ``uniq``): the step gathers and scatters only those
rows, with no device-side ``unique``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .store import aligned_arrays

UNIQ, COUNT, LOCAL = "uniq:", "count:", "local:"


MIN_CAPACITY = 64


def row_capacity(found: int, limit: int) -> int:
    """Static length of a batch's unique-row arrays: the smallest of 64, 96, 128, 192, 256, ...
    (powers of two and the midpoints between them) that holds ``found`` rows, at most ``limit``.

    Gathers, scatters and row gradients scale with this length, not with the ``B·F`` worst case
    (Zipf-like ids at B=4096 repeat heavily: ~1,400 distinct rows, so 1,536 instead of 4,096).
    Each distinct length compiles the step once; at most ~2 per doubling of ``B·F``.
    """
    size = MIN_CAPACITY
    while size < found:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
    return max(min(size, limit), found)


SCRATCH_MAX_ROWS = 1 << 25  # per-thread lookup tables up to 128 MB; larger ones use searchsorted
_scratch = threading.local()


def _lookup_table(site: str, rows: int) -> np.ndarray | None:
    """This thread's ``int32[rows]`` scratch for ``site``: the inverse of a batch's unique rows
    is two O(batch) passes through it instead of a binary search per id. Entries are only
    ever read at rows the same batch has just written, so the table is never cleared."""
    if rows > SCRATCH_MAX_ROWS:
        return None
    tables = _scratch.__dict__.setdefault("tables", {})
    table = tables.get(site)
    if table is None or len(table) < rows:
        table = tables[site] = np.empty(rows, np.int32)
    return table


def _unique(
    x: np.ndarray, lookup: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``np.unique(x, return_inverse=True, return_counts=True)`` in a fraction of the time: one
    ``sort`` instead of an ``argsort``, and the inverse through ``lookup`` (an int32 scratch
    indexed by value, see :func:`_lookup_table`) or else by ``searchsorted``."""
    s = np.sort(x)
    first = np.empty(len(s), bool)
    first[:1] = True
    np.not_equal(s[1:], s[:-1], out=first[1:])
    u = s[first]
    counts = np.diff(np.append(np.flatnonzero(first), len(s)))
    if lookup is None:
        return u, np.searchsorted(u, x), counts
    lookup[u] = np.arange(len(u), dtype=np.int32)
    return u, lookup[x], counts


@dataclass(frozen=True)
class TableRows:
    """What the host needs to know of one sparse table: which categorical fields index it,
    each field's first row in it, and its row count."""

    site: str
    fields: tuple[int, ...]
    offsets: tuple[int, ...]
    rows: int


def host_rows(categorical: np.ndarray, tables: Sequence[TableRows]) -> dict[str, np.ndarray]:
    """Deduplicate each sparse table's rows of a batch on the host: ``uniq:{site}`` (sorted,
    distinct, fills past the table), ``count:{site}`` and ``local:{site}`` arrays that
    ``train.sparse.batch_rows`` uses instead of a device-side ``unique``. Their length is
    :func:`row_capacity` of the distinct rows found."""
    out = {}
    for table in tables:
        site, idx = table.site, table.fields
        if len(idx) == 1:  # one field: its ids are the table rows
            rows = categorical[:, idx[0]]
        else:
            offsets = np.asarray(table.offsets, categorical.dtype)
            rows = (categorical[:, list(idx)] + offsets[None, :]).ravel()
        u, inv, c = _unique(rows, _lookup_table(site, table.rows))
        k = row_capacity(len(u), min(rows.size, table.rows))
        uniq, counts, local = aligned_arrays(
            [((k,), np.int32), ((k,), np.float32), ((len(categorical), len(idx)), np.int32)]
        )
        uniq[: len(u)] = u
        # distinct fill ids past the table: the row arrays stay sorted and unique, which the
        # step's gathers and scatters are told (``indices_are_sorted``, ``unique_indices``)
        uniq[len(u) :] = np.arange(table.rows, table.rows + k - len(u), dtype=np.int32)
        counts[: len(u)] = c
        counts[len(u) :] = 0
        local.reshape(-1)[:] = inv
        out[UNIQ + site] = uniq
        out[COUNT + site] = counts
        out[LOCAL + site] = local
    return out


def pad_rows(batches: Sequence[dict[str, np.ndarray]], tables: Sequence[TableRows]) -> list:
    """The batches with each table's ``uniq:`` and ``count:`` arrays lengthened to the longest
    among them, so they stack into one dispatch (:mod:`train.dispatch`). The added slots are
    further distinct fill ids past the table, counted 0: still sorted and distinct, and never
    read by an example (``local:`` is unchanged)."""
    out = [dict(b) for b in batches]
    for table in tables:
        uniq_key, count_key = UNIQ + table.site, COUNT + table.site
        longest = max(len(b[uniq_key]) for b in batches)
        for b in out:
            uniq, counts = b[uniq_key], b[count_key]
            short = longest - len(uniq)
            if short:
                start = max(int(uniq[-1]) + 1, table.rows)
                fills = np.arange(start, start + short, dtype=np.int32)
                b[uniq_key] = np.concatenate([uniq, fills])
                b[count_key] = np.concatenate([counts, np.zeros(short, np.float32)])
    return out
