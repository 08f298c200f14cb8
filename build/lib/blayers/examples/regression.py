"""End-to-end example: fit a layer model with SVI on generated data and print the recovered
coefficients with 90% intervals next to the truth.

    python -m blayers.examples.regression
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal

from blayers.layers import AdaptiveLayer, InterceptLayer, RandomEffectsLayer
from blayers.links import gaussian_link

N, D, GROUPS, BATCH, STEPS = 50_000, 4, 50, 1024, 4000
TRUE_BETA = np.array([1.5, -2.0, 0.5, 0.0])
TRUE_BIAS, TRUE_SIGMA, TRUE_GROUP_SD = 0.7, 0.5, 0.8


def model(x: jax.Array, group: jax.Array, y: jax.Array | None = None, n: int = N) -> jax.Array:
    mu = (
        InterceptLayer()("bias")
        + AdaptiveLayer()("x", x)
        + RandomEffectsLayer()("group", group, GROUPS)
    )
    return gaussian_link(mu, y, num_data=n)


def main() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D)).astype(np.float32)
    group = rng.integers(0, GROUPS, size=N).astype(np.int32)
    effects = rng.normal(0, TRUE_GROUP_SD, size=GROUPS)
    y = (TRUE_BIAS + x @ TRUE_BETA + effects[group] + rng.normal(0, TRUE_SIGMA, N)).astype(
        np.float32
    )

    guide = AutoNormal(model)
    svi = SVI(model, guide, optax.adam(optax.cosine_decay_schedule(0.02, STEPS)), Trace_ELBO())
    state = svi.init(jax.random.PRNGKey(0), x[:BATCH], group[:BATCH], y[:BATCH])
    update = jax.jit(svi.update)
    for step in range(STEPS):
        idx = rng.integers(0, N, size=BATCH)
        state, loss = update(state, x[idx], group[idx], y[idx])
        if step % 1000 == 0 or step == STEPS - 1:
            print(f"step {step:5d}  loss/row {float(loss) / N:.4f}")

    params = svi.get_params(state)
    draws = guide.sample_posterior(jax.random.PRNGKey(1), params, sample_shape=(1000,))

    def row(label: str, truth: float, samples: jax.Array) -> None:
        lo, mid, hi = np.quantile(np.asarray(samples), [0.05, 0.5, 0.95])
        inside = "yes" if lo <= truth <= hi else "NO"
        print(f"{label:<18}{truth:>8.3f}{mid:>10.3f}   [{lo:7.3f}, {hi:7.3f}]   {inside}")

    print(f"\n{'parameter':<18}{'truth':>8}{'median':>10}   {'90% interval':<20}  covers")
    # bias and the mean group effect are confounded; compare their sum
    row(
        "bias + mean eff.",
        TRUE_BIAS + effects.mean(),
        draws["InterceptLayer_bias_beta"][:, 0, 0]
        + jnp.mean(draws["RandomEffectsLayer_group_theta"], axis=1),
    )
    for j in range(D):
        row(f"beta[{j}]", TRUE_BETA[j], draws["AdaptiveLayer_x_beta"][:, j, 0])
    row("sigma", TRUE_SIGMA, draws["sigma"])
    row("group sd", TRUE_GROUP_SD, draws["RandomEffectsLayer_group_scale"])
    est = np.asarray(draws["RandomEffectsLayer_group_theta"].mean(0))
    corr = np.corrcoef(est - est.mean(), effects - effects.mean())[0, 1]
    print(f"\ngroup effects: correlation with truth {corr:.3f} over {GROUPS} groups")


if __name__ == "__main__":
    main()
