"""The windowed cosine search: each query location against an r×r window of reference maps.

At test time CPR compares each query location with an r×r window around the same location in each
of the K retrieved reference maps; its score is the smallest cosine distance found.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST


def normalise(f: jax.Array, eps: float = 1e-8) -> jax.Array:
    """f / (||f|| + eps) over the channel axis."""
    return f / (jnp.linalg.norm(f, axis=-1, keepdims=True) + eps)


def window_offsets(r: int) -> np.ndarray:
    """The r² (dy, dx) offsets of an r×r window centred on 0, row-major."""
    half = r // 2
    d = np.arange(r) - half
    return np.stack(np.meshgrid(d, d, indexing="ij"), -1).reshape(-1, 2)


def window_valid(h: int, w: int, r: int) -> np.ndarray:
    """bool [r², h, w]: whether location + offset lies inside the h×w grid."""
    off = window_offsets(r)
    y = np.arange(h)[None, :, None] + off[:, 0, None, None]
    x = np.arange(w)[None, None, :] + off[:, 1, None, None]
    return (y >= 0) & (y < h) & (x >= 0) & (x < w)


def windows(refs: jax.Array, r: int) -> jax.Array:
    """Reference maps [..., h, w, C] → the r² shifted copies [..., r², h, w, C] (zero padded):
    copy o at (y, x) holds refs[y + dy_o, x + dx_o]."""
    half = r // 2
    h, w = refs.shape[-3:-1]
    pad = [(0, 0)] * (refs.ndim - 3) + [(half, half), (half, half), (0, 0)]
    padded = jnp.pad(refs, pad)
    shifted = [padded[..., half + dy: half + dy + h, half + dx: half + dx + w, :] for dy, dx in window_offsets(r)]
    return jnp.stack(shifted, axis=-4)


def windowed_min_distance(query: jax.Array, bank: jax.Array, neighbours: jax.Array, r: int,
                          chunk: int = 1) -> jax.Array:
    """min over k and window offsets o of 1 − ⟨q(x), bank[neighbours_k](x + o)⟩.

    query [B, h, w, C] and bank [N, h, w, C] unit-length descriptors, neighbours [B, K] indices →
    [B, h, w]. Offsets outside the grid never count. References are processed ``chunk`` at a time
    (a sequential map keeps the [B, chunk, r², h, w, C] window stack the only large buffer); within
    a chunk the search is one contraction over (k, r², C) for all locations."""
    B, K = neighbours.shape
    chunk = max(1, min(chunk, K))
    n_chunks = -(-K // chunk)
    padded = jnp.concatenate([neighbours, jnp.repeat(neighbours[:, :1], n_chunks * chunk - K, 1)], 1)
    groups = padded.reshape(B, n_chunks, chunk).transpose(1, 0, 2)  # [n_chunks, B, chunk]
    valid = jnp.asarray(window_valid(query.shape[1], query.shape[2], r))

    def best(idx: jax.Array) -> jax.Array:
        win = windows(bank[idx], r)  # [B, chunk, r², h, w, C]
        sim = jnp.einsum("bhwc,bkohwc->bkohw", query, win, precision=HIGHEST)
        sim = jnp.where(valid, sim, -jnp.inf)
        return jnp.max(sim, axis=(1, 2))

    return 1.0 - jnp.max(jax.lax.map(best, groups), axis=0)
