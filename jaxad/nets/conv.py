"""A 2-D convolution layer whose backward pass is fast on XLA's CPU backend.

XLA computes a convolution's weight gradient as another convolution whose "kernel" is the whole
output gradient. On CPU that runs through a slow generic path, far slower than the forward pass
for PDN-S's 4×4 layers, and slower still when the padding is built into the convolution. This
layer pads explicitly, and for stride 1 it computes the weight gradient as k² matrix products of
shifted input windows with the output gradient (plain matmuls on GPU/TPU too). Values and
gradients equal ``flax.linen.Conv``'s with the same padding; parameters have the same names and
shapes (``kernel`` HWIO, ``bias``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def _conv_valid(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=_DIMENSIONS)


@jax.custom_vjp
def conv_valid(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Stride-1 "VALID" convolution of NHWC ``x`` with an HWIO ``kernel``."""
    return _conv_valid(x, kernel)


def _forward(x: jax.Array, kernel: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _conv_valid(x, kernel), (x, kernel)


def _backward(saved: tuple[jax.Array, jax.Array], dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, kernel = saved
    dx = jax.vjp(lambda v: _conv_valid(v, kernel), x)[1](dy)[0]
    kh, kw = kernel.shape[:2]
    h, w = dy.shape[1:3]
    dkernel = jnp.stack([
        jnp.stack([jnp.einsum("bhwc,bhwd->cd", x[:, i:i + h, j:j + w], dy) for j in range(kw)])
        for i in range(kh)
    ])
    return dx, dkernel.astype(kernel.dtype)


conv_valid.defvjp(_forward, _backward)


class Conv(nn.Module):
    """torch ``Conv2d(in, features, kernel, stride, padding)`` on NHWC, zero padding on all sides."""

    features: int
    kernel: int
    padding: int = 0
    stride: int = 1
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (self.kernel, self.kernel, x.shape[-1], self.features),
                            jnp.float32)
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
        if self.padding:
            p = self.padding
            x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
        if self.stride == 1:
            y = conv_valid(x, kernel.astype(x.dtype))
        else:
            y = jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), (self.stride, self.stride), "VALID",
                                             dimension_numbers=_DIMENSIONS)
        return y + bias.astype(y.dtype)
