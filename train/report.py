"""A one-file HTML report of a run: is it trained, what did it learn, does it fit?

    blayers-report runs/default [SCORES_DIR]

- **Model**: its priors, linear predictor and likelihood as the run wrote them
  (:mod:`train.describe`), as text and LaTeX.
- **Training**: the ELBO per row by step, raw and smoothed (a running median), on the whole
  run and on its last 80% (so the first steps' large values neither clip nor flatten the
  rest), and the throughput; the convergence verdict.
- **Global sites**: a forest plot of the posterior means and 90% intervals, with the truth
  where the data has a ``truth.json`` (the generated datasets do), and the summary table.
- **Table terms**: per term, a caterpillar plot (each level's mean and 90% interval, sorted)
  and a shrinkage plot (each level's mean and sd against its training count).
- **Fit** on a scored dataset that has the target: RMSE and mean log predictive density
  (gaussian-like targets) or Brier and log score (binary); predicted against observed; a
  reliability diagram; a PIT histogram (randomized for a binary target; from the predictive's
  sd when scored with ``predictive=true`` otherwise).

Figures are drawn with matplotlib and embedded as PNG, so the file opens anywhere. Without
matplotlib the report keeps its tables and numbers and says what to install.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from omegaconf import OmegaConf

from . import files
from .describe import read as describe_files

MAX_LEVELS_PLOTTED = 400  # caterpillar: evenly spaced levels of a long table
MAX_POINTS = 50_000  # shrinkage and fit scatter: a stride sample


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    fig.clf()
    import matplotlib.pyplot as plt

    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode()
    return f"<img alt='figure' src='data:image/png;base64,{data}'/>"


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>"
        + "".join(
            f"<td>{v:.4f}</td>" if isinstance(v, float) else f"<td>{html.escape(str(v))}</td>"
            for v in (r[c] for c in columns)
        )
        + "</tr>"
        for r in rows
    )
    return f"<table border=1 cellpadding=3><tr>{head}</tr>{body}</table>"


def running_median(values: np.ndarray, window: int) -> np.ndarray:
    """Each point's median over the ``window`` points ending at it (fewer at the start)."""
    return np.array([np.median(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))])


def _training(plt: Any, lines: list[dict[str, Any]]) -> list[str]:
    steps = np.array([m["step"] for m in lines], float)
    elbo = np.array([m["elbo_per_row"] for m in lines], float)
    rate = np.array([m["examples_per_s"] for m in lines], float)
    smooth = running_median(elbo, max(3, len(elbo) // 20))
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
    tail = steps >= steps[0] + 0.2 * (steps[-1] - steps[0])
    for ax, keep, title in ((axes[0], slice(None), "whole run"), (axes[1], tail, "last 80%")):
        ax.plot(steps[keep], elbo[keep], color="#9ecae1", lw=0.8, label="per log interval")
        ax.plot(steps[keep], smooth[keep], color="#08519c", lw=1.8, label="running median")
        ax.set(xlabel="step", ylabel="ELBO per row", title=f"ELBO, {title}")
        ax.legend(fontsize=8)
    axes[2].plot(steps[1:], rate[1:] / 1e3, color="#31a354")  # the first interval compiles
    axes[2].set(xlabel="step", ylabel="thousand examples / s", title="throughput")
    return [_png(fig)]


def _truth(run_dir: Path) -> dict[str, float]:
    """Known values by (site, label) from a ``truth.json`` beside the run's data, if any."""
    data_path = _config_value(run_dir, "data", "path") or ""
    found = Path(str(data_path)).parent / "truth.json"
    if "*" in str(data_path) or not found.is_file():
        return {}
    truth = json.loads(found.read_text())
    out: dict[str, float] = {}
    if "intercept" in truth:
        out["intercept"] = float(truth["intercept"])
    for i, b in enumerate(truth.get("beta", [])):
        out[f"beta:{i}"] = float(b)
    for name, sd in truth.get("effect_sd", {}).items():
        out[f"sd:{name}"] = float(sd)
    return out


def _truth_of(row: dict[str, Any], truth: dict[str, float]) -> float | None:
    site, index = row["site"], row["index"]
    if site.startswith("InterceptLayer_") and site.endswith("_beta"):
        return truth.get("intercept")
    if site.startswith("AdaptiveLayer_") and site.endswith("_beta") and index:
        return truth.get(f"beta:{index.split(',')[0]}")
    if site.startswith("RandomEffectsLayer_") and site.endswith("_scale"):
        return truth.get(f"sd:{site[len('RandomEffectsLayer_') : -len('_scale')]}")
    return None


def _forest(plt: Any, rows: list[dict[str, Any]], truth: dict[str, float]) -> str:
    names = [f"{r['site']} {r.get('label') or r['index']}".strip() for r in rows]
    y = np.arange(len(rows))[::-1]
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(rows) + 1))
    mean = np.array([r["mean"] for r in rows])
    lo, hi = np.array([r["q05"] for r in rows]), np.array([r["q95"] for r in rows])
    ax.errorbar(
        mean,
        y,
        xerr=[mean - lo, hi - mean],
        fmt="o",
        ms=4,
        color="#08519c",
        label="posterior mean, 90% interval",
    )
    known = [(i, t) for i, r in enumerate(rows) if (t := _truth_of(r, truth)) is not None]
    if known:
        ax.scatter(
            [t for _, t in known],
            [y[i] for i, _ in known],
            marker="x",
            color="#de2d26",
            zorder=3,
            label="truth (truth.json)",
        )
    ax.set_yticks(y, names, fontsize=8)
    ax.axvline(0, color="#999", lw=0.5)
    ax.set(title="global sites")
    ax.legend(fontsize=8, loc="best")
    return _png(fig)


