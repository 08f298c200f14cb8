"""Orbax checkpoints: the whole train state plus JSON metadata (config, vocab sizes, structure).

Each step directory holds ``state`` (guide params, optimizer state, step, rng — restored onto
whatever mesh the caller gives, so 8-device checkpoints restore on 1 or 4) and ``meta``. The
vocabulary lives beside the checkpoints in ``run_dir/vocab`` and is written once per run.
A structure fingerprint in ``meta`` guards against restoring into a different model, and a
checksum of every array (:func:`state_checksums`, in ``meta["checksums"]``) against restoring
different values: a step that is unreadable or does not verify is named, and restore falls
back to the newest step that does (:func:`restore_newest_good`), unless asked to be strict.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from blayers import guides

from . import late_reads


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says why and what to do."""


def _first_line(err: BaseException, limit: int = 240) -> str:
    """The head of a storage library's error, kept to one line."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def structure(sites: Mapping[str, guides.LatentSite]) -> dict[str, list[int]]:
    return {name: list(site.unconstrained_shape) for name, site in sorted(sites.items())}


def fingerprint(
    sites: Mapping[str, guides.LatentSite],
    link: str,
    sparse: list[str] | None = None,
    guide: str = "mean_field",
    fm_rows: str = "site",
) -> str:
    """Identity of a model's parameter structure, its link, which tables train row-sparse
    (their state differs: one row state per table, ``train.state.ROW_STATE``), the guide
    family and how it draws FM factors (their parameters mean different things)."""
    content: dict[str, Any] = {"sites": structure(sites), "link": link, "sparse": sparse or []}
    if guide != "mean_field":  # mean-field runs keep the fingerprint they always had
        content["guide"] = guide
    if fm_rows != "site":  # so do runs whose FM factors are drawn as they always were
        content["fm_rows"] = fm_rows
    if sparse:
        content["row_state"] = 2  # layout version; 1 kept moments apart from the parameters
        if guide != "mean_field":  # their rows carry a coupling state since this version
            content["coupled_rows"] = 1
    payload = json.dumps(content, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


_GOLDEN = np.uint32(0x9E3779B1)  # odd: every element's weight is odd, so no change cancels
# Leaves up to this many elements are summed on the host. A state holds dozens of small
# arrays (scales, dense weights, their optimizer moments), and compiling one XLA reduction
# each took ~1 s of a cold scoring job's restore, for sums numpy does in microseconds.
HOST_SUM_MAX = 1 << 20


@jax.jit
def _leaf_sums(leaves: list[jax.Array]) -> list[jax.Array]:
    sums = []
    for x in leaves:
        if x.dtype.itemsize == 4:
            bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
        else:
            bits = x.astype(jnp.uint32)
        index = jax.lax.broadcasted_iota(jnp.uint32, bits.shape, 0) if bits.ndim else 0
        for axis in range(1, bits.ndim):  # the flat index, without a reshape of a sharded array
            index = index * np.uint32(bits.shape[axis]) + jax.lax.broadcasted_iota(
                jnp.uint32, bits.shape, axis
            )
        weight = (index * np.uint32(2) + np.uint32(1)) * _GOLDEN
        sums.append(jnp.sum(bits * weight, dtype=jnp.uint32))
    return sums


def _host_sum(x: np.ndarray) -> int:
    """:func:`_leaf_sums` of one array, in numpy (uint32 arithmetic wraps alike: the sum
    mod 2^32 does not depend on the order of its terms)."""
    flat = np.ascontiguousarray(x).reshape(-1)
    bits = flat.view(np.uint32) if flat.dtype.itemsize == 4 else flat.astype(np.uint32)
    weight = np.arange(flat.size, dtype=np.uint32)
    weight *= np.uint32(2)
    weight += np.uint32(1)
    weight *= _GOLDEN
    weight *= bits
    return int(weight.sum(dtype=np.uint32))


def _on_host(leaf: Any, host_max: int) -> bool:
    """Whether ``leaf`` is summed by :func:`_host_sum`: small, every shard in this process,
    and of a dtype numpy converts as XLA does (4-byte, integer or bool)."""
    if np.size(leaf) > host_max:
        return False
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        return False
    dtype = np.dtype(leaf.dtype)
    return dtype.itemsize == 4 or dtype.kind in "biu"


def state_checksums(state: Any, host_max: int = HOST_SUM_MAX) -> dict[str, int]:
    r"""A checksum of every array in ``state``: :math:`\sum_i b_i w_i \bmod 2^{32}` over its
    elements' bits :math:`b_i`, with odd weights :math:`w_i` that depend on the element's
    index. Any change to one element changes it; it depends on values only, not on the mesh
    or the sharding. Arrays of up to ``host_max`` elements are summed on the host, larger
    ones on their devices (they never leave them)."""
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    keys = [jax.tree_util.keystr(path) for path, _ in flat]
    leaves = [leaf if hasattr(leaf, "dtype") else jnp.asarray(leaf) for _, leaf in flat]
    host = [i for i, leaf in enumerate(leaves) if _on_host(leaf, host_max)]
    device = sorted(set(range(len(leaves))) - set(host))
    on_host = jax.device_get([leaves[i] for i in host])
    sums = dict(zip(host, map(_host_sum, on_host), strict=True))
    if device:
        on_device = jax.device_get(_leaf_sums([leaves[i] for i in device]))
        sums.update(zip(device, on_device, strict=True))
    return {keys[i]: int(sums[i]) for i in range(len(leaves))}


def verify(state: Any, meta: Mapping[str, Any], step: int, directory: Path) -> None:
    """:class:`CheckpointError` naming the first array whose checksum differs from the one
    saved with ``step`` (checkpoints written before checksums were kept are not checked)."""
    saved = meta.get("checksums")
    if not saved:
        return
    now = state_checksums(state)
    bad = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if bad:
        raise CheckpointError(
            f"checkpoint step {step} in {directory} is corrupt: {bad[0]} does not match its "
            f"checksum ({len(bad)} of {len(now)} arrays differ)"
        )


class Checkpointer:
    def __init__(self, directory: Path, max_to_keep: int = 3, async_save: bool = True) -> None:
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Save ``step`` unless it is already on disk (a rerun that had nothing left to do)."""
        if step in self.manager.all_steps():
            return
        meta = {**meta, "checksums": state_checksums(state)}
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def read_meta(directory: Path, step: int | None = None) -> tuple[int, dict[str, Any]]:
    """``(step, meta)`` of the latest (or given) complete checkpoint, read without the state."""
    directory = Path(directory).absolute()
    if not directory.exists():
        raise CheckpointError(f"no checkpoints in {directory}: train the run first")
    manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(create=False),
        item_names=("state", "meta"),
    )
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no complete checkpoint in {directory}: train the run first")
        if step not in manager.all_steps():
            raise CheckpointError(
                f"no checkpoint for step {step} in {directory}; have {sorted(manager.all_steps())}"
            )
        try:
            meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except Exception as err:  # orbax raises several types for unreadable files
            raise CheckpointError(
                f"checkpoint step {step} in {directory} is unreadable: {_first_line(err)}"
            ) from err
        return step, dict(meta["meta"])
    finally:
        manager.close()


