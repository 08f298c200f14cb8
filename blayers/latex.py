r"""A model written down: the sampling statements of its generative form, as LaTeX or text.

A blayers model is a NumPyro function, so one trace of it holds every latent site's prior and
the likelihood. :func:`model_to_latex` and :func:`model_to_text` trace the model once (prior
draws, no target) and write one statement per site, priors first::

    \lambda_{\mathrm{user}} \sim \mathrm{HalfNormal}(1)
    \theta_{\mathrm{user}} \sim \mathrm{Normal}(0, \lambda_{\mathrm{user}})
    y_i \sim \mathrm{Bernoulli}(\mathrm{logit}^{-1}(\eta_i))

A prior parameter that is another site's draw is written as that site's symbol (a
hierarchy reads as one); a constant one as its value; one computed from data or from several
sites as :math:`\cdot`. How the layers add up to the linear predictor :math:`\eta_i` is
Python, not part of a trace: the service, which knows its terms, writes that line itself
(:func:`train.describe.model_statements`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from numpyro import handlers

from blayers import layers

__all__ = ["LatexStr", "Statement", "model_statements", "model_to_latex", "model_to_text"]

OBS = "obs"
ENVS = ("align", "aligned", "none")

# a site's last name part -> (LaTeX, text) symbol
PARAM_SYMBOLS: dict[str, tuple[str, str]] = {
    "beta": (r"\beta", "β"),
    "theta": (r"\theta", "θ"),
    "scale": (r"\lambda", "λ"),
    "tau": (r"\tau", "τ"),
    "rho": (r"\rho", "ρ"),
    "sigma": (r"\sigma", "σ"),
    "z": ("z", "z"),
    "c2": ("c^2", "c²"),
    "lengthscale": (r"\ell", "ℓ"),
    "weights": ("w", "w"),
    "logits": (r"\gamma", "γ"),
}
# the links' global sites -> (LaTeX, text) symbol
LINK_SYMBOLS: dict[str, tuple[str, str]] = {
    "sigma": (r"\sigma", "σ"),
    "concentration": (r"\phi", "φ"),
    "gamma_shape": ("k", "k"),
    "zinb_concentration": (r"\phi", "φ"),
    "zinb_gate": (r"\pi", "π"),
    "zip_gate": (r"\pi", "π"),
    "ordinal_c0": ("c_0", "c0"),
    "ordinal_gaps": (r"\delta", "δ"),
    "beta_phi": (r"\phi", "φ"),
}
ETA = (r"\eta_i", "η_i")


class LatexStr(str):
    """LaTeX source (``print`` shows it) that a notebook displays typeset."""

    def _repr_latex_(self) -> str:
        return f"$$\n{self}\n$$"


@dataclass(frozen=True)
class Statement:
    """One line of the generative model: ``symbol ~ law`` (or ``symbol = law``)."""

    symbol: tuple[str, str]  # (LaTeX, text)
    law: tuple[str, str]
    relation: str = "~"

    def latex(self) -> str:
        op = r"\sim" if self.relation == "~" else "="
        return f"{self.symbol[0]} &{op} {self.law[0]}"

    def text(self) -> str:
        return f"{self.symbol[1]} {self.relation} {self.law[1]}"


def _layer_classes() -> set[str]:
    return {n for n in layers.__all__ if isinstance(getattr(layers, n), type) and n != "BLayer"}


def site_symbol(name: str) -> tuple[str, str]:
    """``(LaTeX, text)`` symbol of a site: ``RandomEffectsLayer_user_theta`` is
    :math:`\\theta_{\\mathrm{user}}`, a link's ``sigma`` is :math:`\\sigma`."""
    if name in LINK_SYMBOLS:
        return LINK_SYMBOLS[name]
    parts = name.split("_")
    if len(parts) >= 3 and parts[0] in _layer_classes():
        scope, param = "_".join(parts[1:-1]), parts[-1]
        tex, txt = PARAM_SYMBOLS.get(param, (rf"\mathrm{{{_tex_escape(param)}}}", param))
        return rf"{tex}_{{\mathrm{{{_tex_escape(scope)}}}}}", f"{txt}_{scope}"
    return rf"\mathrm{{{_tex_escape(name)}}}", name


def _tex_escape(s: str) -> str:
    return s.replace("_", r"\_")


def _number(x: float) -> str:
    return str(round(x)) if np.isclose(x, round(x)) else f"{x:.3g}"


def _unwrap(fn: Any) -> Any:
    while type(fn).__name__ in ("ExpandedDistribution", "Independent", "MaskedDistribution"):
        fn = fn.base_dist
    return fn


