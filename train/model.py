"""Config terms → a NumPyro model over a packed batch.

A term is ``{layer: <class in blayers.layers>, name: <str>, inputs: [columns], ...}`` plus that
layer's constructor kwargs (``scale_dist``, ``coef_kwargs``, …) and call kwargs
(``low_rank_dim``, ``embedding_dim``, ``units``, …) at the same level. Extra keys:

- ``z_inputs``: the second input of two-input layers (``InteractionLayer``, ``BilinearLayer``,
  ``LowRank*``);
- ``slopes``: numeric columns an ``EmbeddingLayer`` output is dotted with (varying slopes);
  without it the embedding's dimensions are summed.

``FMLayer`` over categorical inputs becomes the embedding-backed ``CategoricalFMLayer`` (no
one-hot). Table sizes come from the vocabulary plus one out-of-vocabulary (OOV) row per field
— never seen in training, so the ELBO's prior term alone shapes it and scoring maps unseen
values there — padded to the mesh's table axis.

Gathered mode: ``model(batch, num_data, gathered={term: local_ids})`` runs each gatherable table
term on a small table of the ``K = n * F`` rows its batch touches (``local_ids`` index those
rows); ``GatheredRows(local_ids, K)`` sets a smaller ``K`` when fewer distinct rows occur.
Scoring and the row-sparse step substitute the gathered rows' values, so no step ever
draws or differentiates a whole table.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dists
from hydra.utils import get_method
from omegaconf import DictConfig, ListConfig, OmegaConf

from blayers import layers as L
from blayers import links
from blayers.sharding import pad_to_multiple

from .config import ConfigError, ModelConfig
from .smooth import SMOOTH_KEYS, domain


def service_layers() -> dict[str, type[L.BLayer]]:
    """Every layer class of :mod:`blayers.layers` that declares how the service feeds it
    (:attr:`blayers.layers.BLayer.input_kind`), by name."""
    return {
        name: cls
        for name, cls in vars(L).items()
        if inspect.isclass(cls) and issubclass(cls, L.BLayer) and cls.input_kind is not None
    }


def user_layer_paths(terms: Sequence[Any]) -> list[str]:
    """The import paths (``package.module.Class``) of the configured terms' layers of the
    user's own: building the model imports them."""
    return [
        str(t["layer"])
        for t in terms
        if isinstance(t, Mapping) and isinstance(t.get("layer"), str) and "." in t["layer"]
    ]


def layer_class(name: str, where: str) -> type[L.BLayer]:
    """A term's layer class: a :mod:`blayers.layers` class by name, or a layer of the
    user's own by import path (``my_pkg.layers.MyLayer``), a :class:`blayers.layers.BLayer`
    that declares its ``input_kind``."""
    layers = service_layers()
    if name in layers:
        return layers[name]
    if "." not in name:
        raise ConfigError(
            f"{where}: unknown layer {name!r}; choose one of {sorted(layers)}, or give the "
            "import path of a layer of your own (my_pkg.layers.MyLayer)"
        )
    module, _, attr = name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"{where}: cannot import layer {name!r} ({err})") from None
    kinds = sorted(k for k in TERM_BUILDERS if k != "smooth")
    if not (inspect.isclass(cls) and issubclass(cls, L.BLayer) and cls.input_kind in kinds):
        raise ConfigError(
            f"{where}: {name} must be a blayers.layers.BLayer subclass whose input_kind is one "
            f"of {kinds} (a smooth term's domain is fixed per layer: use a shipped one)"
        )
    return cls


TERM_KEYS = {"layer", "name", "inputs", "z_inputs", "slopes", "sparse"}
SPARSE_AUTO_ROWS = 100_000  # dense is cheap below this and converges rare rows in fewer epochs
# call args the builder fills (unit_axis: from model.fm_unit_axis)
SUPPLIED = {"name", "x", "z", "groups", "num_categories", "unit_axis", "self"}

LINEAR_PREDICTOR = "linear_predictor"


@dataclass(frozen=True)
class Columns:
    numeric: tuple[str, ...]
    categorical: tuple[str, ...]


