r"""A run's posterior as an ArviZ ``InferenceData``, for ``az.summary``, ``az.plot_forest``,
``az.loo`` and ``az.plot_ppc``.

Draw :math:`s` of ``draws`` is one joint draw from the guide (key ``fold_in(seed, s)``):
every global site, the table rows asked for (``rows={"user": [raw values]}``) and, given a
dataset of at most ``max_rows`` rows, the rows it reads. Under that draw the model runs on the
dataset (:mod:`train.posterior`, as scoring does), giving

- ``posterior_predictive["y"][s, i]``: :math:`y_i^{(s)} \sim p(y_i \mid \theta^{(s)})`;
- ``log_likelihood["y"][s, i]``: :math:`\log p(y_i \mid \theta^{(s)})` (needs the target);
- ``observed_data["y"]``: the target.

The guide's draws are independent, so ArviZ sees one chain of ``draws`` exact samples of the
variational posterior (an ``ess`` near ``draws`` and an ``r_hat`` near 1 by construction: they
say nothing about how good the approximation is). Dense coefficients' first dimension is named
by their input columns, a table's rows by their raw category values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa

from blayers import guides

from . import data as data_lib
from . import effects as effects_lib
from . import posterior
from . import vocab as vocab_lib
from .config import ConfigError
from .frames import as_arrow
from .model import Columns, coefficient_labels
from .score import Y_STREAM, _encode_part, predictive_value

MAX_ROWS = 20_000  # an InferenceData is held in memory: draws x rows floats per group


def _import_arviz() -> Any:
    try:
        import arviz
    except ImportError:
        raise ConfigError(
            "to_arviz needs ArviZ: pip install 'blayers[arviz]' (or pip install arviz)"
        ) from None
    return arviz


def _picked_rows(
    setup: Any, vocabs: Mapping[str, vocab_lib.Vocab], rows: Mapping[str, Sequence[Any]]
) -> tuple[dict[str, np.ndarray], dict[str, tuple[str, list[Any]]]]:
    """Table rows for ``rows={term: [raw values]}``; and per table site, its term's name and
    the values, in order."""
    terms = setup.model.terms
    extra, named = {}, {}
    for name, values in rows.items():
        term = effects_lib.find_term(terms, name)
        if len(term.categorical_idx) != 1:
            raise ConfigError(f"rows={{{name!r}: ...}}: pick rows of a one-column table term")
        column = setup.columns.categorical[term.categorical_idx[0]]
        vocab = vocabs[column]
        values = list(values)
        ids = vocab.encode(pa.array(values).cast(vocab.values.type))
        if np.any(ids == vocab_lib.UNSEEN):
            unknown = [v for v, i in zip(values, ids, strict=True) if i == vocab_lib.UNSEEN]
            raise ConfigError(f"rows: {unknown[:5]} are not categories of column {column!r}")
        extra[term.table_site] = ids.astype(np.int32) + int(term.row_offsets[0])
        named[term.table_site] = (name, values)
    return extra, named


def _dims(setup: Any, name: str, shape: tuple[int, ...]) -> tuple[list[str], dict[str, Any]]:
    dims = [f"{name}_dim_{i}" for i in range(len(shape))]
    terms = setup.model.terms
    labels = coefficient_labels(terms, setup.columns, name)
    if labels is None or not shape or len(labels) != shape[0]:
        return dims, {}
    term = next(t for t in terms if name == f"{t.layer_name}_{t.name}_beta")
    dims[0] = f"{term.name}_input"
    return dims, {dims[0]: labels}


def _data_batch(
    data: Any,
    columns: Columns,
    vocabs: Mapping[str, vocab_lib.Vocab],
    max_rows: int,
    target: str | None,
) -> tuple[dict[str, np.ndarray], bool]:
    """The encoded rows of ``data`` (with their target, where it holds the run's), or one
    placeholder row when there is none; and whether the target is observed."""
    if data is None:
        placeholder = {
            "numeric": np.zeros((1, len(columns.numeric)), np.float32),
            "categorical": np.zeros((1, len(columns.categorical)), np.int32),
        }
        return placeholder, False
    table = as_arrow(data)
    if table.num_rows > max_rows:
        raise ConfigError(
            f"data has {table.num_rows:,} rows; to_arviz holds draws x rows in memory: "
            f"pass at most max_rows={max_rows:,} rows (a sample), or raise max_rows"
        )
    features = (*columns.numeric, *columns.categorical)
    missing = [c for c in features if c not in table.schema.names]
    if missing:
        raise data_lib.DataError(f"data: column(s) {missing} are missing")
    encoded = _encode_part(table, columns, vocabs)[0]
    if not np.all(np.isfinite(encoded["numeric"])):
        raise data_lib.DataError("data: numeric features hold NaN or inf")
    batch = dict(encoded)
    observed = target is not None and target in table.schema.names
    if observed:
        y = table.column(target).to_numpy(zero_copy_only=False).astype(np.float32)
        if not np.all(np.isfinite(y)):
            raise data_lib.DataError(f"data: target column {target!r} holds NaN or inf")
        batch["target"] = y
    return batch, observed


def _chunked_draws(
    drawn: Callable[[jax.Array], dict[str, jax.Array]], draws: int, per_call: int, seed: int
) -> dict[str, np.ndarray]:
    """``draws`` draws of ``drawn`` (vmapped over keys), ``per_call`` at a time so memory
    holds one chunk; draw ``s`` has key ``fold_in(PRNGKey(seed), s)`` whatever the chunking."""
    base = jax.random.PRNGKey(seed)
    chunks = []
    for lo in range(0, draws, per_call):
        index = jnp.arange(lo, min(lo + per_call, draws))
        keys = jax.vmap(lambda s: jax.random.fold_in(base, s))(index)
        chunks.append(jax.device_get(drawn(keys)))
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def to_arviz(
    setup: Any,
    state: Any,
    vocab_dir: Path,
    draws: int = 500,
    seed: int = 0,
    rows: Mapping[str, Sequence[Any]] | None = None,
    data: Any = None,
    max_rows: int = MAX_ROWS,
    target: str | None = None,
    draws_per_call: int = 50,
) -> Any:
    """The InferenceData of a restored run (module docstring); ``target``: the data's target
    column (the run's ``data.target``)."""
    az = _import_arviz()
    if draws < 1:
        raise ConfigError(f"draws={draws}: give at least 1")
    columns = setup.columns
    vocabs = vocab_lib.load_all(vocab_dir, columns.categorical)
    extra, named = _picked_rows(setup, vocabs, rows or {})
    batch, observed = _data_batch(data, columns, vocabs, max_rows, target)
    names = sorted(n for n, site in setup.sites.items() if guides.is_global(site))
    terms = posterior.table_terms(setup)
    seen = {site: jnp.asarray(rows) for site, rows in posterior.seen_rows(setup, vocabs).items()}
    gathered = posterior.gather(terms, jnp.asarray(batch["categorical"]), seen, extra)
    params = state.params

    def one(key: jax.Array) -> dict[str, jax.Array]:
        trace, values = posterior.draw_trace(setup, key, params, gathered, batch)
        out = {n: values[n] for n in names}
        for site, where in gathered.picked.items():
            out[site] = values[site][where]
        if data is not None:
            fn = trace["obs"]["fn"]
            out["y_rep"] = predictive_value(fn.sample(jax.random.fold_in(key, Y_STREAM)))
            if observed:
                out["log_lik"] = fn.log_prob(batch["target"]).reshape(-1)
        return out

    stacked = _chunked_draws(jax.jit(jax.vmap(one)), draws, draws_per_call, seed)
    post, dims, coords = {}, {}, {}
    for n in names:
        post[n] = stacked[n][None]
        dims[n], found = _dims(setup, n, stacked[n].shape[1:])
        coords.update(found)
    for site, (term, values) in named.items():
        var = f"{term}_rows"
        post[var] = stacked[site][None]
        event = stacked[site].shape[2:]
        dims[var] = [f"{term}_level", *(f"{var}_dim_{i}" for i in range(len(event)))]
        coords[f"{term}_level"] = values
    groups: dict[str, Any] = {"posterior": post}
    if data is not None:
        groups["posterior_predictive"] = {"y": stacked["y_rep"][None]}
        dims["y"] = ["obs_id"]
        if observed:
            groups["log_likelihood"] = {"y": stacked["log_lik"][None]}
            groups["observed_data"] = {"y": batch["target"]}
    return az.from_dict(**groups, coords=coords, dims=dims)
