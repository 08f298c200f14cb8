"""The job's sharding plan: one object that owns the mesh and where every array goes.

It is built once from the ``mesh`` config (axis name → size) and the ``sharding.rules``
(logical axis → mesh axes, first applicable rule wins; :mod:`blayers.sharding`), and it
gives everything that places data: the mesh, the train state's shardings, a batch's and a
table's per-row shardings, the table padding multiple and the printed plan. No mesh axis
name is written anywhere else in the service.

Two logical axes carry the service's own arrays:

- ``batch`` (:data:`blayers.axes.BATCH`): a batch's rows. Without a rule that names it,
  they are split over the ``data`` mesh axis.
- ``categories``: a table's rows (guide fields, row-wise moments, per-row counts).

So adding a mesh axis is one config line and one rule, e.g. a ``replica`` axis that also
splits the batch: ``mesh.replica: 2`` and the rule ``[batch, [replica, data]]``. A mesh axis
of size above 1 that no rule uses is refused, naming it (a typo would otherwise be a silent
extra axis).

State shardings follow each leaf's logical axes: a guide field takes its site's
(:meth:`blayers.guides.MeanFieldGuide.param_logical_axes`), a row-sparse table's row state
its rows', and an optimizer moment the sharding of the parameter it mirrors, found by
``optax.tree_map_params`` from the optimizer's own ``init``, not by names. An optimizer
leaf that mirrors no parameter must be a scalar (a step count); anything larger is refused
rather than silently replicated.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from blayers import axes as ax
from blayers import guides
from blayers.sharding import (
    MeshAxes,
    Rules,
    ShardingError,
    logical_to_spec,
    make_mesh,
    mesh_axis_names,
    normalize_rules,
)

from .config import Config, ConfigError
from .state import COUPLING_STATE, ROW_STATE, TrainState

#: The mesh axis a batch's rows are split over when no rule names ``batch``.
BATCH_AXIS_DEFAULT = "data"


@dataclass(frozen=True)
class PlanRow:
    """One guide parameter leaf as placed: for the printed plan."""

    name: str
    shape: tuple[int, ...]
    logical_axes: Any
    spec: PartitionSpec
    bytes_per_device: int
    total_bytes: int


@dataclass(frozen=True)
class ShardingPlan:
    """The mesh and the logical-axis rules of a job, and every placement derived from them."""

    mesh: Mesh
    rules: tuple[tuple[str, MeshAxes], ...]

    @classmethod
    def build(
        cls, sizes: Mapping[str, int], rules: Rules | None, devices: list[Any] | None = None
    ) -> ShardingPlan:
        """A plan over a mesh of ``sizes`` (one may be -1: the remaining devices).

        Raises:
            ConfigError: the sizes do not fit the devices, a rule names an axis the mesh
                lacks, or a mesh axis of size above 1 is used by no rule.
        """
        try:
            pairs = _with_batch_rule(normalize_rules(rules))
        except ShardingError as err:
            raise ConfigError(str(err)) from None
        for logical, mesh_axes in pairs:
            unknown = [a for a in mesh_axis_names(mesh_axes) if a not in sizes]
            if unknown and not (logical == ax.BATCH and mesh_axes == BATCH_AXIS_DEFAULT):
                raise ConfigError(
                    f"sharding.rules: [{logical}, {mesh_axes}] names mesh axis {unknown[0]!r}; "
                    f"the mesh has {list(sizes)}"
                )
        try:
            mesh = make_mesh(dict(sizes), devices)
        except ShardingError as err:
            raise ConfigError(f"mesh: {err}") from None
        plan = cls(mesh, pairs)
        used = {a for _, mesh_axes in pairs for a in mesh_axis_names(mesh_axes)}
        for name, size in mesh.shape.items():
            if size > 1 and name not in used:
                raise ConfigError(
                    f"mesh.{name}={size}: no sharding rule uses this axis, so its devices would "
                    f"only repeat the work; add a rule (e.g. [batch, [{name}, "
                    f"{', '.join(plan.batch_axes)}]]) or remove mesh.{name}"
                )
        return plan

    @classmethod
    def from_config(cls, cfg: Config) -> ShardingPlan:
        """The job's plan from its ``mesh`` and ``sharding`` config. Explicit sizes whose
        product is below the device count use the first devices (one process only: across
        processes every device must take part)."""
        sizes = {str(k): int(v) for k, v in cfg.mesh.items()}
        devices = None
        wanted = math.prod(sizes.values())
        fewer = -1 not in sizes.values() and 0 < wanted < jax.device_count()
        if fewer and jax.process_count() == 1:
            devices = jax.devices()[:wanted]
        return cls.build(sizes, [tuple(r) for r in cfg.sharding.rules], devices)

    @classmethod
    def for_restore(cls, cfg: Config, pad_multiple: int) -> ShardingPlan:
        """The run's own plan when it fits these devices and the run's table padding; else
        every axis at 1 but two: the table axis, split as far as the padding allows, and the
        first batch axis, which takes the remaining devices."""
        try:
            plan = cls.from_config(cfg)
            if pad_multiple % plan.table_multiple == 0:
                return plan
        except ConfigError:
            pass
        sizes = {str(k): 1 for k in cfg.mesh}
        rules = [tuple(r) for r in cfg.sharding.rules]
        pairs = _with_batch_rule(normalize_rules(rules))  # valid: from_config read them
        table = mesh_axis_names(_first_rule(pairs, ax.CATEGORIES, sizes))[:1]
        batch = mesh_axis_names(_first_rule(pairs, ax.BATCH, sizes))[:1]
        for name in table:
            sizes[name] = math.gcd(jax.device_count(), pad_multiple)
        for name in batch:
            if name not in table:
                sizes[name] = -1
        return cls.build(sizes, rules)

    # -- where things go -------------------------------------------------------------

    def axes_of(self, logical: str) -> MeshAxes:
        """The mesh axes the first applicable rule gives a dimension of ``logical`` axis."""
        return _first_rule(self.rules, logical, self.mesh.shape)

    def ways(self, logical: str) -> int:
        """How many ways a dimension of ``logical`` axis is split."""
        return math.prod(self.mesh.shape[a] for a in mesh_axis_names(self.axes_of(logical)))

    @property
    def batch_axes(self) -> tuple[str, ...]:
        """The mesh axes a batch's rows are split over."""
        return mesh_axis_names(self.axes_of(ax.BATCH))

    @property
    def batch_ways(self) -> int:
        """How many ways a batch's rows are split (a batch size must divide by it)."""
        return self.ways(ax.BATCH)

    @property
    def table_multiple(self) -> int:
        """How many ways a table's rows are split: tables pad to a multiple of this."""
        return self.ways(ax.CATEGORIES)

    def spec(
        self, logical_axes: ax.LogicalAxes | None, shape: tuple[int, ...], what: str
    ) -> PartitionSpec:
        """The PartitionSpec of an array of ``shape`` whose dimensions have ``logical_axes``."""
        return logical_to_spec(logical_axes, shape, self.mesh, self.rules, what=what)

    def named(self, spec: PartitionSpec) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def batch(self) -> NamedSharding:
        """A batch's rows (leading axis) split over the batch axes; other axes whole."""
        axes = self.batch_axes
        return self.named(PartitionSpec(None if not axes else axes[0] if len(axes) == 1 else axes))

    def batch_shardings(self, has_target: bool = True) -> dict[str, NamedSharding]:
        """Shardings of a training or scoring batch's arrays."""
        out = {"numeric": self.batch, "categorical": self.batch}
        if has_target:
            out["target"] = self.batch
        return out

    def check_batch_size(self, batch_size: int, key: str = "data.batch_size") -> None:
        """A batch must divide over the batch axes' devices and the processes.

        Raises:
            ConfigError: naming ``key`` and a size that would do.
        """
        b, d, per_process = int(batch_size), self.batch_ways, jax.process_count()
        if b < 1:
            raise ConfigError(f"{key}={b} must be positive")
        if b % (d * per_process) and b % d:
            raise ConfigError(
                f"{key}={b} is not divisible by the {d} data-parallel devices (mesh "
                f"{', '.join(self.batch_axes)}); use a multiple of {d}, e.g. {(b // d + 1) * d}"
            )
        if b % per_process:
            raise ConfigError(f"{key}={b} does not divide over {per_process} processes")

    def state_shardings(
        self,
        abstract: TrainState,
        guide: guides.MeanFieldGuide,
        optimizer: optax.GradientTransformation,
    ) -> TrainState:
        """NamedShardings for every leaf of the train state (see the module docstring)."""
        params = self._param_shardings(abstract, guide)
        row_state = {k for k, v in abstract.params.items() if ROW_STATE in v}
        if row_state:  # the optimizer holds only the dense sites (train.state.init_fn)
            dense = {k: v for k, v in params.items() if k not in row_state}
            opt = {"dense": self._mirror(optimizer.init, abstract.opt_state["dense"], dense)}
        else:
            opt = self._mirror(optimizer.init, abstract.opt_state, params)
        return TrainState(self.replicated, params, opt, self.replicated)

    def _param_shardings(
        self, abstract: TrainState, guide: guides.MeanFieldGuide
    ) -> dict[str, dict[str, NamedSharding]]:
        out = {}
        for name, fields in guide.param_logical_axes().items():
            shape = guide.sites[name].unconstrained_shape
            spec = self.spec(fields["loc"], shape, what=name)
            if ROW_STATE in abstract.params[name]:  # rows split as the table's; fields whole
                parts = (*tuple(spec), *(None,) * (len(shape) - len(spec)))
                row = self.named(PartitionSpec(parts[0], None, *parts[1:]))
                # (rows, fields, *event[, D_r]): a coupling's globals axis stays whole
                out[name] = {f: row for f in abstract.params[name]}
                continue
            # every field leads with the site's own axes (a coupling adds one trailing axis
            # of globals, which a shorter spec leaves whole)
            out[name] = {f: self.named(spec) for f in fields}
        return out

    def _mirror(self, init: Callable[[Any], Any], opt_state: Any, params: Any) -> Any:
        """The optimizer state's shardings: each copy of the parameter tree in it takes the
        parameters' shardings; any other leaf must be a scalar, and is replicated."""

        def other(leaf: Any) -> NamedSharding:
            if np.ndim(leaf):
                raise ShardingError(
                    f"optimizer state leaf of shape {tuple(np.shape(leaf))} mirrors no guide "
                    "parameter, so the plan cannot place it; use an optax optimizer whose state "
                    "copies the parameter tree"
                )
            return self.replicated

        return optax.tree_map_params(
            init,
            lambda _, sharding: sharding,
            opt_state,
            params,
            transform_non_params=other,
            is_leaf=lambda x: isinstance(x, NamedSharding),
        )

    # -- the printed plan ------------------------------------------------------------

    def describe(
        self, abstract: TrainState, shardings: TrainState, guide: guides.MeanFieldGuide
    ) -> list[PlanRow]:
        """Every guide parameter with shape, logical axes, placement and bytes per device."""
        rows = []
        axes = guide.param_logical_axes()
        for site, fields in abstract.params.items():
            for f, leaf in fields.items():
                sh = shardings.params[site][f]
                itemsize = np.dtype(leaf.dtype).itemsize
                own = guides.COUPLING if f == COUPLING_STATE else f
                logical = axes[site].get(own, axes[site]["loc"])
                if f in (ROW_STATE, COUPLING_STATE) and logical is not None:
                    logical = (logical[0], None, *logical[1:])
                rows.append(
                    PlanRow(
                        f"{site}.{f}",
                        tuple(leaf.shape),
                        logical,
                        sh.spec,
                        int(math.prod(sh.shard_shape(leaf.shape)) * itemsize),
                        int(math.prod(leaf.shape) * itemsize),
                    )
                )
        return rows

    def format(self, rows: list[PlanRow], abstract: TrainState, shardings: TrainState) -> str:
        """The plan as printed by a dry run: one line per parameter, then the totals."""
        head = (
            f"{'parameter':<48} {'shape':<18} {'logical axes':<34} {'mesh':<16} "
            f"{'bytes/device':>13}"
        )
        lines = [
            f"mesh {dict(self.mesh.shape)} over {self.mesh.devices.size} devices",
            f"batch rows over {list(self.batch_axes) or 'no axis'}; "
            f"tables padded to multiples of {self.table_multiple} rows",
            head,
            "-" * len(head),
        ]
        for r in rows:
            lines.append(
                f"{r.name:<48} {r.shape!s:<18} {r.logical_axes!s:<34} {r.spec!s:<16} "
                f"{r.bytes_per_device:>13,}"
            )
        params = sum(r.bytes_per_device for r in rows)
        lines.append(
            f"guide parameters per device: {params:,} bytes "
            f"(of {sum(r.total_bytes for r in rows):,} total)"
        )
        opt = bytes_per_device(abstract.opt_state, shardings.opt_state)
        lines.append(f"optimizer state per device:  {opt:,} bytes")
        if any(r.name.endswith("." + ROW_STATE) for r in rows):
            lines.append(
                f"({ROW_STATE}: a row-sparse table's guide parameters and row-wise moments "
                "together, counted above with the guide parameters)"
            )
        return "\n".join(lines)


