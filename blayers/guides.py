r"""Guide families whose parameters are a plain, shardable pytree; every read of the
posterior (the ELBO, the row-sparse loss, scoring, the summary, recentering, convergence
checks) goes through one guide object.

:class:`MeanFieldGuide`: for each latent site :math:`z` with support :math:`S` and bijection
:math:`T: \mathbb{R}^k \to S`:

.. math::
    u \sim Normal(\text{loc}, \text{softplus}(\rho)), \quad z = T(u), \quad
    \log q(z) = \log Normal(u; \text{loc}, \text{softplus}(\rho)) - \log|\det J_T(u)|

:class:`StructuredGuide` adds a joint Normal over the global sites and table rows whose means
are linear in them (its docstring has the math). The ELBO is :math:`E_q[\log p(y, z) - \log
q(z)]`, estimated with one reparameterised draw, as NumPyro's ``AutoNormal`` with
``Trace_ELBO``. Parameters live in ``{site: {"loc", "raw_scale"[, "coupling"]}}`` so that each
table keeps its own (sharded) parameters, state can be created already sharded (shapes come
from ``jax.eval_shape``, no prototype draw of the tables), and a row-sparse update can gather
rows of any site.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from numpyro.distributions import biject_to, constraints
from numpyro.infer.util import log_density

from blayers import axes as ax

Params = dict[str, dict[str, jax.Array]]


@dataclass(frozen=True)
class LatentSite:
    """What the guide needs to know about one latent site."""

    name: str
    shape: tuple[int, ...]  # constrained value shape
    unconstrained_shape: tuple[int, ...]
    support: constraints.Constraint
    logical_axes: ax.LogicalAxes | None


def is_global(site: LatentSite) -> bool:
    """A site without a table axis: intercept, coefficients, scales, link globals."""
    return ax.CATEGORIES not in (site.logical_axes or ())


def latent_sites(model: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, LatentSite]:
    """Latent sites of ``model`` found by an abstract trace: no parameter value is ever built.

    ``args`` may be arrays or ``jax.ShapeDtypeStruct``s; ``kwargs`` are static (e.g. sizes).
    """
    found: dict[str, LatentSite] = {}

    def probe(*a: Any) -> int:
        trace = handlers.trace(handlers.seed(model, 0)).get_trace(*a, **kwargs)
        for name, site in trace.items():
            if site["type"] != "sample" or site["is_observed"]:
                continue
            support = site["fn"].support
            shape = tuple(jnp.shape(site["value"]))
            unconstrained = tuple(biject_to(support).inverse_shape(shape))
            found[name] = LatentSite(name, shape, unconstrained, support, ax.site_axes(site))
        return 0

    jax.eval_shape(probe, *args)
    return found


def init_params(
    sites: Mapping[str, LatentSite],
    init_scale: float = 0.1,
    dtype: Any = jnp.float32,
    start: Mapping[str, Any] | None = None,
    scales: Mapping[str, Any] | None = None,
) -> Params:
    """Guide parameters: ``loc = 0`` in unconstrained space (the prior median for the layers'
    zero-centred priors) unless ``start`` gives a site's constrained starting value, and
    ``scale = init_scale``, or ``scales[site]`` where that is smaller. Cheap to trace under
    ``jit`` with ``out_shardings`` so large tables are born sharded."""
    start, scales = start or {}, scales or {}

    def raw_scale(site: LatentSite) -> jax.Array:
        sd = np.minimum(np.asarray(scales.get(site.name, init_scale), np.float64), init_scale)
        raw = np.log(np.expm1(np.broadcast_to(sd, site.unconstrained_shape)))  # softplus^-1
        return jnp.asarray(raw, dtype)

    def loc(site: LatentSite) -> jax.Array:
        if site.name not in start:
            return jnp.zeros(site.unconstrained_shape, dtype)
        value = jnp.broadcast_to(jnp.asarray(start[site.name], dtype), site.shape)
        return biject_to(site.support).inv(value).astype(dtype)

    return {
        name: {
            "loc": loc(site),
            "raw_scale": raw_scale(site),
        }
        for name, site in sites.items()
    }


def param_logical_axes(sites: Mapping[str, LatentSite]) -> dict[str, dict[str, Any]]:
    """Logical axes per guide parameter (same as its site's when shapes agree)."""
    out = {}
    for name, site in sites.items():
        axes = site.logical_axes if site.unconstrained_shape == site.shape else None
        out[name] = {"loc": axes, "raw_scale": axes}
    return out


class SiteDraw(NamedTuple):
    """One site's reparameterised draw: the constrained ``value``, the standard-normal
    ``noise`` behind it, the guide's log-density split into its Normal part (elementwise,
    the unconstrained shape) and the bijection's ``log|det J|`` (the transform's shape), and
    the ``unconstrained`` point :math:`u` with ``value`` :math:`= T(u)`."""

    value: jax.Array
    noise: jax.Array
    log_normal: jax.Array
    log_det: jax.Array
    unconstrained: jax.Array

    def total(self) -> jax.Array:
        r""":math:`\log q` of the whole site."""
        return jnp.sum(self.log_normal) - jnp.sum(self.log_det)

    def per_row(self) -> jax.Array:
        r""":math:`\log q` of each leading row (a table's rows), ``(rows,)``."""
        lq = self.log_normal - jnp.broadcast_to(self.log_det, self.log_normal.shape)
        return lq.reshape(lq.shape[0], -1).sum(1)


def _log_normal(x: jax.Array, loc: Any, sd: Any) -> jax.Array:
    z = (x - loc) / sd
    return -0.5 * z**2 - jnp.log(sd) - 0.5 * jnp.log(2 * jnp.pi)


def _per_row(elementwise: jax.Array) -> jax.Array:
    return elementwise.reshape(elementwise.shape[0], -1).sum(1)


class MeanFieldGuide:
    r"""The per-site mean-field Normal guide: every read of its posterior goes through here.

    The ELBO (:func:`elbo_loss`), the row-sparse loss, scoring, the summary, recentering and
    the convergence check all call it: :meth:`draw` on whole sites or on gathered table rows
    (any leading subset of a site's rows, since rows are independent given the globals),
    :meth:`loc_scale` for a site's unconstrained mean and sd. A guide family is one class.
    """

    name = "mean_field"

    def __init__(self, sites: Mapping[str, LatentSite]) -> None:
        self.sites = dict(sites)

    @staticmethod
    def loc_scale(p: Mapping[str, Any]) -> tuple[Any, Any]:
        """Mean and sd of a site's (or rows') unconstrained marginal posterior, without the
        spread a structured guide adds through the globals."""
        return p["loc"], jax.nn.softplus(p["raw_scale"])

    def marginal(self, name: str, p: Mapping[str, Any]) -> tuple[Any, Any]:
        """Mean and sd of each element of a global site's unconstrained marginal posterior
        (for a table's rows: given the globals)."""
        return self.loc_scale(p)

    def row_marginal(
        self, name: str, rows: Mapping[str, Any], params: Mapping[str, Mapping[str, Any]]
    ) -> tuple[Any, Any]:
        """Mean and sd of each element of some rows of table ``name`` (``rows``: their guide
        parameters), unconditionally: here, the rows' own Normal. ``params``: the globals'."""
        return self.loc_scale(rows)

    def init_params(
        self,
        init_scale: float = 0.1,
        dtype: Any = jnp.float32,
        start: Mapping[str, Any] | None = None,
        scales: Mapping[str, Any] | None = None,
    ) -> Params:
        """This family's starting parameters (see :func:`init_params`)."""
        return self._extra_params(init_params(self.sites, init_scale, dtype, start, scales), dtype)

    def _extra_params(self, params: Params, dtype: Any) -> Params:
        """A family's parameters beyond each site's ``loc`` and ``raw_scale``: none here."""
        return params

    def param_logical_axes(self) -> dict[str, dict[str, Any]]:
        """Logical axes of every parameter leaf, by site and field."""
        return param_logical_axes(self.sites)

    def _site_draw(
        self, name: str, p: Mapping[str, jax.Array], eps: jax.Array, shift: Any = 0.0
    ) -> SiteDraw:
        loc, scale = self.loc_scale(p)
        u = loc + scale * eps + shift
        transform = biject_to(self.sites[name].support)
        value = transform(u)
        log_normal = -0.5 * eps**2 - jnp.log(scale) - 0.5 * jnp.log(2 * jnp.pi)
        return SiteDraw(value, eps, log_normal, transform.log_abs_det_jacobian(u, value), u)

    @staticmethod
    def noise(
        key: jax.Array,
        params: Mapping[str, Mapping[str, jax.Array]],
        given: Mapping[str, jax.Array] | None = None,
    ) -> dict[str, jax.Array]:
        """Standard normal noise for every site in ``params``: ``given[site]`` where given,
        else drawn from ``key`` (split in site order). An antithetic pair draws it once and
        negates it (:func:`antithetic_mean`)."""
        names = sorted(params)
        given = given or {}
        keys = jax.random.split(key, max(len(names), 1))
        return {
            n: given[n]
            if n in given
            else jax.random.normal(k, params[n]["loc"].shape, params[n]["loc"].dtype)
            for k, n in zip(keys, names, strict=False)
        }

    def draw(
        self,
        key: jax.Array,
        params: Mapping[str, Mapping[str, jax.Array]],
        noise: Mapping[str, jax.Array] | None = None,
    ) -> dict[str, SiteDraw]:
        """A draw of every site in ``params`` (whole or gathered rows), keys split in site
        order; ``noise[site]``: that site's standard normal noise, instead of noise from
        ``key`` (:meth:`noise`)."""
        eps = self.noise(key, params, noise)
        return {n: self._site_draw(n, params[n], e) for n, e in eps.items()}

    def sample(
        self,
        key: jax.Array,
        params: Mapping[str, Mapping[str, jax.Array]],
        noise: Mapping[str, jax.Array] | None = None,
    ) -> tuple[dict[str, jax.Array], jax.Array]:
        """Constrained values of every site and the total guide log-density (``noise``: as in
        :meth:`draw`)."""
        draws = self.draw(key, params, noise)
        log_q = sum((d.total() for d in draws.values()), jnp.zeros(()))
        return {n: d.value for n, d in draws.items()}, log_q

    def globals_log_density(
        self,
        params: Mapping[str, Mapping[str, Any]],
        u: Mapping[str, jax.Array],
        widen: float = 1.0,
    ) -> jax.Array:
        r""":math:`\log q(g)`, the density of the global sites' unconstrained point ``u`` (by
        site) under the guide with ``params``, every sd multiplied by ``widen``. Here the
        globals are independent: :math:`\sum_j \log N(u_j; \text{loc}_j, w\,\text{sd}_j)`."""
        total = jnp.zeros(())
        for name, site in self.sites.items():
            if is_global(site):
                loc, sd = self.loc_scale(params[name])
                total = total + jnp.sum(_log_normal(u[name], loc, widen * sd))
        return total

    def rows_log_density(
        self,
        name: str,
        rows: Mapping[str, Any],
        u_rows: jax.Array,
        u: Mapping[str, jax.Array],
        params: Mapping[str, Mapping[str, Any]],
        widen: float = 1.0,
    ) -> jax.Array:
        r""":math:`\log q(u_r \mid g)` of each of some rows of table ``name`` (``rows``: their
        guide parameters, ``u_rows``: their unconstrained values), ``(rows,)``, given the
        globals' point ``u`` and parameters ``params``; sds times ``widen``. Here the rows'
        own Normal."""
        loc, sd = self.loc_scale(rows)
        return _per_row(_log_normal(u_rows, loc, widen * sd))


COUPLING = "coupling"


class StructuredGuide(MeanFieldGuide):
    r"""Partially factorized: a joint Normal over the global sites, and each coupled table
    row's mean linear in them (after Goplerud, Papaspiliopoulos & Zanella's partially
    factorized VI for high-dimensional mixed models).

    With :math:`g \in \mathbb{R}^D` every global site's unconstrained elements in site
    order and :math:`\varepsilon` standard normal noise of matching shapes:

    .. math::
        g = \mu + L \varepsilon_g, \quad L = \mathrm{diag}(s) + T \ (T \text{ strictly lower}),
        \qquad u_r = m_r + s_r \varepsilon_r + A_r (g - \mu)

    so :math:`q(g, u) = N(g; \mu, LL^\top) \prod_r N(u_r; m_r + A_r(g - \mu), s_r^2)`. The map
    from noise to :math:`(g, u)` is triangular with diagonal :math:`(s, s_r)`, hence

    .. math:: \log q = \textstyle\sum -\tfrac12 \varepsilon^2 - \log s - \tfrac12\log 2\pi
        - \log|\det J_T|

    exactly as for the mean-field guide: only the values move. Rows stay independent given
    :math:`g`, so any subset of rows (a batch's gathered rows) is drawn from its own
    parameters and the globals' draw, and a row's ELBO terms can be weighted row by row as
    the row-sparse loss does. Parameters: each global site carries ``coupling`` ``(*shape,
    D)``, its rows of :math:`T` (entries on or above the diagonal are masked out); each
    coupled table ``coupling`` ``(rows, *event, D_r)``, the :math:`A_r`, sharded with its
    rows: :math:`O(D_r)` more per row, where :math:`D_r \le D` counts the globals a row
    follows (``row_globals``, for all tables or per table; the service picks the intercept and
    the dense coefficients: a row's conditional mean is linear in exactly those for a gaussian
    likelihood, while scales act at second order, and every extra coupling is noise that SGD
    must average out). :math:`T = 0, A = 0` is the mean-field guide, where it starts.
    """

    name = "structured"

    def __init__(
        self,
        sites: Mapping[str, LatentSite],
        coupled: Iterable[str] = (),
        row_globals: Mapping[str, Iterable[str]] | Iterable[str] | None = None,
    ) -> None:
        super().__init__(sites)
        self.globals = tuple(sorted(n for n, site in self.sites.items() if is_global(site)))
        sizes = [int(np.prod(self.sites[n].unconstrained_shape)) for n in self.globals]
        starts = np.cumsum([0, *sizes[:-1]]).tolist() if sizes else []
        self.offsets = dict(zip(self.globals, starts, strict=True))
        self.dim = int(sum(sizes))
        self.coupled = tuple(sorted(set(coupled) - set(self.globals)))
        # per coupled table, the globals its rows' means follow (default: all), as indices
        # into g
        self.row_index: dict[str, np.ndarray] = {}
        for table in self.coupled:
            wanted = row_globals.get(table) if isinstance(row_globals, Mapping) else row_globals
            chosen = [n for n in self.globals if wanted is None or n in set(wanted)]
            self.row_index[table] = np.concatenate(
                [self.offsets[n] + np.arange(sizes[self.globals.index(n)]) for n in chosen]
                or [np.zeros(0, np.int64)]
            ).astype(np.int64)

    def row_column(self, table: str, name: str) -> int | None:
        """The column of ``table``'s coupling that holds global ``name``'s first element."""
        found = np.flatnonzero(self.row_index[table] == self.offsets[name])
        return int(found[0]) if found.size else None

    def _mask(self, name: str) -> np.ndarray:
        """The columns of :math:`T` a global site's elements may use: those before them."""
        shape = self.sites[name].unconstrained_shape
        rows = self.offsets[name] + np.arange(int(np.prod(shape)))
        mask = np.arange(self.dim)[None, :] < rows[:, None]
        return mask.astype(np.float32).reshape((*shape, self.dim))

    def global_factor(self, params: Mapping[str, Mapping[str, Any]]) -> jax.Array:
        """:math:`L`, the ``(D, D)`` lower-triangular factor of the globals' covariance."""
        blocks = []
        for n in self.globals:
            size = int(np.prod(self.sites[n].unconstrained_shape))
            scale = self.loc_scale(params[n])[1].reshape(-1)
            coupling = (params[n][COUPLING] * self._mask(n)).reshape(size, self.dim)
            diag = (
                jnp.zeros((size, self.dim))
                .at[:, self.offsets[n] : self.offsets[n] + size]
                .set(jnp.diag(scale))
            )
            blocks.append(coupling + diag)
        return jnp.concatenate(blocks) if blocks else jnp.zeros((0, 0))

    def marginal(self, name: str, p: Mapping[str, Any]) -> tuple[Any, Any]:
        loc, scale = self.loc_scale(p)
        if name not in self.offsets:
            return loc, scale
        coupling = p[COUPLING] * self._mask(name)
        return loc, jnp.sqrt(scale**2 + jnp.sum(coupling**2, axis=-1))

    def row_marginal(
        self, name: str, rows: Mapping[str, Any], params: Mapping[str, Mapping[str, Any]]
    ) -> tuple[Any, Any]:
        r"""With :math:`u_r = m_r + s_r\varepsilon_r + A_r L_r \varepsilon_g` (:math:`L_r`: the
        rows of :math:`L` of the globals the table follows), :math:`E u_r = m_r` and
        :math:`\mathrm{Var}\, u_r = s_r^2 + \lVert A_r L_r \rVert^2`: the row's own spread
        plus what it inherits from the globals (the realized group means' uncertainty)."""
        loc, scale = self.loc_scale(rows)
        if COUPLING not in rows or name not in self.row_index:
            return loc, scale
        inherited = rows[COUPLING] @ self.global_factor(params)[self.row_index[name]]
        return loc, jnp.sqrt(scale**2 + jnp.sum(inherited**2, axis=-1))

    def _globals_point(self, u: Mapping[str, jax.Array]) -> jax.Array:
        return jnp.concatenate([u[n].reshape(-1) for n in self.globals])

    def _globals_mean(self, params: Mapping[str, Mapping[str, Any]]) -> jax.Array:
        return jnp.concatenate([params[n]["loc"].reshape(-1) for n in self.globals])

    def globals_log_density(
        self,
        params: Mapping[str, Mapping[str, Any]],
        u: Mapping[str, jax.Array],
        widen: float = 1.0,
    ) -> jax.Array:
        r""":math:`\log N(g; \mu, w^2 LL^\top) = -\tfrac12 \lVert (wL)^{-1}(g - \mu)
        \rVert^2 - \sum_i \log(w L_{ii}) - \tfrac{D}{2}\log 2\pi`, one triangular solve."""
        if not self.dim:
            return jnp.zeros(())
        factor = widen * self.global_factor(params)
        centred = self._globals_point(u) - self._globals_mean(params)
        eps = jax.scipy.linalg.solve_triangular(factor, centred, lower=True)
        return (
            -0.5 * jnp.sum(eps**2)
            - jnp.sum(jnp.log(jnp.diagonal(factor)))
            - 0.5 * self.dim * jnp.log(2 * jnp.pi)
        )

    def _row_shift(
        self,
        name: str,
        rows: Mapping[str, Any],
        u: Mapping[str, jax.Array],
        params: Mapping[str, Mapping[str, Any]],
    ) -> Any:
        r""":math:`A_r (g - \mu)` for coupled rows, else 0."""
        if COUPLING not in rows or name not in self.row_index or not self.dim:
            return 0.0
        centred = self._globals_point(u) - self._globals_mean(params)
        return rows[COUPLING] @ centred[self.row_index[name]]

    def rows_log_density(
        self,
        name: str,
        rows: Mapping[str, Any],
        u_rows: jax.Array,
        u: Mapping[str, jax.Array],
        params: Mapping[str, Mapping[str, Any]],
        widen: float = 1.0,
    ) -> jax.Array:
        r""":math:`\log N(u_r; m_r + A_r (g - \mu), w^2 s_r^2)` per row."""
        loc, sd = self.loc_scale(rows)
        mean = loc + self._row_shift(name, rows, u, params)
        return _per_row(_log_normal(u_rows, mean, widen * sd))

    def _extra_params(self, params: Params, dtype: Any) -> Params:
        """Every global's row of :math:`T` and every coupled row's :math:`A_r`, at 0."""
        for name in (*self.globals, *self.coupled):
            width = self.dim if name in self.offsets else len(self.row_index[name])
            shape = (*self.sites[name].unconstrained_shape, width)
            params[name] = {**params[name], COUPLING: jnp.zeros(shape, dtype)}
        return params

    def param_logical_axes(self) -> dict[str, dict[str, Any]]:
        out = super().param_logical_axes()
        for name in (*self.globals, *self.coupled):
            axes = out[name]["loc"]
            out[name][COUPLING] = None if axes is None else (*axes, None)
        return out

    def draw(
        self,
        key: jax.Array,
        params: Mapping[str, Mapping[str, jax.Array]],
        noise: Mapping[str, jax.Array] | None = None,
    ) -> dict[str, SiteDraw]:
        missing = [n for n in self.globals if n not in params]
        if missing:
            raise ValueError(f"structured guide: a draw needs every global site; missing {missing}")
        eps = self.noise(key, params, noise)
        out: dict[str, SiteDraw] = {}
        centred = []  # g - mu, in global order
        eps_g = jnp.concatenate([eps[n].reshape(-1) for n in self.globals]) if self.dim else None
        for n in self.globals:
            p = params[n]
            shift = (p[COUPLING] * self._mask(n)) @ eps_g
            out[n] = self._site_draw(n, p, eps[n], shift)
            centred.append((self.loc_scale(p)[1] * eps[n] + shift).reshape(-1))
        z = jnp.concatenate(centred) if centred else None
        for n in sorted(eps):
            if n not in out:
                p = params[n]
                coupled = COUPLING in p and z is not None
                shift = p[COUPLING] @ z[self.row_index[n]] if coupled else 0.0
                out[n] = self._row_draw(n, p, eps[n], shift, out, params)
        return out

    def _row_draw(
        self,
        name: str,
        p: Mapping[str, jax.Array],
        eps: jax.Array,
        shift: Any,
        drawn: Mapping[str, SiteDraw],
        params: Mapping[str, Mapping[str, jax.Array]],
    ) -> SiteDraw:
        """A table's rows given the globals' draw (``drawn``): their own Normal, shifted."""
        return self._site_draw(name, p, eps, shift)


ANCHOR = "anchor"


class ConditionalGuide(StructuredGuide):
    r"""The structured guide with each Normal-prior table's rows conditional on the table's
    own scale :math:`\lambda`: a row's posterior is its prior times a Gaussian *site*.

    For a table with prior :math:`u_r \sim N(0, \lambda^2)` (``conditional`` maps the table
    to its scale site), row :math:`r` keeps a site precision :math:`\tau_r = e^{\rho_r}` and
    a site mean :math:`\nu_r`, the table an *anchor* :math:`a`, and

    .. math::
        P_r(\lambda) = \tau_r + \lambda^{-2}, \qquad
        u_r \mid g = a + \frac{\nu_r (\tau_r + 1)}{P_r(\lambda)} + P_r(\lambda)^{-1/2}
        \varepsilon_r + A_r (g - \mu)

    with :math:`\lambda` the scale in the same draw of the globals :math:`g`. This is
    :math:`q(u_r \mid \lambda) \propto N(u_r; a, \lambda^2)\,
    N(u_r; \cdot, \tau_r^{-1})`: for a gaussian likelihood it holds the exact conditional
    posterior of every row *for every* :math:`\lambda` at once (:math:`\tau_r = n_r /
    \sigma^2`). A weakly observed row (:math:`\tau_r \lambda^2 \ll 1`) then has mean
    :math:`\propto \lambda^2` and sd :math:`\approx \lambda`: when the scale moves, its tens
    of thousands of rows follow at once, instead of over many epochs of noisy row gradients
    (the slow mode of a hierarchical scale under SVI). A well observed row has mean
    :math:`\approx a + \nu_r` and sd :math:`\tau_r^{-1/2}`, whatever :math:`\lambda`.
    (:math:`\nu_r` is stored as :math:`\nu_r (\tau_r + 1)`'s cofactor so that it moves in
    the row mean's own units.)

    The map from noise to :math:`(g, u)` stays triangular with diagonal :math:`(s,
    P_r^{-1/2})`, so :math:`\log q` is the same sum of :math:`-\tfrac12\varepsilon^2 -
    \log \text{sd}` as for the other families, and rows stay independent given :math:`g`
    (row-sparse, shardable: the same two row fields, ``loc`` = :math:`\nu_r`, ``raw_scale``
    = :math:`\rho_r`). The anchor sits on the scale site (``anchor``, the row's event
    shape); moving it by :math:`-\delta` moves every row's mean by :math:`-\delta` at every
    :math:`\lambda`, which recentering uses (:mod:`train.recenter`). Only recentering moves
    it: along it the likelihood is flat, so its gradient is noise (it is stopped).
    """

    name = "conditional"

    def __init__(
        self,
        sites: Mapping[str, LatentSite],
        coupled: Iterable[str] = (),
        row_globals: Mapping[str, Iterable[str]] | Iterable[str] | None = None,
        conditional: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(sites, coupled, row_globals)
        self.conditional = {
            table: scale
            for table, scale in sorted((conditional or {}).items())
            if table in self.sites and scale in self.offsets
        }

    def event_shape(self, table: str) -> tuple[int, ...]:
        """The shape of one row of ``table`` (the anchor's)."""
        return tuple(self.sites[table].unconstrained_shape[1:])

    def conditional_loc_scale(
        self, table: str, rows: Mapping[str, Any], lam: Any, anchor: Any
    ) -> tuple[Any, Any]:
        """Mean and sd of rows of ``table`` given the scale ``lam`` (without the coupling)."""
        tau = jnp.exp(rows["raw_scale"])
        # rsqrt and products instead of a division and a fractional power: scoring evaluates
        # this for every gathered row in every draw
        sd = jax.lax.rsqrt(tau + lam**-2.0)
        return anchor + rows["loc"] * (tau + 1.0) * (sd * sd), sd

    def _row_draw(
        self,
        name: str,
        p: Mapping[str, jax.Array],
        eps: jax.Array,
        shift: Any,
        drawn: Mapping[str, SiteDraw],
        params: Mapping[str, Mapping[str, jax.Array]],
    ) -> SiteDraw:
        if name not in self.conditional:
            return super()._row_draw(name, p, eps, shift, drawn, params)
        scale_site = self.conditional[name]
        # the anchor trades exactly with the intercept, where the likelihood is flat: the
        # gradient there is noise, so only recentering's closed form moves it
        anchor = jax.lax.stop_gradient(params[scale_site][ANCHOR])
        loc, scale = self.conditional_loc_scale(name, p, drawn[scale_site].value, anchor)
        u = loc + scale * eps + shift
        log_normal = -0.5 * eps**2 - jnp.log(scale) - 0.5 * jnp.log(2 * jnp.pi)
        return SiteDraw(u, eps, log_normal, jnp.zeros(()), u)

    def rows_log_density(
        self,
        name: str,
        rows: Mapping[str, Any],
        u_rows: jax.Array,
        u: Mapping[str, jax.Array],
        params: Mapping[str, Mapping[str, Any]],
        widen: float = 1.0,
    ) -> jax.Array:
        r"""For a conditional table, :math:`\log N(u_r; a + \nu_r(\tau_r + 1)/P_r(\lambda) +
        A_r(g - \mu), w^2 P_r(\lambda)^{-1})` per row, with :math:`\lambda` the scale at
        the globals' point ``u``."""
        if name not in self.conditional:
            return super().rows_log_density(name, rows, u_rows, u, params, widen)
        scale_site = self.conditional[name]
        lam = biject_to(self.sites[scale_site].support)(u[scale_site])
        loc, sd = self.conditional_loc_scale(name, rows, lam, params[scale_site][ANCHOR])
        mean = loc + self._row_shift(name, rows, u, params)
        return _per_row(_log_normal(u_rows, mean, widen * sd))

    def scale_quadrature(
        self, table: str, params: Mapping[str, Mapping[str, Any]], nodes: int = 24
    ) -> tuple[Any, Any, Any]:
        r"""Gauss–Hermite nodes :math:`\ell_k` and weights :math:`w_k` of the marginal of
        :math:`\log\lambda` for ``table``'s scale, so that :math:`E f(\lambda) \approx
        \sum_k w_k f(e^{\ell_k})` (exact for polynomials of degree ``2 nodes - 1`` in
        :math:`\ell`); and the scale's covariance with every global, ``(D,)``."""
        scale_site = self.conditional[table]
        mu, sd = self.marginal(scale_site, params[scale_site])
        x, w = np.polynomial.hermite_e.hermegauss(nodes)
        ell = jnp.reshape(mu, ()) + jnp.reshape(sd, ()) * jnp.asarray(x, jnp.float32)
        L = self.global_factor(params)
        k = self.offsets[scale_site]
        return ell, jnp.asarray(w / w.sum(), jnp.float32), L @ L[k]

    def row_marginal(
        self, name: str, rows: Mapping[str, Any], params: Mapping[str, Mapping[str, Any]]
    ) -> tuple[Any, Any]:
        r"""As :meth:`StructuredGuide.row_marginal`, integrating the row's mean
        :math:`m_r(\lambda)` and variance :math:`P_r^{-1}` over the scale by quadrature:
        :math:`\mathrm{Var}\, u_r = E P_r^{-1} + \mathrm{Var}\, m_r(\lambda) + \lVert A_r L_r
        \rVert^2 + 2 A_r \mathrm{Cov}(z, \ell) E[m_r'(\ell)]` (the last by Stein's lemma,
        :math:`\ell = \log\lambda` being jointly Normal with the globals :math:`z`)."""
        if name not in self.conditional:
            return super().row_marginal(name, rows, params)
        ell, w, cov = self.scale_quadrature(name, params)
        anchor = params[self.conditional[name]][ANCHOR]
        tau = jnp.exp(rows["raw_scale"])
        mean = second = slope = jnp.zeros_like(tau)
        # a sum over nodes of elementwise terms: each row's value does not depend on which
        # other rows are computed with it (a streamed read equals one read, bit for bit)
        for k in range(len(w)):
            inv = jnp.exp(-2.0 * ell[k])
            precision = tau + inv
            part = rows["loc"] * (tau + 1.0) / precision  # m_r(λ_k) - a
            mean = mean + w[k] * part
            second = second + w[k] * (part**2 + 1.0 / precision)
            slope = slope + w[k] * part * 2.0 * inv / precision  # dm/dℓ
        var = second - mean**2
        if COUPLING in rows and name in self.row_index:
            factor = self.global_factor(params)[self.row_index[name]]
            inherited = rows[COUPLING] @ factor
            var = var + jnp.sum(inherited**2, axis=-1)
            covariance = jnp.sum(rows[COUPLING] * cov[self.row_index[name]], axis=-1)
            var = var + 2.0 * covariance * slope
        return anchor + mean, jnp.sqrt(jnp.maximum(var, 0.0))

    def weighted_row_mean(
        self, name: str, rows: Mapping[str, Any], params: Mapping[str, Mapping[str, Any]]
    ) -> Any:
        r""":math:`E[\lambda^{-2} m_r(\lambda)] / E[\lambda^{-2}]` of each row (the anchor
        included): the row mean that a Normal prior's quadratic term sees."""
        ell, w, _ = self.scale_quadrature(name, params)
        anchor = params[self.conditional[name]][ANCHOR]
        tau = jnp.exp(rows["raw_scale"])
        total = jnp.zeros_like(tau)
        for k in range(len(w)):
            inv = jnp.exp(-2.0 * ell[k])
            total = total + w[k] * inv * rows["loc"] * (tau + 1.0) / (tau + inv)
        return anchor + total / jnp.sum(w * jnp.exp(-2.0 * ell))

    def init_params(
        self,
        init_scale: float = 0.1,
        dtype: Any = jnp.float32,
        start: Mapping[str, Any] | None = None,
        scales: Mapping[str, Any] | None = None,
        row_precision: Mapping[str, Any] | None = None,
    ) -> Params:
        """As :meth:`MeanFieldGuide.init_params`; each conditional table's rows start at site
        precision ``row_precision[table]`` (a scalar or one per row), else 1. Start a row at
        the information its data carries (``n_r`` times the likelihood's Fisher information per
        observation, as the service does): from a precision far below it the rows' spread
        stays tied to the scale, and SVI can settle with the scale too small."""
        params = super().init_params(init_scale, dtype, start, scales)
        for table in self.conditional:
            raw = params[table]["raw_scale"]
            tau = (row_precision or {}).get(table, 1.0)
            tau = jnp.asarray(tau, dtype)
            tau = tau.reshape(tau.shape + (1,) * (raw.ndim - tau.ndim))
            raw = jnp.broadcast_to(jnp.log(tau), raw.shape)
            params[table] = {**params[table], "raw_scale": raw}
        return params

    def _extra_params(self, params: Params, dtype: Any) -> Params:
        params = super()._extra_params(params, dtype)
        for table, scale in self.conditional.items():
            params[scale] = {**params[scale], ANCHOR: jnp.zeros(self.event_shape(table), dtype)}
        return params

    def param_logical_axes(self) -> dict[str, dict[str, Any]]:
        out = super().param_logical_axes()
        for table, scale in self.conditional.items():
            out[scale][ANCHOR] = (None,) * len(self.event_shape(table)) or None
        return out


GUIDES = ("structured", "conditional", "mean_field")


def make_guide(
    name: str,
    sites: Mapping[str, LatentSite],
    coupled: Iterable[str] = (),
    row_globals: Mapping[str, Iterable[str]] | Iterable[str] | None = None,
    conditional: Mapping[str, str] | None = None,
) -> MeanFieldGuide:
    """The guide family ``name`` over ``sites``; ``coupled``: the tables whose rows a
    structured guide ties to the globals; ``conditional``: table → scale site, the tables
    whose rows a conditional guide makes depend on their scale."""
    if name == "mean_field":
        return MeanFieldGuide(sites)
    if name == "structured":
        return StructuredGuide(sites, coupled, row_globals)
    if name == "conditional":
        return ConditionalGuide(sites, coupled, row_globals, conditional)
    raise ValueError(f"unknown guide {name!r}; choose one of {list(GUIDES)}")


def sample_latents(
    key: jax.Array, params: Params, sites: Mapping[str, LatentSite]
) -> tuple[dict[str, jax.Array], jax.Array]:
    """One reparameterised draw of every latent (constrained) and its guide log-density."""
    return MeanFieldGuide(sites).sample(key, params)


def antithetic_mean(
    loss: Callable[[Mapping[str, jax.Array]], jax.Array],
    noise: Mapping[str, jax.Array],
    antithetic: bool,
) -> jax.Array:
    r"""``loss(noise)``, a one-draw estimate of the negative ELBO at the standard normal
    ``noise`` (by site, :meth:`MeanFieldGuide.noise`), or with ``antithetic`` the mean of
    the draw and its mirror image, :math:`\tfrac12 (L(\varepsilon) + L(-\varepsilon))`.

    The noise is drawn once, by the caller, and negated here: drawn in each half, XLA
    merges the two draws in a step compiled alone but computes both inside a scan over steps
    (:mod:`train.dispatch`).

    Both are unbiased. The pair cancels every part of the gradient's noise that is odd in
    :math:`\varepsilon`, which is all of it where the integrand is locally linear. That
    noise is what drives a weakly identified scale down: with one draw per row, the scale's
    gradient sums one noisy term per table row. On a logit table of 6,000 levels with one to
    three binary rows each (``tests/test_weak_levels.py``; NUTS 0.42 ± 0.14) full-batch SVI
    settled the scale at 0.13 with one draw per step and at 0.39 ± 0.10 with the pair (64
    independent draws: 0.46, at 32 times the pair's cost)."""
    if not antithetic:
        return loss(noise)
    return 0.5 * (loss(noise) + loss({n: -e for n, e in noise.items()}))


def elbo_loss(
    key: jax.Array,
    params: Params,
    guide: MeanFieldGuide,
    model: Callable[..., Any],
    *args: Any,
    antithetic: bool = False,
    **kwargs: Any,
) -> jax.Array:
    """Negative ELBO estimate :math:`\\log q(z) - \\log p(y, z)` at one draw, or at an
    antithetic pair (:func:`antithetic_mean`)."""
    draw_key, model_key = jax.random.split(key)

    def one(noise: Mapping[str, jax.Array]) -> jax.Array:
        values, log_q = guide.sample(draw_key, params, noise)
        log_p, _ = log_density(handlers.seed(model, model_key), args, kwargs, values)
        return log_q - log_p

    return antithetic_mean(one, guide.noise(draw_key, params), antithetic)
