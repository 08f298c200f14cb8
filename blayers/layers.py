r"""Bayesian layers on JAX + NumPyro.

Three levels of configuration:

- class level: the generic model form and how coefficients meet data (``class FMLayer(BLayer)``);
- instance level: which distributions and prior parameters (``FMLayer(scale_dist=...)``). An
  instance holds no parameters: it is a reusable factory, callable many times under new names;
- call level: ``layer(name, x, ...)`` emits NumPyro ``sample`` sites for one batch and returns the
  output. Layers are pure NumPyro, so they run under SVI, NUTS, ``Predictive`` and any handler.

Notation: ``n`` rows in a batch, ``c`` categories, ``d`` features, ``l`` low-rank dim, ``m``
embedding dim, ``u`` units (output dim).

Sample sites are named ``"{LayerClass}_{name}_{param}"`` (``param`` is ``scale`` for the
hierarchical :math:`\lambda`). Every site declares logical sharding axes (``blayers.axes``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from numpyro import distributions, handlers
from numpyro.primitives import _PYRO_STACK

from blayers import axes as ax
from blayers._checks import as_2d, check_id_range, check_ids, check_kwargs, is_concrete
from blayers.splines import bspline_basis

Activation = Callable[[jax.Array], jax.Array]
identity: Activation = jax.nn.identity

__all__ = [
    "AR1Layer",
    "AdaptiveLayer",
    "AttentionLayer",
    "BLayer",
    "BilinearLayer",
    "CategoricalFMLayer",
    "EmbeddingLayer",
    "FM3Layer",
    "FMLayer",
    "FixedEffectsLayer",
    "FixedPriorLayer",
    "HSGPLayer",
    "HorseshoeInteractionLayer",
    "HorseshoeLayer",
    "InteractionLayer",
    "InterceptLayer",
    "LowRankBilinearLayer",
    "LowRankInteractionLayer",
    "MixtureLayer",
    "PSplineLayer",
    "RandomEffectsLayer",
    "RandomSlopesLayer",
    "RandomWalkLayer",
    "SpikeAndSlabLayer",
    "hsgp_L",
    "pairwise_interactions",
]


def pairwise_interactions(x: jax.Array, z: jax.Array) -> jax.Array:
    r"""Row-wise flattened outer product.

    .. math:: \text{out}_{n, (i, j)} = x_{n,i}\, z_{n,j}

    Args:
        x: ``(n, d1)`` (or ``(n,)``).
        z: ``(n, d2)`` (or ``(n,)``).

    Returns:
        ``(n, d1 * d2)``, column ``i * d2 + j`` holding :math:`x_i z_j`.
    """
    x = as_2d(x, "pairwise_interactions x")
    z = as_2d(z, "pairwise_interactions z")
    if x.shape[0] != z.shape[0]:
        raise ValueError(f"pairwise_interactions: x has {x.shape[0]} rows but z has {z.shape[0]}")
    return jnp.einsum("ni,nj->nij", x, z).reshape(x.shape[0], -1)


def _refuse_duplicate(site: str, name: str) -> None:
    """Raise if ``site`` was already recorded by an enclosing trace (two layers, one name)."""
    for frame in _PYRO_STACK:
        if isinstance(frame, handlers.trace) and site in frame.trace:
            raise ValueError(
                f"layer name clash: sample site {site!r} already exists in this model; "
                f"give each call of this layer class a distinct name (not {name!r} twice)"
            )


class BLayer(ABC):
    """Abstract base class for Bayesian layers. Lays out an interface."""

    # the parameter a table-backed layer keeps one row of per category (its site is
    # ``{Layer}_{name}_{table_param}``), which the service gathers and shards by row
    table_param = "theta"
    # How the service (train/model.py) feeds the layer: "intercept" (no input), "dense"
    # (numeric columns), "pair" (two sets of numeric columns), "table" (one categorical
    # column's ids), "categorical_fm" (several categorical columns), "smooth" (one numeric
    # column on a domain from the data); None: not a service term.
    input_kind: ClassVar[str | None] = None
    gatherable: ClassVar[bool] = False  # its table trains row-sparse: rows gathered per batch
    ordered: ClassVar[bool] = False  # its table's rows follow the column's values (time)
    slopes_input: ClassVar[bool] = False  # a table layer called as layer(name, x, ids, n)
    pairs_within: ClassVar[bool] = False  # a pair layer that, without z, pairs its inputs
    # a table layer whose rows are dotted with numeric columns the config names (``slopes``)
    takes_slopes: ClassVar[bool] = False
    # a table whose rows are Normal(0, λ) under the layer's own scale λ, so a guide can
    # draw them given λ; ``rows_additive``: and they add to the linear predictor, so the
    # table's mean trades with the intercept (the service recenters such tables)
    rows_scaled: ClassVar[bool] = False
    rows_additive: ClassVar[bool] = False
    # a table whose level effects are a path built from its rows (``"cumsum"``: the rows are
    # increments), not the rows themselves
    rows_path: ClassVar[str | None] = None
    # a smooth layer's input domain, which the service fixes from the training data:
    # ``"knots"`` (a spline basis over a range) or ``"boundary"`` (a centre and half-width)
    domain: ClassVar[str | None] = None
    # call arguments the service cannot derive from the data: a config must give them
    required_call_args: ClassVar[tuple[str, ...]] = ()

    def check_service(self) -> None:
        """Raise ``ValueError`` (the message says the fix) where this configured layer cannot
        be trained as a service term; by default every configuration can."""
        return None

    @abstractmethod
    def __init__(self, *args: Any) -> None:
        """Store the prior family and its parameters (no sampling happens here)."""

    @abstractmethod
    def __call__(self, *args: Any) -> jax.Array:
        """Emit sample sites for one batch and return the layer output."""

    def _site(self, name: str, param: str) -> str:
        if not isinstance(name, str) or not name:
            raise TypeError(f"{type(self).__name__}: name must be a non-empty str, got {name!r}")
        return f"{type(self).__name__}_{name}_{param}"

    def _sample(
        self,
        name: str,
        param: str,
        fn: distributions.Distribution,
        shape: tuple[int, ...],
        logical_axes: ax.LogicalAxes,
    ) -> jax.Array:
        """Sample a parameter block of ``shape`` as one site with event shape ``shape``."""
        if len(shape) != len(logical_axes):
            raise AssertionError(f"axes {logical_axes} do not match shape {shape}")
        if shape:
            fn = fn.expand(shape).to_event(len(shape))
        site = self._site(name, param)
        _refuse_duplicate(site, name)
        return numpyro.sample(site, fn, infer=ax.tag(logical_axes))


class _HierarchicalLayer(BLayer):
    r"""Shared constructor for the adaptive layers: :math:`\lambda \sim` ``scale_dist``,
    coefficients :math:`\sim` ``coef_dist(scale=\lambda, **coef_kwargs)``."""

    def __init__(
        self,
        scale_dist: type[distributions.Distribution] = distributions.HalfNormal,
        coef_dist: type[distributions.Distribution] = distributions.Normal,
        coef_kwargs: dict[str, float] = {"loc": 0.0},  # noqa: B006 - published default
        scale_kwargs: dict[str, float] = {"scale": 1.0},  # noqa: B006 - published default
    ) -> None:
        """
        Args:
            scale_dist: NumPyro distribution class for the scale (λ) of the prior.
            coef_dist: NumPyro distribution class for the coefficient prior; it receives
                ``scale=λ`` plus ``coef_kwargs``.
            coef_kwargs: Parameters for the coefficient prior.
            scale_kwargs: Parameters for the scale distribution.

        Raises:
            TypeError: a distribution cannot take the given kwargs.
        """
        check_kwargs(scale_dist, scale_kwargs, "scale")
        check_kwargs(coef_dist, coef_kwargs, "coef", provided=("scale",))
        self.scale_dist = scale_dist
        self.coef_dist = coef_dist
        self.coef_kwargs = dict(coef_kwargs)
        self.scale_kwargs = dict(scale_kwargs)

    def _scale(self, name: str, param: str = "scale") -> jax.Array:
        return self._sample(name, param, self.scale_dist(**self.scale_kwargs), (), ())

    def _coef(
        self,
        name: str,
        param: str,
        shape: tuple[int, ...],
        logical_axes: ax.LogicalAxes,
        scale: jax.Array,
    ) -> jax.Array:
        prior = self.coef_dist(scale=scale, **self.coef_kwargs)
        return self._sample(name, param, prior, shape, logical_axes)


class _FixedPriorBase(BLayer):
    def __init__(
        self,
        coef_dist: type[distributions.Distribution] = distributions.Normal,
        coef_kwargs: dict[str, float] = {"loc": 0.0, "scale": 1.0},  # noqa: B006
    ) -> None:
        """
        Args:
            coef_dist: NumPyro distribution class for the coefficients.
            coef_kwargs: Parameters of the (fixed) prior distribution.

        Raises:
            TypeError: ``coef_dist`` cannot take ``coef_kwargs``.
        """
        check_kwargs(coef_dist, coef_kwargs, "coef")
        self.coef_dist = coef_dist
        self.coef_kwargs = dict(coef_kwargs)


# --------------------------------------------------------------------------------------------
# Dense regression layers
# --------------------------------------------------------------------------------------------


class AdaptiveLayer(_HierarchicalLayer):
    r"""Bayesian layer with adaptive prior using hierarchical modeling.

    .. math::
        \lambda \sim HalfNormal(1), \quad \beta \sim Normal(0, \lambda),
        \quad \beta \in \mathbb{R}^{d \times u}

    .. math:: \text{output} = \text{act}(x \beta) \in \mathbb{R}^{n \times u}

    Sites: ``AdaptiveLayer_{name}_scale`` (scalar), ``AdaptiveLayer_{name}_beta`` ``(d, u)``.
    """

    input_kind: ClassVar[str | None] = "dense"

    def __call__(
        self, name: str, x: jax.Array, units: int = 1, activation: Activation = identity
    ) -> jax.Array:
        """Forward pass with adaptive prior on coefficients.

        Args:
            name: Variable name.
            x: Input of shape ``(n, d)`` (``(n,)`` is read as ``(n, 1)``).
            units: Number of outputs.
            activation: Applied to the output.

        Returns:
            ``(n, u)``.
        """
        x = as_2d(x, self._site(name, "x"))
        scale = self._scale(name)
        beta = self._coef(name, "beta", (x.shape[1], units), (ax.FEATURES, ax.UNITS), scale)
        return activation(x @ beta)


class FixedPriorLayer(_FixedPriorBase):
    r"""Bayesian layer with a fixed prior distribution over coefficients.

    .. math:: \beta \sim Normal(0, 1), \quad \beta \in \mathbb{R}^{d \times u},
        \quad \text{output} = \text{act}(x\beta)

    Sites: ``FixedPriorLayer_{name}_beta`` ``(d, u)``.
    """

    input_kind: ClassVar[str | None] = "dense"

    def __call__(
        self, name: str, x: jax.Array, units: int = 1, activation: Activation = identity
    ) -> jax.Array:
        """Forward pass with fixed prior.

        Args:
            name: Variable name.
            x: Input of shape ``(n, d)`` (``(n,)`` is read as ``(n, 1)``).
            units: Number of outputs.
            activation: Applied to the output.

        Returns:
            ``(n, u)``.
        """
        x = as_2d(x, self._site(name, "x"))
        prior = self.coef_dist(**self.coef_kwargs)
        beta = self._sample(name, "beta", prior, (x.shape[1], units), (ax.FEATURES, ax.UNITS))
        return activation(x @ beta)


class InterceptLayer(_FixedPriorBase):
    r"""Bayesian intercept (bias) term with a fixed prior.

    .. math:: \beta \sim Normal(0, 1), \quad \beta \in \mathbb{R}^{1 \times u},
        \quad \text{output} = \text{act}(\beta)

    The ``(1, u)`` output broadcasts over the rows of other terms.
    Sites: ``InterceptLayer_{name}_beta`` ``(1, u)``.
    """

    input_kind: ClassVar[str | None] = "intercept"

    def __call__(self, name: str, units: int = 1, activation: Activation = identity) -> jax.Array:
        """Forward pass with fixed prior.

        Args:
            name: Variable name.
            units: Number of outputs.
            activation: Applied to the output.

        Returns:
            ``(1, u)``.
        """
        prior = self.coef_dist(**self.coef_kwargs)
        return activation(self._sample(name, "beta", prior, (1, units), (None, ax.UNITS)))


# --------------------------------------------------------------------------------------------
# Factorization machines and interactions
# --------------------------------------------------------------------------------------------


def _fm2(xv: jax.Array, x2v2: jax.Array) -> jax.Array:
    """Rendle's identity: 0.5 Σ_l [(Σ_i x_i v_il)² − Σ_i x_i² v_il²], inputs ``(n, l, u)``."""
    return 0.5 * jnp.sum(xv**2 - x2v2, axis=1)


