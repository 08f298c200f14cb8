"""A user's own model function, referenced from config as ``model._target_``."""

from blayers.layers import InterceptLayer, RandomEffectsLayer
from blayers.links import logit_link


def random_intercepts(cols, y, *, num_data, num_categories):
    eta = InterceptLayer()("bias") + RandomEffectsLayer()(
        "mine", cols["user"], num_categories["user"]
    )
    return logit_link(eta, y, num_data=num_data)
