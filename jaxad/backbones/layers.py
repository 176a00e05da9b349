"""Layers the backbones share."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxad.backbones import winograd

MAX_SHIFTED_TAPS = 27  # k²·C_in up to which XLA:CPU runs a dense convolution faster as shifted
# multiply-adds (a 3×3 stem over RGB: faster at batch 1 and 16; a 7×7 one over RGB, 147 taps, is not)


def shifted_sum_pays(taps: int, depthwise: bool = False) -> bool:
    """Whether a convolution with ``taps`` inputs per output value (k²·C_in; k² for a depthwise one)
    runs faster as :func:`_shifted_sum` than as XLA's convolution. On CPU: every depthwise one (XLA:CPU
    runs one group per channel an order of magnitude slower) and dense ones up to
    ``MAX_SHIFTED_TAPS``. Elsewhere never: GPU/TPU convolutions map to the vendors' kernels."""
    return jax.default_backend() == "cpu" and (depthwise or taps <= MAX_SHIFTED_TAPS)


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'SAME': output ceil(size/stride), the odd pixel of padding at the end."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pads(x: jax.Array, k: int, s: int, symmetric: bool) -> list[tuple[int, int]]:
    """Height and width padding: torch's symmetric k//2, or TF 'SAME'."""
    if symmetric:
        return [(k // 2, k // 2)] * 2
    return [_same_padding(x.shape[1], k, s), _same_padding(x.shape[2], k, s)]


def _windows(x: jax.Array, pads: list[tuple[int, int]], k: int, s: int):
    """Yields ``(i, j, window)`` for every kernel offset: the padded input's pixels that offset
    (i, j) of a k×k, stride-s kernel meets, one per output pixel."""
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    out_h, out_w = ((x.shape[a] + sum(pads[a - 1]) - k) // s + 1 for a in (1, 2))
    for i in range(k):
        for j in range(k):
            yield i, j, xp[:, i : i + (out_h - 1) * s + 1 : s, j : j + (out_w - 1) * s + 1 : s, :]


def _shifted_sum(x: jax.Array, kernel: jax.Array, pads: list[tuple[int, int]], s: int) -> jax.Array:
    """A convolution with kernel [k, k, C, O] as k²·C shifted, broadcast multiply-adds, which XLA
    fuses into one loop over the output. C = 1 covers depthwise kernels [k, k, 1, channels] too.
    Sums in float32 whatever ``x``'s dtype (as a convolution accumulates), returns ``x``'s dtype."""
    k, _, c, _ = kernel.shape
    kernel = kernel.astype(jnp.float32)
    terms = ((window if c == 1 else window[..., m : m + 1]).astype(jnp.float32) * kernel[i, j, m]
             for i, j, window in _windows(x, pads, k, s) for m in range(c))
    out = next(terms)
    for term in terms:
        out = out + term
    return out.astype(x.dtype)


class FrozenConv(nn.Module):
    """A frozen backbone's k×k convolution; kernel [k, k, C, O] and optional bias like nn.Conv (same
    parameter paths, shapes and initialisers). Padding: torch's symmetric k//2, or TF 'SAME'
    (``symmetric=False``, the TF-trained EfficientNet-Lite weights).

    Inference only, so it may take the fastest path per shape: a 1×1 one is a matmul over channels
    (of every s-th pixel); a stride-1 3×3 one runs as Winograd F(4×4, 3×3) when the variables carry
    its transformed kernel (the ``winograd`` collection, added on CPU when a backbone is built), the
    input is small enough for that to pay (:func:`winograd.worthwhile`) and it computes in float32
    (in bfloat16 the transforms would add rounding a direct convolution, as an accelerator runs it,
    does not have); on CPU one with at
    most ``MAX_SHIFTED_TAPS`` input taps (k²·C_in: a 3×3 stem over RGB) as shifted multiply-adds;
    any other as XLA's convolution.
    """

    features: int
    kernel_size: int
    stride: int = 1
    dtype: Any = jnp.float32
    use_bias: bool = False
    symmetric: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, gate: jax.Array | None = None) -> jax.Array:
        """Returns ``conv(x * gate[:, None, None, :])``; ``gate`` ([N, C], optional): per-image factors
        of the input channels, as a squeeze-excite block's. One image through a 1×1 kernel folds the
        gate into the kernel's rows, saving a pass over the map; for several images the per-image
        kernels would make a batched matmul, slower on CPU than scaling the map."""
        x = x.astype(self.dtype)
        gate = None if gate is None else gate.astype(self.dtype)
        if gate is not None and not (x.shape[0] == 1 and self.kernel_size == 1):
            x, gate = x * gate[:, None, None, :], None
        y = self._convolve(x, gate)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
        return y

    def _convolve(self, x: jax.Array, gate: jax.Array | None) -> jax.Array:
        k, s = self.kernel_size, self.stride
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features), jnp.float32)
        if k == 1:  # a matmul over channels (no padding either way), faster on XLA:CPU than a convolution
            rows = kernel[0, 0].astype(self.dtype)
            if gate is not None:
                return jnp.einsum("nhwc,nc,co->nhwo", x[:, ::s, ::s], gate, rows)
            return jnp.einsum("nhwc,co->nhwo", x[:, ::s, ::s], rows)
        if ((k, s) == (3, 1) and self.dtype == jnp.float32 and self.has_variable(winograd.COLLECTION, "kernel")
                and winograd.worthwhile(x.shape)):
            return winograd.conv3x3(x, self.get_variable(winograd.COLLECTION, "kernel"))
        pads = _pads(x, k, s, self.symmetric)
        if shifted_sum_pays(k * k * x.shape[-1]):
            return _shifted_sum(x, kernel.astype(self.dtype), pads, s)
        return jax.lax.conv_general_dilated(x, kernel.astype(self.dtype), (s, s), pads,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))


class DepthwiseConv(nn.Module):
    """k×k depthwise convolution (no bias); kernel [k, k, 1, C] like nn.Conv.

    Padding: TF 'SAME' (the TF-trained EfficientNet-Lite weights), or torch's symmetric k//2
    (``symmetric=True``, torchvision's EfficientNet).

    ``impl="auto"`` picks by :func:`shifted_sum_pays`: k² shifted multiply-adds, which XLA fuses into
    one loop, on CPU; the grouped convolution (the vendors' kernels) on GPU/TPU.
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
        pads = _pads(x, k, s, self.symmetric)
        impl = self.impl if self.impl != "auto" else ("shift" if shifted_sum_pays(k * k, depthwise=True) else "grouped")
        if impl == "grouped":
            return jax.lax.conv_general_dilated(
                x, kernel, (s, s), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels
            )
        return _shifted_sum(x, kernel, pads, s)