def _fm3(p1: jax.Array, p2: jax.Array, p3: jax.Array) -> jax.Array:
    """Newton's identity for the 3rd elementary symmetric polynomial, summed over rank."""
    return jnp.sum(p1**3 - 3.0 * p2 * p1 + 2.0 * p3, axis=1) / 6.0


class FMLayer(_HierarchicalLayer):
    r"""Bayesian factorization machine layer with adaptive priors (Rendle 2010).

    .. math::
        \lambda \sim HalfNormal(1), \quad \theta \sim Normal(0, \lambda),
        \quad \theta \in \mathbb{R}^{d \times l \times u}

    .. math::
        \text{output}_{\cdot u} = \sum_{i<j} \langle \theta_{i\cdot u}, \theta_{j\cdot u}\rangle
        x_i x_j = \tfrac12 \sum_l \Big[\big(\textstyle\sum_i x_i\theta_{ilu}\big)^2
        - \textstyle\sum_i x_i^2 \theta_{ilu}^2\Big]

    Sites: ``FMLayer_{name}_scale``, ``FMLayer_{name}_theta`` ``(d, l, u)``. For categorical
    fields use :class:`CategoricalFMLayer`, which never builds the one-hot matrix.
    """

    input_kind: ClassVar[str | None] = "dense"

    def __call__(
        self,
        name: str,
        x: jax.Array,
        low_rank_dim: int,
        units: int = 1,
        activation: Activation = identity,
    ) -> jax.Array:
        """Forward pass through the factorization machine layer.

        Args:
            name: Variable name scope.
            x: Input matrix of shape ``(n, d)``.
            low_rank_dim: Dimensionality ``l`` of the factors.
            units: Number of outputs.
            activation: Applied to the output.

        Returns:
            ``(n, u)``.
        """
        x = as_2d(x, self._site(name, "x"))
        scale = self._scale(name)
        theta = self._coef(
            name,
            "theta",
            (x.shape[1], low_rank_dim, units),
            (ax.FEATURES, ax.RANK, ax.UNITS),
            scale,
        )
        return activation(self._interactions(x, theta))

    @staticmethod
    def _interactions(x: jax.Array, theta: jax.Array) -> jax.Array:
        """The pairwise term from the power sums :math:`p_1, p_2` (class docstring)."""
        xv = jnp.einsum("nd,dlu->nlu", x, theta)
        x2v2 = jnp.einsum("nd,dlu->nlu", x**2, theta**2)
        return _fm2(xv, x2v2)


class FM3Layer(FMLayer):
    r"""Bayesian order-3 factorization machine layer with adaptive prior (Blondel et al. 2016).

    .. math::
        \lambda \sim HalfNormal(1), \quad \theta \sim Normal(0, \lambda),
        \quad \theta \in \mathbb{R}^{d \times l \times u}

    With power sums :math:`p_k = \sum_i x_i^k \theta_i^k` (per rank and unit),

    .. math::
        \text{output} = \sum_l \frac{p_1^3 - 3 p_2 p_1 + 2 p_3}{6}
        = \sum_l \sum_{i<j<k} x_i x_j x_k \theta_{il}\theta_{jl}\theta_{kl}

    Sites: ``FM3Layer_{name}_scale``, ``FM3Layer_{name}_theta`` ``(d, l, u)``. Called as
    :class:`FMLayer` is.
    """

    @staticmethod
    def _interactions(x: jax.Array, theta: jax.Array) -> jax.Array:
        """The order-3 term from the power sums :math:`p_1, p_2, p_3` (class docstring)."""
        p1, p2, p3 = (jnp.einsum("nd,dlu->nlu", x**k, theta**k) for k in (1, 2, 3))
        return _fm3(p1, p2, p3)


class LowRankInteractionLayer(_HierarchicalLayer):
    r"""Bayesian low-rank interaction between two feature sets (UV decomposition).

    .. math::
        \lambda_1, \lambda_2 \sim HalfNormal(1), \quad
        \theta_1 \sim Normal(0, \lambda_1) \in \mathbb{R}^{d_1 \times l \times u}, \quad
        \theta_2 \sim Normal(0, \lambda_2) \in \mathbb{R}^{d_2 \times l \times u}

    .. math:: \text{output}_u = \sum_{r=1}^{l} (x\theta_{1})_{ru} (z\theta_{2})_{ru}
        = x^\top (\theta_{1\cdot\cdot u}\theta_{2\cdot\cdot u}^\top) z

    Sites: ``..._scale1``, ``..._theta1``, ``..._scale2``, ``..._theta2``.
    """

    input_kind: ClassVar[str | None] = "pair"

    def __call__(
        self,
        name: str,
        x: jax.Array,
        z: jax.Array,
        low_rank_dim: int,
        units: int = 1,
        activation: Activation = identity,
    ) -> jax.Array:
        """Low-rank interaction of ``x`` and ``z``.

        Args:
            name: Variable name scope.
            x: ``(n, d1)``.
            z: ``(n, d2)``.
            low_rank_dim: Rank ``l``.
            units: Number of outputs.
            activation: Applied to the output.

        Returns:
            ``(n, u)``.
        """
        x = as_2d(x, self._site(name, "x"))
        z = as_2d(z, self._site(name, "z"))
        scale1 = self._scale(name, "scale1")
        theta1 = self._coef(
            name,
            "theta1",
            (x.shape[1], low_rank_dim, units),
            (ax.FEATURES, ax.RANK, ax.UNITS),
            scale1,
        )
        scale2 = self._scale(name, "scale2")
        theta2 = self._coef(
            name,
            "theta2",
            (z.shape[1], low_rank_dim, units),
            (ax.FEATURES2, ax.RANK, ax.UNITS),
            scale2,
        )
        xt = jnp.einsum("nd,dlu->nlu", x, theta1)
        zt = jnp.einsum("nd,dlu->nlu", z, theta2)
        return activation(jnp.sum(xt * zt, axis=1))


