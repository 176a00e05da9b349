"""Collaborative representation distance (CRD), global or per position.

The paper's distance of a query patch y to the span of the training patches F (d×n), ridge weight λ:

    ρ* = argmin_ρ ||y − Fρ||² + λ||ρ||²,   D(y) = ||y − Fρ*||²
       = ||M y||²  (the paper's eq. 3.8),  M = λ (G + λI)^{-1},  G = F Fᵀ = Σ_i f_i f_iᵀ

(push-through identity, d×d). The minimised objective itself, ||y − Fρ*||² + λ||ρ*||², equals
yᵀ M y; the score is the residual ||M y||². So the fit is a streamed sum of outer products
(O(d²) memory for any n, one psum across devices) and scoring is one matmul.

Position (``config.position``): ``global`` is the paper (one G); ``blocks`` keeps one G per K×K
tile of the grid and ``location`` one per cell, for aligned objects whose normal appearance depends
on where a patch is. Every group's M comes from one batched eigendecomposition, and all candidate
λ share it: :func:`candidate_scores` scores ~10 λ in one compiled call.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxad.distances import protocol
from jaxad.distances.protocol import Stats

LamMode = Literal["absolute", "trace", "per_patch"]
LAM_MODES: tuple[str, ...] = ("absolute", "trace", "per_patch")

_HIGHEST = jax.lax.Precision.HIGHEST


# ---- the closed form on one Gram matrix ---------------------------------------------------------


def gram(features: jax.Array) -> jax.Array:
    """Σ f fᵀ over all leading axes of ``features[..., d]``, in float32."""
    f = features.reshape(-1, features.shape[-1]).astype(jnp.float32)
    return jnp.matmul(f.T, f, precision=_HIGHEST)


def effective_lambda(G: jax.Array, n: jax.Array | int, lam: float, mode: LamMode = "absolute") -> jax.Array:
    """The λ that enters M for a Gram matrix G (..., d, d) of n patches.

    ``absolute`` is the paper's λ on G = Σ f fᵀ; it regularises less as the training set grows.
    ``trace`` scales λ by the mean eigenvalue trace(G)/d and ``per_patch`` by n (i.e. λ applied to
    G/n): both make the same λ mean the same thing for any number of patches and any feature scale.
    """
    if mode == "absolute":
        return jnp.broadcast_to(jnp.asarray(lam, jnp.float32), jnp.shape(n))
    if mode == "trace":
        return lam * jnp.trace(G, axis1=-2, axis2=-1) / G.shape[-1]
    if mode == "per_patch":
        return lam * jnp.asarray(n, jnp.float32)
    raise ValueError(f"lam_mode must be one of {LAM_MODES}, got {mode!r}")


def spectrum(G: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (clipped at 0) and eigenvectors of symmetric G [..., d, d], in float64 on the host.

    Raw-feature Gram matrices span many orders of magnitude (largest eigenvalue 1e8 and more
    against λ = 5); a float32 eigensolver would smear that error over the small eigenvalues that
    decide which directions count as anomalous. Batched: one call for every group.
    """
    G64 = np.asarray(G, dtype=np.float64)
    w, V = np.linalg.eigh(0.5 * (G64 + np.swapaxes(G64, -1, -2)))
    return np.maximum(w, 0.0), V


def matrix(G: jax.Array | np.ndarray, lam: float | jax.Array | np.ndarray) -> jax.Array:
    """M = λ (G + λI)^{-1} = V diag(λ / (w + λ)) Vᵀ for G [..., d, d] and λ [...] (float32).

    Never inverts G; M is symmetric with eigenvalues in (0, 1].
    """
    w, V = spectrum(G)
    lam = np.asarray(lam, np.float64)[..., None]
    M = (V * (lam / (w + lam))[..., None, :]) @ np.swapaxes(V, -1, -2)
    return jnp.asarray(0.5 * (M + np.swapaxes(M, -1, -2)), dtype=jnp.float32)


def score(M: jax.Array, features: jax.Array) -> jax.Array:
    """||M f||² over the last axis, for any leading shape, as one matmul."""
    projected = jnp.einsum("...d,de->...e", features.astype(M.dtype), M, precision=_HIGHEST)
    return jnp.sum(jnp.square(projected), axis=-1)


