"""A new run that continues a trained one on new data (``init_from=<run_dir>``).

Users retrain every day on a new partition, where new users and items appear. A warm start
makes the day-2 run a run of its own (its own directory, checkpoints, resumes and restores)
that begins where the day-1 run ended:

- **Vocabulary.** Every categorical column's vocabulary is the day-1 run's, extended by the
  day-2 data (:meth:`train.vocab.Vocab.extended`): known categories keep their ids, hence
  their table rows; new ones are appended; ``counts`` are the day-2 data's (the row-sparse
  objective's) and ``totals`` the lineage's.
- **Tables grow.** Each table term's rows are laid out by field (each field's known ids,
  then its unseen-category row; the last field padded to the mesh), so a known row of field
  :math:`f` moves from ``old_offset_f + i`` to ``new_offset_f + i``. The day-1 state is
  restored onto the day-2 mesh, sharded as its own checkpoint was, and one jitted copy
  writes each field's block of known rows into the day-2 state, which is born sharded:
  no table is ever gathered onto one device.
- **What carries over.** Every guide parameter of the global sites and of the known rows,
  and the optimizer's moments with them. New rows, the unseen-category rows and the padding
  start as a fresh run's do (at the prior, or at a conditional guide's row start), and so do
  the step, the learning-rate schedule's count and the random key. So do a conditional
  guide's known rows that the new data observes (:func:`restarted_rows` says why).
- **What must match.** The model (terms, link, columns, target), the guide family and its
  FM-row form, and the optimizer: the state's layout follows them. A smooth term's domain
  is the day-1 run's (:mod:`train.smooth`), so the carried coefficients mean the same curve.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import checkpoint as ckpt
from . import vocab as vocab_lib
from .config import Config, ConfigError, from_container, to_container, with_saved_defaults
from .plan import row_sharding
from .settings import differences, under
from .smooth import SMOOTH, SMOOTH_KEYS

# settings a warm start must share with the run it continues: the state's layout and the
# meaning of its rows follow them
SHARED = (
    "model",
    "data.numeric",
    "data.categorical",
    "data.target",
    "optim.name",
    "optim.guide",
    "optim.fm_rows",
)


@dataclass(frozen=True)
class Base:
    """The run a warm start continues: its directory, newest readable checkpoint's step and
    metadata, saved config and vocabularies."""

    run_dir: Path
    step: int
    meta: Mapping[str, Any]
    cfg: Config
    vocabs: Mapping[str, vocab_lib.Vocab]
    key: str = "init_from"  # the setting that named it

    @classmethod
    def open(
        cls, run_dir: Path, cfg: Config, log: Callable[[str], None] = print, key: str = "init_from"
    ) -> Base:
        """The run at ``run_dir``, checked against the new run's ``cfg``; a
        :class:`~train.config.ConfigError` naming ``key`` (the setting that named the run)
        and the fix otherwise."""
        run_dir = Path(run_dir)
        try:
            step, meta = ckpt.newest_readable_meta(run_dir / "checkpoints", log=log)
        except ckpt.CheckpointError as err:
            raise ConfigError(f"{key}={run_dir}: {err}") from None
        if meta.get("config", {}).get("model", {}).get("_target_"):
            raise ConfigError(
                f"{key}={run_dir}: a run of a model of the user's own (model._target_) "
                "cannot be continued; warm starts take models of model.terms"
            )
        base_cfg = from_container(with_saved_defaults(meta["config"]))
        changed = differences(
            base_cfg, with_base_settings(cfg, base_cfg), lambda k: under(k, SHARED)
        )
        if changed:
            raise ConfigError(
                f"{key}={run_dir} was trained with another model or guide "
                f"({'; '.join(changed)}); a warm start continues the same model: use those "
                f"settings, or start a new run without {key}"
            )
        try:
            vocabs = vocab_lib.load_all(run_dir / "vocab", list(base_cfg.data.categorical))
        except vocab_lib.IncompleteVocabError as err:
            raise ConfigError(f"{key}={run_dir}: {err}") from None
        return cls(run_dir, step, meta, base_cfg, vocabs, key)

    @property
    def table_sizes(self) -> dict[str, int]:
        return {c: int(n) for c, n in self.meta["table_sizes"].items()}

    @property
    def pad_multiple(self) -> int:
        return int(self.meta.get("table_pad_multiple", 1))

    def lineage(self) -> dict[str, Any]:
        """What the new run's checkpoints record of where it started."""
        return {"run_dir": str(self.run_dir), "step": self.step}


def with_base_settings(cfg: Config, base_cfg: Config) -> Config:
    """``cfg`` with what a continuation takes from its base run: each smooth term that leaves
    its domain out takes the base run's (by term name), so a continued curve keeps its knots
    and :math:`L`, and the base run's layout of FM factors (``model.fm_unit_axis``: a run
    saved before that setting keeps the unit axis, and its continuation takes it over)."""
    terms = list(to_container(cfg)["model"].get("terms") or [])
    saved = {t.get("name"): t for t in to_container(base_cfg)["model"].get("terms") or []}
    out = []
    for spec in terms:
        spec = dict(spec)
        before = saved.get(spec.get("name"), {})
        if spec.get("layer") in SMOOTH and before.get("layer") == spec["layer"]:
            for key in (*SMOOTH_KEYS[spec["layer"]], "L", "knots"):
                if key in before and key not in spec:
                    spec[key] = before[key]
        out.append(spec)
    data = to_container(cfg)
    data["model"]["terms"] = out
    data["model"]["fm_unit_axis"] = bool(base_cfg.model.fm_unit_axis)
    return from_container(data)