def restore_state(directory: Path, step: int, target: Any) -> Any:
    """Restore ``state`` at ``step`` onto ``target`` (a tree of ``ShapeDtypeStruct`` with
    shardings), whatever mesh wrote it."""
    manager = ocp.CheckpointManager(
        Path(directory).absolute(),
        options=ocp.CheckpointManagerOptions(create=False),
        item_names=("state", "meta"),
    )
    with late_reads.contained() as failed:
        try:
            restored = manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
            )
        except Exception as err:
            # not chained: the traceback would keep the failed reads' tasks alive past here
            reason = _first_line(err)
        else:
            return restored["state"]
        finally:
            manager.close()
        failed()
    raise CheckpointError(f"checkpoint step {step} in {directory} cannot be restored: {reason}")


def steps(directory: Path) -> list[int]:
    """The complete steps in ``directory``, newest first."""
    directory = Path(directory).absolute()
    if not directory.exists():
        return []
    manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(create=False),
        item_names=("state", "meta"),
    )
    try:
        return sorted(manager.all_steps(), reverse=True)
    finally:
        manager.close()


def newest_readable_meta(
    directory: Path,
    step: int | None = None,
    strict: bool = False,
    log: Callable[[str], None] = print,
) -> tuple[int, dict[str, Any]]:
    """``(step, meta)`` of ``step``, or of the newest step whose metadata reads (each one
    passed over is named on ``log``; with ``strict``, the first failure is the error)."""
    if step is not None:
        return read_meta(directory, step)
    candidates = steps(directory)
    if not candidates:
        return read_meta(directory)  # the "train the run first" error
    for i, s in enumerate(candidates):
        try:
            return read_meta(directory, s)
        except CheckpointError as err:
            if strict or i == len(candidates) - 1:
                raise
            log(f"warning: {err}; trying step {candidates[i + 1]}")
    raise AssertionError("unreachable")


def restore_newest_good(
    directory: Path,
    target: Any,
    step: int,
    strict: bool = False,
    log: Callable[[str], None] = print,
    compatible: Callable[[Mapping[str, Any]], None] = lambda meta: None,
) -> tuple[int, dict[str, Any], Any]:
    """``(step, meta, state)`` of ``step`` if it reads and verifies, else of the newest older
    step that does, saying which step was passed over and why. ``strict``: the first failure
    is the error. ``compatible(meta)`` raises for a step the caller cannot use."""
    candidates = [s for s in steps(directory) if s <= step] or [step]
    if strict:
        candidates = candidates[:1]

    def pass_over(i: int, err: CheckpointError) -> None:
        if i == len(candidates) - 1:
            raise err
        log(f"warning: {err}; falling back to step {candidates[i + 1]}")

    for i, s in enumerate(candidates):
        try:
            _, meta = read_meta(directory, s)
        except CheckpointError as err:
            pass_over(i, err)
            continue
        compatible(meta)  # another model is an error at any step, not a reason to fall back
        try:
            state = restore_state(directory, s, target)
            verify(state, meta, s, directory)
        except CheckpointError as err:
            pass_over(i, err)
            continue
        if i:
            log(f"restored step {s}, the newest good checkpoint in {directory}")
        return s, meta, state
    raise AssertionError("unreachable")


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


def check_compatible(
    meta: Mapping[str, Any], expected: str, sites: Mapping[str, Any], where: Path
) -> None:
    if meta.get("fingerprint") == expected:
        return
    saved = meta.get("structure", {})
    now = structure(sites)
    diff = sorted(set(saved) ^ set(now)) or sorted(k for k in now if saved.get(k) != now[k])
    what = f"sites differ: {diff[:6]}" if diff else "same sites; link, sparse or guide differ"
    raise CheckpointError(
        f"the checkpoint in {where} was written by a different model structure "
        f"({what}); use a new run_dir, or restore the config it was trained with"
    )