# ---- the streaming protocol ---------------------------------------------------------------------


def feature_map(context: dict, f: jax.Array) -> jax.Array:
    """The vectors CRD sees: the features, or random Fourier features when ``context`` holds a map."""
    f = f.astype(jnp.float32)
    if "rff_w" not in context:
        return f
    z = jnp.einsum("...d,de->...e", f, context["rff_w"], precision=_HIGHEST) + context["rff_b"]
    return jnp.sqrt(2.0 / context["rff_w"].shape[1]) * jnp.cos(z)


def init_with(context: dict, config: ml_collections.ConfigDict, sample: jax.Array, dim: int) -> Stats:
    """Zero Grams of dimension ``dim`` for every position group of the sample's grid."""
    grid = tuple(sample.shape[1:3])
    protocol.check_position(config, grid)
    groups = protocol.num_groups(config, grid)
    context = {**context, "group": jnp.asarray(protocol.cell_groups(config, grid))}
    sums = {"G": jnp.zeros((groups, dim, dim), jnp.float32), "n": jnp.zeros((groups,), jnp.float32)}
    return Stats(context, sums)


def init(config: ml_collections.ConfigDict, sample: jax.Array) -> Stats:
    return init_with({}, config, sample, sample.shape[-1])


def update(stats: Stats, features: jax.Array, valid: jax.Array) -> Stats:
    """Add Σ f fᵀ of the valid images' patches to each position group's Gram."""
    groups = stats.sums["G"].shape[0]
    x = feature_map(stats.context, features) * valid.astype(jnp.float32)[:, None, None, None]
    cells = jax.ops.segment_sum(jnp.ones_like(stats.context["group"], jnp.float32), stats.context["group"], groups)
    return Stats(stats.context, {"G": stats.sums["G"] + protocol.grouped_outer(x, groups),
                                 "n": stats.sums["n"] + jnp.sum(valid.astype(jnp.float32)) * cells})


def group_lambda(stats: Stats, lam: float, mode: LamMode) -> np.ndarray:
    """The effective λ of every group [P] (float64)."""
    return np.asarray(effective_lambda(jnp.asarray(stats.sums["G"], jnp.float32), stats.sums["n"], lam, mode), np.float64)


def finalize(stats: Stats, config: ml_collections.ConfigDict) -> dict:
    """M per group [P, d, d] for the numeric ``config.lam`` in ``config.lam_mode``."""
    lam = group_lambda(stats, float(config.lam), config.lam_mode)
    return {**stats.context, "M": matrix(stats.sums["G"], lam)}


def score_params(params: dict, features: jax.Array) -> jax.Array:
    """||M_g y||² for every patch with its cell's group g → [B, h, w]."""
    x = feature_map(params, features)
    return jnp.sum(jnp.square(protocol.apply_per_cell(params["M"], params["group"], x)), axis=-1)


def stats_bytes(config: ml_collections.ConfigDict, d: int, grid: tuple[int, int]) -> int:
    return protocol.num_groups(config, grid) * d * d * 4


DISTANCE = protocol.Distance(init, update, finalize, score_params, stats_bytes)


# ---- many λ at once -----------------------------------------------------------------------------


def candidate_scores(context: dict, w: jax.Array, V: jax.Array, lams: jax.Array, features: jax.Array) -> jax.Array:
    """Patch scores for K candidate λ from one eigendecomposition → [K, B, h, w].

    ``w`` [P, d], ``V`` [P, d, d] are the groups' spectra, ``lams`` [K, P] the effective λ. With
    z = Vᵀy, ||M y||² = Σ_j (λ / (w_j + λ))² z_j²: one projection serves every λ, each extra
    candidate is one more small contraction.
    """
    x = feature_map(context, features)
    b, h, wd, _ = x.shape
    z2 = jnp.square(protocol.apply_per_cell(V, context["group"], x)).reshape(b, h * wd, -1)
    cell_w = w[context["group"]]  # [L, d]
    cell_lam = lams[:, context["group"]]  # [K, L]
    coef = jnp.square(cell_lam[..., None] / (cell_w[None] + cell_lam[..., None]))  # [K, L, d]
    return jnp.einsum("bld,kld->kbl", z2, coef, precision=_HIGHEST).reshape(-1, b, h, wd)