class InteractionLayer(_HierarchicalLayer):
    r"""Bayesian full pairwise interaction layer with adaptive prior.

    .. math::
        \lambda \sim HalfNormal(1), \quad \beta \sim Normal(0, \lambda),
        \quad \beta \in \mathbb{R}^{d_1 d_2 \times u}

    .. math:: \text{output} = (x \otimes z)\, \beta

    with :math:`x \otimes z` from :func:`pairwise_interactions`. Prefer
    :class:`LowRankInteractionLayer` when :math:`d_1 d_2` is large.
    Sites: ``..._scale``, ``..._beta`` ``(d1*d2, u)``.
    """

    input_kind: ClassVar[str | None] = "pair"

    def __call__(
        self,
        name: str,
        x: jax.Array,
        z: jax.Array,
        units: int = 1,
        activation: Activation = identity,
    ) -> jax.Array:
        """All pairwise interactions of ``x`` and ``z``, weighted.

        Args:
            name: Variable name scope.
            x: ``(n, d1)``.
            z: ``(n, d2)``.
            units: Number of outputs.
            activation: Applied to the output.

        Returns:
            ``(n, u)``.
        """
        pairs = pairwise_interactions(x, z)
        scale = self._scale(name)
        beta = self._coef(name, "beta", (pairs.shape[1], units), (ax.PAIRS, ax.UNITS), scale)
        return activation(pairs @ beta)


class BilinearLayer(_HierarchicalLayer):
    r"""Bayesian full bilinear layer with adaptive prior.

    .. math::
        \lambda \sim HalfNormal(1), \quad W \sim Normal(0, \lambda),
        \quad W \in \mathbb{R}^{d_1 \times d_2 \times u}

    .. math:: \text{output}_u = x^\top W_{\cdot\cdot u}\, z

    Sites: ``..._scale``, ``..._W`` ``(d1, d2, u)``.
    """

    input_kind: ClassVar[str | None] = "pair"

    def __call__(
        self,
        name: str,
        x: jax.Array,
        z: jax.Array,
        units: int = 1,
        activation: Activation = identity,
    ) -> jax.Array:
        """Bilinear form of ``x`` and ``z``.

        Args:
            name: Variable name scope.
            x: ``(n, d1)``.
            z: ``(n, d2)``.
            units: Number of outputs.
            activation: Applied to the output.

        Returns:
            ``(n, u)``.
        """
        x = as_2d(x, self._site(name, "x"))
        z = as_2d(z, self._site(name, "z"))
        scale = self._scale(name)
        W = self._coef(
            name,
            "W",
            (x.shape[1], z.shape[1], units),
            (ax.FEATURES, ax.FEATURES2, ax.UNITS),
            scale,
        )
        return activation(jnp.einsum("ni,iju,nj->nu", x, W, z))


class LowRankBilinearLayer(_HierarchicalLayer):
    r"""Bayesian low-rank bilinear layer with one shared adaptive scale.

    .. math::
        \lambda \sim HalfNormal(1), \quad A \sim Normal(0, \lambda) \in
        \mathbb{R}^{d_1 \times l \times u}, \quad B \sim Normal(0, \lambda) \in
        \mathbb{R}^{d_2 \times l \times u}

    .. math:: \text{output}_u = x^\top A_{\cdot\cdot u} B_{\cdot\cdot u}^\top z
        = \sum_r (xA)_{ru} (zB)_{ru}

    Sites: ``..._scale``, ``..._A``, ``..._B``.
    """

    input_kind: ClassVar[str | None] = "pair"

    def __call__(
        self,
        name: str,
        x: jax.Array,
        z: jax.Array,
        low_rank_dim: int,
        units: int = 1,
        activation: Activation = identity,
    ) -> jax.Array:
        """Rank-``l`` bilinear form of ``x`` and ``z``.

        Args:
            name: Variable name scope.
            x: ``(n, d1)``.
            z: ``(n, d2)``.
            low_rank_dim: Rank ``l``.
            units: Number of outputs.
            activation: Applied to the output.

        Returns:
            ``(n, u)``.
        """
        x = as_2d(x, self._site(name, "x"))
        z = as_2d(z, self._site(name, "z"))
        scale = self._scale(name)
        A = self._coef(
            name, "A", (x.shape[1], low_rank_dim, units), (ax.FEATURES, ax.RANK, ax.UNITS), scale
        )
        B = self._coef(
            name, "B", (z.shape[1], low_rank_dim, units), (ax.FEATURES2, ax.RANK, ax.UNITS), scale
        )
        xa = jnp.einsum("nd,dlu->nlu", x, A)
        zb = jnp.einsum("nd,dlu->nlu", z, B)
        return activation(jnp.sum(xa * zb, axis=1))


# --------------------------------------------------------------------------------------------
# Categorical (table) layers
# --------------------------------------------------------------------------------------------


class EmbeddingLayer(_HierarchicalLayer):
    r"""Bayesian embedding layer for sparse categorical features.

    .. math::
        \lambda \sim HalfNormal(1), \quad \theta \sim Normal(0, \lambda),
        \quad \theta \in \mathbb{R}^{c \times m}, \quad \text{output}_i = \theta[x_i]

    For :math:`m = 1` prefer :class:`RandomEffectsLayer`.
    Sites: ``EmbeddingLayer_{name}_scale``, ``EmbeddingLayer_{name}_theta`` ``(c, m)`` with logical
    axes ``("categories", "embed")``.
    """

    input_kind: ClassVar[str | None] = "table"
    takes_slopes: ClassVar[bool] = True
    rows_scaled: ClassVar[bool] = True
    rows_additive: ClassVar[bool] = True
    required_call_args: ClassVar[tuple[str, ...]] = ("embedding_dim",)
    gatherable: ClassVar[bool] = True

    def __call__(
        self, name: str, x: jax.Array, num_categories: int, embedding_dim: int
    ) -> jax.Array:
        """Forward pass through embedding lookup.

        Args:
            name: Variable name scope.
            x: Integer ids in ``[0, num_categories)``, shape ``(n,)`` or ``(n, 1)``.
            num_categories: Number of rows ``c`` of the table.
            embedding_dim: Embedding size ``m``.

        Returns:
            ``(n, m)``.

        Raises:
            TypeError: non-integer ids. ValueError: ids out of range (when concrete).
        """
        ids = check_ids(x, num_categories, self._site(name, "x"))
        scale = self._scale(name)
        theta = self._coef(
            name, "theta", (num_categories, embedding_dim), (ax.CATEGORIES, ax.EMBED), scale
        )
        return theta[ids]


class RandomEffectsLayer(_HierarchicalLayer):
    r"""Bayesian random-effects layer — a scalar effect per category.

    .. math::
        \lambda \sim HalfNormal(1), \quad \theta \sim Normal(0, \lambda),
        \quad \theta \in \mathbb{R}^{c}, \quad \text{output}_i = \theta[x_i]

    A classical mixed-effects intercept with learned variance :math:`\lambda^2`.
    Sites: ``RandomEffectsLayer_{name}_scale``, ``RandomEffectsLayer_{name}_theta`` ``(c,)`` with
    logical axes ``("categories",)``.
    """

    input_kind: ClassVar[str | None] = "table"
    rows_scaled: ClassVar[bool] = True
    rows_additive: ClassVar[bool] = True
    gatherable: ClassVar[bool] = True

    def __call__(self, name: str, x: jax.Array, num_categories: int) -> jax.Array:
        """Forward pass through the random-effect lookup.

        Args:
            name: Variable name scope.
            x: Integer ids in ``[0, num_categories)``, shape ``(n,)`` or ``(n, 1)``.
            num_categories: Number of groups ``c``.

        Returns:
            ``(n, 1)``.
        """
        ids = check_ids(x, num_categories, self._site(name, "x"))
        scale = self._scale(name)
        theta = self._coef(name, "theta", (num_categories,), (ax.CATEGORIES,), scale)
        return theta[ids][:, None]


class FixedEffectsLayer(_FixedPriorBase):
    r"""Bayesian fixed-effects layer — a scalar effect per category under a fixed prior.

    .. math::
        \theta_c \sim Normal(0, 1), \quad \theta \in \mathbb{R}^{c \times 1},
        \quad \text{output}_i = \theta[x_i]

    The no-pooling counterpart of :class:`RandomEffectsLayer`: no learned variance, so the
    prior's scale is a fixed ridge penalty on per-category dummies. Use it for few,
    well-observed groups, or where pooling is unwanted. Sites: ``FixedEffectsLayer_{name}_theta``
    ``(c, 1)`` with logical axes ``("categories", "units")``.
    """

    input_kind: ClassVar[str | None] = "table"
    gatherable: ClassVar[bool] = True

    def __call__(self, name: str, x: jax.Array, num_categories: int) -> jax.Array:
        """Forward pass through the fixed-effect lookup.

        Args:
            name: Variable name scope.
            x: Integer ids in ``[0, num_categories)``, shape ``(n,)`` or ``(n, 1)``.
            num_categories: Number of groups ``c``.

        Returns:
            ``(n, 1)``.
        """
        ids = check_ids(x, num_categories, self._site(name, "x"))
        prior = self.coef_dist(**self.coef_kwargs)
        theta = self._sample(name, "theta", prior, (num_categories, 1), (ax.CATEGORIES, ax.UNITS))
        return theta[ids]


