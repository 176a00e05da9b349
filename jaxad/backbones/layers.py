"""Layers the backbones share."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxad.backbones import winograd


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'SAME': output ceil(size/stride), the odd pixel of padding at the end."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class FrozenConv(nn.Module):
    """A frozen backbone's k×k convolution; kernel [k, k, C, O] and optional bias like nn.Conv (same
    parameter paths, shapes and initialisers). Padding: torch's symmetric k//2, or TF 'SAME'
    (``symmetric=False``, the TF-trained EfficientNet-Lite weights).

    Inference only, so it may take the fastest path per shape: a 1×1 one is a matmul over channels
    (of every s-th pixel); a stride-1 3×3 one runs as Winograd F(2×2, 3×3) when the variables carry
    its transformed kernel (the ``winograd`` collection, added on CPU when a backbone is built) and
    the input is small enough for that to pay (:func:`winograd.worthwhile`); any other as XLA's
    convolution.
    """

    features: int
    kernel_size: int
    stride: int = 1
    dtype: Any = jnp.float32
    use_bias: bool = False
    symmetric: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = self._convolve(x.astype(self.dtype))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
        return y

    def _convolve(self, x: jax.Array) -> jax.Array:
        k, s = self.kernel_size, self.stride
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features), jnp.float32)
        if k == 1:  # a matmul over channels (no padding either way), faster on XLA:CPU than a convolution
            return jnp.einsum("nhwc,co->nhwo", x[:, ::s, ::s], kernel[0, 0].astype(self.dtype))
        if (k, s) == (3, 1) and self.has_variable(winograd.COLLECTION, "kernel") and winograd.worthwhile(x.shape):
            return winograd.conv3x3(x, self.get_variable(winograd.COLLECTION, "kernel").astype(self.dtype))
        if self.symmetric:
            pads = [(k // 2, k // 2)] * 2
        else:
            pads = [_same_padding(x.shape[1], k, s), _same_padding(x.shape[2], k, s)]
        return jax.lax.conv_general_dilated(x, kernel.astype(self.dtype), (s, s), pads,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))


class DepthwiseConv(nn.Module):
    """k×k depthwise convolution (no bias); kernel [k, k, 1, C] like nn.Conv.

    Padding: TF 'SAME' (the TF-trained EfficientNet-Lite weights), or torch's symmetric k//2
    (``symmetric=True``, torchvision's EfficientNet).

    XLA:CPU runs grouped convolutions with one group per channel an order of magnitude slower than
    the same arithmetic written as k² shifted multiply-adds, which it fuses into one loop; on
    GPU/TPU the grouped convolution maps to the vendor kernels and is used as is.
    """

    kernel_size: int
    stride: int = 1
    dtype: Any = jnp.float32
    impl: str = "auto"  # "shift", "grouped", or "auto": shift on CPU, grouped elsewhere
    symmetric: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, s, channels = self.kernel_size, self.stride, x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 1, channels), jnp.float32)
        kernel = kernel.astype(self.dtype)
        x = x.astype(self.dtype)
        if self.symmetric:
            pads = [(k // 2, k // 2)] * 2
        else:
            pads = [_same_padding(x.shape[1], k, s), _same_padding(x.shape[2], k, s)]
        impl = self.impl if self.impl != "auto" else ("shift" if jax.default_backend() == "cpu" else "grouped")
        if impl == "grouped":
            return jax.lax.conv_general_dilated(
                x, kernel, (s, s), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels
            )
        xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
        out_h, out_w = ((x.shape[i] + sum(pads[i - 1]) - k) // s + 1 for i in (1, 2))
        out = None
        for i in range(k):
            for j in range(k):
                window = xp[:, i : i + (out_h - 1) * s + 1 : s, j : j + (out_w - 1) * s + 1 : s, :]
                term = window * kernel[i, j, 0]
                out = term if out is None else out + term
        return out
