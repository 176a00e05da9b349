"""Patch scores → pixel anomaly maps (the same post-processing for every method).

Bilinear upsampling and a reflect-padded Gaussian blur are both linear and separable, so the pair
is one (H×h) matrix for the rows and one (W×w) matrix for the columns: a map costs two small
matmuls, which every backend runs at full speed, instead of a single-channel convolution that
XLA:CPU runs slowly. The matrices depend only on static shapes and σ and are built once.
"""

from __future__ import annotations

from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """1-D normalised Gaussian of radius int(truncate·σ + 0.5): 33 taps at σ=4, as the reference code."""
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


@lru_cache(maxsize=64)
def blur_matrix(n: int, sigma: float) -> np.ndarray:
    """(n×n) matrix of a 1-D Gaussian blur with torch 'reflect' padding (edge beyond one reflection)."""
    if sigma <= 0:
        return np.eye(n)
    k = gaussian_kernel(sigma)
    r = (len(k) - 1) // 2
    src = np.arange(n)[:, None] + np.arange(-r, r + 1)[None, :]
    src = np.where(src < 0, -src, src)
    src = np.where(src > n - 1, 2 * (n - 1) - src, src)
    src = np.clip(src, 0, n - 1)
    out = np.zeros((n, n))
    np.add.at(out, (np.repeat(np.arange(n), len(k)), src.ravel()), np.tile(k, n))
    return out


@lru_cache(maxsize=64)
def resize_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out×n_in) bilinear resampling, half-pixel centres, no antialiasing (torch align_corners=False)."""
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    w = src - lo
    out = np.zeros((n_out, n_in))
    np.add.at(out, (np.arange(n_out), lo), 1 - w)
    np.add.at(out, (np.arange(n_out), hi), w)
    return out


def _separable(maps: jax.Array, rows: np.ndarray, cols: np.ndarray) -> jax.Array:
    rows, cols = jnp.asarray(rows, jnp.float32), jnp.asarray(cols, jnp.float32)
    return jnp.einsum("Hh,bhw,Ww->bHW", rows, maps.astype(jnp.float32), cols, precision=jax.lax.Precision.HIGHEST)


def gaussian_blur(maps: jax.Array, sigma: float) -> jax.Array:
    """Separable Gaussian blur of [B, H, W] maps with reflect padding; σ ≤ 0 is the identity."""
    if sigma <= 0:
        return maps
    return _separable(maps, blur_matrix(maps.shape[1], sigma), blur_matrix(maps.shape[2], sigma))


def anomaly_maps(patch_scores: jax.Array, size: tuple[int, int], sigma: float = 4.0) -> jax.Array:
    """[B, h, w] patch scores → [B, H, W] pixel map: bilinear upsampling, then Gaussian blur."""
    (H, W), (h, w) = size, patch_scores.shape[1:3]
    rows = blur_matrix(H, sigma) @ resize_matrix(H, h)
    cols = blur_matrix(W, sigma) @ resize_matrix(W, w)
    return _separable(patch_scores, rows, cols)
