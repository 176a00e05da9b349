"""Patch scores → pixel anomaly maps (the same post-processing for every method)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxad.features import resize_bilinear


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> jax.Array:
    """1-D normalised Gaussian of radius int(truncate·σ + 0.5): 33 taps at σ=4, as the reference code."""
    radius = int(truncate * sigma + 0.5)
    x = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    k = jnp.exp(-0.5 * (x / sigma) ** 2)
    return k / jnp.sum(k)


def _pad_reflect(maps: jax.Array, axis: int, r: int) -> jax.Array:
    """Reflect padding (torch 'reflect'); edge padding for what a too-small map cannot reflect."""
    n = maps.shape[axis]
    reflect = min(r, n - 1)
    pad = [(0, 0)] * maps.ndim
    pad[axis] = (reflect, reflect)
    out = jnp.pad(maps, pad, mode="reflect")
    if r > reflect:
        pad[axis] = (r - reflect, r - reflect)
        out = jnp.pad(out, pad, mode="edge")
    return out


def gaussian_blur(maps: jax.Array, sigma: float) -> jax.Array:
    """Separable Gaussian blur of [B, H, W] maps with reflect padding; σ ≤ 0 is the identity."""
    if sigma <= 0:
        return maps
    k = gaussian_kernel(sigma)
    r = (k.shape[0] - 1) // 2
    x = _pad_reflect(_pad_reflect(maps.astype(jnp.float32), 1, r), 2, r)[..., None]
    dims = ("NHWC", "HWIO", "NHWC")
    x = jax.lax.conv_general_dilated(x, k.reshape(-1, 1, 1, 1), (1, 1), "VALID", dimension_numbers=dims)
    x = jax.lax.conv_general_dilated(x, k.reshape(1, -1, 1, 1), (1, 1), "VALID", dimension_numbers=dims)
    return x[..., 0]


def anomaly_maps(patch_scores: jax.Array, size: tuple[int, int], sigma: float = 4.0) -> jax.Array:
    """[B, h, w] patch scores → [B, H, W] pixel map: bilinear upsampling, then Gaussian blur."""
    up = resize_bilinear(patch_scores[..., None], size)[..., 0]
    return gaussian_blur(up, sigma)