def row_sharding(shardings: TrainState, site: str) -> NamedSharding:
    """Sharding of a per-row vector (counts, flags) of table ``site``: split as its rows."""
    leaf = next(iter(shardings.params[site].values()))
    spec = tuple(leaf.spec)
    return NamedSharding(leaf.mesh, PartitionSpec(spec[0] if spec else None))


def bytes_per_device(abstract: Any, shardings: Any) -> int:
    """Bytes one device holds of a tree of arrays placed by a matching tree of shardings."""
    leaves = jax.tree.leaves(abstract)
    shs = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    return int(
        sum(
            math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
            for a, s in zip(leaves, shs, strict=True)
        )
    )


def _with_batch_rule(pairs: tuple[tuple[str, MeshAxes], ...]) -> tuple[tuple[str, MeshAxes], ...]:
    """``pairs`` with the default batch rule last, when no rule names ``batch``."""
    if any(logical == ax.BATCH for logical, _ in pairs):
        return pairs
    return (*pairs, (ax.BATCH, BATCH_AXIS_DEFAULT))


def _first_rule(
    pairs: tuple[tuple[str, MeshAxes], ...], logical: str, mesh_axes: Mapping[str, Any]
) -> MeshAxes:
    """The mesh axes of the first rule for ``logical`` whose axes all exist."""
    for rule_logical, axes in pairs:
        if rule_logical == logical and all(a in mesh_axes for a in mesh_axis_names(axes)):
            return axes
    return None
