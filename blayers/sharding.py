"""Logical axes → mesh placement for model parameters.

Layers tag each sampled parameter with logical axes (``blayers.axes``). A rule set maps logical
axis names to mesh axis names, like MaxText's ``logical_axis_rules``::

    rules = {"categories": "model", "embed": None}          # or [("categories", "model"), ...]
    mesh = make_mesh({"data": -1, "model": 1})
    shardings = guide_param_shardings(model, (x, ids), mesh, rules, params)

Per parameter dimension, the first rule for its logical axis whose mesh axes exist and are not
already used by another dimension of the same parameter wins; a logical axis without a rule is
replicated. A dimension that a rule shards but that does not divide the mesh axis size is an
error naming the site and the fix (pad the table with :func:`pad_to_multiple`) — never a silent
replication. :func:`assert_sharded` checks live arrays against the plan.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
from numpyro import handlers

from blayers import axes as ax

MeshAxes = str | tuple[str, ...] | None
Rules = Mapping[str, MeshAxes] | Sequence[tuple[str, MeshAxes]]

#: Default rules: tables row-sharded over the ``model`` axis, everything else replicated.
DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = ((ax.CATEGORIES, "model"),)

GUIDE_PARAM_SUFFIXES = ("_auto_loc", "_auto_scale", "_loc", "_scale")


class ShardingError(ValueError):
    """A parameter cannot be placed as its rules say."""


@dataclass(frozen=True)
class SiteInfo:
    """A latent site of a model: its value's shape, dtype and declared logical axes."""

    name: str
    shape: tuple[int, ...]
    dtype: Any
    logical_axes: ax.LogicalAxes | None


def describe_model(model: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, SiteInfo]:
    """Trace ``model(*args, **kwargs)`` once and report each latent site's shape and axes.

    Observed sites and deterministic sites are left out. Sites that declared no logical axes
    (e.g. a user's own ``numpyro.sample``) report ``logical_axes=None`` and are replicated.
    """
    trace = handlers.trace(handlers.seed(model, 0)).get_trace(*args, **kwargs)
    out: dict[str, SiteInfo] = {}
    for name, site in trace.items():
        if site["type"] != "sample" or site["is_observed"]:
            continue
        value = site["value"]
        out[name] = SiteInfo(name, tuple(np.shape(value)), value.dtype, ax.site_axes(site))
    return out


def normalize_rules(rules: Rules | None) -> tuple[tuple[str, MeshAxes], ...]:
    """Rules as an ordered tuple of ``(logical, mesh_axes)`` pairs."""
    if rules is None:
        return DEFAULT_RULES
    pairs = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
    out = []
    for pair in pairs:
        if len(pair) != 2 or not isinstance(pair[0], str):
            raise ShardingError(f"sharding rule {pair!r} must be a (logical_axis, mesh_axes) pair")
        logical, mesh_axes = pair
        if isinstance(mesh_axes, list):
            mesh_axes = tuple(mesh_axes)
        out.append((logical, mesh_axes))
    return tuple(out)