class RandomSlopesLayer(BLayer):
    r"""Group-specific slope deviations, partially pooled: one scale per predictor and output.

    .. math::
        \tau_{ju} \sim HalfNormal(1), \quad \beta_{gju} \sim Normal(0, \tau_{ju}),
        \quad \text{output}_{iu} = \text{act}\Big(\sum_j x_{ij}\, \beta_{g_i ju}\Big)

    The population slopes belong in another layer (e.g. :class:`AdaptiveLayer`); a column of
    ones in ``x`` adds a varying intercept. Slopes are independent given the scales (no
    correlation between them is estimated). Sites: ``RandomSlopesLayer_{name}_scale``
    ``(d, u)`` and ``RandomSlopesLayer_{name}_beta`` ``(c, d, u)``, the table, with logical
    axes ``("categories", "features", "units")``.
    """

    input_kind: ClassVar[str | None] = "table"
    gatherable: ClassVar[bool] = True
    slopes_input: ClassVar[bool] = True
    takes_slopes: ClassVar[bool] = True

    table_param = "beta"

    def __init__(
        self,
        scale_dist: type[distributions.Distribution] = distributions.HalfNormal,
        scale_kwargs: dict[str, Any] | None = None,
    ) -> None:
        r"""
        Args:
            scale_dist: Prior of the between-group scales :math:`\tau` (continuous,
                positive, scalar; its kwargs may broadcast to ``(d, u)``).
            scale_kwargs: Its parameters; default ``{"scale": 1.0}``.

        Raises:
            TypeError: ``scale_dist`` cannot take ``scale_kwargs``.
            ValueError: ``scale_dist`` is discrete or not scalar.
        """
        self.scale_kwargs = {"scale": 1.0} if scale_kwargs is None else dict(scale_kwargs)
        check_kwargs(scale_dist, self.scale_kwargs, "scale")
        prior = scale_dist(**self.scale_kwargs)
        if prior.is_discrete or prior.event_shape:
            raise ValueError("RandomSlopesLayer: scale_dist must be a continuous scalar prior")
        self.scale_dist = scale_dist

    def __call__(
        self,
        name: str,
        x: jax.Array,
        groups: jax.Array,
        num_categories: int,
        units: int = 1,
        activation: Activation = identity,
    ) -> jax.Array:
        """Forward pass: each row's predictors times its group's slopes.

        Args:
            name: Variable name scope.
            x: Predictors ``(n, d)`` (``(n,)`` is read as ``(n, 1)``).
            groups: Integer group ids in ``[0, num_categories)``, ``(n,)`` or ``(n, 1)``.
            num_categories: Number of groups ``c`` (the table's rows).
            units: Number of outputs.
            activation: Applied to the output.

        Returns:
            ``(n, u)``.
        """
        x = as_2d(x, self._site(name, "x"))
        ids = check_ids(groups, num_categories, self._site(name, "groups"))
        if ids.shape[0] != x.shape[0]:
            raise ValueError(
                f"{self._site(name, 'groups')}: {ids.shape[0]} group ids for {x.shape[0]} rows "
                "of x; give one group id per row"
            )
        d = x.shape[1]
        prior = self.scale_dist(**self.scale_kwargs)
        scale = self._sample(name, "scale", prior, (d, units), (ax.FEATURES, ax.UNITS))
        beta = self._sample(
            name,
            "beta",
            distributions.Normal(0.0, scale),
            (num_categories, d, units),
            (ax.CATEGORIES, ax.FEATURES, ax.UNITS),
        )
        return activation(jnp.einsum("nd,ndu->nu", x, beta[ids]))


def _scalar_prior(
    layer: str,
    dist: type[distributions.Distribution],
    kwargs: dict[str, Any] | None,
    role: str,
) -> dict[str, Any]:
    """``kwargs`` (default ``{"scale": 1.0}``) for a layer's continuous scalar ``role`` prior,
    checked at construction: they fit ``dist``, which is continuous and scalar."""
    kwargs = {"scale": 1.0} if kwargs is None else dict(kwargs)
    check_kwargs(dist, kwargs, role)
    prior = dist(**kwargs)
    if prior.is_discrete or prior.event_shape:
        raise ValueError(f"{layer}: {role}_dist must be a continuous scalar prior")
    return kwargs


class _StretchedBeta(distributions.Distribution):
    r""":math:`\rho = 2p - 1` with :math:`p \sim Beta(a, a)`, on :math:`(-1, 1)`.

    Its support is declared as that interval with constant bounds. An affine map of a Beta
    (``TransformedDistribution``) reads as supported on the whole real line unless the map's
    domain is given, and then its bounds are computed, so a trace under ``jax.eval_shape``
    leaks them as tracers; either way a guide or NUTS could propose :math:`|\rho| \ge 1`,
    where the density is 0."""

    support = distributions.constraints.interval(-1.0, 1.0)
    arg_constraints: ClassVar[dict[str, Any]] = {
        "concentration": distributions.constraints.positive
    }

    def __init__(self, concentration: float, *, validate_args: bool | None = None) -> None:
        self.concentration = concentration
        self._beta = distributions.Beta(concentration, concentration)
        super().__init__(batch_shape=(), validate_args=validate_args)

    def sample(self, key: jax.Array, sample_shape: tuple[int, ...] = ()) -> jax.Array:
        return 2.0 * self._beta.sample(key, sample_shape) - 1.0

    def log_prob(self, value: jax.Array) -> jax.Array:
        return self._beta.log_prob((value + 1.0) / 2.0) - jnp.log(2.0)


class AR1Layer(BLayer):
    r"""Stationary zero-mean AR(1) effects over equally spaced time slots, per output.

    .. math::
        p_u \sim Beta(a, a), \quad \rho_u = 2p_u - 1, \quad \sigma_u \sim HalfNormal(1),

        \theta_{0u} \sim Normal\big(0, \sigma_u / \sqrt{1 - \rho_u^2}\big), \quad
        \theta_{tu} \mid \theta_{t-1,u} \sim Normal(\rho_u \theta_{t-1,u}, \sigma_u),
        \quad \text{output}_{iu} = \text{act}(\theta_{x_i u})

    :math:`\sigma` is the innovation sd; the stationary covariance is
    :math:`\sigma^2 \rho^{|t-s|} / (1 - \rho^2)`. Add an :class:`InterceptLayer` for the
    mean. Sites: ``AR1Layer_{name}_rho`` ``(u,)``, ``AR1Layer_{name}_scale`` ``(u,)``, and the
    states ``AR1Layer_{name}_theta`` ``(c, u)``, or with ``noncentered=True`` the standardized
    innovations ``AR1Layer_{name}_z`` ``(c, u)`` from which the states are computed (often
    better when states are weakly observed). Slots keep their place: missing periods keep
    their slot, reserved future slots follow the recursion.
    """

    input_kind: ClassVar[str | None] = "table"
    ordered: ClassVar[bool] = True

    def __init__(
        self,
        scale_dist: type[distributions.Distribution] = distributions.HalfNormal,
        scale_kwargs: dict[str, Any] | None = None,
        rho_concentration: float = 2.0,
        noncentered: bool = False,
    ) -> None:
        r"""
        Args:
            scale_dist: Prior of the innovation sd :math:`\sigma` (continuous, positive,
                scalar; kwargs may broadcast to ``(u,)``).
            scale_kwargs: Its parameters; default ``{"scale": 1.0}``.
            rho_concentration: :math:`a` of the symmetric Beta prior on :math:`(\rho+1)/2`;
                1 is uniform on ``(-1, 1)``, the default 2 mildly favours persistence near 0.
            noncentered: Sample standardized innovations instead of the states.

        Raises:
            ValueError: ``rho_concentration`` is not finite and positive, or ``scale_dist``
                is discrete or not scalar.
        """
        if not np.isfinite(rho_concentration) or rho_concentration <= 0:
            raise ValueError(
                f"AR1Layer: rho_concentration must be finite and > 0, got {rho_concentration}"
            )
        self.scale_kwargs = _scalar_prior("AR1Layer", scale_dist, scale_kwargs, "scale")
        self.scale_dist = scale_dist
        self.rho_concentration = float(rho_concentration)
        self.noncentered = bool(noncentered)

    def check_service(self) -> None:
        """The service keeps the states themselves in the table: per-level effects and
        scoring read them row by row."""
        if self.noncentered:
            raise ValueError("the service trains AR1Layer's states; drop noncentered")

    def __call__(
        self,
        name: str,
        x: jax.Array,
        num_categories: int,
        units: int = 1,
        activation: Activation = identity,
    ) -> jax.Array:
        """Forward pass: each row's state at its time slot.

        Args:
            name: Variable name scope.
            x: Integer time slots in ``[0, num_categories)``, ``(n,)`` or ``(n, 1)``.
            num_categories: Number of slots ``c`` (the whole grid, future slots included).
            units: Number of independent series.
            activation: Applied to the output.

        Returns:
            ``(n, u)``.
        """
        ids = check_ids(x, num_categories, self._site(name, "x"))
        a = self.rho_concentration
        rho_prior = _StretchedBeta(a)
        rho = self._sample(name, "rho", rho_prior, (units,), (ax.UNITS,))
        prior = self.scale_dist(**self.scale_kwargs)
        sigma = self._sample(name, "scale", prior, (units,), (ax.UNITS,))
        # rho rounds to ±1 in float32 at the edge of its support: keep the variance finite
        first = sigma * jax.lax.rsqrt(jnp.maximum((1.0 - rho) * (1.0 + rho), 1e-12))
        if self.noncentered:
            z = self._sample(
                name,
                "z",
                distributions.Normal(0.0, 1.0),
                (num_categories, units),
                (ax.CATEGORIES, ax.UNITS),
            )

            def step(previous: jax.Array, innovation: jax.Array) -> tuple[jax.Array, jax.Array]:
                current = rho * previous + sigma * innovation
                return current, current

            _, rest = jax.lax.scan(step, first * z[0], z[1:])
            states = jnp.concatenate([(first * z[0])[None], rest], axis=0)
        else:
            # innovations e_t ~ N(0, sd_t) mapped to states by theta_t = rho theta_{t-1} + e_t
            sd = jnp.broadcast_to(sigma, (num_categories, units)).at[0].set(first)
            recursion = distributions.transforms.RecursiveLinearTransform(jnp.diag(rho))
            fn = distributions.TransformedDistribution(
                distributions.Normal(0.0, sd).to_event(2), recursion
            )
            site = self._site(name, "theta")
            _refuse_duplicate(site, name)
            states = numpyro.sample(site, fn, infer=ax.tag((ax.CATEGORIES, ax.UNITS)))
        return activation(states[ids])


