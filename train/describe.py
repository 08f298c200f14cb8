"""A configured model written down: its priors, its linear predictor and its likelihood.

``blayers-train dry_run=true`` prints it, and every run writes it beside its config
(``model.txt``, ``model.tex``) for the report. The priors and the likelihood come from one
trace of the model (:mod:`blayers.latex`), built on two-row tables so that a 10⁷-row table
is never drawn; the linear predictor's line comes from the configured terms, which a trace
does not record.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import files

if TYPE_CHECKING:  # the report reads the written files without importing JAX
    from blayers.latex import Statement

    from .config import ModelConfig
    from .model import Columns, Term

TEXT_FILE, LATEX_FILE = "model.txt", "model.tex"


def _term_piece(term: Term, columns: Columns, sites: set[str]) -> tuple[str, str]:
    """``(LaTeX, text)`` of one term's contribution to the linear predictor."""
    from blayers.latex import site_symbol as symbol

    beta = f"{term.layer_name}_{term.name}_beta"
    numeric = [columns.numeric[i] for i in term.numeric_idx]
    categorical = [columns.categorical[i] for i in term.categorical_idx]
    slopes = [columns.numeric[i] for i in term.slopes_idx]
    if term.kind == "intercept" and beta in sites:
        return symbol(beta)
    if term.kind == "dense" and beta in sites and term.layer.pairs_within:
        tex, txt = symbol(beta)
        return rf"\mathrm{{pairs}}(x_i)^{{\top}}{tex}", f"pairs([{', '.join(numeric)}])·{txt}"
    if term.kind == "dense" and beta in sites:
        tex, txt = symbol(beta)
        return rf"x_{{i}}^{{\top}}{tex}", f"[{', '.join(numeric)}]·{txt}"
    if term.kind == "pair" and beta in sites:  # every product x_j z_k, one coefficient each
        tex, txt = symbol(beta)
        z = [columns.numeric[i] for i in term.z_idx]
        return (
            rf"(x_i \otimes z_i)^{{\top}}{tex}",
            f"([{', '.join(numeric)}] ⊗ [{', '.join(z)}])·{txt}",
        )
    if term.kind in ("table", "categorical_fm") and term.table_site in sites:
        tex, txt = symbol(term.table_site)
        rows = [(rf"{tex}[\mathrm{{{c}}}_i]", f"{txt}[{c}_i]") for c in categorical]
        if term.kind == "categorical_fm":
            return (
                r"\mathrm{FM}(" + ", ".join(r[0] for r in rows) + ")",
                "FM(" + ", ".join(r[1] for r in rows) + ")",
            )
        if term.layer.rows_path:  # a path over the ordered levels, read at t
            op = term.layer.rows_path
            c = categorical[0]
            return rf"\mathrm{{{op}}}({tex})[\mathrm{{{c}}}_i]", f"{op}({txt})[{c}_i]"
        if slopes:
            return rf"{rows[0][0]}^{{\top}} s_i", f"{rows[0][1]}·[{', '.join(slopes)}]"
        return rows[0]
    inputs = ", ".join(numeric + categorical)
    name = term.name.replace("_", r"\_")
    return rf"f_{{\mathrm{{{name}}}}}(\ldots)", f"f_{term.name}({inputs})"


def describe(model_cfg: ModelConfig | Mapping[str, Any], columns: Columns) -> list[Statement]:
    """Statements of the configured model: every prior, then ``η_i = …`` from its terms (for
    a model of terms), then the likelihood."""
    import jax.numpy as jnp

    from blayers.latex import ETA, Statement, model_statements

    from .model import build_model

    model = build_model(model_cfg, columns, {c: 2 for c in columns.categorical})
    batch = {
        "numeric": jnp.zeros((1, len(columns.numeric)), jnp.float32),
        "categorical": jnp.zeros((1, len(columns.categorical)), jnp.int32),
    }
    statements = model_statements(lambda: model(batch))
    terms: Sequence[Term] = model.terms
    if not terms:
        return statements
    sites = _site_names(statements, terms)
    pieces = [_term_piece(t, columns, sites) for t in terms]
    eta = Statement(ETA, (" + ".join(p[0] for p in pieces), " + ".join(p[1] for p in pieces)), "=")
    return [*statements[:-1], eta, statements[-1]]


def _site_names(statements: Sequence[Statement], terms: Sequence[Term]) -> set[str]:
    """The model's sites among the terms' candidate sites, found by their symbols."""
    from blayers.latex import site_symbol as symbol

    drawn = {s.symbol for s in statements}
    candidates = [f"{t.layer_name}_{t.name}_beta" for t in terms] + [t.table_site for t in terms]
    return {c for c in candidates if symbol(c) in drawn}


def write(run_dir: Path, statements: Sequence[Statement]) -> None:
    """``model.txt`` and ``model.tex`` in the run dir."""
    from blayers.latex import render_latex, render_text

    files.write_text(Path(run_dir) / TEXT_FILE, render_text(statements) + "\n")
    files.write_text(Path(run_dir) / LATEX_FILE, str(render_latex(statements)) + "\n")


def read(run_dir: Path) -> Mapping[str, str]:
    """The written model of a run, by format (``text``, ``latex``); empty for older runs."""
    out = {}
    for key, name in (("text", TEXT_FILE), ("latex", LATEX_FILE)):
        path = Path(run_dir) / name
        if path.is_file():
            out[key] = path.read_text()
    return out
