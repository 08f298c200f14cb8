r"""Per-level posterior effects of one table term: a row per category, streamed.

For a random-effects or embedding table (and an FM's factor table) the guide's marginal of
row :math:`r` is Normal, :math:`u_r \sim N(m_r, \sigma_r^2)`, with :math:`\sigma_r` from
:meth:`blayers.guides.MeanFieldGuide.row_marginal` (under the structured guide it includes
the spread a row inherits from the globals). Its quantiles are therefore exact:
:math:`m_r + \sigma_r \Phi^{-1}(q)`.

Output columns: ``column`` (the input field), ``value`` (the raw category, as in the data),
``count`` (its training rows), ``dim`` (embedding dimension, for tables with more than one),
``mean``, ``sd`` and one column per quantile (``q05`` …). Categories are read from the run's
vocabulary and the table's rows from the restored state ``chunk_rows`` at a time, so host
memory stays flat in the table size; the out-of-vocabulary and padding rows are left out.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from statistics import NormalDist
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from numpyro.distributions import constraints

from blayers import guides

from . import files
from . import vocab as vocab_lib
from .config import ConfigError
from .model import Term
from .score import quantile_name
from .state import guide_rows

QUANTILES = (0.05, 0.5, 0.95)
TABLE_KINDS = ("table", "categorical_fm")


def unsupported(term: Term) -> str | None:
    """Why per-level effects of ``term`` are not written, or ``None`` when they are: a table
    whose levels are a path built from its rows (:attr:`blayers.layers.BLayer.rows_path`)."""
    path = term.layer.rows_path
    return f"its rows are increments; positions are their {path}" if path else None


def table_terms(terms: Sequence[Term]) -> dict[str, Term]:
    """The model's terms that own a table, by name."""
    return {t.name: t for t in terms if t.kind in TABLE_KINDS}


def find_term(terms: Sequence[Term], name: str) -> Term:
    """The table term called ``name``, or a :class:`ConfigError` naming the ones there are."""
    tables = table_terms(terms)
    if name not in tables:
        raise ConfigError(
            f"term={name!r} is not a table term of this run; choose one of {sorted(tables)}"
        )
    term = tables[name]
    if unsupported(term):
        raise ConfigError(
            f"term={name!r}: per-level effects of a {term.layer_name} are not written "
            f"({unsupported(term)})"
        )
    return term


def effect_batches(
    setup: Any,
    state: Any,
    vocab_dir: Path,
    name: str,
    quantiles: Sequence[float] = QUANTILES,
    chunk_rows: int = 1 << 18,
) -> Iterator[pa.RecordBatch]:
    """The per-level effects of table term ``name`` (module docstring), ``chunk_rows``
    categories per batch. The term and the run's vocabulary are checked on the call."""
    terms = setup.model.terms
    term = find_term(terms, name)
    site = term.table_site
    if not _real(setup.sites[site].support):
        raise ConfigError(f"term={name!r}: its rows are not real-valued; no Normal marginal")
    guide = setup.guide
    params = state.params
    globals_ = {n: params[n] for n, s in setup.sites.items() if guides.is_global(s)}
    columns = [setup.columns.categorical[i] for i in term.categorical_idx]
    schemas = [pq.read_schema(vocab_lib.column_file(vocab_dir, c)) for c in columns]
    types = {schema.field("value").type for schema in schemas}
    value_type = types.pop() if len(types) == 1 else pa.string()  # one type, else as text
    z = np.array([NormalDist().inv_cdf(q) for q in quantiles], np.float32)

    @jax.jit
    def marginal(rows: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        return guide.row_marginal(site, rows, globals_)

    def stream() -> Iterator[pa.RecordBatch]:
        for column, offset in zip(columns, term.row_offsets, strict=True):
            start = int(offset)
            for values, counts in vocab_lib.stream(vocab_dir, column, chunk_rows):
                n = len(counts)
                rows = jnp.arange(start, start + n)
                mean, sd = (np.asarray(a) for a in marginal(guide_rows(params[site], rows)))
                start += n
                yield _batch(column, values.cast(value_type), counts, mean, sd, quantiles, z)

    return stream()  # checked above, before the caller writes anything


def _real(support: Any) -> bool:
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


def _batch(
    column: str,
    values: pa.Array,
    counts: np.ndarray,
    mean: np.ndarray,
    sd: np.ndarray,
    quantiles: Sequence[float],
    z: np.ndarray,
) -> pa.RecordBatch:
    n = len(counts)
    dims = int(np.prod(mean.shape[1:]))
    mean, sd = mean.reshape(n, dims), sd.reshape(n, dims)
    repeat = np.repeat(np.arange(n), dims)
    out: dict[str, Any] = {
        "column": pa.array([column] * (n * dims), pa.string()),
        "value": values.take(pa.array(repeat)),
        "count": pa.array(counts[repeat], pa.int64()),
    }
    if dims > 1:
        out["dim"] = pa.array(np.tile(np.arange(dims, dtype=np.int32), n))
    out["mean"] = pa.array(mean.reshape(-1))
    out["sd"] = pa.array(sd.reshape(-1))
    for q, zq in zip(quantiles, z, strict=True):
        out[quantile_name("", q)] = pa.array((mean + zq * sd).reshape(-1))
    return pa.RecordBatch.from_pydict(out)


def write(batches: Iterator[pa.RecordBatch], path: Path) -> int:
    """Stream ``batches`` into one Parquet file, written atomically; returns its row count."""
    written = 0

    def write_to(tmp: Path) -> None:
        nonlocal written
        writer = None
        try:
            for batch in batches:
                if writer is None:
                    writer = pq.ParquetWriter(tmp, batch.schema)
                writer.write_batch(batch)
                written += batch.num_rows
        finally:
            if writer is not None:
                writer.close()

    files.atomic_write(Path(path), write_to)
    return written
