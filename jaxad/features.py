"""From backbone feature maps to one patch-feature map per image.

The pipeline shared by the patch-distance methods: an optional k×k local average per tap (each
location then describes its neighbourhood, PatchCore-style), coarser taps resized to the finest
tap's grid, channels concatenated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp


def local_average(x: jax.Array, size: int, count_padding: bool = True) -> jax.Array:
    """k×k mean over a stride-1 window with zero padding. ``count_padding``: the padding counts
    (torch ``AvgPool2d(k, 1, k//2)``); else a border location averages only its in-image
    neighbours, so its scale matches the interior's."""
    if size <= 1:
        return x
    pad = size // 2
    window, strides, padding = (1, size, size, 1), (1, 1, 1, 1), ((0, 0), (pad, pad), (pad, pad), (0, 0))
    summed = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, padding)
    if count_padding:
        return summed / (size * size)
    ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
    return summed / jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, strides, padding)


def resize_bilinear(x: jax.Array, hw: tuple[int, int]) -> jax.Array:
    """Bilinear resize of NHWC maps with half-pixel centres and no antialiasing (torch's
    ``interpolate(mode='bilinear', align_corners=False)``)."""
    if x.shape[1:3] == tuple(hw):
        return x
    shape = (x.shape[0], hw[0], hw[1], *x.shape[3:])
    return jax.image.resize(x, shape, method="bilinear", antialias=False)


def resize_nearest(x: jax.Array, hw: tuple[int, int]) -> jax.Array:
    """Nearest-neighbour resize of NHWC maps, source index ⌊i·in/out⌋ (torch's ``mode='nearest'``)."""
    if x.shape[1:3] == tuple(hw):
        return x
    rows = (jnp.arange(hw[0]) * x.shape[1]) // hw[0]
    cols = (jnp.arange(hw[1]) * x.shape[2]) // hw[1]
    return x[:, rows][:, :, cols]


def embed(feature_maps: Mapping[str, jax.Array], taps: Sequence[str], aggregate: int = 3) -> jax.Array:
    """Concatenate ``taps`` (in order) on the grid of the finest one → [B, h, w, Σ channels]."""
    maps = [local_average(feature_maps[t].astype(jnp.float32), aggregate) for t in taps]
    grid = max((m.shape[1:3] for m in maps), key=lambda hw: hw[0] * hw[1])
    return jnp.concatenate([resize_bilinear(m, grid) for m in maps], axis=-1)
