"""Orbax checkpoints: the whole train state plus JSON metadata (config, vocab sizes, structure).

Each step directory holds ``state`` (guide params, optimizer state, step, rng — restored onto
whatever mesh the caller gives, so 8-device checkpoints restore on 1 or 4) and ``meta``. The
vocabulary lives beside the checkpoints in ``run_dir/vocab`` and is written once per run.
A structure fingerprint in ``meta`` guards against restoring into a different model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from blayers import guides


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says why and what to do."""


def structure(sites: Mapping[str, guides.LatentSite]) -> dict[str, list[int]]:
    return {name: list(site.unconstrained_shape) for name, site in sorted(sites.items())}


def fingerprint(
    sites: Mapping[str, guides.LatentSite],
    link: str,
    sparse: list[str] | None = None,
    guide: str = "mean_field",
) -> str:
    """Identity of a model's parameter structure, its link, which tables train row-sparse
    (their state differs: one row state per table, ``train.state.ROW_STATE``) and the guide
    family (its parameters differ)."""
    content: dict[str, Any] = {"sites": structure(sites), "link": link, "sparse": sparse or []}
    if guide != "mean_field":  # mean-field runs keep the fingerprint they always had
        content["guide"] = guide
    if sparse:
        content["row_state"] = 2  # layout version; 1 kept moments apart from the parameters
        if guide != "mean_field":  # their rows carry a coupling state since this version
            content["coupled_rows"] = 1
    payload = json.dumps(content, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


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
                f"checkpoint step {step} in {directory} is unreadable: {err}"
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
    try:
        restored = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )
        return restored["state"]
    except Exception as err:
        raise CheckpointError(
            f"checkpoint step {step} in {directory} cannot be restored: {err}"
        ) from err
    finally:
        manager.close()


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
    raise CheckpointError(
        f"the checkpoint in {where} was written by a different model structure "
        f"(sites differ: {diff[:6]}); use a new run_dir, or restore the config it was trained "
        "with"
    )