def _effect_sample(batches: Iterator[pa.RecordBatch]) -> pa.Table:
    """A bounded sample of a table term's effects: every row of small tables, a stride of
    long ones, read batch by batch."""
    kept, seen = [], 0
    for batch in batches:
        stride = max(1, (seen + batch.num_rows) // MAX_POINTS)
        kept.append(batch.take(pa.array(np.arange(0, batch.num_rows, stride))))
        seen += batch.num_rows
    return pa.Table.from_batches(kept) if kept else pa.table({})


def _table_terms(plt: Any, run_dir: Path) -> list[str]:
    from . import effects as effects_lib
    from .config import ConfigError
    from .run import restore_run

    try:
        setup, state, _ = restore_run(run_dir, log=lambda _: None)
    except ConfigError as err:  # e.g. a model of the user's own, restored only when trusted
        return [f"<p>(not drawn: {html.escape(str(err))})</p>"]
    parts = []
    for name, term in effects_lib.table_terms(setup.model.terms).items():
        if effects_lib.unsupported(term):
            continue
        got = _effect_sample(effects_lib.effect_batches(setup, state, run_dir / "vocab", name))
        if not got.num_rows:
            continue
        if "dim" in got.schema.names:
            got = got.filter(pc.equal(got["dim"], 0))
        mean, sd = got["mean"].to_numpy(), got["sd"].to_numpy()
        count = got["count"].to_numpy()
        order = np.argsort(mean)
        spaced = np.linspace(0, len(order) - 1, min(len(order), MAX_LEVELS_PLOTTED))
        pick = order[spaced.astype(int)]
        fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
        x = np.arange(len(pick))
        axes[0].errorbar(
            x, mean[pick], yerr=1.6449 * sd[pick], fmt=".", ms=2, elinewidth=0.5, color="#08519c"
        )
        axes[0].set(
            xlabel="level (sorted by mean)",
            ylabel="effect",
            title=f"{name}: caterpillar, 90% intervals",
        )
        axes[1].scatter(count, mean, s=3, alpha=0.4, color="#08519c")
        axes[1].set(
            xscale="log",
            xlabel="training count",
            ylabel="posterior mean",
            title=f"{name}: shrinkage",
        )
        axes[2].scatter(count, sd, s=3, alpha=0.4, color="#31a354")
        axes[2].set(
            xscale="log",
            xlabel="training count",
            ylabel="posterior sd",
            title=f"{name}: uncertainty",
        )
        note = "" if "dim" not in got.schema.names else " (embedding dimension 0)"
        parts.append(f"<h3>{html.escape(name)}{note}</h3>" + _png(fig))
    return parts


def fit_metrics(y: np.ndarray, mean: np.ndarray, std: np.ndarray) -> dict[str, float]:
    """Held-out fit of scores against observed ``y``: Brier and log score for a 0/1 target
    (``mean`` a probability), else RMSE and the mean log density of a Normal with the
    scores' mean and sd (the predictive's spread, when scored with ``predictive=true``)."""
    if np.all((y == 0) | (y == 1)) and np.all((mean >= 0) & (mean <= 1)):
        p = np.clip(mean, 1e-6, 1 - 1e-6)
        return {
            "Brier": float(np.mean((p - y) ** 2)),
            "log score": float(np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))),
        }
    sd = np.maximum(std, 1e-9)
    logpdf = -0.5 * ((y - mean) / sd) ** 2 - np.log(sd) - 0.5 * np.log(2 * np.pi)
    return {
        "RMSE": float(np.sqrt(np.mean((y - mean) ** 2))),
        "mean log density": float(np.mean(logpdf)),
    }


