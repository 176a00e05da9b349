"""SimpleNet's two trainable heads: the feature adaptor and the normality discriminator."""

from __future__ import annotations

import flax.linen as nn
import jax

XAVIER_NORMAL = nn.initializers.variance_scaling(1.0, "fan_avg", "normal")  # torch xavier_normal_


class Discriminator(nn.Module):
    """Linear → BatchNorm → LeakyReLU(0.2) → Linear(1, no bias): one normality score per feature."""

    hidden: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.Dense(self.hidden, kernel_init=XAVIER_NORMAL)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x)  # torch momentum 0.1
        x = nn.leaky_relu(x, 0.2)
        return nn.Dense(1, use_bias=False, kernel_init=XAVIER_NORMAL)(x)[:, 0]


def adaptor(dim: int) -> nn.Dense:
    """The feature adaptor: one Linear d → d with bias."""
    return nn.Dense(dim, kernel_init=XAVIER_NORMAL)
