"""CPR's local retrieval branch: a small learned metric on backbone features.

The LRB maps a backbone tap to descriptors whose cosine similarity is trained to be high for the
same spot of two normal images and low for anomalous or distant spots
(:mod:`jaxad.distances.windowed` searches them).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

TORCH_KERNEL = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")  # kaiming_uniform(a=√5)


def torch_bias(fan_in: int):
    """PyTorch's default bias initialiser: U(±1/√fan_in)."""
    bound = 1.0 / np.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def conv(features: int, size: int, fan_in: int, bias: bool) -> nn.Conv:
    """Stride-1 'same' convolution initialised like PyTorch's ``nn.Conv2d``."""
    pad = size // 2
    return nn.Conv(features, (size, size), padding=((pad, pad), (pad, pad)), use_bias=bias,
                   kernel_init=TORCH_KERNEL, bias_init=torch_bias(fan_in * size * size))


class BasicConv(nn.Module):
    """Conv (no bias) → BatchNorm(eps 1e-3) → ReLU, the inception building block."""

    features: int
    size: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = conv(self.features, self.size, x.shape[-1], bias=False)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-3)(x)
        return nn.relu(x)


class LocalRetrievalBranch(nn.Module):
    """1×1 conv → BN → ReLU → inception block (four branches, 256 ch) → 1×1 conv to ``out_dim``.

    Returns raw (unnormalised) descriptors; :func:`jaxad.distances.windowed.normalise` makes them unit length."""

    out_dim: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = conv(192, 1, x.shape[-1], bias=True)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x))
        b0 = BasicConv(64)(x, train)
        b1 = BasicConv(64, 3)(BasicConv(48)(x, train), train)
        b2 = BasicConv(64)(x, train)
        pooled = nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)
        b3 = BasicConv(64)(pooled, train)
        x = jnp.concatenate([b0, b1, b2, b3], axis=-1)
        return conv(self.out_dim, 1, 256, bias=True)(x)
