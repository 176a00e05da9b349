"""Per-location Gaussians: streamed moments, a Cholesky factor per location, Mahalanobis maps.

PaDiM models the patch feature at every grid location as its own Gaussian. The covariances of a
full grid are too large to build from stored features (WRN50: 64×64 locations × 550² ≈ 5 GB in
float32), so the fit only accumulates sums. Sums are taken about a per-location shift close to
the mean (the first batch's mean): that keeps the float32 sums of squares from cancelling
catastrophically, and a shifted sum is still a plain sum, so device shards add up with one psum.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import solve_triangular


class Moments(NamedTuple):
    """Sums about ``shift`` at each of L locations: count n, Σ(x−shift) [L, d], Σ(x−shift)(x−shift)ᵀ [L, d, d]."""

    n: jax.Array
    s1: jax.Array
    s2: jax.Array


def masked_mean(f: jax.Array, valid: jax.Array) -> jax.Array:
    """Per-location mean over the valid images of a batch: [B, h, w, d] → [h·w, d]."""
    w = valid.astype(f.dtype)[:, None, None, None]
    return (jnp.sum(f * w, axis=0) / jnp.maximum(jnp.sum(w), 1.0)).reshape(-1, f.shape[-1])


def moments(f: jax.Array, valid: jax.Array, shift: jax.Array) -> Moments:
    """The sums one batch adds: f [B, h, w, d], valid [B] (padded rows add nothing), shift [h·w, d]."""
    x = (f.reshape(f.shape[0], -1, f.shape[-1]) - shift) * valid.astype(f.dtype)[:, None, None]
    s2 = jnp.einsum("bld,ble->lde", x, x, precision=jax.lax.Precision.HIGHEST)
    return Moments(jnp.sum(valid).astype(jnp.float32), jnp.sum(x, axis=0), s2)


def add(a: Moments, b: Moments) -> Moments:
    return Moments(*(x + y for x, y in zip(a, b)))


def gaussians(m: Moments, shift: jax.Array, reg: float) -> tuple[jax.Array, jax.Array]:
    """(mean [L, d], lower Cholesky factor [L, d, d]) of the unbiased covariance + ``reg``·I.

    ``reg`` > 0 keeps every factor defined even with fewer images than channels (rank-deficient
    sample covariance), which is the usual case for small categories.
    """
    n = m.n
    centred = m.s1 / n
    cov = (m.s2 - n * centred[:, :, None] * centred[:, None, :]) / jnp.maximum(n - 1.0, 1.0)
    cov = 0.5 * (cov + jnp.swapaxes(cov, 1, 2)) + reg * jnp.eye(cov.shape[-1], dtype=cov.dtype)
    return shift + centred, jnp.linalg.cholesky(cov)


def distance(f: jax.Array, mean: jax.Array, chol: jax.Array) -> jax.Array:
    """Mahalanobis distance of f [B, h, w, d] to the Gaussian of its location → [B, h, w].

    ‖L⁻¹(x − μ)‖ by one batched triangular solve per location (no explicit inverse).
    """
    b, h, w, d = f.shape
    diff = jnp.transpose(f.reshape(b, h * w, d) - mean, (1, 2, 0))  # [L, d, B]
    z = solve_triangular(chol, diff, lower=True)
    return jnp.sqrt(jnp.sum(z * z, axis=1)).T.reshape(b, h, w)


def ledoit_wolf(xc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ledoit-Wolf shrinkage (sklearn's estimator) of centred samples xc [n, L, d], per location:
    (a [L], b [L]) with Σ = a·XcᵀXc + b·I, i.e. Σ = (1−ρ)S + ρμI for S = XcᵀXc/n, μ = tr S/d.

    ρ = min(β, δ)/δ with δ = ‖S − μI‖²_F/d and β = (Σₖ‖xₖ‖⁴/n − ‖S‖²_F)/(n·d); every term comes
    from the n×n Gram matrix, never from a d×d one, so it stays cheap when d ≫ n.
    """
    xc = np.asarray(xc, np.float64)
    n, _, d = xc.shape
    gram = np.einsum("nld,mld->lnm", xc, xc)
    mu = np.trace(gram, axis1=1, axis2=2) / (n * d)
    fro2 = np.sum(gram * gram, axis=(1, 2)) / n**2
    fourth = np.sum(np.sum(xc * xc, axis=2) ** 2, axis=0)
    delta = (fro2 - d * mu * mu) / d
    beta = np.minimum((fourth / n - fro2) / (n * d), delta)
    rho = np.where(delta > 0, beta / np.where(delta > 0, delta, 1.0), 0.0)
    return (1.0 - rho) / n, rho * mu
