"""Layers the backbones share."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'SAME': output ceil(size/stride), the odd pixel of padding at the end."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


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
