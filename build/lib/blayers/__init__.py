"""blayers: Bayesian layers on JAX + NumPyro, with sharding annotations for large tables."""

from blayers import layers, links, sharding
from blayers.layers import (
    AdaptiveLayer,
    AttentionLayer,
    BilinearLayer,
    BLayer,
    CategoricalFMLayer,
    EmbeddingLayer,
    FixedPriorLayer,
    FM3Layer,
    FMLayer,
    HorseshoeLayer,
    InteractionLayer,
    InterceptLayer,
    LowRankBilinearLayer,
    LowRankInteractionLayer,
    RandomEffectsLayer,
    RandomWalkLayer,
    SpikeAndSlabLayer,
    pairwise_interactions,
)
from blayers.sharding import describe_model

__version__ = "0.1.0"

__all__ = [
    "AdaptiveLayer",
    "AttentionLayer",
    "BLayer",
    "BilinearLayer",
    "CategoricalFMLayer",
    "EmbeddingLayer",
    "FM3Layer",
    "FMLayer",
    "FixedPriorLayer",
    "HorseshoeLayer",
    "InteractionLayer",
    "InterceptLayer",
    "LowRankBilinearLayer",
    "LowRankInteractionLayer",
    "RandomEffectsLayer",
    "RandomWalkLayer",
    "SpikeAndSlabLayer",
    "describe_model",
    "layers",
    "links",
    "pairwise_interactions",
    "sharding",
]
