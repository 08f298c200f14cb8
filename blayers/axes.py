"""Logical axis names that layer parameters declare.

A layer never names a mesh axis. It tags each sampled parameter with logical axes; a rule set
(``blayers.sharding``) maps those to mesh axes. The tag rides on the NumPyro sample site as
``site["infer"]["logical_axes"]``, so it survives every handler and inference algorithm.
"""

from __future__ import annotations

from typing import Any

CATEGORIES = "categories"  # rows of an embedding / random-effect / categorical-FM table
EMBED = "embed"  # embedding dimension m
FEATURES = "features"  # dense input features d (d1 for two-input layers)
FEATURES2 = "features2"  # second input's features d2
PAIRS = "pairs"  # flattened d1*d2 interaction coefficients
RANK = "rank"  # low-rank dimension l
UNITS = "units"  # output units u
HEADS = "heads"  # attention heads
MODEL_DIM = "model_dim"  # attention token width (head_dim * num_heads)
HEAD_DIM = "head_dim"  # width of one attention head
BATCH = "batch"  # rows of a batch of data (placed by the service's plan, not by a layer)

LogicalAxes = tuple[str | None, ...]

INFER_KEY = "logical_axes"


def tag(axes: LogicalAxes) -> dict[str, Any]:
    """The ``infer`` dict that attaches ``axes`` to a sample site."""
    return {INFER_KEY: tuple(axes)}


def site_axes(site: dict[str, Any]) -> LogicalAxes | None:
    """Logical axes a traced site declared, or ``None`` if it declared none."""
    infer = site.get("infer") or {}
    axes = infer.get(INFER_KEY)
    return tuple(axes) if axes is not None else None
