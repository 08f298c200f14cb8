"""A one-file HTML report of a run: ELBO curve, posterior summaries, scoring statistics.

    python -m train.report runs/default

The curve is inline SVG, so the report needs no plotting library and opens anywhere.
"""

from __future__ import annotations

import csv
import html
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from . import files


def _svg_curve(steps: list[float], values: list[float], width: int = 640, height: int = 220) -> str:
    if len(steps) < 2:
        return "<p>(not enough points for a curve)</p>"
    x0, x1 = min(steps), max(steps)
    lo, hi = float(np.percentile(values, 2)), float(max(values))
    hi = hi if hi > lo else lo + 1.0
    pad = 30

    def px(s: float, v: float) -> str:
        x = pad + (s - x0) / max(x1 - x0, 1) * (width - 2 * pad)
        y = height - pad - (min(max(v, lo), hi) - lo) / (hi - lo) * (height - 2 * pad)
        return f"{x:.1f},{y:.1f}"

    points = " ".join(px(s, v) for s, v in zip(steps, values, strict=True))
    return (
        f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">'
        f'<rect width="100%" height="100%" fill="white" stroke="#ccc"/>'
        f'<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{points}"/>'
        f'<text x="{pad}" y="18" font-size="12">ELBO per row: {hi:.4f} (top) … {lo:.4f}</text>'
        f'<text x="{pad}" y="{height - 8}" font-size="12">step {x0:.0f}</text>'
        f'<text x="{width - pad - 70}" y="{height - 8}" font-size="12">step {x1:.0f}</text>'
        "</svg>"
    )


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


def build(run_dir: Path, scores: Path | None = None) -> Path:
    """Write ``run_dir/report.html`` and return its path."""
    run_dir = Path(run_dir)
    parts = [f"<h1>blayers run: {html.escape(str(run_dir))}</h1>"]
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        parts.append("<h2>Training</h2>")
        parts.append(_svg_curve([m["step"] for m in lines], [m["elbo_per_row"] for m in lines]))
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
    summary = run_dir / "summary.csv"
    if summary.exists():
        with open(summary) as fh:
            rows = [
                {k: (float(v) if k not in ("site", "index", "label") else v) for k, v in r.items()}
                for r in csv.DictReader(fh)
            ]
        parts.append("<h2>Posterior of the global parameters</h2>")
        parts.append(
            _table(rows, ["site", "index", "label", "mean", "std", "q05", "q50", "q95"])
        )
    scores = scores or run_dir / "scores"
    manifest = scores / "_manifest.json"
    if manifest.exists():
        info = json.loads(manifest.read_text())
        table = pq.read_table(scores, columns=["mean", "std"])
        mean, std = table["mean"].to_numpy(), table["std"].to_numpy()
        parts.append("<h2>Scores</h2>")
        parts.append(
            f"<p>{info['rows']:,} rows in {info['num_parts']} parts, {info['draws']} posterior "
            f"draws each. Expected response: mean {mean.mean():.4f}, range "
            f"[{mean.min():.4f}, {mean.max():.4f}]; posterior std median {np.median(std):.4f}, "
            f"90th percentile {np.percentile(std, 90):.4f}. Rows with unseen categories: "
            f"{html.escape(json.dumps(info['unseen_rows_by_column']))}.</p>"
        )
    out = run_dir / "report.html"
    files.write_text(
        out, "<html><body style='font-family:sans-serif'>" + "\n".join(parts) + "</body></html>"
    )
    return out


def main() -> None:
    run_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/default")
    print(f"wrote {build(run_dir)}")


if __name__ == "__main__":
    main()