def _columns(matrix: jax.Array, idx: tuple[int, ...]) -> jax.Array:
    """Columns ``idx`` of ``matrix``: a slice (no gather) when they are contiguous."""
    if idx and list(idx) == list(range(idx[0], idx[0] + len(idx))):
        return matrix[:, idx[0] : idx[0] + len(idx)]
    return matrix[:, list(idx)]


class GatheredRows(NamedTuple):
    """A term's local ids ``(n, F)`` into a gathered table of ``rows`` rows."""

    local: jax.Array
    rows: int


@dataclass
class Term:
    layer: L.BLayer
    kind: str
    name: str
    numeric_idx: tuple[int, ...] = ()
    categorical_idx: tuple[int, ...] = ()
    z_idx: tuple[int, ...] = ()
    slopes_idx: tuple[int, ...] = ()
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    num_categories: tuple[int, ...] = ()
    sparse: bool = False  # train this term's table with the row-sparse step
    center: float = 0.0  # a smooth term's input is x - center (:mod:`train.smooth`)

    @property
    def layer_name(self) -> str:
        return type(self.layer).__name__

    @property
    def gatherable(self) -> bool:
        return self.layer.gatherable

    @property
    def table_site(self) -> str:
        return f"{self.layer_name}_{self.name}_{self.layer.table_param}"

    @property
    def row_offsets(self) -> np.ndarray:
        """First table row of each input field."""
        return np.concatenate([[0], np.cumsum(self.num_categories)[:-1]]).astype(np.int32)

    def rows(self, categorical: jax.Array | np.ndarray) -> jax.Array | np.ndarray:
        """Global table rows ``(n, F)`` this term reads for each example (numpy for numpy
        ids, as the host counts a batch's rows)."""
        ids = categorical[:, list(self.categorical_idx)]
        return ids + self.row_offsets.astype(ids.dtype)

    def __call__(
        self,
        numeric: jax.Array,
        categorical: jax.Array,
        local: jax.Array | GatheredRows | None = None,
    ) -> jax.Array:
        kw = self.call_kwargs
        if local is not None:  # gathered mode: a table of the rows this batch touches
            if isinstance(local, GatheredRows):
                local, size = local
            else:
                size = local.shape[0] * local.shape[1]
            if self.kind == "categorical_fm":
                return self.layer(self.name, local, size, ids_are_rows=True, **kw)
            return self._table_call(numeric, local[:, 0], size)
        if self.kind == "intercept":
            return self.layer(self.name, **kw)
        if self.kind == "dense":
            return self.layer(self.name, _columns(numeric, self.numeric_idx), **kw)
        if self.kind == "smooth":
            x = _columns(numeric, self.numeric_idx)
            if "L" in kw:  # the HSGP's basis is periodic past its domain: hold the boundary
                x = jnp.clip(x - self.center, -kw["L"], kw["L"])
            return self.layer(self.name, x, **kw)
        if self.kind == "pair":
            x = _columns(numeric, self.numeric_idx)
            z = _columns(numeric, self.z_idx)
            return self.layer(self.name, x, z, **kw)
        if self.kind == "categorical_fm":
            ids = categorical[:, list(self.categorical_idx)]
            return self.layer(self.name, ids, list(self.num_categories), **kw)
        ids = categorical[:, self.categorical_idx[0]]
        return self._table_call(numeric, ids, self.num_categories[0])

    def _table_call(self, numeric: jax.Array, ids: jax.Array, rows: int) -> jax.Array:
        """A table layer's output on ``ids`` into a table of ``rows`` rows, summed to
        ``(n, 1)``: its rows times the slopes' columns for an embedding with ``slopes``, the
        layer's own product for a layer that takes them as input (``slopes_input``)."""
        kw = self.call_kwargs
        if self.layer.slopes_input:
            out = self.layer(self.name, _columns(numeric, self.slopes_idx), ids, rows, **kw)
        else:
            out = self.layer(self.name, ids, rows, **kw)
            if self.slopes_idx:
                out = out * _columns(numeric, self.slopes_idx)
        return jnp.sum(out, axis=1, keepdims=True)