class PSplineLayer(BLayer):
    r"""A smooth effect of one numeric input: a B-spline basis whose coefficients have a
    second-difference prior (a Bayesian P-spline, after Eilers & Marx), anchored at 0.

    With the clamped ``knots`` of degree :math:`p` giving :math:`K` basis functions
    :math:`B(x)` (:func:`blayers.splines.bspline_basis`), :math:`D` the :math:`(K-2)\times K`
    second-difference matrix and :math:`R = D^\top (D D^\top)^{-1}` its minimum-norm right
    inverse:

    .. math::
        \lambda_u \sim \text{scale\_dist}, \quad
        \delta_{\cdot u} \sim Normal(0, \lambda_u)^{K-2}, \quad
        t_u \sim Normal(0, s_t),

        \beta_{\cdot u} = R\,\delta_{\cdot u} + \ell\, t_u, \quad
        \ell = \mathrm{linspace}(-1, 1, K), \qquad
        f_u(x) = \big(B(\mathrm{clip}(x)) - B(x_0)\big)\,\beta_{\cdot u}

    so :math:`D\beta = \delta` exactly (a smaller :math:`\lambda` penalizes roughness more),
    the coefficients' linear trend (:math:`D\ell = 0`) has its own prior of scale
    :math:`s_t` (``trend_scale``), and since each row of :math:`B` sums to 1 the constant is
    removed by the anchor :math:`f(x_0) = 0` (``reference``, default the knots' midpoint):
    add an :class:`InterceptLayer` for the level. Outside the knots the curve holds its
    boundary value. Sites: ``PSplineLayer_{name}_scale`` ``(u,)``, ``..._differences``
    ``(K-2, u)``, ``..._trend`` ``(u,)``. With clamped or uneven knots the coefficients'
    linear trend is not exactly linear in :math:`x` near the ends; a separate linear term
    on the same input would be confounded with it.
    """

    input_kind: ClassVar[str | None] = "smooth"
    domain: ClassVar[str | None] = "knots"

    def __init__(
        self,
        scale_dist: type[distributions.Distribution] = distributions.HalfNormal,
        scale_kwargs: dict[str, Any] | None = None,
        trend_scale: float = 1.0,
        degree: int = 3,
    ) -> None:
        """
        Args:
            scale_dist: Prior of the smoothing scale :math:`\\lambda` (continuous, positive,
                scalar; kwargs may broadcast to ``(u,)``).
            scale_kwargs: Its parameters; default ``{"scale": 1.0}``.
            trend_scale: Prior sd :math:`s_t` of the coefficients' linear trend.
            degree: Degree :math:`p` of the B-splines (the knots must be made for it).

        Raises:
            ValueError: ``degree`` is not an integer >= 1, ``trend_scale`` is not finite
                and positive, or ``scale_dist`` is discrete or not scalar.
        """
        if isinstance(degree, bool) or not isinstance(degree, int | np.integer) or degree < 1:
            raise ValueError(f"PSplineLayer: degree must be an integer >= 1, got {degree!r}")
        if not (np.isfinite(trend_scale) and trend_scale > 0):
            raise ValueError(f"PSplineLayer: trend_scale must be finite and > 0, got {trend_scale}")
        self.scale_kwargs = _scalar_prior("PSplineLayer", scale_dist, scale_kwargs, "scale")
        self.scale_dist = scale_dist
        self.trend_scale = float(trend_scale)
        self.degree = int(degree)

    def __call__(
        self,
        name: str,
        x: jax.Array,
        knots: jax.Array,
        units: int = 1,
        reference: float | None = None,
        activation: Activation = identity,
    ) -> jax.Array:
        """Forward pass: the smooth effect at each row's ``x``.

        Args:
            name: Variable name scope.
            x: One numeric input, ``(n,)`` or ``(n, 1)``.
            knots: A clamped knot vector for this degree with at least 3 basis functions
                (:func:`blayers.splines.make_knots`); the same at training and prediction.
            units: Number of outputs (independent curves).
            reference: Where the curve is 0; default the knots' midpoint.
            activation: Applied to the output.

        Returns:
            ``(n, u)``; a row whose ``x`` is not finite is NaN.

        Raises:
            ValueError: (for concrete values) ``x`` not one column, knots not clamped and
                ordered or too few, ``reference`` outside them, or ``x`` not finite.
        """
        what = self._site(name, "x")
        x = as_2d(x, what)
        if x.shape[1] != 1:
            raise ValueError(f"{what}: PSplineLayer takes one input column, got {x.shape[1]}")
        x = x[:, 0]
        knots_np = np.asarray(knots, np.float64).reshape(-1)
        p = self.degree
        k = knots_np.size - p - 1
        lo, hi = (knots_np[0], knots_np[-1]) if knots_np.size else (np.nan, np.nan)
        ref = (lo + hi) / 2.0 if reference is None else float(reference)
        clamped = (
            k >= 3
            and np.isfinite(knots_np).all()
            and (np.diff(knots_np) >= 0).all()
            and hi > lo
            and (knots_np[: p + 1] == lo).all()
            and (knots_np[-p - 1 :] == hi).all()
        )
        if not clamped:
            raise ValueError(
                f"{what}: knots must be a finite, ordered, clamped knot vector of degree {p} "
                "with at least 3 basis functions (blayers.splines.make_knots)"
            )
        if not lo <= ref <= hi:
            raise ValueError(f"{what}: reference {ref} is outside the knots' range [{lo}, {hi}]")
        finite = jnp.isfinite(x)
        if is_concrete(finite) and not bool(jnp.all(finite)):
            raise ValueError(f"{what}: x must be finite")
        knots_j = jnp.asarray(knots_np, jnp.float32)
        basis = bspline_basis(jnp.clip(x, lo, hi), knots_j, p)
        basis = basis - bspline_basis(jnp.asarray([ref], jnp.float32), knots_j, p)
        second = np.diff(np.eye(k), n=2, axis=0)
        right_inverse = np.linalg.solve(second @ second.T, second).T  # float64, then fixed
        scale = self._sample(
            name, "scale", self.scale_dist(**self.scale_kwargs), (units,), (ax.UNITS,)
        )
        delta = self._sample(
            name, "differences", distributions.Normal(0.0, scale), (k - 2, units), (None, ax.UNITS)
        )
        trend = self._sample(
            name, "trend", distributions.Normal(0.0, self.trend_scale), (units,), (ax.UNITS,)
        )
        beta = (
            jnp.asarray(right_inverse, jnp.float32) @ delta
            + jnp.asarray(np.linspace(-1.0, 1.0, k), jnp.float32)[:, None] * trend
        )
        return activation(jnp.where(finite[:, None], basis @ beta, jnp.nan))


def hsgp_L(x: Any, c: float = 1.5) -> float:  # noqa: N802  (upstream's name)
    """The half-width :math:`L = c \\max|x|` of the domain :math:`[-L, L]` on which
    :class:`HSGPLayer` builds its basis. Compute it once on the (centred) training inputs and
    pass the same value at prediction; ``c`` between 1.2 and 2 keeps the approximation good
    up to the data's edges."""
    if not c > 1.0:
        raise ValueError(f"hsgp_L: c must be > 1 (the domain must reach past the data), got {c}")
    span = float(np.max(np.abs(np.asarray(x, np.float64))))
    if not (np.isfinite(span) and span > 0):
        raise ValueError("hsgp_L: x must be finite and not all 0")
    return float(c * span)