def row_blocks(
    base_terms: Sequence[Any],
    terms: Sequence[Any],
    known: Mapping[str, int],
    columns: Sequence[str],
) -> dict[str, list[tuple[int, int, int]]]:
    """Per table site, ``(old_first_row, new_first_row, rows)`` of each field's known ids:
    the rows a warm start copies. ``known``: each column's number of known categories."""
    old = {t.table_site: t for t in base_terms if t.categorical_idx}
    out = {}
    for t in terms:
        if not t.categorical_idx:
            continue
        before = old[t.table_site]
        fields = [columns[i] for i in t.categorical_idx]
        out[t.table_site] = [
            (int(o), int(n), known[c])
            for o, n, c in zip(before.row_offsets, t.row_offsets, fields, strict=True)
        ]
    return out


def _site_of(path: tuple[Any, ...], sites: Mapping[str, Any]) -> str | None:
    for key in path:
        name = getattr(key, "key", None)
        if isinstance(name, str) and name in sites:
            return name
    return None


def _is_count(path: tuple[Any, ...], leaf: Any) -> bool:
    """An optimizer's step count (the schedule's, Adam's bias correction): the new run's."""
    return getattr(path[-1], "name", None) == "count" or (
        np.ndim(leaf) == 0 and np.issubdtype(leaf.dtype, np.integer)
    )


def carry_over(
    base_state: Any,
    fresh: Any,
    blocks: Mapping[str, Sequence[tuple[int, int, int]]],
    base_shardings: Any,
    shardings: Any,
    restart: Mapping[str, Any] | None = None,
) -> Any:
    """The new run's first state: ``fresh`` with the base run's global parameters, known rows
    and optimizer moments written in (module docstring), in one jitted, sharded copy.
    ``restart[site]``: a flag per row of the new table; flagged rows keep their fresh start
    (:func:`restarted_rows`)."""
    if jax.tree.structure(base_state) != jax.tree.structure(fresh):
        raise ConfigError(
            "init_from: the run's state is laid out differently (a table's row-sparse "
            "setting changed as it grew?): set sparse: true or false on each table term"
        )
    restart = dict(restart or {})
    copy = copy_fn(blocks, base_shardings, shardings, tuple(restart))
    return copy(base_state, fresh, restart)


def restarted_rows(counts: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    r"""The rows of each conditional-guide table (``counts``: its rows' counts in the new data)
    that the new data observes: they keep the fresh, data-aware start. Such a row's guide
    parameters are a Gaussian site for its likelihood (precision :math:`\tau_r = n_r /
    \sigma^2` and a mean), i.e. the *old* data's evidence; carried into a fit of the new
    data alone they held a drifted row near its old value until many steps moved it (on
    ``make daily``'s day 2 after 200 steps: effects RMSE 0.145 against 0.072 from a cold
    start). Rows the new data does not observe keep the base run's parameters."""
    return {site: np.asarray(c) > 0 for site, c in counts.items()}


def copy_fn(
    blocks: Mapping[str, Sequence[tuple[int, int, int]]],
    base_shardings: Any,
    shardings: Any,
    restart_sites: Sequence[str] = (),
) -> Callable[[Any, Any, Any], Any]:
    """The jitted copy of :func:`carry_over` (``fresh`` donated), for it and for measuring
    its memory (``benchmarks/warm_start_growth.py``)."""

    def leaf(
        path: tuple[Any, ...], old: jax.Array, new: jax.Array, placed: Any, restart: Any
    ) -> jax.Array:
        site = _site_of(path, blocks)
        if site is None:
            if old.shape != new.shape:
                raise ConfigError(
                    f"init_from: {jax.tree_util.keystr(path)} has shape {old.shape} there and "
                    f"{new.shape} here; a warm start continues the same model"
                )
            return new if _is_count(path, new) else old.astype(new.dtype)
        # each block: the old rows shifted into place by a pad (negative pads crop) laid out
        # as the new table, then selected row by row. A slice and an update of the sharded
        # table instead made XLA gather the whole table onto every device
        row = jax.lax.broadcasted_iota(jnp.int32, new.shape, 0)
        out = new
        for first_old, first_new, rows in blocks[site]:
            low = first_new - first_old
            high = new.shape[0] - old.shape[0] - low
            widths = [(low, high, 0)] + [(0, 0, 0)] * (old.ndim - 1)
            moved = jax.lax.pad(old.astype(new.dtype), jnp.zeros((), new.dtype), widths)
            moved = jax.lax.with_sharding_constraint(moved, placed)
            inside = (row >= first_new) & (row < first_new + rows)
            out = jnp.where(inside, moved, out)
        if site in restart:
            flags = restart[site].reshape((-1,) + (1,) * (new.ndim - 1))
            out = jnp.where(flags, new, out)
        return out

    def merge(old: Any, new: Any, restart: Mapping[str, jax.Array]) -> Any:
        def each(old_tree: Any, new_tree: Any, placed: Any) -> Any:
            return jax.tree_util.tree_map_with_path(
                lambda p, o, n, s: leaf(p, o, n, s, restart), old_tree, new_tree, placed
            )

        return new._replace(
            params=each(old.params, new.params, shardings.params),
            opt_state=each(old.opt_state, new.opt_state, shardings.opt_state),
        )

    flags = {site: row_sharding(shardings, site) for site in restart_sites}
    return jax.jit(
        merge,
        in_shardings=(base_shardings, shardings, flags),
        out_shardings=shardings,
        donate_argnums=1,
    )