@dataclass(frozen=True)
class Model:
    """A service model: ``model(batch, num_data=None, gathered=None)`` runs ``fn`` on packed
    batches ``{numeric, categorical[, target]}``; ``terms`` are its configured terms (none
    for a model of the user's own, ``model._target_``)."""

    fn: Callable[..., Any]
    terms: tuple[Term, ...] = ()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


def _resolve_dists(kwargs: dict[str, Any], where: str) -> dict[str, Any]:
    out = {}
    for key, value in kwargs.items():
        if isinstance(value, DictConfig | ListConfig):
            value = OmegaConf.to_container(value, resolve=True)
        if key.endswith("_dists") and isinstance(value, list):  # one class name per component
            value = [_resolve_dists({key[:-1]: v}, where)[key[:-1]] for v in value]
        if key.endswith("_dist") and isinstance(value, str):
            cls = getattr(dists, value, None)
            if not (inspect.isclass(cls) and issubclass(cls, dists.Distribution)):
                raise ConfigError(
                    f"{where}: {key}={value!r} is not a numpyro.distributions class "
                    "(e.g. Normal, StudentT, HalfNormal, Exponential)"
                )
            value = cls
        out[key] = value
    return out


def _indices(
    cols: Sequence[str], universe: Sequence[str], what: str, where: str
) -> tuple[int, ...]:
    out = []
    for c in cols:
        if c not in universe:
            raise ConfigError(
                f"{where}: {what} column {c!r} is not in data.{what} ({list(universe)}); add it "
                "there or fix the term"
            )
        out.append(universe.index(c))
    return tuple(out)


def _check_prior_values(layer: L.BLayer, where: str) -> None:
    """Each prior the layer holds (``<x>_dist`` with ``<x>_kwargs``) built once with NumPyro's
    argument validation, so a value outside a parameter's support (a StudentT ``df`` of -1) is
    refused at load, naming the term, instead of failing inside the first step."""
    for attr, dist in sorted(vars(layer).items()):
        kwargs = getattr(layer, attr.removesuffix("_dist") + "_kwargs", None)
        if not attr.endswith("_dist") or not isinstance(kwargs, dict):
            continue
        try:
            try:
                dist(**kwargs, validate_args=True)
            except TypeError:  # a parameter the layer supplies itself (the scale λ)
                dist(**{"scale": 1.0, **kwargs}, validate_args=True)
        except (ValueError, TypeError) as err:
            raise ConfigError(
                f"{where}: {attr.removesuffix('_dist')}_kwargs={kwargs} are invalid for "
                f"{getattr(dist, '__name__', dist)}: {err}"
            ) from None


@dataclass
class _TermConfig:
    """One term's config, split into its layer's constructor and call arguments."""

    spec: dict[str, Any]
    name: str
    where: str
    cls: type[L.BLayer]
    layer: L.BLayer
    inputs: list[str]
    call_kw: dict[str, Any]
    columns: Columns

    @property
    def layer_name(self) -> str:
        return self.cls.__name__

    def numeric_idx(self, cols: Sequence[str], what: str = "numeric") -> tuple[int, ...]:
        return _indices(cols, self.columns.numeric, what, self.where)

    def error(self, message: str) -> ConfigError:
        return ConfigError(f"{self.where}: {message}")


