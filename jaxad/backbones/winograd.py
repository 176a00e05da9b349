"""3×3 convolutions as Winograd F(4×4, 3×3): 36 matrix products in place of 144 per 4×4 output tile.

Each 6×6 input tile d (stride 4) and 3×3 kernel g become Bᵀ d B and G g Gᵀ; their elementwise
product, summed over input channels, is one [tiles, C] × [C, O] matmul for each of the 36 positions
in a tile, and Aᵀ m A turns it back into the 4×4 outputs (Lavin & Gray, "Fast Algorithms for
Convolutional Neural Networks", 2016). The multiply count falls 4×; the transforms are additions
and small integer scalings.

XLA:CPU runs a convolution as Eigen's direct kernel, which is far below its matmul rate on the small,
wide maps of a ResNet's stages; there the 36 matmuls win. On large maps the tile tensor (2.25× the
input) leaves the cache and the direct kernel wins, so :func:`worthwhile` draws the line by the size
of a call's input. F(4×4, 3×3) beat F(2×2, 3×3) (4× the input in tiles, 2.25× fewer multiplies) at
every layer shape timed, on 2 cores. The kernel transform is done once, when a backbone is built
(:func:`transformed_kernels`), not in every forward. The transforms' larger entries (up to 8 in A,
1/24 in G) cost some rounding; in float32 the backbones' taps stay within the ports' 1e-4 parity
bound against torchvision (tests/test_backbones_*.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxad.runtime import compilation

MAX_INPUT = 2**20  # input elements (N·H·W·C) of a call above which XLA's convolution is faster on CPU:
# the tile tensor, 2.25× the input, then passes 9 MiB and leaves the cache (timed layer by layer on
# 2 cores for 64-512 channels: faster up to 2^20, slower above)
COLLECTION = "winograd"  # the variable collection holding the transformed kernels

_BT = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
       (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1))
_G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
      (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))
_AT = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))


def kernel_transform(kernel: jax.Array) -> jax.Array:
    """G g Gᵀ of every (input, output) channel pair: HWIO [3, 3, C, O] → [6, 6, C, O]."""
    g = jnp.asarray(_G, kernel.dtype)
    return jnp.einsum("ai,ijco,bj->abco", g, kernel, g, precision=jax.lax.Precision.HIGHEST)


def _combine(matrix: Sequence[Sequence[int]], terms: Sequence[jax.Array]) -> list[jax.Array]:
    """``matrix`` applied to a list of arrays: each row's weighted sum of ``terms``, zeros skipped
    and ±1 taken without a multiply, for XLA to fuse into one pass."""
    rows = []
    for row in matrix:
        parts = [t if w == 1 else -t if w == -1 else w * t for w, t in zip(row, terms) if w != 0]
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        rows.append(total)
    return rows


def conv3x3(x: jax.Array, transformed: jax.Array) -> jax.Array:
    """Stride-1 3×3 convolution with zero padding 1 of NHWC ``x``, given ``kernel_transform(kernel)``.

    Heights and widths are padded to whole 4×4 tiles and the output cropped back."""
    n, h, w, c = x.shape
    o = transformed.shape[-1]
    th, tw = -(-h // 4), -(-w // 4)
    xp = jnp.pad(x, ((0, 0), (1, 1 + 4 * th - h), (1, 1 + 4 * tw - w), (0, 0)))
    rows = _combine(_BT, [xp[:, i:i + 4 * th:4] for i in range(6)])
    tiles = jnp.stack([t for r in rows for t in _combine(_BT, [r[:, :, j:j + 4 * tw:4] for j in range(6)])])
    m = jnp.einsum("kpc,kco->kpo", tiles.reshape(36, n * th * tw, c), transformed.reshape(36, c, o))
    m = m.reshape(6, 6, n, th, tw, o)
    y = [_combine(_AT, list(r)) for r in _combine(_AT, list(m))]  # y[p][q]: output pixel (4i + p, 4j + q)
    out = jnp.stack([jnp.stack(row, axis=3) for row in y], axis=2)  # [n, th, 4, tw, 4, o]
    return out.reshape(n, 4 * th, 4 * tw, o)[:, :h, :w]


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
            out[name] = compilation.jit(kernel_transform)(value)
    return out
