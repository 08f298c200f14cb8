"""Posterior summaries of a run's global latent sites, from its latest checkpoint."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from blayers import guides

from . import files
from .model import coefficient_labels
from .run import restore_run
from .setup import Setup

QUANTILES = (0.05, 0.5, 0.95)
FIELDS = ["site", "index", "label", "mean", "std", "q05", "q50", "q95"]


def summarize(
    run_dir: Path,
    step: int | None = None,
    draws: int = 1000,
    seed: int = 0,
    strict: bool = False,
    log: Callable[[str], None] = print,
    trust_model: str | None = None,
) -> list[dict[str, Any]]:
    """One row per element of each global site: mean, std and quantiles of guide draws."""
    setup, state, _ = restore_run(run_dir, step, strict, log, trust_model)
    return summary_rows(setup, state, draws, seed)


def summary_rows(
    setup: Setup, state: Any, draws: int = 1000, seed: int = 0
) -> list[dict[str, Any]]:
    """:func:`summarize` of a restored run."""
    names = sorted(n for n, site in setup.sites.items() if guides.is_global(site))
    guide = setup.guide
    view = {n: state.params[n] for n in names}
    keys = jax.random.split(jax.random.PRNGKey(seed), draws)
    drawn = jax.jit(jax.vmap(lambda k: guide.sample(k, view)[0]))(keys)
    rows = []
    terms = setup.model.terms
    for name in names:
        site = setup.sites[name]
        labels = coefficient_labels(terms, setup.columns, name)
        values = np.asarray(drawn[name]).reshape(draws, -1)
        qs = np.quantile(values, QUANTILES, axis=0)
        for j in range(values.shape[1]):
            index = np.unravel_index(j, site.shape) if site.shape else ()
            rows.append(
                {
                    "site": name,
                    "index": ",".join(str(int(i)) for i in index),
                    # a dense coefficient's input column (and unit, where there are several)
                    "label": _label(labels, index, site.shape),
                    "mean": float(values[:, j].mean()),
                    "std": float(values[:, j].std()),
                    "q05": float(qs[0, j]),
                    "q50": float(qs[1, j]),
                    "q95": float(qs[2, j]),
                }
            )
    return rows


def _label(labels: list[str] | None, index: tuple[Any, ...], shape: tuple[int, ...]) -> str:
    if labels is None or not index or len(labels) != shape[0]:
        return ""
    unit = f"[{int(index[1])}]" if len(index) > 1 and shape[1] > 1 else ""
    return labels[int(index[0])] + unit


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(rows)

    files.atomic_write(path, write)


def format_rows(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'site':<40} {'index':<8} {'label':<10} {'mean':>9} {'std':>8} {'q05':>9} "
        f"{'q50':>9} {'q95':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['site']:<40} {r['index']:<8} {r['label']:<10} {r['mean']:>9.4f} {r['std']:>8.4f} "
            f"{r['q05']:>9.4f} {r['q50']:>9.4f} {r['q95']:>9.4f}"
        )
    return "\n".join(lines)
