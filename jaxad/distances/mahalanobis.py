"""Gaussians of patch features: streamed moments per position group, whitening, Mahalanobis maps.

PaDiM models the patch feature at every grid location as its own Gaussian (``position='location'``);
``position='global'`` is one Gaussian for all patches. The covariances of a full grid are too large
to build from stored features (WRN50: 64×64 locations × 550² ≈ 5 GB in float32), so the fit only
accumulates sums, about a per-group shift close to the mean (the first batch's mean): that keeps
the float32 sums of squares from cancelling catastrophically, and a shifted sum is still a plain
sum, so device shards add up with one psum. The fit ends with a whitening matrix W = L⁻¹ per group
(L the Cholesky factor of the covariance, W from a triangular solve, once), so scoring is one
batched contraction ‖W(x − μ)‖, no solve per query.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import scipy.linalg

from jaxad.distances import protocol
from jaxad.distances.protocol import Stats
from jaxad.errors import NumericsError
from jaxad.runtime import memory

FINALIZE_BYTES = 48  # float64 temporaries per covariance entry while a group is solved


def init(config: ml_collections.ConfigDict, sample: jax.Array) -> Stats:
    """Zero moments per group, about the sample's per-group mean."""
    grid = tuple(sample.shape[1:3])
    protocol.check_position(config, grid)
    groups = protocol.num_groups(config, grid)
    group = jnp.asarray(protocol.cell_groups(config, grid))
    d = sample.shape[-1]
    cells = jax.ops.segment_sum(jnp.ones(group.shape, jnp.float32), group, groups)
    count = jnp.maximum(sample.shape[0] * cells, 1.0)[:, None]
    shift = protocol.grouped_sum(sample.astype(jnp.float32), group, groups) / count
    sums = {"n": jnp.zeros((groups,), jnp.float32), "s1": jnp.zeros((groups, d), jnp.float32),
            "s2": jnp.zeros((groups, d, d), jnp.float32)}
    return Stats({"group": group, "shift": shift}, sums)


def update(stats: Stats, features: jax.Array, valid: jax.Array) -> Stats:
    """Add the valid images' count, Σ(x − shift) and Σ(x − shift)(x − shift)ᵀ to each group."""
    group, shift = stats.context["group"], stats.context["shift"]
    groups, (b, h, w, d) = shift.shape[0], features.shape
    v = valid.astype(jnp.float32)
    x = (features.astype(jnp.float32).reshape(b, h * w, d) - shift[group]) * v[:, None, None]
    x = x.reshape(b, h, w, d)
    cells = jax.ops.segment_sum(jnp.ones(group.shape, jnp.float32), group, groups)
    s = stats.sums
    return Stats(stats.context, {"n": s["n"] + jnp.sum(v) * cells,
                                 "s1": s["s1"] + protocol.grouped_sum(x, group, groups),
                                 "s2": s["s2"] + protocol.grouped_outer(x, groups)})


def gaussians(stats: Stats, reg: float) -> tuple[np.ndarray, np.ndarray]:
    """(mean [P, d], lower Cholesky factor [P, d, d]) of the unbiased covariance + ``reg``·I, float64.

    ``reg`` > 0 keeps every factor defined even with fewer images than channels (rank-deficient
    sample covariance), which is the usual case for small categories.
    """
    n = np.asarray(stats.sums["n"], np.float64)
    centred = np.asarray(stats.sums["s1"], np.float64) / n[:, None]
    s2 = np.asarray(stats.sums["s2"], np.float64)
    cov = (s2 - n[:, None, None] * centred[:, :, None] * centred[:, None, :]) / np.maximum(n - 1.0, 1.0)[:, None, None]
    cov = 0.5 * (cov + np.swapaxes(cov, 1, 2)) + reg * np.eye(cov.shape[-1])
    try:
        chol = np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        raise NumericsError(f"covariance not positive definite in some group; raise --config.reg (now {reg})") from None
    return np.asarray(stats.context["shift"], np.float64) + centred, chol


def inverse_factor(chol: np.ndarray) -> np.ndarray:
    """L⁻¹ of lower Cholesky factors [..., d, d] by a triangular solve: computed once at fit time,
    it makes every score a contraction (no solve, so no LAPACK call, at predict time)."""
    return scipy.linalg.solve_triangular(chol, np.broadcast_to(np.eye(chol.shape[-1]), chol.shape), lower=True)


def finalize(stats: Stats, config: ml_collections.ConfigDict, budget_bytes: int | None = None) -> dict:
    """Mean and whitening matrix Wᵀ = (L⁻¹)ᵀ per group, so a score is one contraction.

    Groups are solved in chunks whose float64 temporaries (covariance, factor, inverse: about
    :data:`FINALIZE_BYTES` per entry of a d×d matrix) fit in ``budget_bytes`` (default: a quarter
    of the memory available), so the peak is the sums and the float32 result, not several
    float64 copies of every group's covariance; chunks do not change the result."""
    groups, d = stats.sums["s1"].shape
    budget = memory.available().bytes // 4 if budget_bytes is None else budget_bytes
    step = memory.rows_per_chunk(FINALIZE_BYTES * d * d, budget)
    mean = np.empty((groups, d), np.float32)
    whiten_t = np.empty((groups, d, d), np.float32)
    for lo in range(0, groups, step):
        part = slice(lo, lo + step)
        chunk = Stats({"shift": stats.context["shift"][part]}, {k: v[part] for k, v in stats.sums.items()})
        m, chol = gaussians(chunk, config.reg)
        mean[part], whiten_t[part] = m, np.swapaxes(inverse_factor(chol), 1, 2)
    return {"group": stats.context["group"], "mean": jnp.asarray(mean), "whiten_t": jnp.asarray(whiten_t)}


def score(params: dict, features: jax.Array) -> jax.Array:
    """Mahalanobis distance ‖W(x − μ)‖ of every patch to its group's Gaussian → [B, h, w]."""
    b, h, w, d = features.shape
    x = features.astype(jnp.float32).reshape(b, h * w, d) - params["mean"][params["group"]]
    z = protocol.apply_per_cell(params["whiten_t"], params["group"], x.reshape(b, h, w, d))
    return jnp.sqrt(jnp.sum(jnp.square(z), axis=-1))


def stats_bytes(config: ml_collections.ConfigDict, d: int, grid: tuple[int, int]) -> int:
    return protocol.num_groups(config, grid) * d * d * 4


DISTANCE = protocol.Distance(init, update, finalize, score, stats_bytes)


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
