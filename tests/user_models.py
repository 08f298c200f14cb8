"""Code of a user's own, referenced from config: a model function (``model._target_``) and a
layer (a term's ``layer`` given by import path)."""

import jax.numpy as jnp
import numpyro.distributions as dist

from blayers import axes as ax
from blayers.layers import BLayer, InterceptLayer, RandomEffectsLayer
from blayers.links import logit_link


def random_intercepts(cols, y, *, num_data, num_categories):
    eta = InterceptLayer()("bias") + RandomEffectsLayer()(
        "mine", cols["user"], num_categories["user"]
    )
    return logit_link(eta, y, num_data=num_data)


class ScaledSumLayer(BLayer):
    r"""A layer made outside the package: :math:`\beta \sim Normal(0, s)`, output
    :math:`\beta \sum_j x_j`."""

    input_kind = "dense"

    def __init__(self, prior_scale: float = 1.0) -> None:
        self.prior_scale = float(prior_scale)

    def __call__(self, name: str, x: jnp.ndarray) -> jnp.ndarray:
        beta = self._sample(name, "beta", dist.Normal(0.0, self.prior_scale), (1,), (ax.UNITS,))
        return jnp.sum(x, axis=1, keepdims=True) * beta
