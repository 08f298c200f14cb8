"""The batch pipeline: the store's rows → the batches of steps ``first..total-1``.

:class:`StepBatches` makes the batch at step ``s`` a pure function of ``(seed, s)``: position
``s·B`` in an endless sequence of per-epoch permutations. Resume is "start at step s"; it
stays exact when the number of processes changes, since each process takes its contiguous
share of the same global batch. Rows are gathered in whole batches (sorted numpy takes),
never one Python object per row, and the batches of one dispatch of several steps straight
into one stacked buffer (:meth:`StepBatches.group`); grain's ``MapDataset`` over step numbers
prefetches them on background threads (:func:`iterate`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping
from functools import lru_cache
from typing import Any

import grain
import jax
import numpy as np

from . import dispatch, distributed
from .config import Config
from .cores import CoreSplit, pipeline_threads
from .store import Store


class DataError(ValueError):
    """Input data that cannot be used; the message names the column and the fix."""


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

    def group(
        self, first: int, k: int, stack: Callable[[list[Any]], dispatch.Stacked] = dispatch.stack
    ) -> dispatch.Stacked:
        """The batches of steps ``first..first+k-1`` stacked, as ``stack([self(s) for s in
        ...])`` gives them, but each step's rows are gathered straight into its slice of one
        ``[k, local, ...]`` buffer: the stored columns, most of a batch's bytes, are copied
        once instead of twice. Only the arrays the transform adds or replaces go through
        ``stack`` (e.g. the deduplicated rows, which it pads to one length); a transform
        treats every step alike, so they are the same keys in each."""
        buffers = self.store.empty_batch(k * self.local)
        rows = {n: a.reshape(k, self.local, *a.shape[1:]) for n, a in buffers.items()}
        steps = [{n: a[i] for n, a in rows.items()} for i in range(k)]
        for i, view in enumerate(steps):
            self.store.take_blocks(self.blocks(first + i), self.block, out=view)
        if self.transform is None:
            return dispatch.Stacked(rows)
        prepared = [self.transform(view) for view in steps]
        # an array the transform hands back untouched is already in the buffer
        added = [
            {n: a for n, a in batch.items() if a is not view.get(n)}
            for batch, view in zip(prepared, steps, strict=True)
        ]
        out = dispatch.Stacked({n: a for n, a in rows.items() if n in prepared[0]})
        if added[0]:
            out.update(stack(added))
        return out


STEPS_PER_ELEMENT = 4  # steps per grain element, which share its fixed per-element cost


def iterate(
    batches: StepBatches,
    start: int,
    stop: int,
    prefetch: int,
    cores: CoreSplit | None = None,
    per_dispatch: int = 1,
    finish: Callable[[Any], Any] = lambda batch: batch,
    stack: Callable[[list[Any]], Any] = dispatch.stack,
) -> Iterator[Any]:
    """What each dispatch of steps ``start..stop-1`` takes, through grain, prefetched on
    background threads (on ``cores.data`` when given, see :mod:`train.cores`): one batch, or
    ``per_dispatch`` consecutive batches stacked (``stack``), as :func:`train.dispatch.units`
    plans them; ``finish`` runs on each in the same threads.

    Each grain element holds at least a few steps, so grain's own work per element (futures,
    statistics, the hand-off between threads) is paid once per group.
    """
    plan = dispatch.units(start, stop, per_dispatch)
    if not len(plan):
        return iter(())
    per_element = max(1, STEPS_PER_ELEMENT // per_dispatch)

    def element(i: int) -> list[Any]:
        if cores is not None:
            cores.pin_data_thread()
        out = []
        for first, length in map(plan.__getitem__, range(i, min(i + per_element, len(plan)))):
            if length == 1:
                out.append(finish(batches(first)))
            else:
                out.append(finish(batches.group(first, length, stack)))
        return out

    ds = grain.MapDataset.range(0, len(plan), per_element).map(element)
    threads = pipeline_threads(prefetch)
    options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(prefetch, 1))
    return itertools.chain.from_iterable(ds.to_iter_dataset(read_options=options))


def device_batches(
    store: Store,
    cfg: Config,
    prepare: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    shardings: Mapping[str, Any],
    first: int,
    total: int,
    cores: CoreSplit | None = None,
    per_dispatch: int = 1,
    stack: Callable[[list[Any]], Any] = dispatch.stack,
) -> Iterator[dict[str, Any]]:
    """The global batches of steps ``first..total-1`` of a job (``cfg.data``, ``cfg.train.seed``),
    ``per_dispatch`` steps' stacked into one where :func:`train.dispatch.units` plans it.
    Each process's local batch goes through the host-side ``prepare`` registered by the step
    (the row-sparse step's deduplication), stacked ones through its ``stack``, and is
    assembled into global arrays placed by ``shardings``, all in the pipeline's threads (on
    ``cores.data`` when given), so the main thread only dispatches steps."""
    stacked_sh = {k: dispatch.stacked_sharding(s) for k, s in shardings.items()}

    def to_device(local: dict[str, np.ndarray]) -> dict[str, Any]:
        if isinstance(local, dispatch.Stacked):
            return dispatch.Stacked(distributed.step_inputs(local, stacked_sh))
        return distributed.step_inputs(local, shardings)

    batches = StepBatches(
        store,
        cfg.data.batch_size,
        cfg.train.seed,
        jax.process_index(),
        jax.process_count(),
        transform=prepare,
        block=cfg.data.shuffle_block,
    )
    return iterate(batches, first, total, cfg.data.prefetch, cores, per_dispatch, to_device, stack)