class HSGPLayer(BLayer):
    r"""A Gaussian-process effect of one numeric input, approximated in a Hilbert-space basis
    (Solin & Särkkä; Riutort-Mayol et al. 2020): squared-exponential kernel, learned
    lengthscale and amplitude, linear cost in the rows.

    On :math:`[-L, L]` the Laplacian's eigenfunctions and eigenvalues are
    :math:`\phi_j(x) = L^{-1/2} \sin\big(\sqrt{\lambda_j}(x + L)\big)`,
    :math:`\sqrt{\lambda_j} = j\pi / (2L)`, :math:`j = 1..m`, and the kernel
    :math:`k(x, x') = \alpha^2 \exp(-(x - x')^2 / 2\ell^2)` has spectral density
    :math:`S(\omega) = \alpha^2 \sqrt{2\pi}\, \ell\, e^{-\ell^2\omega^2/2}`:

    .. math::
        \ell \sim \text{lengthscale\_dist}, \quad \alpha \sim \text{sigma\_dist}, \quad
        \beta_{ju} \sim Normal(0, 1), \quad
        f_u(x) = \textstyle\sum_{j=1}^{m} \phi_j(x) \sqrt{S(\sqrt{\lambda_j})}\, \beta_{ju}

    so :math:`\mathrm{Cov}\, f(x), f(x') = \sum_j S(\sqrt{\lambda_j}) \phi_j(x) \phi_j(x')
    \to k(x, x')` as :math:`m` grows, for :math:`x, x'` well inside the domain. Centre
    :math:`x`, choose :math:`L` with :func:`hsgp_L` and keep it and :math:`m` at prediction;
    20–50 functions suit lengthscales that are not short against :math:`L`. Sites:
    ``HSGPLayer_{name}_lengthscale``, ``..._sigma`` (scalars), ``..._beta`` ``(m, u)``.
    """

    input_kind: ClassVar[str | None] = "smooth"
    domain: ClassVar[str | None] = "boundary"
    required_call_args: ClassVar[tuple[str, ...]] = ("m",)

    def __init__(
        self,
        lengthscale_dist: type[distributions.Distribution] = distributions.InverseGamma,
        lengthscale_kwargs: dict[str, float] | None = None,
        sigma_dist: type[distributions.Distribution] = distributions.HalfNormal,
        sigma_kwargs: dict[str, float] | None = None,
    ) -> None:
        """
        Args:
            lengthscale_dist: Prior of the lengthscale :math:`\\ell` (positive, scalar).
            lengthscale_kwargs: Its parameters; default ``{"concentration": 5.0, "rate": 5.0}``.
            sigma_dist: Prior of the amplitude :math:`\\alpha` (positive, scalar).
            sigma_kwargs: Its parameters; default ``{"scale": 1.0}``.

        Raises:
            TypeError: kwargs that do not fit their distribution.
            ValueError: a prior that is not continuous, scalar and positive.
        """
        self.lengthscale_kwargs = (
            {"concentration": 5.0, "rate": 5.0}
            if lengthscale_kwargs is None
            else dict(lengthscale_kwargs)
        )
        self.sigma_kwargs = {"scale": 1.0} if sigma_kwargs is None else dict(sigma_kwargs)
        for role, cls, kw in (
            ("lengthscale", lengthscale_dist, self.lengthscale_kwargs),
            ("sigma", sigma_dist, self.sigma_kwargs),
        ):
            check_kwargs(cls, kw, role)
            prior = cls(**kw)
            if (
                prior.is_discrete
                or prior.event_shape
                or prior.support is not (distributions.constraints.positive)
            ):
                raise ValueError(f"HSGPLayer: {role}_dist must be a continuous positive scalar")
        self.lengthscale_dist = lengthscale_dist
        self.sigma_dist = sigma_dist

    @staticmethod
    def basis(x: jax.Array, L: float, m: int) -> tuple[jax.Array, jax.Array]:
        """``(phi, sqrt_lambda)``: the ``(n, m)`` eigenfunctions at ``x`` and ``(m,)`` roots
        of the eigenvalues on ``[-L, L]``."""
        root = jnp.arange(1, m + 1, dtype=jnp.float32) * (jnp.pi / (2.0 * L))
        phi = jnp.sin(root[None, :] * (jnp.reshape(x, (-1, 1)) + L)) / jnp.sqrt(L)
        return phi, root

    def __call__(
        self,
        name: str,
        x: jax.Array,
        L: float,
        m: int,
        units: int = 1,
        activation: Activation = identity,
    ) -> jax.Array:
        """Forward pass: the GP's value at each row's ``x``.

        Args:
            name: Variable name scope.
            x: One numeric input, ``(n,)`` or ``(n, 1)``, inside ``[-L, L]``.
            L: Half-width of the basis' domain (:func:`hsgp_L`), the same at prediction.
            m: Number of basis functions.
            units: Number of outputs (independent functions).
            activation: Applied to the output.

        Returns:
            ``(n, u)``.

        Raises:
            ValueError: ``x`` not one column, ``L`` or ``m`` not positive, or (for concrete
                values) ``x`` outside ``[-L, L]``.
        """
        what = self._site(name, "x")
        x = as_2d(x, what)
        if x.shape[1] != 1:
            raise ValueError(f"{what}: HSGPLayer takes one input column, got {x.shape[1]}")
        if not (float(L) > 0 and int(m) >= 1):
            raise ValueError(f"{what}: L must be > 0 and m >= 1, got L={L}, m={m}")
        inside = jnp.all(jnp.abs(x) <= L)
        if is_concrete(inside) and not bool(inside):
            raise ValueError(
                f"{what}: x reaches outside [-L, L] = [{-L:g}, {L:g}]; centre x and take L "
                "from blayers.layers.hsgp_L on the training data"
            )
        phi, root = self.basis(x[:, 0], float(L), int(m))
        ell = self._sample(
            name, "lengthscale", self.lengthscale_dist(**self.lengthscale_kwargs), (), ()
        )
        alpha = self._sample(name, "sigma", self.sigma_dist(**self.sigma_kwargs), (), ())
        # sqrt(S) in closed form: the square root of an S that underflows to 0 at a long
        # lengthscale would have an infinite gradient
        root_density = (
            alpha * (2.0 * jnp.pi) ** 0.25 * jnp.sqrt(ell) * jnp.exp(-0.25 * (ell * root) ** 2)
        )
        beta = self._sample(
            name, "beta", distributions.Normal(0.0, 1.0), (int(m), units), (None, ax.UNITS)
        )
        return activation(phi @ (root_density[:, None] * beta))


class RandomWalkLayer(_HierarchicalLayer):
    r"""Bayesian Gaussian random walk over ordered categories.

    .. math::
        \lambda \sim HalfNormal(1), \quad \delta_t \sim Normal(0, \lambda)
        \in \mathbb{R}^{m}, \quad \theta_t = \sum_{s \le t} \delta_s,
        \quad \text{output}_i = \theta[x_i]

    ``m`` independent walks run in parallel. The increments :math:`\delta` are the sampled site,
    named ``RandomWalkLayer_{name}_theta`` ``(c, m)`` as in the published layer; positions are
    their cumulative sum along the category axis.
    """

    input_kind: ClassVar[str | None] = "table"
    rows_path: ClassVar[str | None] = "cumsum"
    required_call_args: ClassVar[tuple[str, ...]] = ("embedding_dim",)
    ordered: ClassVar[bool] = True

    def __call__(
        self, name: str, x: jax.Array, num_categories: int, embedding_dim: int
    ) -> jax.Array:
        """Forward pass: positions of each row's category along the walk.

        Args:
            name: Variable name scope.
            x: Integer ids (ordered categories, e.g. time), ``(n,)`` or ``(n, 1)``.
            num_categories: Number of steps ``c``.
            embedding_dim: Number of parallel walks ``m``.

        Returns:
            ``(n, m)``.
        """
        ids = check_ids(x, num_categories, self._site(name, "x"))
        scale = self._scale(name)
        delta = self._coef(
            name, "theta", (num_categories, embedding_dim), (ax.CATEGORIES, ax.EMBED), scale
        )
        return jnp.cumsum(delta, axis=0)[ids]


def _field_offsets(num_categories: int | Sequence[int], num_fields: int, what: str) -> np.ndarray:
    sizes = (
        np.full(num_fields, int(num_categories), dtype=np.int64)
        if np.ndim(num_categories) == 0
        else np.asarray(num_categories, dtype=np.int64)
    )
    if sizes.shape != (num_fields,):
        raise ValueError(
            f"{what}: num_categories has {sizes.size} entries but x has {num_fields} fields; "
            "give one count per column of x (or a single int for all)"
        )
    if (sizes < 1).any():
        raise ValueError(f"{what}: every field needs num_categories >= 1, got {sizes.tolist()}")
    return sizes


