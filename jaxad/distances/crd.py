"""Collaborative representation distance (CRD).

The distance of a query patch y to the span of the training patches F (d×n), with ridge weight λ,

    D(y) = min_ρ ||y − Fρ||² + λ||ρ||²  evaluated at the minimiser,  = ||M y||²,
    M = λ (G + λI)^{-1},  G = F Fᵀ = Σ_i f_i f_iᵀ   (push-through identity, d×d).

So fitting is a streaming sum of outer products (O(d²) memory for any n, a psum across
devices), and scoring is one matmul for every patch of every image.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

LamMode = Literal["absolute", "trace", "per_patch"]
LAM_MODES: tuple[str, ...] = ("absolute", "trace", "per_patch")

_HIGHEST = jax.lax.Precision.HIGHEST


def gram(features: jax.Array) -> jax.Array:
    """Σ f fᵀ over all leading axes of ``features[..., d]``, in float32."""
    f = features.reshape(-1, features.shape[-1]).astype(jnp.float32)
    return jnp.matmul(f.T, f, precision=_HIGHEST)


def effective_lambda(G: jax.Array, n: jax.Array | int, lam: float, mode: LamMode = "absolute") -> jax.Array:
    """The λ that enters M.

    ``absolute`` is the paper's λ on G = Σ f fᵀ; it regularises less as the training set grows.
    ``trace`` scales λ by the mean eigenvalue trace(G)/d and ``per_patch`` by n (i.e. λ applied to
    G/n): both make the same λ mean the same thing for any number of patches and any feature scale.
    """
    if mode == "absolute":
        return jnp.asarray(lam, jnp.float32)
    if mode == "trace":
        return lam * jnp.trace(G) / G.shape[0]
    if mode == "per_patch":
        return lam * jnp.asarray(n, jnp.float32)
    raise ValueError(f"lam_mode must be one of {LAM_MODES}, got {mode!r}")


def matrix(G: jax.Array | np.ndarray, lam: float | jax.Array) -> jax.Array:
    """M = λ (G + λI)^{-1} through the eigendecomposition of the symmetric G, in float64 on the host.

    G is positive semi-definite, so M = V diag(λ / (w + λ)) Vᵀ with the eigenvalues w clipped at 0
    (rounding can push tiny ones negative). This never inverts G and yields a symmetric M with
    eigenvalues in (0, 1]. The solve is done once per fit on a d×d matrix, so it runs in float64:
    raw-feature Gram matrices span many orders of magnitude (largest eigenvalue 1e8 and more against
    λ = 5), and a float32 eigensolver would smear that error over the small eigenvalues that decide
    which directions count as anomalous.
    """
    G64 = np.asarray(G, dtype=np.float64)
    G64 = 0.5 * (G64 + G64.T)
    w, V = np.linalg.eigh(G64)
    lam = float(lam)
    M = (V * (lam / (np.maximum(w, 0.0) + lam))) @ V.T
    return jnp.asarray(0.5 * (M + M.T), dtype=jnp.float32)


def score(M: jax.Array, features: jax.Array) -> jax.Array:
    """||M f||² over the last axis, for any leading shape, as one matmul."""
    projected = jnp.einsum("...d,de->...e", features.astype(M.dtype), M, precision=_HIGHEST)
    return jnp.sum(jnp.square(projected), axis=-1)
