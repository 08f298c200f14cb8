"""Batch scoring: stream Parquet through the model's posterior, write Parquet part files.

Per batch, each table term's rows are gathered (``unique`` over the batch) and only those rows
are drawn from the guide, S times; the model runs in gathered mode under each draw and the S
values of the expected response ``E[y | θ]`` (and optionally the linear predictor) are reduced
to mean / std / quantiles on device, except the quantiles on the CPU backend, where numpy sorts
the draws far faster than XLA does. Memory is bounded by one input part plus one batch of
draws, whatever the number of rows.

Parts are the input's Parquet row groups, in file order. Process ``p`` of ``P`` scores parts
``k ≡ p (mod P)``; each part is written under a temporary name and renamed when complete, so a
killed job leaves no partial part and a rerun skips finished ones. Every process runs the same
number of device batches (padding with fully-masked batches), as collectives require.

Unseen categories map to the field's OOV row, which training shaped by the prior alone: their
effect is a draw from (approximately) the prior, and the manifest counts them per column.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from numpyro import handlers

from . import data as data_lib
from . import files, posterior
from . import vocab as vocab_lib
from .config import ScoreConfig
from .dedup import row_capacity
from .jit_once import jit_once
from .model import LINEAR_PREDICTOR, Columns, GatheredRows
from .plan import row_sharding
from .run import restore_run
from .settings import check_score_settings
from .setup import Setup
from .stages import StageClock

MANIFEST = "_manifest.json"


@dataclass(frozen=True)
class Part:
    index: int
    file: str
    row_group: int
    rows: int


def plan_parts(paths: Sequence[str]) -> list[Part]:
    """Every row group of every input file, in order (read from Parquet footers only)."""
    parts = []
    for f in paths:
        meta = pq.ParquetFile(f).metadata
        for g in range(meta.num_row_groups):
            parts.append(Part(len(parts), f, g, meta.row_group(g).num_rows))
    return parts


def parts_for_process(parts: Sequence[Part], process: int, count: int) -> list[Part]:
    return [p for p in parts if p.index % count == process]


def batches_per_process(parts: Sequence[Part], count: int, batch_rows: int) -> int:
    """Device batches the busiest process needs; every process runs this many."""
    return max(
        sum(-(-p.rows // batch_rows) for p in parts_for_process(parts, i, count))
        for i in range(count)
    )


def response_mean(fn: Any) -> jax.Array:
    """``E[y | θ]`` of an observation distribution (expected class for ordinal / categorical)."""
    probs = getattr(fn, "probs", None)
    if probs is not None and probs.ndim >= 2:
        return jnp.sum(probs * jnp.arange(probs.shape[-1]), axis=-1)
    return fn.mean


def predictive_value(y: jax.Array) -> jax.Array:
    """A drawn observation as the score columns hold it: float, one value per row (a one-hot
    or class-index draw of a categorical likelihood becomes its class index)."""
    if y.ndim == 2:  # one-hot
        y = jnp.argmax(y, axis=-1)
    return y.astype(jnp.float32).reshape(y.shape[0])


QUANTILE_DRAWS = "_draws_for_quantiles:"


def quantile_name(prefix: str, level: float) -> str:
    """``q`` and the level's decimal digits, at least two: 0.05 → ``q05``, 0.5 → ``q50``,
    0.001 → ``q001``, 0.975 → ``q975``, 1 → ``q100``. A shortest decimal form never ends in
    0, so distinct levels never share a name, at any precision."""
    text = repr(float(level))
    if "e" in text:  # below 1e-4
        text = f"{level:.20f}".rstrip("0")
    whole, _, digits = text.partition(".")
    if whole != "0":
        return f"{prefix}q100"
    return f"{prefix}q{digits.rstrip('0').ljust(2, '0')}"


def output_columns(
    quantiles: Sequence[float], linear: bool, raw: bool, columns: Any, predictive: bool = False
) -> list[str]:
    """Every column a score part adds after the passthrough ones, in order."""
    stats = ["mean", "std", *(quantile_name("", q) for q in sorted(quantiles))]
    out = stats + ([f"eta_{c}" for c in stats] if linear else [])
    out += [f"{PREDICTIVE}{c}" for c in stats[1:]] if predictive else []
    return out + (["draws"] if raw else []) + (["unseen_categories"] if columns.categorical else [])


Y_STREAM = 0x5EED  # folded into a draw's key for its y
TABLE_STREAM = 0x7AB1E  # folded into the seed's key for draws of whole tables
PREDICTIVE = "pred_"  # y drawn from the likelihood under each posterior draw: its sd, quantiles


PROVENANCE = "blayers.score"  # the part's Parquet metadata key: what it was made from


def part_input(part: Part) -> dict[str, Any]:
    """What identifies a part's input: its file, row group, size and modification time."""
    stat = os.stat(part.file)
    return {
        "file": os.path.abspath(part.file),
        "row_group": part.row_group,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
    }


