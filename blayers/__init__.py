"""blayers: Bayesian layers on JAX + NumPyro, with sharding annotations for large tables."""

from blayers import xla_flags

# before any backend reads XLA_FLAGS (see the module)
xla_flags.apply()

from blayers import layers, links, sharding  # noqa: E402
from blayers.layers import *  # noqa: E402, F403 - the layer API is blayers.layers.__all__
from blayers.sharding import describe_model  # noqa: E402

__version__ = "0.1.0"

__all__ = [  # the layers once, as blayers.layers lists them
    *layers.__all__,
    "describe_model",
    "layers",
    "links",
    "sharding",
]
