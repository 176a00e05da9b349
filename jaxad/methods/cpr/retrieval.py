"""Global retrieval branch: which training images look most like a query, judged block by block.

Every stride-4 feature vector is assigned to one of a few k-means centres (visual words); the
feature grid is cut into S×S blocks and each block becomes a normalised word histogram. Two images
are compared block-wise by KL divergence, and the τ largest block divergences are dropped, so a
defect (or any local change) in a few blocks does not push a good neighbour away.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxad.runtime import compilation

HIGHEST = jax.lax.Precision.HIGHEST


def squared_distances(x: jax.Array, centres: jax.Array) -> jax.Array:
    """||x − c||² for x [..., d] and centres [k, d] → [..., k] (expanded form, clipped at 0)."""
    cross = jnp.einsum("...d,kd->...k", x, centres, precision=HIGHEST)
    d2 = jnp.sum(x * x, -1, keepdims=True) - 2.0 * cross + jnp.sum(centres * centres, -1)
    return jnp.maximum(d2, 0.0)


def assign(x: jax.Array, centres: jax.Array) -> jax.Array:
    """Index of the nearest centre for every vector of x [..., d] → int32 [...]."""
    return jnp.argmin(squared_distances(x, centres), axis=-1).astype(jnp.int32)


def lloyd_step(x: jax.Array, centres: jax.Array) -> jax.Array:
    """One Lloyd iteration: every centre moves to the mean of its points (an empty one stays)."""
    onehot = jax.nn.one_hot(assign(x, centres), centres.shape[0], dtype=x.dtype)
    counts = onehot.sum(0)
    sums = jnp.einsum("nk,nd->kd", onehot, x, precision=HIGHEST)
    return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], centres)


def _plus_plus_init(x: jax.Array, k: int, key: jax.Array) -> jax.Array:
    """k-means++ seeding: each new centre drawn ∝ squared distance to the nearest chosen one."""
    first, rest = jax.random.split(key)
    centres = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(x[jax.random.randint(first, (), 0, x.shape[0])])
    nearest = jnp.sum((x - centres[0]) ** 2, -1)

    def add(i, carry):
        centres, nearest = carry
        p = nearest / jnp.maximum(nearest.sum(), 1e-30)
        pick = jax.random.choice(jax.random.fold_in(rest, i), x.shape[0], p=p)
        centres = centres.at[i].set(x[pick])
        return centres, jnp.minimum(nearest, jnp.sum((x - x[pick]) ** 2, -1))

    centres, _ = jax.lax.fori_loop(1, k, add, (centres, nearest))
    return centres


def inertia(x: jax.Array, centres: jax.Array) -> jax.Array:
    """Sum of squared distances of the points to their nearest centre."""
    return jnp.sum(jnp.min(squared_distances(x, centres), -1))


@partial(compilation.jit, static_argnames=("k", "n_init", "iterations"))
def kmeans(x: jax.Array, k: int, key: jax.Array, n_init: int = 10, iterations: int = 100) -> jax.Array:
    """k-means (k-means++ seeding + Lloyd), ``n_init`` seeded restarts run in parallel; the centres
    [k, d] of the restart with the lowest inertia (as sklearn's ``KMeans(n_init=...)``)."""
    x = x.astype(jnp.float32)

    def one(key):
        centres = _plus_plus_init(x, k, key)
        return jax.lax.fori_loop(0, iterations, lambda _, c: lloyd_step(x, c), centres)

    runs = jax.vmap(one)(jax.random.split(key, n_init))
    return runs[jnp.argmin(jax.vmap(partial(inertia, x))(runs))]


def block_matrix(n: int, blocks: int) -> np.ndarray:
    """(blocks × n) 0/1 matrix: grid row i belongs to block ⌊i·blocks/n⌋ (equal blocks when n divides)."""
    owner = (np.arange(n) * blocks) // n
    return (owner[None, :] == np.arange(blocks)[:, None]).astype(np.float32)


def block_histograms(words: jax.Array, k: int, blocks: int) -> jax.Array:
    """Word indices [B, h, w] → per-block normalised histograms [B, blocks², k] (rows sum to 1)."""
    onehot = jax.nn.one_hot(words, k, dtype=jnp.float32)
    rows = jnp.asarray(block_matrix(words.shape[1], blocks))
    cols = jnp.asarray(block_matrix(words.shape[2], blocks))
    counts = jnp.einsum("sh,bhwc,tw->bstc", rows, onehot, cols, precision=HIGHEST)
    counts = counts.reshape(words.shape[0], blocks * blocks, k)
    return counts / jnp.sum(counts, -1, keepdims=True)


def histograms(features: jax.Array, centres: jax.Array, blocks: int) -> jax.Array:
    """Raw stride-4 features [B, h, w, d] → block word histograms [B, blocks², k]."""
    return block_histograms(assign(features.astype(jnp.float32), centres), centres.shape[0], blocks)


def robust_kl(query: jax.Array, refs: jax.Array, drop: int, eps: float = 1e-8) -> jax.Array:
    """Block-wise KL(query ‖ ref) with the ``drop`` largest blocks left out.

    query [B, S², k], refs [N, S², k] → [B, N]: Σ over the S² − drop smallest block divergences."""
    p = query[:, None] + eps
    q = refs[None] + eps
    per_block = jnp.sum(p * (jnp.log(p) - jnp.log(q)), -1)  # [B, N, S²]
    kept = per_block.shape[-1] - drop
    return jnp.sum(jnp.sort(per_block, axis=-1)[..., :kept], -1)


def top_k(distances: jax.Array, k: int, exclude: jax.Array | None = None) -> jax.Array:
    """Indices [B, k] of the k smallest distances [B, N], nearest first; ``exclude`` [B, N] (bool)
    marks candidates that may not be returned (e.g. the query itself)."""
    if exclude is not None:
        distances = jnp.where(exclude, jnp.inf, distances)
    return jax.lax.top_k(-distances, k)[1]


def same_image(query_fp: jax.Array, ref_fp: jax.Array, rtol: float = 1e-4) -> jax.Array:
    """Whether query [B, d] and reference [N, d] fingerprints (mean raw features) are the same image:
    equal up to float noise of a different batch composition → bool [B, N]."""
    diff = jnp.linalg.norm(query_fp[:, None] - ref_fp[None], axis=-1)
    return diff <= rtol * (jnp.linalg.norm(ref_fp, axis=-1)[None] + 1e-12)