class _Values:
    """Renders a distribution parameter: another site's draw as its symbol, the product of two
    sites' draws (a global-local scale) as theirs, a constant as its value, anything else as
    a dot."""

    def __init__(self, latents: Mapping[str, Any]) -> None:
        self.by_id = {id(site["value"]): site_symbol(n) for n, site in latents.items()}
        self.draws = [
            (np.asarray(site["value"], np.float64), site_symbol(n)) for n, site in latents.items()
        ]
        self.scalars = [
            (float(np.asarray(site["value"]).reshape(())), site_symbol(n))
            for n, site in latents.items()
            if np.size(site["value"]) == 1
        ]

    def __call__(self, value: Any) -> tuple[str, str]:
        if id(value) in self.by_id:
            return self.by_id[id(value)]
        flat = np.asarray(value, np.float64).reshape(-1)
        if flat.size == 0 or not np.all(flat == flat[0]):
            return self._product(np.asarray(value, np.float64))
        # a draw the distribution broadcast into a new array: match its value
        for drawn, symbol in self.scalars:
            if flat[0] == drawn:
                return symbol
        return _number(float(flat[0])), _number(float(flat[0]))

    def _product(self, value: np.ndarray) -> tuple[str, str]:
        for i, (a, sa) in enumerate(self.draws):
            for b, sb in self.draws[i + 1 :]:
                try:
                    product = np.broadcast_to(a * b, value.shape)
                except ValueError:
                    continue
                if np.allclose(product, value, rtol=1e-6, atol=0.0):
                    return rf"{sa[0]} {sb[0]}", f"{sa[1]}·{sb[1]}"
        return r"\cdot", "·"


def _law(fn: Any, values: _Values) -> tuple[str, str]:
    base = _unwrap(fn)
    cls = type(base).__name__
    if cls == "MixtureGeneral":  # weights, then each component's law
        weights = _softmax_of(base.mixing_distribution.probs, values)
        parts = [_law(c, values) for c in base.component_distributions]
        return (
            rf"\mathrm{{Mixture}}({weights[0]}; " + ", ".join(p[0] for p in parts) + ")",
            f"Mixture({weights[1]}; " + ", ".join(p[1] for p in parts) + ")",
        )
    if cls == "TransformedDistribution":  # e.g. a bounded coefficient: a base law, mapped
        inner = _law(base.base_dist, values)
        maps = [type(t).__name__.removesuffix("Transform") for t in base.transforms]
        return (
            inner[0] + "".join(rf" \mapsto \mathrm{{{m}}}" for m in maps),
            inner[1] + "".join(f" → {m}" for m in maps),
        )
    args = [values(getattr(base, k)) for k in base.arg_constraints if hasattr(base, k)]
    name = cls.lstrip("_").removesuffix("Logits").removesuffix("Probs")
    tex = rf"\mathrm{{{name}}}(" + ", ".join(a[0] for a in args) + ")"
    return tex, f"{name}(" + ", ".join(a[1] for a in args) + ")"


def _softmax_of(probs: Any, values: _Values) -> tuple[str, str]:
    """``softmax(γ)`` when the weights are the softmax of a drawn site, else the values."""
    p = np.asarray(probs, np.float64).reshape(-1, np.shape(probs)[-1])[0]
    for drawn, symbol in values.draws:
        if drawn.shape == p.shape and np.allclose(np.exp(drawn) / np.exp(drawn).sum(), p):
            return rf"\mathrm{{softmax}}({symbol[0]})", f"softmax({symbol[1]})"
    numbers = ", ".join(_number(float(v)) for v in p)
    return f"({numbers})", f"({numbers})"