def made_with(part_file: Path) -> str | None:
    """The provenance a finished part records; ``None`` for no part, a planted link or a
    file that is not one of ours."""
    if not files.is_regular_file(part_file):
        return None
    try:
        metadata = pq.read_schema(part_file).metadata or {}
    except (OSError, pa.ArrowException):
        return None
    value = metadata.get(PROVENANCE.encode())
    return value.decode() if value is not None else None


def checkpoint_time(ckpt_dir: Path, step: int) -> int:
    """When a checkpoint step was written (a retrained run's step ``k`` is another step)."""
    return (Path(ckpt_dir) / str(step)).stat().st_mtime_ns


def finish_quantiles(out: dict[str, np.ndarray], quantiles: Sequence[float]) -> None:
    """Replace each row's draws (from a scorer made with ``host_quantiles``) by its quantiles,
    interpolated linearly as ``jnp.quantile`` does. On the CPU backend numpy sorts a
    batch's draws far faster than XLA does, and the sort was most of a batch's reduction
    time."""
    for key in [k for k in out if k.startswith(QUANTILE_DRAWS)]:
        ordered = np.sort(out.pop(key), axis=1)
        last = ordered.shape[1] - 1
        for level in quantiles:
            pos = level * last
            lo = int(np.floor(pos))
            hi, w = min(lo + 1, last), np.float32(pos - lo)
            value = ordered[:, lo] * (1 - w) + ordered[:, hi] * w
            out[quantile_name(key[len(QUANTILE_DRAWS) :], level)] = value


# the default bytes of posterior draws of whole tables that scoring draws once up front
# (posterior.draw_tables; the job's predraw_mb); larger tables are drawn per batch
PREDRAW_BYTES = 256 << 20


class Scorer(NamedTuple):
    """``context = prepare(params, seen, key)`` once, then ``score(context, key, batch) ->
    dict of (B, ...) summaries`` per batch; batches are split over ``rows_sharding``."""

    prepare: Callable[..., Any]
    score: Callable[..., Any]
    rows_sharding: NamedSharding
    predrawn: bool


@dataclass(frozen=True)
class Summaries:
    """A batch's score columns from the S draws ``(S, B)`` of its response mean, linear
    predictor and predicted ``y``: mean, sd and quantiles of each asked for, plus the raw
    draws. With ``host_quantiles`` a column's quantiles are left to
    :func:`finish_quantiles`, which then receives its draws ``(B, S)``."""

    quantiles: tuple[float, ...]
    host_quantiles: bool
    with_eta: bool
    predictive: bool
    with_draws: bool

    def summarize(self, x: jax.Array, prefix: str) -> dict[str, jax.Array]:
        out = {f"{prefix}mean": x.mean(0), f"{prefix}std": x.std(0)}
        if self.quantiles and self.host_quantiles:
            out[QUANTILE_DRAWS + prefix] = x.T  # rows × draws, for finish_quantiles
        elif self.quantiles:
            qs = jnp.quantile(x, jnp.asarray(self.quantiles, jnp.float32), axis=0)
            for i, level in enumerate(self.quantiles):
                out[quantile_name(prefix, level)] = qs[i]
        return out

    def __call__(self, mean: jax.Array, eta: Any, y: Any) -> dict[str, jax.Array]:
        out = self.summarize(mean, "")
        if self.with_eta and eta is not None:
            out.update(self.summarize(eta, "eta_"))
        if self.predictive:
            out.update(
                {k: v for k, v in self.summarize(y, PREDICTIVE).items() if k != PREDICTIVE + "mean"}
            )
        if self.with_draws:
            out["draws"] = mean.T
        return out