class CategoricalFMLayer(_HierarchicalLayer):
    r"""Factorization machine over categorical fields, backed by one embedding table.

    Equivalent to :class:`FMLayer` on the concatenated one-hot encoding of the ``F`` fields
    (``d = C = \sum_f c_f`` columns) without ever building that ``(n, C)`` matrix: each row has
    exactly one active column per field, so with :math:`v_f = \theta[\text{off}_f + x_f]`

    .. math::
        \lambda \sim HalfNormal(1), \quad \theta \sim Normal(0, \lambda),
        \quad \theta \in \mathbb{R}^{C \times l \times u}

    .. math::
        \text{output}_u = \sum_{f<g} \langle v_{f\cdot u}, v_{g\cdot u} \rangle
        = \tfrac12 \sum_l \Big[\big(\textstyle\sum_f v_{flu}\big)^2
        - \textstyle\sum_f v_{flu}^2\Big]

    Cost per row is ``O(F l u)``, independent of ``C``. Sites: ``..._scale``, ``..._theta``
    ``(C, l, u)`` with logical axes ``("categories", "rank", "units")``, or ``(C, l)`` with
    ``("categories", "rank")`` for one unit with ``unit_axis=False``; field ``f`` owns rows
    ``[off_f, off_f + c_f)`` of the table.
    """

    input_kind: ClassVar[str | None] = "categorical_fm"
    rows_scaled: ClassVar[bool] = True
    gatherable: ClassVar[bool] = True

    def __call__(
        self,
        name: str,
        x: jax.Array,
        num_categories: int | Sequence[int],
        low_rank_dim: int,
        units: int = 1,
        activation: Activation = identity,
        ids_are_rows: bool = False,
        unit_axis: bool = True,
    ) -> jax.Array:
        """FM over the categorical fields in the columns of ``x``.

        Args:
            name: Variable name scope.
            x: Integer ids, shape ``(n, F)``; column ``f`` holds ids in ``[0, c_f)``.
            num_categories: ``c_f`` per field (a sequence of ``F`` ints), or one int for all.
            low_rank_dim: Rank ``l`` of the factors.
            units: Number of outputs.
            activation: Applied to the output.
            ids_are_rows: ``x`` already holds rows of one shared table of ``num_categories``
                (an int) rows — e.g. fields drawing from one vocabulary, or rows gathered from
                a larger table.
            unit_axis: With one unit, keep its axis on the site (``(C, l, 1)``); ``False``
                makes the site ``(C, l)``, the same numbers in the same order. A table whose
                last axis has length 1 keeps XLA:CPU from vectorizing the code that draws and
                updates its rows: a row-sparse FM step at 10⁶ rows ran 1.6–2× faster without
                it (``benchmarks/results/design_measurements.md``).

        Returns:
            ``(n, u)``.
        """
        what = self._site(name, "x")
        x = as_2d(x, what)
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise TypeError(f"{what}: category ids must be integers, got dtype {x.dtype}")
        if ids_are_rows:
            if np.ndim(num_categories) != 0:
                raise ValueError(f"{what}: ids_are_rows needs one table size, not per field")
            rows_total = int(num_categories)
            check_id_range(x, rows_total, what)
            rows = x.astype(jnp.int32)
        else:
            sizes = _field_offsets(num_categories, x.shape[1], what)
            check_id_range(x, sizes[None, :], what)
            offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            rows_total = int(sizes.sum())
            rows = x.astype(jnp.int32) + jnp.asarray(offsets, dtype=jnp.int32)
        scale = self._scale(name)
        shape, axes = (rows_total, low_rank_dim, units), (ax.CATEGORIES, ax.RANK, ax.UNITS)
        if units == 1 and not unit_axis:
            shape, axes = shape[:2], axes[:2]
        theta = self._coef(name, "theta", shape, axes, scale)
        # One 1-D row gather per field from a flat (C, l*u) view: XLA:CPU is several times
        # faster at this than at one (n, F) gather of (l, u) slices, forward and backward.
        flat = theta.reshape(rows_total, low_rank_dim * units)
        fields = [flat[rows[:, f]] for f in range(rows.shape[1])]
        shape = (rows.shape[0], low_rank_dim, units)
        first = sum(fields[1:], fields[0]).reshape(shape)
        second = sum((v * v for v in fields[1:]), fields[0] * fields[0]).reshape(shape)
        return activation(_fm2(first, second))


# --------------------------------------------------------------------------------------------
# Sparsity priors
# --------------------------------------------------------------------------------------------


class HorseshoeLayer(BLayer):
    r"""Bayesian layer with (regularized) horseshoe prior (Piironen & Vehtari 2017).

    .. math::
        \tau_u \sim HalfCauchy(\tau_0), \quad \lambda_{ju} \sim HalfCauchy(1),
        \quad \beta_{ju} \sim Normal(0, \tau_u \tilde\lambda_{ju})

    with :math:`\tilde\lambda = \lambda` (plain), or when ``slab_scale`` :math:`s` is set

    .. math::
        c^2 \sim InverseGamma(\nu/2, \nu s^2/2), \quad
        \tilde\lambda_{ju}^2 = \frac{c^2 \lambda_{ju}^2}{c^2 + \tau_u^2 \lambda_{ju}^2}

    Sites: ``..._tau`` ``(u,)``, ``..._scale`` ``(d, u)``, ``..._c2`` (regularized only),
    ``..._beta`` ``(d, u)``. :math:`\tau_0` (``tau0``, default 1) sets how hard the layer
    selects: Piironen & Vehtari suggest :math:`\tau_0 = \frac{p_0}{p - p_0}
    \frac{\sigma}{\sqrt n}` for :math:`p_0` expected non-zero coefficients of :math:`p`.
    Later upstream releases take it as the first argument; here it comes last, keeping the
    published positional order, so pass it by name (``HorseshoeLayer(tau0=0.05)``) to run
    the same code under both.
    """

    input_kind: ClassVar[str | None] = "dense"

    def __init__(
        self,
        slab_scale: float | None = None,
        slab_df: float = 4.0,
        coef_dist: type[distributions.Distribution] = distributions.Normal,
        coef_kwargs: dict[str, float] = {"loc": 0.0},  # noqa: B006
        tau0: float = 1.0,
    ) -> None:
        """
        Args:
            slab_scale: If set, the regularized horseshoe with this slab scale; ``None`` gives
                the plain horseshoe.
            slab_df: Degrees of freedom ``ν`` of the slab variance prior.
            coef_dist: Coefficient distribution; receives ``scale`` from the shrinkage.
            coef_kwargs: Extra kwargs for ``coef_dist`` (beyond ``scale``).
            tau0: Scale of the global shrinkage's HalfCauchy prior.
        """
        if not (np.isfinite(tau0) and tau0 > 0):
            raise ValueError(f"HorseshoeLayer: tau0 must be finite and > 0, got {tau0}")
        if slab_scale is not None and not slab_scale > 0:
            raise ValueError(f"HorseshoeLayer: slab_scale must be > 0 or None, got {slab_scale}")
        if not slab_df > 0:
            raise ValueError(f"HorseshoeLayer: slab_df must be > 0, got {slab_df}")
        check_kwargs(coef_dist, coef_kwargs, "coef", provided=("scale",))
        self.tau0 = float(tau0)
        self.slab_scale = slab_scale
        self.slab_df = float(slab_df)
        self.coef_dist = coef_dist
        self.coef_kwargs = dict(coef_kwargs)

    def __call__(
        self, name: str, x: jax.Array, units: int = 1, activation: Activation = identity
    ) -> jax.Array:
        """Forward pass with horseshoe prior on coefficients.

        Args:
            name: Variable name scope.
            x: ``(n, d)``.
            units: Number of outputs.
            activation: Applied to the output.

        Returns:
            ``(n, u)``.
        """
        x = as_2d(x, self._site(name, "x"))
        d = x.shape[1]
        half_cauchy = distributions.HalfCauchy(1.0)
        global_prior = distributions.HalfCauchy(self.tau0)
        tau = self._sample(name, "tau", global_prior, (units,), (ax.UNITS,))
        lam = self._sample(name, "scale", half_cauchy, (d, units), (ax.FEATURES, ax.UNITS))
        if self.slab_scale is not None:
            half_df = self.slab_df / 2.0
            slab = distributions.InverseGamma(half_df, half_df * self.slab_scale**2)
            c2 = self._sample(name, "c2", slab, (), ())
            lam = jnp.sqrt(c2 * lam**2 / (c2 + tau**2 * lam**2))
        prior = self.coef_dist(scale=tau * lam, **self.coef_kwargs)
        beta = self._sample(name, "beta", prior, (d, units), (ax.FEATURES, ax.UNITS))
        return activation(x @ beta)


class MixtureLayer(BLayer):
    r"""Coefficients from a finite mixture of priors (for example Normal and Laplace).

    .. math::
        \gamma \sim Normal(0, s)^{K}, \quad w = \mathrm{softmax}(\gamma), \quad
        \beta_{ju} \sim \textstyle\sum_{k=1}^{K} w_k\, p_k(\cdot), \quad
        \text{output} = \text{act}(x \beta)

    or fixed weights :math:`w` when ``weights`` is given. Which component a coefficient
    comes from is summed out (``numpyro.distributions.MixtureGeneral``), so the density is
    smooth in :math:`\beta` and the layer runs under SVI and NUTS alike. The weights' prior
    is logistic-normal (``softmax`` of Normal logits, scale :math:`s` = ``weight_scale``)
    rather than a Dirichlet, so the site is unconstrained with as many dimensions as
    components. A heavy-tailed component lets a few large coefficients escape the shrinkage
    the others get. Sites: ``MixtureLayer_{name}_logits`` ``(K,)`` (unless ``weights``),
    ``MixtureLayer_{name}_beta`` ``(d, u)``.
    """

    input_kind: ClassVar[str | None] = "dense"

    def __init__(
        self,
        component_dists: Sequence[type[distributions.Distribution]] = (
            distributions.Normal,
            distributions.Laplace,
        ),
        component_kwargs: Sequence[dict[str, float]] = (
            {"loc": 0.0, "scale": 1.0},
            {"loc": 0.0, "scale": 1.0},
        ),
        weights: Sequence[float] | None = None,
        weight_scale: float = 1.0,
    ) -> None:
        """
        Args:
            component_dists: One distribution class per component (at least two), all on
                the real line.
            component_kwargs: Each component's parameters.
            weights: Fixed mixing weights, one per component, summing to 1; ``None``: a
                logistic-normal prior on them.
            weight_scale: The sd of the Normal logits behind that prior.

        Raises:
            ValueError: fewer than two components, lengths that differ, weights that are
                not a distribution, a component not on the real line, or a non-positive
                ``weight_scale``.
            TypeError: a component's kwargs do not fit it.
        """
        dists_ = tuple(component_dists)
        kwargs = tuple(dict(k) for k in component_kwargs)
        if len(dists_) < 2:
            raise ValueError("MixtureLayer: a mixture needs at least two components")
        if len(dists_) != len(kwargs):
            raise ValueError(
                f"MixtureLayer: {len(dists_)} component_dists but {len(kwargs)} component_kwargs"
            )
        for cls, kw in zip(dists_, kwargs, strict=True):
            check_kwargs(cls, kw, "component")
            if cls(**kw).support is not distributions.constraints.real:
                raise ValueError(f"MixtureLayer: component {cls.__name__} is not on the real line")
        if weights is not None:
            w = np.asarray(weights, np.float64)
            if w.shape != (len(dists_),) or (w < 0).any() or not np.isclose(w.sum(), 1.0):
                raise ValueError(
                    f"MixtureLayer: weights must be {len(dists_)} non-negative numbers summing "
                    f"to 1, got {list(weights)}"
                )
        if not weight_scale > 0:
            raise ValueError(f"MixtureLayer: weight_scale must be > 0, got {weight_scale}")
        self.component_dists = dists_
        self.component_kwargs = kwargs
        self.weights = None if weights is None else tuple(float(v) for v in weights)
        self.weight_scale = float(weight_scale)

    def __call__(
        self,
        name: str,
        x: jax.Array,
        units: int = 1,
        activation: Activation = identity,
    ) -> jax.Array:
        """Forward pass.

        Args:
            name: Variable name scope.
            x: Input matrix ``(n, d)``.
            units: Number of outputs.
            activation: Applied to the output.

        Returns:
            ``(n, u)``.
        """
        x = as_2d(x, self._site(name, "x"))
        d, k = x.shape[1], len(self.component_dists)
        if self.weights is None:
            logits = self._sample(
                name, "logits", distributions.Normal(0.0, self.weight_scale), (k,), (None,)
            )
            w = jax.nn.softmax(logits)
        else:
            w = jnp.asarray(self.weights)
        mixing = distributions.Categorical(probs=jnp.broadcast_to(w, (d, units, k)))
        components = [
            cls(**kw).expand((d, units))
            for cls, kw in zip(self.component_dists, self.component_kwargs, strict=True)
        ]
        prior = distributions.MixtureGeneral(mixing, components).to_event(2)
        site = self._site(name, "beta")
        _refuse_duplicate(site, name)
        beta = numpyro.sample(site, prior, infer=ax.tag((ax.FEATURES, ax.UNITS)))
        return activation(x @ beta)