def predictive_pit(y: np.ndarray, mean: np.ndarray, table: pa.Table) -> np.ndarray | None:
    r"""The probability integral transform of each observed ``y`` under its posterior
    predictive: for a 0/1 target the randomized PIT of Bernoulli(``mean``) (the predictive
    is exactly that), else, with ``predictive=true`` scores, the Normal approximation
    :math:`\Phi((y - \text{mean}) / \text{pred\_std})`; ``None`` otherwise."""
    from statistics import NormalDist

    if np.all((y == 0) | (y == 1)) and np.all((mean >= 0) & (mean <= 1)):
        below = np.where(y == 1, 1 - mean, 0.0)  # P(Y < y)
        at = np.where(y == 1, mean, 1 - mean)  # P(Y = y)
        return below + np.random.default_rng(0).random(len(y)) * at
    if "pred_std" not in table.schema.names:
        return None
    z = (y - mean) / np.maximum(table["pred_std"].to_numpy(), 1e-12)
    cdf = np.vectorize(NormalDist().cdf)
    return cdf(z)


def _fit(plt: Any | None, table: pa.Table, target: str) -> list[str]:
    y = table[target].to_numpy(zero_copy_only=False).astype(float)
    mean = table["mean"].to_numpy()
    spread = table["pred_std"] if "pred_std" in table.schema.names else table["std"]
    metrics = fit_metrics(y, mean, spread.to_numpy())
    parts = [
        "<p>Fit on the scored rows (held out only if they were not trained on): "
        + "; ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        + f" over {len(y):,} rows.</p>"
    ]
    if plt is None:
        return parts
    stride = max(1, len(y) // MAX_POINTS)
    edges = np.quantile(mean, np.linspace(0, 1, 21))
    bins = np.clip(np.searchsorted(edges, mean, side="right") - 1, 0, 19)
    filled = [b for b in range(20) if np.any(bins == b)]
    pred = np.array([mean[bins == b].mean() for b in filled])
    obs = np.array([y[bins == b].mean() for b in filled])
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
    axes[0].scatter(mean[::stride], y[::stride], s=3, alpha=0.3)
    axes[0].set(xlabel="predicted E[y]", ylabel=f"observed {target}", title="predicted vs observed")
    axes[1].plot(pred, obs, "o-", color="#08519c")
    lims = [min(pred.min(), obs.min()), max(pred.max(), obs.max())]
    axes[1].plot(lims, lims, color="#999", lw=0.8)
    axes[1].set(
        xlabel="mean predicted (20 bins)", ylabel="mean observed", title="reliability / calibration"
    )
    pit = predictive_pit(y, mean, table)
    if pit is not None:
        axes[2].hist(pit, bins=20, range=(0, 1), color="#31a354")
        axes[2].set(xlabel="PIT", ylabel="rows", title="PIT histogram (flat: calibrated)")
    else:
        axes[2].axis("off")
        axes[2].text(0.05, 0.5, "PIT: score with predictive=true", fontsize=10)
    parts.append(_png(fig))
    return parts


def build(run_dir: Path, scores: Path | None = None) -> Path:
    """Write ``run_dir/report.html`` and return its path; ``scores``: a scored dataset's
    directory (default ``run_dir/scores``)."""
    run_dir = Path(run_dir)
    plt = _pyplot()
    parts = [f"<h1>blayers run: {html.escape(str(run_dir))}</h1>"]
    if plt is None:
        parts.append("<p>(figures need matplotlib: pip install 'blayers[report]')</p>")
    parts += _model_section(run_dir)
    parts += _training_section(plt, run_dir)
    parts += _posterior_section(plt, run_dir)
    if plt is not None and (run_dir / "checkpoints").is_dir():
        parts.append("<h2>Table terms: per-level effects</h2>")
        parts += _table_terms(plt, run_dir)
    parts += _scores_section(plt, run_dir, Path(scores) if scores else run_dir / "scores")
    out = run_dir / "report.html"
    files.write_text(
        out, "<html><body style='font-family:sans-serif'>" + "\n".join(parts) + "</body></html>"
    )
    return out


def _model_section(run_dir: Path) -> list[str]:
    """The model as written at training time (text, and its LaTeX folded away)."""
    written = describe_files(run_dir)
    if "text" not in written:
        return []
    parts = ["<h2>Model</h2>", f"<pre>{html.escape(written['text'])}</pre>"]
    if "latex" in written:
        parts.append(
            f"<details><summary>LaTeX</summary><pre>{html.escape(written['latex'])}</pre></details>"
        )
    return parts


def _training_section(plt: Any, run_dir: Path) -> list[str]:
    """The ELBO curves, the run's pace and its convergence status."""
    parts = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        parts.append("<h2>Training</h2>")
        if plt is not None and len(lines) >= 2:
            parts += _training(plt, lines)
        if lines:
            steady = lines[1:] or lines
            rate = float(np.median([m["examples_per_s"] for m in steady]))
            waits = [m["input_wait"] for m in steady if "input_wait" in m]  # older runs lack it
            waited = f"; waiting for data {np.median(waits):.0%} of the time" if waits else ""
            parts.append(
                f"<p>{lines[-1]['step']} steps; final ELBO per row "
                f"{lines[-1]['elbo_per_row']:.4f}; median {rate:,.0f} examples/s{waited}</p>"
            )
    run_info = run_dir / "run.json"
    if run_info.exists():
        status = json.loads(run_info.read_text()).get("convergence")
        if status:  # runs written before convergence was tracked lack it
            colour = "green" if status.startswith("converged") else "#b00"
            parts.append(f"<p style='color:{colour}'><b>{html.escape(status)}</b></p>")
    return parts


def _posterior_section(plt: Any, run_dir: Path) -> list[str]:
    """The global sites' summary (``blayers-summary``'s ``summary.csv``): a forest plot
    against the truth where the data has one, and the table."""
    summary = run_dir / "summary.csv"
    if not summary.exists():
        return []
    keep = ("site", "index", "label")
    with open(summary) as fh:
        rows = [
            {k: (float(v) if k not in keep else v) for k, v in r.items()}
            for r in csv.DictReader(fh)
        ]
    parts = ["<h2>Posterior of the global parameters</h2>"]
    if plt is not None and rows:
        parts.append(_forest(plt, rows, _truth(run_dir)))
    columns = [
        c
        for c in ("site", "index", "label", "mean", "std", "q05", "q50", "q95")
        if not rows or c in rows[0]
    ]
    parts.append(_table(rows, columns))
    return parts


def _scores_section(plt: Any, run_dir: Path, scores: Path) -> list[str]:
    """The scored rows' spread of means and sds and, where they hold the target, the fit."""
    manifest = scores / "_manifest.json"
    if not manifest.exists():
        return []
    info = json.loads(manifest.read_text())
    table = pq.read_table(scores)
    mean, std = table["mean"].to_numpy(), table["std"].to_numpy()
    parts = [
        "<h2>Scores</h2>",
        f"<p>{info['rows']:,} rows in {info['num_parts']} parts, {info['draws']} posterior "
        f"draws each. Expected response: mean {mean.mean():.4f}, range "
        f"[{mean.min():.4f}, {mean.max():.4f}]; posterior std median {np.median(std):.4f}, "
        f"90th percentile {np.percentile(std, 90):.4f}. Rows with unseen categories: "
        f"{html.escape(json.dumps(info['unseen_rows_by_column']))}.</p>",
    ]
    target = _config_value(run_dir, "data", "target")
    if target and target in table.schema.names:
        parts += _fit(plt, table, target)
    return parts


def _config_value(run_dir: Path, group: str, key: str) -> Any:
    """A key of the resolved config the run last started with (``config.yaml``), if any."""
    config = run_dir / "config.yaml"
    if not config.is_file():
        return None
    return OmegaConf.select(OmegaConf.load(config), f"{group}.{key}", default=None)


def main() -> None:
    from . import metric_sinks
    from .config import ConfigError

    run_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/default")
    scores = Path(sys.argv[2]) if len(sys.argv) > 2 else None
    print(f"wrote {build(run_dir, scores)}")
    try:
        if metric_sinks.log_report(run_dir):
            print("logged report.html and summary.csv to the run's MLflow run")
    except ConfigError as err:
        print(f"warning: {err}")


if __name__ == "__main__":
    main()
