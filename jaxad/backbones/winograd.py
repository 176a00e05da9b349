"""3×3 convolutions as Winograd F(2×2, 3×3): 16 matrix products in place of 36 per 2×2 output tile.

Each 4×4 input tile d (stride 2) and 3×3 kernel g become Bᵀ d B and G g Gᵀ; their elementwise
product, summed over input channels, is one [tiles, C] × [C, O] matmul for each of the 16 positions in a tile,
and Aᵀ m A turns it back into the 2×2 outputs (Lavin & Gray, "Fast Algorithms for Convolutional
Neural Networks", 2016). The multiply count falls 2.25×; the transforms are additions.

XLA:CPU runs a convolution as Eigen's direct kernel, which is far below its matmul rate on the small,
wide maps of a ResNet's deeper stages; there the 16 matmuls win. On large maps the tile tensor
(4× the input) leaves the cache and the direct kernel wins, so :func:`worthwhile` draws the line by
the size of a call's input. The kernel transform is done once, when a backbone is built
(:func:`transformed_kernels`), not in every forward. The float32 error stays at the 1e-6 level of
a direct convolution's rounding (F(2×2, 3×3)'s transforms have entries 0, ±1, ±½).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

MAX_INPUT = 2**19  # input elements (N·H·W·C) of a call above which XLA's convolution is faster on CPU:
# the tile tensor, 4× the input, then passes 8 MiB and leaves the cache (timed layer by layer on
# 2 cores: faster below it for 64-512 channels, several times slower well above it)
COLLECTION = "winograd"  # the variable collection holding the transformed kernels

_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def kernel_transform(kernel: jax.Array) -> jax.Array:
    """G g Gᵀ of every (input, output) channel pair: HWIO [3, 3, C, O] → [4, 4, C, O]."""
    g = jnp.asarray(_G, kernel.dtype)
    return jnp.einsum("ai,ijco,bj->abco", g, kernel, g, precision=jax.lax.Precision.HIGHEST)


def _bt(t: list[jax.Array]) -> list[jax.Array]:
    """Bᵀ applied along the list of four tile rows (or columns)."""
    return [t[0] - t[2], t[1] + t[2], t[2] - t[1], t[1] - t[3]]


def _at(t: jax.Array) -> list[jax.Array]:
    """Aᵀ applied along the leading axis of four."""
    return [t[0] + t[1] + t[2], t[1] - t[2] - t[3]]


def conv3x3(x: jax.Array, transformed: jax.Array) -> jax.Array:
    """Stride-1 3×3 convolution with zero padding 1 of NHWC ``x``, given ``kernel_transform(kernel)``.

    Odd heights and widths are padded to whole tiles and the output cropped back."""
    n, h, w, c = x.shape
    o = transformed.shape[-1]
    th, tw = -(-h // 2), -(-w // 2)
    xp = jnp.pad(x, ((0, 0), (1, 1 + 2 * th - h), (1, 1 + 2 * tw - w), (0, 0)))
    rows = _bt([xp[:, i:i + 2 * th:2] for i in range(4)])
    tiles = jnp.stack([t for r in rows for t in _bt([r[:, :, j:j + 2 * tw:2] for j in range(4)])])
    m = jnp.einsum("kpc,kco->kpo", tiles.reshape(16, n * th * tw, c), transformed.reshape(16, c, o))
    y = [_at(r) for r in _at(m.reshape(4, 4, n, th, tw, o))]  # y[p][q]: output pixel (2i + p, 2j + q)
    out = jnp.stack([jnp.stack(row, axis=3) for row in y], axis=2)  # [n, th, 2, tw, 2, o]
    return out.reshape(n, 2 * th, 2 * tw, o)[:, :h, :w]


def worthwhile(shape: tuple[int, ...]) -> bool:
    """Whether an NHWC input of ``shape`` runs faster through :func:`conv3x3` than through XLA's
    convolution: on CPU, and only while the call's tile tensor stays small enough for the cache."""
    return jax.default_backend() == "cpu" and math.prod(shape) <= MAX_INPUT


def transformed_kernels(params: Mapping[str, Any]) -> dict[str, Any]:
    """The ``winograd`` collection for ``params``: each 3×3 convolution kernel with more than one
    input channel (depthwise kernels have one), transformed, at the same path as its ``kernel``."""
    out: dict[str, Any] = {}
    for name, value in params.items():
        if isinstance(value, Mapping):
            sub = transformed_kernels(value)
            if sub:
                out[name] = sub
        elif name == "kernel" and value.ndim == 4 and value.shape[:2] == (3, 3) and value.shape[2] > 1:
            out[name] = jax.jit(kernel_transform)(value)
    return out