def _parse_term(spec: Mapping[str, Any], columns: Columns) -> _TermConfig:
    """The term's layer class (an FM over categorical inputs becomes
    :class:`blayers.layers.CategoricalFMLayer`), built from the keys its constructor takes;
    the keys its call takes kept for the call; any other key refused, naming the valid ones."""
    spec = dict(spec)
    layer_name = spec.get("layer")
    name = spec.get("name")
    where = f"model.terms[{name or layer_name}]"
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: every term needs a non-empty 'name'")
    cls = layer_class(str(layer_name), where)
    inputs = list(spec.get("inputs") or [])
    if cls is L.FMLayer and inputs and all(c in columns.categorical for c in inputs):
        cls = L.CategoricalFMLayer
    init_params = set(inspect.signature(cls.__init__).parameters) - {"self"}
    call_params = set(inspect.signature(cls.__call__).parameters) - SUPPLIED
    init_kw, call_kw = {}, {}
    own_keys = TERM_KEYS | SMOOTH_KEYS.get(cls.__name__, frozenset())
    for key, value in spec.items():
        if key in own_keys:
            continue
        if key in init_params:
            init_kw[key] = value
        elif key in call_params:
            call_kw[key] = value
        else:
            raise ConfigError(
                f"{where}: {cls.__name__} has no argument {key!r}; valid: "
                f"{sorted(init_params | call_params | own_keys)}"
            )
    try:
        layer = cls(**_resolve_dists(init_kw, where))
        layer.check_service()
    except (TypeError, ValueError) as err:  # the layer's own check of its settings
        raise ConfigError(f"{where}: {err}") from err
    _check_prior_values(layer, where)
    return _TermConfig(spec, name, where, cls, layer, inputs, call_kw, columns)


def _check_required(t: _TermConfig) -> None:
    for arg in t.cls.required_call_args:
        if arg not in t.call_kw:
            raise t.error(f"{t.layer_name} needs {arg}; add `{arg}: <value>` to the term")


def _intercept_term(t: _TermConfig, table_sizes: Mapping[str, int], pad_multiple: int) -> Term:
    if t.inputs:
        raise t.error(f"{t.layer_name} takes no inputs")
    return Term(t.layer, "intercept", t.name, call_kwargs=t.call_kw)


def _dense_term(t: _TermConfig, table_sizes: Mapping[str, int], pad_multiple: int) -> Term:
    if not t.inputs:
        raise t.error(f"{t.layer_name} needs numeric 'inputs'")
    return Term(
        t.layer, "dense", t.name, numeric_idx=t.numeric_idx(t.inputs), call_kwargs=t.call_kw
    )


def _smooth_term(t: _TermConfig, table_sizes: Mapping[str, int], pad_multiple: int) -> Term:
    if len(t.inputs) != 1:
        raise t.error(f"{t.layer_name} takes exactly one numeric input")
    _check_required(t)
    call_kw = {**t.call_kw, **domain(t.spec, getattr(t.layer, "degree", 0))}
    return Term(
        t.layer,
        "smooth",
        t.name,
        numeric_idx=t.numeric_idx(t.inputs),
        call_kwargs=call_kw,
        center=float(t.spec.get("center", 0.0)),
    )


def _pair_term(t: _TermConfig, table_sizes: Mapping[str, int], pad_multiple: int) -> Term:
    z = list(t.spec.get("z_inputs") or [])
    if t.inputs and not z and t.cls.pairs_within:
        return _dense_term(t, table_sizes, pad_multiple)
    if not t.inputs or not z:
        raise t.error(f"{t.layer_name} needs numeric 'inputs' and 'z_inputs'")
    return Term(
        t.layer,
        "pair",
        t.name,
        numeric_idx=t.numeric_idx(t.inputs),
        z_idx=t.numeric_idx(z),
        call_kwargs=t.call_kw,
    )


def _check_sparse(t: _TermConfig) -> None:
    """The term's ``sparse`` setting: true, false or ``auto``; true only on a table that can
    be gathered row-sparse."""
    setting = t.spec.get("sparse", "auto")
    if setting not in (True, False, "auto"):
        raise t.error(f"sparse must be true, false or auto, got {setting!r}")
    if setting is True and not t.cls.gatherable:
        gatherable = sorted(n for n, c in service_layers().items() if c.gatherable)
        raise t.error(
            f"sparse: true needs a table term ({gatherable}); {t.layer_name} "
            "reads all of its rows each step"
        )


def _wants_sparse(t: _TermConfig, rows: int) -> bool:
    """Whether the term's table of ``rows`` rows trains row-sparse: ``sparse: true``, or
    ``auto`` (the default) from :data:`SPARSE_AUTO_ROWS` rows up."""
    setting = t.spec.get("sparse", "auto")
    return t.cls.gatherable and (
        setting is True or (setting == "auto" and rows >= SPARSE_AUTO_ROWS)
    )


