r"""A run whose prior is a trained run's posterior (``prior_from=<run_dir>``).

Day 2 fits only day 2's data, and day 1 enters through its posterior
(:mod:`blayers.posterior_prior` has the math): each global site's and each known table row's
prior term becomes the day-1 guide's density, a category new since day 1 keeps the model's
prior, and ``prior_widen`` :math:`\ge 1` widens every day-1 sd for drift. The run also
continues day 1's state as ``init_from`` does (:mod:`train.warm_start`: the vocabulary
extended, known rows and globals carried over), and it is a run of its own.

The prior is day 1's guide parameters laid out as this run's tables (the same carry-over,
without restarted rows) and a flag per table row for "day 1 had it". It is written once, when
the run starts, to ``<run_dir>/prior`` (an Orbax checkpoint with checksums), and every resume
reads it from there, so a resumed run optimises the same objective bit for bit whatever
happens to day 1's directory.

Row-sparse tables: the step gathers the batch's rows of the prior beside their state and
weights their prior terms as it weights the model's, so the ELBO estimate stays unbiased. A
known row that day 2 never observes is never touched and keeps its day-1 parameters.

Recentering (:mod:`train.recenter`) keeps its closed-form ties and the intercept's variance
floor, with day 1's intercept posterior as the intercept's prior and only the categories new
since day 1 counted as new groups (:func:`train.recenter.couple`); its mean shift assumes the
model's own :math:`N(0, \lambda)` row prior and does not run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from blayers import guides
from blayers.posterior_prior import PosteriorPrior

from . import checkpoint as ckpt
from .config import ConfigError
from .plan import row_sharding
from .state import COUPLING_STATE, ROW_STATE, TrainState, split_row_state

DIRECTORY = "prior"


@dataclass(frozen=True)
class RunPrior:
    """Day 1's guide parameters in this run's state layout (``params``: as ``state.params``,
    row-sparse tables packed), a flag per row of each table (``known``), and ``widen``."""

    params: Any
    known: dict[str, jax.Array]
    widen: float

    def arrays(self) -> dict[str, Any]:
        """What the compiled step takes as an argument (never a compiled-in constant)."""
        return {"params": self.params, "known": self.known}


def known_rows(
    blocks: Mapping[str, Sequence[tuple[int, int, int]]], rows: Mapping[str, int]
) -> dict[str, np.ndarray]:
    """Per table site, which of its ``rows[site]`` rows carry a day-1 posterior: those the
    warm start's copy blocks ``(first_old, first_new, rows)`` fill."""
    out = {}
    for site, total in rows.items():
        flags = np.zeros(total, bool)
        for _, first_new, count in blocks.get(site, ()):
            flags[first_new : first_new + count] = True
        out[site] = flags
    return out


def shardings_of(prior: RunPrior, shardings: TrainState) -> dict[str, Any]:
    """The shardings of :meth:`RunPrior.arrays`: the parameters' own, each flag vector split
    as its table's rows are."""
    return {
        "params": shardings.params,
        "known": {s: row_sharding(shardings, s) for s in prior.known},
    }


def placed(
    params: Any, known: Mapping[str, np.ndarray], widen: float, shardings: TrainState
) -> RunPrior:
    """A :class:`RunPrior` with ``known`` placed as each table's rows are."""
    flags = {
        s: jax.device_put(jnp.asarray(k), row_sharding(shardings, s)) for s, k in known.items()
    }
    return RunPrior(params, flags, widen)


def _target(abstract_params: Any, shardings: TrainState, rows: Mapping[str, int]) -> Any:
    known = {
        s: jax.ShapeDtypeStruct((n,), jnp.bool_, sharding=row_sharding(shardings, s))
        for s, n in rows.items()
    }
    params = ckpt.abstract_with_shardings(abstract_params, shardings.params)
    return {"params": params, "known": known}


def save(run_dir: Path, prior: RunPrior, lineage: Mapping[str, Any]) -> None:
    """Write the prior once beside the run (every process takes part, as in a checkpoint)."""
    writer = ckpt.Checkpointer(Path(run_dir) / DIRECTORY, max_to_keep=1, async_save=False)
    try:
        writer.save(0, prior.arrays(), {"widen": prior.widen, "prior_from": dict(lineage)})
    finally:
        writer.close()


def load(
    run_dir: Path, abstract_params: Any, shardings: TrainState, rows: Mapping[str, int]
) -> RunPrior:
    """The prior this run started with; a :class:`~train.config.ConfigError` naming the
    folder when it is missing or does not restore."""
    directory = Path(run_dir) / DIRECTORY
    try:
        _, meta = ckpt.read_meta(directory, 0)
        tree = ckpt.restore_state(directory, 0, _target(abstract_params, shardings, rows))
        ckpt.verify(tree, meta, 0, directory)
    except ckpt.CheckpointError as err:
        raise ConfigError(
            f"prior_from: this run was started with a prior, and {err}; restore the folder "
            f"{directory} from a backup, or start a new run"
        ) from None
    return RunPrior(tree["params"], dict(tree["known"]), float(meta["widen"]))


def posterior_prior(
    guide: guides.MeanFieldGuide, params: Mapping[str, Any], known: Mapping[str, Any], widen: float
) -> PosteriorPrior:
    """The library's prior over this run's guide, from the prior's dense parameters."""
    return PosteriorPrior(guide, dict(params), dict(known), widen)


def gathered_rows(
    tables: Mapping[str, Any],
    uniq: Mapping[str, jax.Array],
    gather: Callable[[jax.Array, jax.Array], jax.Array],
) -> dict[str, dict[str, jax.Array]]:
    """Day 1's guide fields of a batch's rows of each packed row-sparse table."""
    out = {}
    for site, table in tables.items():
        rows = gather(table[ROW_STATE], uniq[site])
        coupling = gather(table[COUPLING_STATE], uniq[site]) if COUPLING_STATE in table else None
        out[site] = split_row_state(rows, coupling)
    return out
