"""A run directory and the one way its state is restored or begun.

Training, the summary, scoring, the effects export and the Python API all read a run
through :class:`RunDir`: which checkpoint to start from (:meth:`RunDir.resume_point`), the
newest good one that fits a setup (:meth:`RunDir.restore`), a fresh state when there is
none (:meth:`RunDir.restore_or_init`), and a run opened from its directory alone, its setup
rebuilt from the saved config (:func:`restore_run`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import checkpoint as ckpt
from .config import ConfigError, from_container, with_saved_defaults
from .model import user_layer_paths
from .plan import ShardingPlan
from .setup import Setup, fresh_state, make_setup
from .state import TrainState

Log = Callable[[str], None]


@dataclass(frozen=True)
class RunDir:
    """One run's directory: its ``checkpoints`` and what restoring them needs."""

    path: Path

    @property
    def checkpoints(self) -> Path:
        return Path(self.path) / "checkpoints"

    def resume_point(
        self, step: int | None, strict: bool, log: Log, key: str = "train.resume_step"
    ) -> tuple[int | None, dict[str, Any] | None]:
        """The step and metadata to start from: ``step`` (``key`` names the setting that
        asked for it), else the newest whose metadata reads; ``(None, None)`` for a run with
        no checkpoint yet.

        Raises:
            ConfigError: ``step`` was asked for and cannot be read.
        """
        if not ckpt.steps(self.checkpoints):
            if step is not None:
                raise ConfigError(f"{key}={step}: {self.checkpoints} holds no checkpoint")
            return None, None
        try:
            return ckpt.newest_readable_meta(self.checkpoints, step, strict, log)
        except ckpt.CheckpointError as err:
            if step is not None:
                raise ConfigError(f"{key}={step}: {err}") from None
            raise

    def restore(
        self,
        setup: Setup,
        step: int | None,
        strict: bool,
        log: Log,
        check: Callable[[Mapping[str, Any]], None] | None = None,
    ) -> tuple[int, dict[str, Any], TrainState]:
        """The newest good checkpoint at or before ``step`` whose model fits ``setup``
        (``check``: one more test of each candidate's metadata), restored onto the setup's
        shardings; ``strict``: that step or an error."""
        target = ckpt.abstract_with_shardings(setup.abstract, setup.shardings)

        def usable(meta: Mapping[str, Any]) -> None:  # an older step fallen back to, too
            if check is not None:
                check(meta)
            ckpt.check_compatible(meta, setup.fingerprint, setup.sites, self.checkpoints)

        return ckpt.restore_newest_good(
            self.checkpoints, target, step, strict=strict, log=log, compatible=usable
        )

    def restore_or_init(
        self, setup: Setup, step: int | None, strict: bool, log: Log
    ) -> tuple[int | None, dict[str, Any] | None, TrainState]:
        """:meth:`restore` from ``step``, or the setup's fresh state when ``step`` is None."""
        if step is None:
            return None, None, fresh_state(setup)
        return self.restore(setup, step, strict, log)


def restore_run(
    run_dir: Path,
    step: int | None = None,
    strict: bool = False,
    log: Log = print,
    trust_model: str | None = None,
) -> tuple[Setup, Any, dict[str, Any]]:
    """Setup, restored state and metadata of a run, needing nothing but its directory: the
    given ``step``, else the newest that reads and verifies (``strict``: the latest or an
    error). A run of a model of the user's own is restored only if ``trust_model`` names it
    (see :func:`check_trusted`)."""
    run = RunDir(Path(run_dir))
    strict = strict or step is not None  # a step asked for by name is that step or an error
    step, meta = ckpt.newest_readable_meta(run.checkpoints, step, strict, log)
    check_trusted(meta, run_dir, trust_model)
    cfg = from_container(with_saved_defaults(meta["config"]))
    pad = int(meta.get("table_pad_multiple", 1))
    plan = ShardingPlan.for_restore(cfg, pad)
    setup = make_setup(cfg, meta["table_sizes"], int(meta["num_data"]), plan, pad)
    step, meta, state = run.restore(
        setup, step, strict, log, check=lambda m: check_trusted(m, run_dir, trust_model)
    )
    return setup, state, {**meta, "step": step}


def check_trusted(meta: Mapping[str, Any], run_dir: Path, trust_model: str | None) -> None:
    """Refuse a run whose metadata names code of the user's own (a model function,
    ``model._target_``, or a term's layer given by import path) that ``trust_model`` (one
    import path, or several joined by commas) does not name: building the model imports
    it, and metadata is only as trustworthy as whoever could write the run directory."""
    model = meta.get("config", {}).get("model") or {}
    if not isinstance(model, Mapping):
        return
    imported = [model["_target_"]] if model.get("_target_") else []
    imported += user_layer_paths(model.get("terms") or [])
    trusted = {p.strip() for p in (trust_model or "").split(",") if p.strip()}
    untrusted = [p for p in imported if p not in trusted]
    if untrusted:
        raise ConfigError(
            f"trust_model: {run_dir} was trained with code of the user's own "
            f"({', '.join(untrusted)}); restoring it imports that code, so pass "
            f"trust_model={','.join(imported)} if it is yours"
        )