def make_scorer(
    setup: Setup,
    draws: int,
    quantiles: Sequence[float],
    with_eta: bool,
    with_draws: bool,
    host_quantiles: bool = False,
    predictive: bool = False,
    predraw_bytes: int = PREDRAW_BYTES,
) -> Scorer:
    """The jitted scorer of a restored run (:class:`Scorer`). ``predictive``: also the sd and
    quantiles of ``y ~ p(y | θ)``, one ``y`` per draw of ``θ``, i.e. of the posterior
    predictive distribution (observation noise included).

    ``seen[table_site]`` flags table rows that had training data; the others (OOV rows,
    padding) are drawn from the layer's prior given the drawn scale, whatever path trained
    the table. Where every site's ``draws`` draws fit in ``predraw_bytes``, ``prepare`` draws
    them once, whole tables included (:func:`train.posterior.draw_tables`), and each batch
    only reads its rows. Else each batch draws the rows it reads
    (:func:`train.posterior.draw_rows`), the same draws: either way a row's draws are a
    function of the seed, its table and its id, the same in every batch, part and process.
    With ``host_quantiles`` the quantiles are left to :func:`finish_quantiles`: the outputs
    then hold each row's draws instead."""
    terms = posterior.table_terms(setup)
    summaries = Summaries(tuple(quantiles), host_quantiles, with_eta, predictive, with_draws)

    def outputs(trace: Any, key: jax.Array) -> Any:
        eta = trace[LINEAR_PREDICTOR]["value"][:, 0] if LINEAR_PREDICTOR in trace else None
        fn = trace["obs"]["fn"]
        # a key of its own, so the other columns' draws are the same with or without it
        y = predictive_value(fn.sample(jax.random.fold_in(key, Y_STREAM))) if predictive else None
        return response_mean(fn), eta, y

    def values_at(
        drawn: Any, ids: Mapping[str, jax.Array], key: jax.Array, batch: Mapping[str, jax.Array]
    ) -> Any:
        """The summaries of ``batch`` under the ``draws`` drawn values of every site, each
        table term reading rows ``ids[term]`` of its site's drawn rows."""
        local = {
            name: GatheredRows(ids[name], drawn[t.table_site].shape[1]) for name, t in terms.items()
        }

        def one(values: Mapping[str, jax.Array], k: jax.Array) -> Any:
            model = handlers.seed(handlers.substitute(setup.model, data=values), k)
            return outputs(handlers.trace(model).get_trace(batch, None, local), k)

        return summaries(*jax.vmap(one)(drawn, jax.random.split(key, draws)))

    def from_drawn(drawn: Any, key: jax.Array, batch: Mapping[str, jax.Array]) -> Any:
        ids = {name: t.rows(batch["categorical"]) for name, t in terms.items()}
        return values_at(drawn, ids, key, batch)

    def draw_batch_rows(
        context: Any, batch: Mapping[str, jax.Array], sizes: tuple[tuple[str, int], ...]
    ) -> Any:
        """The ``draws`` draws of every site at the table rows ``batch`` reads (each once,
        in ``sizes[site]`` slots), and each term's ids into them: the draws
        :func:`posterior.draw_tables` would give those rows."""
        params, seen, table_key = context
        rows = posterior.gather(terms, batch["categorical"], seen, sizes=dict(sizes))
        ids = {n: r.local if isinstance(r, GatheredRows) else r for n, r in rows.local.items()}
        return posterior.draw_rows(setup, table_key, params, rows, batch, draws), ids

    rows_sharding = setup.plan.batch
    predrawn = posterior.table_bytes(setup, draws) <= predraw_bytes
    if predrawn:
        prepare = jit_once(
            lambda params, seen, key: posterior.draw_tables(setup, key, params, seen, draws)
        )
        return Scorer(
            prepare, jax.jit(from_drawn, out_shardings=rows_sharding), rows_sharding, True
        )
    # Two programs, so each batch's draws exist once in memory before the model reads
    # them: compiled as one, XLA fused the draws (the normal's inverse-CDF polynomial) into
    # the gathers of every (draw, example) pair, recomputing each row's draw once per
    # example that reads it, a third of a batch's time.
    draw_rows = jax.jit(draw_batch_rows, static_argnames="sizes")
    read_rows = jax.jit(values_at, out_shardings=rows_sharding)
    most: dict[str, int] = {}  # per table, the most slots a batch has needed so far

    def slots(categorical: jax.Array) -> tuple[tuple[str, int], ...]:
        """Slots per table for the distinct rows a batch reads, counted on the host: a
        table's draws are as many as its slots, and most batches read far fewer distinct
        rows than ``n * F``. The count only grows, with an eighth of headroom, so that a job
        compiles a length or two (each compile is seconds, a batch milliseconds); a row's
        draws do not depend on it. With several processes no one host sees the global
        batch, and every id keeps its slot."""
        if not categorical.is_fully_addressable:
            return ()
        host = np.asarray(categorical)
        for t in terms.values():
            rows = t.rows(host)
            found = len(np.unique(rows))
            need = row_capacity(min(found + found // 8, rows.size), rows.size)
            most[t.table_site] = max(most.get(t.table_site, 0), need)
        return tuple(sorted(most.items()))

    def per_batch(context: Any, key: jax.Array, batch: Mapping[str, jax.Array]) -> Any:
        drawn, local = draw_rows(context, batch, sizes=slots(batch["categorical"]))
        return read_rows(drawn, local, key, batch)

    return Scorer(lambda params, seen, key: (params, seen, key), per_batch, rows_sharding, False)


def _encode_part(
    table: pa.Table, columns: Any, vocabs: Mapping[str, vocab_lib.Vocab]
) -> tuple[dict[str, np.ndarray], dict[str, int], dict[str, int]]:
    """The part's encoded features, and per column its rows of unseen categories and of
    categories new in this run (those a continued run added to the vocabulary it took over:
    :attr:`train.vocab.Vocab.inherited`)."""
    batch = table.combine_chunks().to_batches()[0] if table.num_rows else None
    numeric = (
        data_lib.numeric_block(batch, columns.numeric)
        if batch is not None
        else np.zeros((0, len(columns.numeric)), np.float32)
    )
    cats, unseen, added = [], {}, {}
    for c in columns.categorical:
        ids = vocabs[c].encode(table.column(c))
        miss = ids == vocab_lib.UNSEEN
        unseen[c] = int(miss.sum())
        added[c] = int(((ids >= vocabs[c].inherited) & ~miss).sum())  # fresh run: all seen
        cats.append(np.where(miss, vocabs[c].size, ids).astype(np.int32))  # -> OOV row
    categorical = np.stack(cats, 1) if cats else np.zeros((table.num_rows, 0), np.int32)
    return {"numeric": numeric, "categorical": categorical}, unseen, added


def score(cfg: ScoreConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the scoring job described by ``cfg`` (see ``ScoreConfig``)."""
    from . import distributed

    check_score_settings(cfg)
    out_dir = Path(cfg.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise data_lib.DataError(
            f"output={str(out_dir)!r} is a file: give a directory for the parts"
        )
    distributed.maybe_initialize(cfg.distributed)
    clock = StageClock()
    clock.mark("start-up")
    run_dir = Path(cfg.run_dir)
    setup, state, meta = restore_run(run_dir, cfg.step, bool(cfg.strict), log, cfg.trust_model)
    clock.mark("restore")
    job = ScoreJob.open(cfg, setup, state.params, meta)
    clock.mark("prepare")  # the input's checks and plan, the scorer, whole tables drawn
    out_dir.mkdir(parents=True, exist_ok=True)
    records = job.run(out_dir)
    clock.mark("scoring")
    manifest = job.manifest(records)
    _publish_manifest(out_dir, manifest, len(job.parts), log)
    clock.mark("manifest")
    if manifest["process"] == 0:
        log(clock.line())
    return {**manifest, "stages": clock.record()}


def _score_columns(cfg: ScoreConfig, columns: Columns, dataset: Any) -> tuple[list[str], list[str]]:
    """The input columns carried through (``passthrough``) and the score columns produced,
    after checking the input holds the model's features and no column name clashes."""
    data_lib.check_files(dataset.files, columns.numeric, columns.categorical, None)
    features = {*columns.numeric, *columns.categorical}
    passthrough = (
        list(cfg.passthrough)
        if cfg.passthrough is not None
        else [c for c in dataset.schema.names if c not in features]
    )
    missing = [c for c in passthrough if c not in dataset.schema.names]
    if missing:
        raise data_lib.DataError(f"passthrough column(s) {missing} are not in the data")
    produced = output_columns(
        list(cfg.quantiles),
        bool(cfg.linear_predictor),
        bool(cfg.raw_draws),
        columns,
        bool(cfg.predictive),
    )
    clash = [c for c in passthrough if c in produced]
    if clash:
        raise data_lib.DataError(
            f"input column(s) {clash} have the names of score columns: leave them out with "
            "passthrough=[...] or rename them in the data"
        )
    _validate_numeric(dataset, columns.numeric)
    return passthrough, produced


@dataclass
class ScoreJob:
    """One process's share of a scoring job: its parts, the prepared scorer and what every
    part file records of how it was made (``provenance``)."""

    cfg: ScoreConfig
    setup: Setup
    meta: Mapping[str, Any]
    vocabs: dict[str, vocab_lib.Vocab]
    passthrough: list[str]
    produced: list[str]
    provenance: dict[str, Any]
    parts: list[Part]
    scorer: Scorer
    context: Any
    base_key: jax.Array

    @classmethod
    def open(
        cls, cfg: ScoreConfig, setup: Setup, params: Mapping[str, Any], meta: Mapping[str, Any]
    ) -> ScoreJob:
        """Check the input against the run, plan the parts and prepare the scorer (whole
        tables drawn up front where they fit)."""
        run_dir = Path(cfg.run_dir)
        columns = setup.columns
        vocabs = vocab_lib.load_all(run_dir / "vocab", columns.categorical)
        dataset = data_lib.open_dataset(cfg.data.path)
        passthrough, produced = _score_columns(cfg, columns, dataset)
        provenance = {
            "run_dir": str(run_dir.absolute()),
            "checkpoint_step": int(meta["step"]),
            "checkpoint_written_ns": checkpoint_time(run_dir / "checkpoints", int(meta["step"])),
            "draws": int(cfg.draws),
            "seed": int(cfg.seed),
            "draw_scheme": posterior.DRAW_SCHEME,
            "quantiles": [float(q) for q in cfg.quantiles],
            "linear_predictor": bool(cfg.linear_predictor),
            "raw_draws": bool(cfg.raw_draws),
            "predictive": bool(cfg.predictive),
            "columns": passthrough + produced,
        }
        parts = plan_parts(data_lib.parquet_files(cfg.data.path))
        setup.plan.check_batch_size(int(cfg.data.batch_size))
        scorer = make_scorer(
            setup,
            int(cfg.draws),
            list(cfg.quantiles),
            bool(cfg.linear_predictor),
            bool(cfg.raw_draws),
            # XLA:CPU's sort is slow; an accelerator's is not, and spares moving the draws
            jax.default_backend() == "cpu",
            bool(cfg.predictive),
            int(cfg.predraw_mb) << 20,
        )
        seen = {
            site: jax.device_put(rows, row_sharding(setup.shardings, site))
            for site, rows in posterior.seen_rows(setup, vocabs).items()
        }
        base_key = jax.random.PRNGKey(int(cfg.seed))
        # the draws of whole tables, when drawn up front, come from a key of their own
        context = scorer.prepare(params, seen, jax.random.fold_in(base_key, TABLE_STREAM))
        jax.block_until_ready(context)
        return cls(
            cfg,
            setup,
            meta,
            vocabs,
            passthrough,
            produced,
            provenance,
            parts,
            scorer,
            context,
            base_key,
        )

    @property
    def local_rows(self) -> int:
        """Rows of this process's share of each device batch."""
        return int(self.cfg.data.batch_size) // jax.process_count()

    def run(self, out_dir: Path) -> list[dict[str, Any]]:
        """Score this process's parts into ``out_dir``, then run the padding batches that
        keep every process's collectives in step; a record per part."""
        count, local_b = jax.process_count(), self.local_rows
        mine = parts_for_process(self.parts, jax.process_index(), count)
        records = [self.score_part(part, out_dir) for part in mine]
        done = sum(-(-p.rows // local_b) for p in mine)
        for _ in range(batches_per_process(self.parts, count, local_b) - done):
            self.run_batch(_padding_batch(self.setup.columns, local_b), 0)
        return records

    def run_batch(self, local: Mapping[str, np.ndarray], key_index: int) -> dict[str, np.ndarray]:
        """The score columns of one device batch (this process's rows, on the host)."""
        return self.collect(self.dispatch(local, key_index))

    def dispatch(self, local: Mapping[str, np.ndarray], key_index: int) -> dict[str, jax.Array]:
        """Start scoring one device batch; its outputs stay on device until :meth:`collect`."""
        from . import distributed

        shardings = {"numeric": self.scorer.rows_sharding, "categorical": self.scorer.rows_sharding}
        with distributed.explain_peer_failure("scoring"):
            batch = distributed.global_batch(local, shardings)
            return self.scorer.score(
                self.context, jax.random.fold_in(self.base_key, key_index), batch
            )

    def collect(self, out: Mapping[str, jax.Array]) -> dict[str, np.ndarray]:
        """A dispatched batch's score columns on the host, quantiles finished there."""
        from . import distributed

        plan = self.setup.plan
        with distributed.explain_peer_failure("scoring"):
            host = {
                k: np.asarray(
                    multihost_utils.global_array_to_host_local_array(v, plan.mesh, plan.batch.spec)
                )
                for k, v in out.items()
            }
        finish_quantiles(host, list(self.cfg.quantiles))
        return host

    def score_part(self, part: Part, out_dir: Path) -> dict[str, Any]:
        """Write one part file, or, when an earlier run already wrote it from the same
        inputs, run its batches as padding (collectives stay in step) and skip the I/O."""
        columns, local_b = self.setup.columns, self.local_rows
        final = out_dir / f"part-{part.index:05d}.parquet"
        features = {*columns.numeric, *columns.categorical}
        table = pq.ParquetFile(part.file).read_row_group(
            part.row_group, columns=sorted({*features, *self.passthrough})
        )
        encoded, unseen, added = _encode_part(table, columns, self.vocabs)
        n = table.num_rows
        n_batches = -(-n // local_b)
        made_from = json.dumps({**self.provenance, "input": part_input(part)}, sort_keys=True)
        record = {"part": part.index, "rows": n, "unseen": unseen, "new": added}
        if made_with(final) == made_from:
            for _ in range(n_batches):
                self.run_batch(_padding_batch(columns, local_b), 0)
            return {**record, "skipped": True}
        pieces: dict[str, list[np.ndarray]] = {}

        def start(i: int) -> tuple[int, dict[str, jax.Array]]:
            """Batch ``i``'s real (unpadded) row count and its dispatched outputs."""
            lo, hi = i * local_b, min((i + 1) * local_b, n)
            local = {k: _pad(v[lo:hi], local_b) for k, v in encoded.items()}
            # the key depends on the part and batch only: same draws on any process count
            return hi - lo, self.dispatch(local, part.index * 1_000_003 + i)

        # one batch in flight while the host finishes the one before (quantiles, copies); an
        # empty part dispatches nothing, so every process still runs the same device batches
        in_flight = [start(0)] if n_batches else []
        for i in range(n_batches):
            if i + 1 < n_batches:
                in_flight.append(start(i + 1))
            rows, out = in_flight.pop(0)
            for k, v in self.collect(out).items():
                pieces.setdefault(k, []).append(v[:rows])  # padded rows masked out
        result = self._part_table(table, encoded, pieces).replace_schema_metadata(
            {PROVENANCE: made_from}
        )
        files.atomic_write(final, lambda tmp, table=result: pq.write_table(table, tmp))
        return {**record, "skipped": False}

    def _part_table(
        self,
        table: pa.Table,
        encoded: Mapping[str, np.ndarray],
        pieces: Mapping[str, list[np.ndarray]],
    ) -> pa.Table:
        """The passthrough columns, the score columns and the unseen-categories count."""
        result = table.select(self.passthrough)
        if not set(pieces) <= set(self.produced):  # a scorer output with no declared column
            raise RuntimeError(
                f"undeclared score columns {sorted(set(pieces) - set(self.produced))}"
            )
        for k in self.produced:
            if k in pieces:
                arr = np.concatenate(pieces[k])
                column = pa.array(list(arr)) if arr.ndim == 2 else pa.array(arr)
            elif table.num_rows == 0 and k != "unseen_categories":  # appended below
                # a part with no rows still gets every column, so all parts share one schema
                column = pa.array([], pa.list_(pa.float32()) if k == "draws" else pa.float32())
            else:
                continue
            result = result.append_column(k, column)
        categorical = self.setup.columns.categorical
        if categorical:
            flags = np.zeros(table.num_rows, np.int8)
            for j, c in enumerate(categorical):
                flags += (encoded["categorical"][:, j] == self.vocabs[c].size).astype(np.int8)
            result = result.append_column("unseen_categories", pa.array(flags))
        return result

    def manifest(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """This process's manifest: its parts, rows and unseen or new categories by column."""
        cfg, vocabs, categorical = self.cfg, self.vocabs, self.setup.columns.categorical
        return {
            "run_dir": str(Path(cfg.run_dir)),
            "checkpoint_step": self.meta["step"],
            "draws": int(cfg.draws),
            "seed": int(cfg.seed),
            "draw_scheme": posterior.DRAW_SCHEME,
            "quantiles": list(cfg.quantiles),
            "process": jax.process_index(),
            "processes": jax.process_count(),
            "parts": list(records),
            "rows": sum(r["rows"] for r in records),
            "unseen_rows_by_column": {c: sum(r["unseen"][c] for r in records) for c in categorical},
            "new_category_rows_by_column": {
                c: sum(r["new"][c] for r in records) for c in categorical
            },
            "categories": {
                c: {"known": vocabs[c].size, "new_in_run": vocabs[c].size - vocabs[c].inherited}
                for c in categorical
            },
        }


def _publish_manifest(
    out_dir: Path, manifest: Mapping[str, Any], num_parts: int, log: Callable[[str], None]
) -> None:
    """Write this process's manifest; process 0 then merges every process's into one."""
    process, count = int(manifest["process"]), int(manifest["processes"])
    _write_json(out_dir / f"_manifest-{process:05d}.json", dict(manifest))
    if count > 1:
        multihost_utils.sync_global_devices("blayers-score-manifests")
    if process == 0:
        merged = _merge_manifests(out_dir, count, num_parts)
        _write_json(out_dir / MANIFEST, merged)
        log(
            f"scored {merged['rows']:,} rows into {num_parts} parts in {out_dir}; unseen "
            f"categories by column: {merged['unseen_rows_by_column']}"
        )


def _pad(x: np.ndarray, rows: int) -> np.ndarray:
    if len(x) == rows:
        return x
    pad = np.zeros((rows - len(x), *x.shape[1:]), x.dtype)
    return np.concatenate([x, pad])


def _padding_batch(columns: Columns, rows: int) -> dict[str, np.ndarray]:
    return {
        "numeric": np.zeros((rows, len(columns.numeric)), np.float32),
        "categorical": np.zeros((rows, len(columns.categorical)), np.int32),
    }


def _validate_numeric(dataset: Any, numeric: Sequence[str]) -> None:
    """A pass over the numeric columns only, so bad values fail before any output exists."""
    if not numeric:
        return
    for batch in data_lib.scan(dataset, numeric):
        data_lib.numeric_block(batch, numeric)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    files.write_text(path, json.dumps(payload, indent=2))


def _merge_manifests(out_dir: Path, count: int, num_parts: int) -> dict[str, Any]:
    manifests = [
        json.loads((out_dir / f"_manifest-{i:05d}.json").read_text()) for i in range(count)
    ]
    parts = sorted((p for m in manifests for p in m["parts"]), key=lambda p: p["part"])
    unseen: dict[str, int] = {}
    added: dict[str, int] = {}
    for m in manifests:
        for c, v in m["unseen_rows_by_column"].items():
            unseen[c] = unseen.get(c, 0) + v
        for c, v in m["new_category_rows_by_column"].items():
            added[c] = added.get(c, 0) + v
    return {
        **{
            k: manifests[0][k]
            for k in ("run_dir", "checkpoint_step", "draws", "seed", "quantiles", "categories")
        },
        "processes": count,
        "num_parts": num_parts,
        "parts": parts,
        "rows": sum(p["rows"] for p in parts),
        "unseen_rows_by_column": unseen,
        "new_category_rows_by_column": added,
        "files": [f"part-{p['part']:05d}.parquet" for p in parts],
    }