def _likelihood(fn: Any, values: _Values) -> tuple[str, str]:
    """The observation's law in terms of the linear predictor :math:`\\eta_i`."""
    base = _unwrap(fn)
    cls = type(base).__name__
    if cls.startswith("ZeroInflated"):
        gate = values(base.gate)
        inner = _likelihood(base.base_dist, values)
        return (
            rf"\mathrm{{ZeroInflated}}({gate[0]}, {inner[0]})",
            f"ZeroInflated({gate[1]}, {inner[1]})",
        )
    e_tex, e_txt = ETA

    def aux(attr: str) -> tuple[str, str]:
        return values(getattr(base, attr))

    forms: dict[str, Callable[[], tuple[str, str]]] = {
        "Normal": lambda: (
            rf"\mathrm{{Normal}}({e_tex}, {aux('scale')[0]})",
            f"Normal({e_txt}, {aux('scale')[1]})",
        ),
        "LogNormal": lambda: (
            rf"\mathrm{{LogNormal}}({e_tex}, {aux('scale')[0]})",
            f"LogNormal({e_txt}, {aux('scale')[1]})",
        ),
        "StudentT": lambda: (
            rf"\mathrm{{StudentT}}({aux('df')[0]}, {e_tex}, {aux('scale')[0]})",
            f"StudentT({aux('df')[1]}, {e_txt}, {aux('scale')[1]})",
        ),
        "BernoulliLogits": lambda: (
            rf"\mathrm{{Bernoulli}}(\mathrm{{logit}}^{{-1}}({e_tex}))",
            f"Bernoulli(logit⁻¹({e_txt}))",
        ),
        "CategoricalLogits": lambda: (
            rf"\mathrm{{Categorical}}(\mathrm{{softmax}}({e_tex}))",
            f"Categorical(softmax({e_txt}))",
        ),
        "Poisson": lambda: (rf"\mathrm{{Poisson}}(e^{{{e_tex}}})", f"Poisson(exp({e_txt}))"),
        "NegativeBinomial2": lambda: (
            rf"\mathrm{{NegativeBinomial}}(e^{{{e_tex}}}, {aux('concentration')[0]})",
            f"NegativeBinomial(mean exp({e_txt}), {aux('concentration')[1]})",
        ),
        "Gamma": lambda: (
            rf"\mathrm{{Gamma}}({aux('concentration')[0]}, {aux('concentration')[0]}"
            rf"\,e^{{-{e_tex}}})",
            f"Gamma({aux('concentration')[1]}, {aux('concentration')[1]}·exp(−{e_txt}))",
        ),
        "Exponential": lambda: (
            rf"\mathrm{{Exponential}}(e^{{-{e_tex}}})",
            f"Exponential(exp(−{e_txt}))",
        ),
        "OrderedLogistic": lambda: (
            rf"\mathrm{{OrderedLogistic}}({e_tex}, c_0 + \mathrm{{cumsum}}(\delta))",
            f"OrderedLogistic({e_txt}, c0 + cumsum(δ))",
        ),
        "Beta": lambda: (
            rf"\mathrm{{Beta}}(\mu_i \phi, (1 - \mu_i)\phi),\ "
            rf"\mu_i = \mathrm{{logit}}^{{-1}}({e_tex})",
            f"Beta(μ_i·φ, (1 − μ_i)·φ), μ_i = logit⁻¹({e_txt})",
        ),
    }
    if cls in forms:
        return forms[cls]()
    return rf"\mathrm{{{cls}}}({e_tex})", f"{cls}({e_txt})"


def model_statements(
    model_fn: Callable[..., Any], *args: Any, seed_value: int = 0, **data: Any
) -> list[Statement]:
    """One :class:`Statement` per latent site (in the order the model samples them), then
    the likelihood of its ``"obs"`` site. ``args`` and ``data``: the model's inputs,
    without the target (the trace draws from the prior)."""
    if "y" in data:
        raise ValueError(
            "model_to_latex/model_to_text: pass the model's inputs without y; the trace draws "
            "from the prior and a target would condition the obs site"
        )
    trace = handlers.trace(handlers.seed(model_fn, jax.random.PRNGKey(seed_value))).get_trace(
        *args, **data
    )
    latents = {
        n: s
        for n, s in trace.items()
        if s["type"] == "sample" and n != OBS and not s.get("is_observed", False)
    }
    values = _Values(latents)
    out = []
    for name, site in latents.items():
        law = _law(site["fn"], values)
        own = site_symbol(name)
        if law == own:  # a parameter matched its own draw by value: say nothing circular
            law = _law(site["fn"], _Values({}))
        out.append(Statement(own, law))
    if OBS in trace:
        out.append(Statement(("y_i", "y_i"), _likelihood(trace[OBS]["fn"], values)))
    return out


def render_latex(statements: Sequence[Statement], env: str = "align") -> LatexStr:
    """Statements as LaTeX lines in ``env`` (``align``, ``aligned`` or ``none``: the bare
    ``\\\\``-separated body)."""
    if env not in ENVS:
        raise ValueError(f"model_to_latex: env={env!r} is not one of {list(ENVS)}")
    body = " \\\\\n".join(s.latex() for s in statements)
    if env == "none":
        return LatexStr(body)
    return LatexStr(f"\\begin{{{env}}}\n{body}\n\\end{{{env}}}")


def render_text(statements: Sequence[Statement]) -> str:
    """Statements as plain text, one per line, their ``~`` aligned."""
    width = max((len(s.symbol[1]) for s in statements), default=0)
    return "\n".join(f"{s.symbol[1]:>{width}} {s.relation} {s.law[1]}" for s in statements)


def model_to_latex(
    model_fn: Callable[..., Any], *, env: str = "align", seed_value: int = 0, **data: Any
) -> LatexStr:
    """The model's generative form as LaTeX: every latent site's prior, then the likelihood
    (module docstring). ``data``: the model's inputs by keyword, without ``y``."""
    return render_latex(model_statements(model_fn, seed_value=seed_value, **data), env)


def model_to_text(model_fn: Callable[..., Any], *, seed_value: int = 0, **data: Any) -> str:
    """As :func:`model_to_latex`, in plain text with Greek letters."""
    return render_text(model_statements(model_fn, seed_value=seed_value, **data))