def _field_rows(
    t: _TermConfig, table_sizes: Mapping[str, int]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The input fields' categorical columns, and the rows of each field's table: its
    vocabulary plus the field's OOV row."""
    idx = _indices(t.inputs, t.columns.categorical, "categorical", t.where)
    return idx, tuple(table_sizes[c] + 1 for c in t.inputs)


def _categorical_fm_term(t: _TermConfig, table_sizes: Mapping[str, int], pad_multiple: int) -> Term:
    cat_idx, sizes = _field_rows(t, table_sizes)
    if len(t.inputs) < 2:
        raise t.error("an FM over categorical fields needs >= 2 inputs")
    padded = (*sizes[:-1], pad_to_multiple(sum(sizes), pad_multiple) - sum(sizes[:-1]))
    return Term(
        t.layer,
        "categorical_fm",
        t.name,
        categorical_idx=cat_idx,
        call_kwargs=t.call_kw,
        num_categories=padded,
        sparse=_wants_sparse(t, sum(padded)),
    )


def _table_term(t: _TermConfig, table_sizes: Mapping[str, int], pad_multiple: int) -> Term:
    cat_idx, sizes = _field_rows(t, table_sizes)
    if len(t.inputs) != 1:
        raise t.error(f"{t.layer_name} takes exactly one categorical input")
    slopes = list(t.spec.get("slopes") or [])
    call_kw = dict(t.call_kw)
    if slopes and not t.cls.takes_slopes:
        takers = sorted(n for n, c in service_layers().items() if c.takes_slopes)
        raise t.error(f"'slopes' applies to {' and '.join(takers)}")
    if t.cls.slopes_input and not slopes:
        raise t.error(f"{t.layer_name} needs the numeric columns of its 'slopes'")
    if slopes and not t.cls.slopes_input:  # the rows are dotted with the slopes' columns
        call_kw.setdefault("embedding_dim", len(slopes))
        if call_kw["embedding_dim"] != len(slopes):
            raise t.error("embedding_dim must equal the number of slopes")
    _check_required(replace(t, call_kw=call_kw))
    rows = pad_to_multiple(sizes[0], pad_multiple)
    return Term(
        t.layer,
        "table",
        t.name,
        categorical_idx=cat_idx,
        slopes_idx=t.numeric_idx(slopes),
        call_kwargs=call_kw,
        num_categories=(rows,),
        sparse=_wants_sparse(t, rows),
    )


TERM_BUILDERS: dict[str, Callable[[_TermConfig, Mapping[str, int], int], Term]] = {
    "intercept": _intercept_term,
    "dense": _dense_term,
    "smooth": _smooth_term,
    "pair": _pair_term,
    "categorical_fm": _categorical_fm_term,
    "table": _table_term,
}


def build_term(
    spec: Mapping[str, Any],
    columns: Columns,
    table_sizes: Mapping[str, int],
    pad_multiple: int = 1,
) -> Term:
    """One configured term, validated against its layer's signatures and declarations
    (:attr:`blayers.layers.BLayer.input_kind` picks the builder)."""
    t = _parse_term(spec, columns)
    _check_sparse(t)  # on any term, not only on tables
    return TERM_BUILDERS[t.cls.input_kind](t, table_sizes, pad_multiple)


def build_model(
    model_cfg: ModelConfig | Mapping[str, Any],
    columns: Columns,
    table_sizes: Mapping[str, int],
    pad_multiple: int = 1,
) -> Model:
    """``model(batch, num_data)`` for packed batches ``{numeric, categorical[, target]}``."""
    target = getattr(model_cfg, "_target_", None) or (
        model_cfg.get("_target_") if isinstance(model_cfg, Mapping) else None
    )
    link_name = str(model_cfg["link"] if isinstance(model_cfg, Mapping) else model_cfg.link)
    try:
        link = links.get_link(link_name)
    except ValueError as err:
        raise ConfigError(f"model.link: {err}") from None
    link_kwargs = configured_link_kwargs(model_cfg)

    if target:
        return _user_model(str(target), columns, table_sizes)

    terms_cfg = list(_get(model_cfg, "terms") or [])
    if not terms_cfg:
        raise ConfigError("model.terms is empty; declare at least one term (or model._target_)")
    unit_axis = bool(_get(model_cfg, "fm_unit_axis"))
    terms = [
        _with_unit_axis(build_term(t, columns, table_sizes, pad_multiple), unit_axis)
        for t in terms_cfg
    ]
    names = [(type(t.layer).__name__, t.name) for t in terms]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ConfigError(f"model.terms: duplicate (layer, name) pairs {sorted(dupes)}")

    def model(
        batch: Mapping[str, jax.Array],
        num_data: int | None = None,
        gathered: Mapping[str, jax.Array] | None = None,
    ) -> jax.Array:
        numeric, categorical = batch["numeric"], batch["categorical"]
        gathered = gathered or {}
        eta = sum(t(numeric, categorical, gathered.get(t.name)) for t in terms)
        eta = jnp.broadcast_to(eta, (numeric.shape[0], eta.shape[-1]))
        numpyro.deterministic(LINEAR_PREDICTOR, eta)
        return link(eta, batch.get("target"), num_data=num_data, **link_kwargs)

    return Model(model, tuple(terms))


def _with_unit_axis(term: Term, unit_axis: bool) -> Term:
    """A categorical FM term with ``model.fm_unit_axis`` among its call arguments."""
    if term.kind != "categorical_fm":
        return term
    return replace(term, call_kwargs={**term.call_kwargs, "unit_axis": unit_axis})


def ordered_columns(model_cfg: ModelConfig | Mapping[str, Any]) -> set[str]:
    """The categorical columns an ordered table term reads (``BLayer.ordered``): their
    vocabularies give ids in the values' ascending order, not by frequency, so that adjacent
    rows are adjacent periods. The out-of-vocabulary row comes right after the last period,
    so an unseen (later) period continues the series (for AR1Layer, a forecast: states past
    the last period follow the recursion)."""
    out: set[str] = set()
    for spec in _get(model_cfg, "terms") or []:
        if not isinstance(spec, Mapping):
            continue
        cls = layer_class(str(spec.get("layer")), f"model.terms[{spec.get('name')}]")
        if cls.ordered:
            out.update(spec.get("inputs") or [])
    return out


def configured_link_kwargs(model_cfg: ModelConfig | Mapping[str, Any]) -> dict[str, Any]:
    """``model.link_kwargs`` with distribution names resolved to classes."""
    return _resolve_dists(dict(_get(model_cfg, "link_kwargs") or {}), "model.link_kwargs")


def _get(cfg: ModelConfig | Mapping[str, Any], key: str) -> Any:
    value = cfg.get(key) if isinstance(cfg, Mapping) else getattr(cfg, key, None)
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def coefficient_labels(terms: Sequence[Term], columns: Columns, site: str) -> list[str] | None:
    """The input column behind each row of a dense term's coefficient site, or ``None`` for
    any other site."""
    for term in terms:
        if term.kind == "dense" and site == f"{term.layer_name}_{term.name}_beta":
            return [columns.numeric[i] for i in term.numeric_idx]
    return None


def _user_model(target: str, columns: Columns, table_sizes: Mapping[str, int]) -> Model:
    try:
        fn = get_method(target)
    except Exception as err:  # hydra wraps import errors in several types
        raise ConfigError(f"model._target_: cannot import {target!r} ({err})") from None
    sizes = dict(table_sizes)

    def model(
        batch: Mapping[str, jax.Array], num_data: int | None = None, gathered: Any = None
    ) -> jax.Array:
        if gathered:
            raise ConfigError("model._target_ models cannot run on gathered table rows")
        cols = {c: batch["numeric"][:, j] for j, c in enumerate(columns.numeric)}
        cols.update({c: batch["categorical"][:, j] for j, c in enumerate(columns.categorical)})
        return fn(cols, batch.get("target"), num_data=num_data, num_categories=sizes)

    return Model(model)
