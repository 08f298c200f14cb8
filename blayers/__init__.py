"""blayers: Bayesian layers on JAX + NumPyro, with sharding annotations for large tables."""

from blayers import layers, links, sharding
from blayers.layers import *  # noqa: F403 - the layer API is blayers.layers.__all__
from blayers.sharding import describe_model

__version__ = "0.1.0"

__all__ = [  # the layers once, as blayers.layers lists them
    *layers.__all__,
    "describe_model",
    "layers",
    "links",
    "sharding",
]