class HorseshoeInteractionLayer(HorseshoeLayer):
    r"""Sparse pairwise interactions under the (regularized) horseshoe of
    :class:`HorseshoeLayer`: its local scales let a few interactions stand while the rest
    shrink to 0, which one global scale (:class:`InteractionLayer`) cannot do.

    Within one feature set (``z`` omitted) the design has the :math:`\binom{d}{2}` distinct
    products, in the row-major order of the upper triangle (:math:`k`-th column
    :math:`(i, j)`, :math:`i < j`, as ``numpy.triu_indices(d, 1)`` lists them); between
    two sets it has all :math:`d_1 d_2` products, column :math:`k = i d_2 + j`:

    .. math::
        \text{output}_{nu} = \sum_{i<j} x_{ni} x_{nj} \beta_{(ij)u}
        \quad\text{or}\quad \sum_{i, j} x_{ni} z_{nj} \beta_{(ij)u}

    with :math:`\beta` under the horseshoe prior above (same sites, ``d`` the number of
    pairs). It costs one coefficient per pair: for many features and prediction only,
    prefer :class:`LowRankInteractionLayer` or :class:`FMLayer`.
    """

    input_kind: ClassVar[str | None] = "pair"
    pairs_within: ClassVar[bool] = True

    def __call__(  # type: ignore[override]  # (x, z?) differs from the horseshoe's (x)
        self,
        name: str,
        x: jax.Array,
        z: jax.Array | None = None,
        units: int = 1,
        activation: Activation = identity,
    ) -> jax.Array:
        """Forward pass.

        Args:
            name: Variable name scope.
            x: Input matrix ``(n, d1)``.
            z: Optional second input ``(n, d2)``; omitted, the pairs are within ``x``.
            units: Number of outputs.
            activation: Applied to the output.

        Returns:
            ``(n, u)``.
        """
        x = as_2d(x, self._site(name, "x"))
        if z is not None:
            return super().__call__(name, pairwise_interactions(x, z), units, activation)
        if x.shape[1] < 2:
            raise ValueError(
                f"{self._site(name, 'x')}: pairs within x need at least 2 columns, got "
                f"{x.shape[1]}; pass z for interactions with another input"
            )
        i, j = np.triu_indices(x.shape[1], k=1)
        return super().__call__(name, x[:, i] * x[:, j], units, activation)


class SpikeAndSlabLayer(BLayer):
    r"""Sparse regression via a continuous spike-and-slab prior.

    .. math::
        z_{ju} \sim Beta(\alpha, \beta), \quad b_{ju} \sim \text{slab},
        \quad \text{output} = \text{act}(x (z \odot b))

    The default ``Beta(0.5, 0.5)`` puts mass near 0 and 1; the posterior mean of :math:`z_j`
    approximates the inclusion probability of feature ``j``.
    Sites: ``..._z`` ``(d, u)``, ``..._beta`` ``(d, u)``.
    """

    input_kind: ClassVar[str | None] = "dense"

    def __init__(
        self,
        alpha: float = 0.5,
        beta: float = 0.5,
        coef_dist: type[distributions.Distribution] = distributions.Normal,
        coef_kwargs: dict[str, float] = {"loc": 0.0, "scale": 1.0},  # noqa: B006
    ) -> None:
        """
        Args:
            alpha: First concentration of the Beta prior on ``z``.
            beta: Second concentration of the Beta prior on ``z``.
            coef_dist: Slab distribution class.
            coef_kwargs: Kwargs for ``coef_dist``.
        """
        if not (alpha > 0 and beta > 0):
            raise ValueError(f"SpikeAndSlabLayer: alpha and beta must be > 0, got {alpha}, {beta}")
        check_kwargs(coef_dist, coef_kwargs, "coef")
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.coef_dist = coef_dist
        self.coef_kwargs = dict(coef_kwargs)

    def __call__(
        self, name: str, x: jax.Array, units: int = 1, activation: Activation = identity
    ) -> jax.Array:
        """Forward pass with gated slab coefficients.

        Args:
            name: Variable name scope.
            x: ``(n, d)``.
            units: Number of outputs.
            activation: Applied to the output.

        Returns:
            ``(n, u)``.
        """
        x = as_2d(x, self._site(name, "x"))
        shape = (x.shape[1], units)
        logical = (ax.FEATURES, ax.UNITS)
        z = self._sample(name, "z", distributions.Beta(self.alpha, self.beta), shape, logical)
        b = self._sample(name, "beta", self.coef_dist(**self.coef_kwargs), shape, logical)
        return activation(x @ (z * b))


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------


class AttentionLayer(_HierarchicalLayer):
    r"""Multi-head Bayesian self-attention over the feature dimension (FT-Transformer tokens).

    For a row :math:`x \in \mathbb{R}^d`, with token width :math:`D = h \cdot H`:

    .. math::
        T_j = x_j E_j + b_j \in \mathbb{R}^{D}, \quad
        Q^{(k)} = T W_Q^{(k)},\; K^{(k)} = T W_K^{(k)},\; V^{(k)} = T W_V^{(k)}

    .. math::
        A^{(k)} = \text{softmax}\big(Q^{(k)} K^{(k)\top} / \sqrt{h}\big) V^{(k)}, \quad
        \text{output} = \text{act}\Big(\tfrac1d \textstyle\sum_j [A^{(1)}, \dots, A^{(H)}]_j
        \, W_O\Big)

    All weights share one adaptive scale :math:`\lambda \sim HalfNormal(1)` and are
    :math:`Normal(0, \lambda)`. Sites: ``..._scale``, ``..._embed`` ``(d, D)``, ``..._bias``
    ``(d, D)``, ``..._query``/``..._key``/``..._value`` ``(H, D, h)``, ``..._out`` ``(D, u)``.
    """

    input_kind: ClassVar[str | None] = "dense"

    def __call__(
        self,
        name: str,
        x: jax.Array,
        head_dim: int = 8,
        num_heads: int = 1,
        units: int = 1,
        activation: Activation = identity,
    ) -> jax.Array:
        """Self-attention over the ``d`` feature tokens of each row.

        Args:
            name: Variable name scope.
            x: ``(n, d)`` with ``d >= 2``.
            head_dim: Width ``h`` of each head.
            num_heads: Number of heads ``H``; token width is ``h * H``.
            units: Number of outputs.
            activation: Applied to the output.

        Returns:
            ``(n, u)``.
        """
        x = as_2d(x, self._site(name, "x"))
        d = x.shape[1]
        if d < 2:
            raise ValueError(f"{self._site(name, 'x')}: attention needs d >= 2 features, got {d}")
        width = head_dim * num_heads
        scale = self._scale(name)
        token_axes = (ax.FEATURES, ax.MODEL_DIM)
        embed = self._coef(name, "embed", (d, width), token_axes, scale)
        bias = self._coef(name, "bias", (d, width), token_axes, scale)
        proj_shape = (num_heads, width, head_dim)
        proj_axes = (ax.HEADS, ax.MODEL_DIM, ax.HEAD_DIM)
        wq, wk, wv = (
            self._coef(name, p, proj_shape, proj_axes, scale) for p in ("query", "key", "value")
        )
        w_out = self._coef(name, "out", (width, units), (ax.MODEL_DIM, ax.UNITS), scale)

        tokens = x[:, :, None] * embed[None] + bias[None]  # (n, d, D)
        q, k, v = (jnp.einsum("ndD,hDk->nhdk", tokens, w) for w in (wq, wk, wv))
        logits = jnp.einsum("nhik,nhjk->nhij", q, k) / jnp.sqrt(float(head_dim))
        attended = jnp.einsum("nhij,nhjk->nhik", jax.nn.softmax(logits, axis=-1), v)
        pooled = attended.mean(axis=2).reshape(x.shape[0], width)  # heads concatenated
        return activation(pooled @ w_out)