def mesh_axis_names(mesh_axes: MeshAxes) -> tuple[str, ...]:
    """A rule's or a spec entry's mesh axes as a tuple (``None``: none)."""
    if mesh_axes is None:
        return ()
    return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def logical_to_spec(
    logical_axes: ax.LogicalAxes | None,
    shape: tuple[int, ...],
    mesh: Mesh,
    rules: Rules | None = None,
    what: str = "parameter",
) -> PartitionSpec:
    """The ``PartitionSpec`` that ``rules`` give a parameter of ``shape`` on ``mesh``.

    Raises:
        ShardingError: a sharded dimension does not divide the product of its mesh axes.
    """
    if logical_axes is None:
        return PartitionSpec()
    if len(logical_axes) != len(shape):
        raise ShardingError(f"{what}: logical axes {logical_axes} do not match shape {shape}")
    pairs = normalize_rules(rules)
    used: set[str] = set()
    spec: list[MeshAxes] = []
    for dim, logical in zip(shape, logical_axes, strict=True):
        chosen: tuple[str, ...] = ()
        for rule_logical, mesh_axes in pairs:
            if rule_logical != logical:
                continue
            cand = mesh_axis_names(mesh_axes)
            if all(a in mesh.shape for a in cand) and not used & set(cand):
                chosen = cand
                break
        size = math.prod(mesh.shape[a] for a in chosen)
        if size > 1 and dim % size:
            raise ShardingError(
                f"{what}: dimension {logical!r} of size {dim} does not divide mesh axes "
                f"{chosen} of size {size}; pad it to {pad_to_multiple(dim, size)} "
                "(blayers.sharding.pad_to_multiple) or change the mesh / rules"
            )
        used |= set(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else chosen)
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def pad_to_multiple(n: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``n`` (table rows past ``n`` stay unused)."""
    return -(-int(n) // int(multiple)) * int(multiple)


def site_of_param(param: str, sites: Mapping[str, Any]) -> str | None:
    """The model site a guide parameter belongs to (``{site}_auto_loc``, ``{site}_loc``, …)."""
    for suffix in GUIDE_PARAM_SUFFIXES:
        if param.endswith(suffix) and param[: -len(suffix)] in sites:
            return param[: -len(suffix)]
    return None


def guide_param_specs(
    sites: Mapping[str, SiteInfo],
    param_shapes: Mapping[str, tuple[int, ...]],
    mesh: Mesh,
    rules: Rules | None = None,
) -> dict[str, PartitionSpec]:
    """PartitionSpecs for guide parameters, each following the axes of the site it belongs to.

    A parameter whose shape differs from its site's (e.g. a packed or low-rank guide) cannot
    follow the site's axes and is an error rather than a silent replication.
    """
    specs: dict[str, PartitionSpec] = {}
    for param, shape in param_shapes.items():
        site = site_of_param(param, sites)
        if site is None:
            specs[param] = PartitionSpec()
            continue
        info = sites[site]
        if tuple(shape) != info.shape:
            if info.logical_axes and any(info.logical_axes):
                raise ShardingError(
                    f"guide parameter {param!r} has shape {tuple(shape)} but site {site!r} has "
                    f"{info.shape}; use a per-site mean-field guide (AutoNormal) so each table "
                    "keeps its own sharding"
                )
            specs[param] = PartitionSpec()
            continue
        specs[param] = logical_to_spec(info.logical_axes, info.shape, mesh, rules, what=site)
    return specs


def guide_param_shardings(
    model: Callable[..., Any],
    model_args: tuple[Any, ...],
    mesh: Mesh,
    rules: Rules | None,
    params: Mapping[str, Any],
    model_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, NamedSharding]:
    """``NamedSharding`` per guide parameter of ``params`` (arrays or ShapeDtypeStructs)."""
    sites = describe_model(model, *model_args, **dict(model_kwargs or {}))
    shapes = {k: tuple(np.shape(v)) for k, v in params.items()}
    specs = guide_param_specs(sites, shapes, mesh, rules)
    return {k: NamedSharding(mesh, spec) for k, spec in specs.items()}


def make_mesh(axis_sizes: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh with named axes; one size may be ``-1`` (all remaining devices).

    Axes are ``AxisType.Auto`` so gathers such as ``table[ids]`` partition automatically.
    """
    devices = list(jax.devices() if devices is None else devices)
    names = tuple(axis_sizes)
    sizes = [int(s) for s in axis_sizes.values()]
    if sizes.count(-1) > 1:
        raise ShardingError(f"mesh {dict(axis_sizes)}: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if known < 1 or any(s == 0 or s < -1 for s in sizes):
        raise ShardingError(f"mesh {dict(axis_sizes)}: sizes must be positive or -1")
    if -1 in sizes:
        if len(devices) % known:
            raise ShardingError(
                f"mesh {dict(axis_sizes)}: {len(devices)} devices do not divide by {known}"
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ShardingError(
            f"mesh {dict(zip(names, sizes, strict=True))} needs {math.prod(sizes)} devices but "
            f"{len(devices)} are available; set the sizes so their product is {len(devices)} "
            "(or use -1 for one axis)"
        )
    grid = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(grid, names, axis_types=(AxisType.Auto,) * len(names))


def assert_sharded(arrays: Mapping[str, jax.Array], shardings: Mapping[str, NamedSharding]) -> None:
    """Loud failure when a parameter the plan shards ended up replicated (or placed otherwise).

    Raises:
        ShardingError: naming every parameter whose live sharding differs from its plan.
    """
    bad = []
    for name, target in shardings.items():
        arr = arrays[name]
        spec_axes = [a for entry in target.spec for a in mesh_axis_names(entry)]
        wants_split = math.prod(target.mesh.shape[a] for a in spec_axes) > 1
        live = getattr(arr, "sharding", None)
        if live is None:
            bad.append(f"{name}: not a jax.Array")
        elif wants_split and live.is_fully_replicated:
            bad.append(f"{name}: planned {target.spec} but fully replicated")
        elif not live.is_equivalent_to(target, np.ndim(arr)):
            bad.append(f"{name}: planned {target.spec} but placed as {live}")
    if bad:
        raise ShardingError("parameters not sharded as planned:\n  " + "\n  ".join(bad))


def bytes_per_device(shape: tuple[int, ...], dtype: Any, sharding: NamedSharding) -> int:
    """Bytes one device holds of a parameter of ``shape`` placed by ``sharding``."""
    local = sharding.shard_shape(tuple(shape))
    return int(math.prod(local) * np.dtype(dtype).itemsize)
